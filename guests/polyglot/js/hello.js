// The SDK's hello in JavaScript, as a wasi:cli/command component (componentize-js).
// Reads {"name": "..."} from stdin (the request body) and writes {"greeting": "Hello, ...!"} on
// stdout (the response). A body without a name is an error: the message on stderr and a failed
// exit, which Kiln reports as function_failed. Build: guests/polyglot/build.sh.
import { getStdin } from 'wasi:cli/stdin@0.2.12';
import { getStdout } from 'wasi:cli/stdout@0.2.12';
import { getStderr } from 'wasi:cli/stderr@0.2.12';
import { exit } from 'wasi:cli/exit@0.2.12';

function readAll(stream) {
  const chunks = [];
  let total = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (e) {
      break; // closed: the end of the body
    }
    chunks.push(chunk);
    total += chunk.length;
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

function write(stream, text) {
  const bytes = new TextEncoder().encode(text);
  // blockingWriteAndFlush takes at most 4096 bytes at a time.
  for (let at = 0; at < bytes.length; at += 4096) {
    stream.blockingWriteAndFlush(bytes.subarray(at, at + 4096));
  }
}

export const run = {
  run() {
    let name;
    try {
      name = JSON.parse(readAll(getStdin()) || 'null').name;
    } catch (e) {
      name = undefined;
    }
    if (typeof name !== 'string' || name === '') {
      write(getStderr(), 'hello: send {"name": "..."}\n');
      exit({ tag: 'err' });
      return;
    }
    write(getStdout(), JSON.stringify({ greeting: `Hello, ${name}!` }));
  },
};
