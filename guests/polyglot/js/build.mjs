// Builds hello.js into a wasi:cli/command component. Usage: node build.mjs OUT.wasm
import { readFile, writeFile } from 'node:fs/promises';
import { componentize } from '@bytecodealliance/componentize-js';

const here = new URL('.', import.meta.url).pathname;
const { component } = await componentize({
  sourcePath: `${here}hello.js`,
  witPath: `${here}../wit`,
  worldName: 'hello',
  // A plain command: no HTTP and no fetch-event handler, so the component exports only wasi:cli/run.
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(process.argv[2], component);
