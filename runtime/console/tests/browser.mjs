// The console in a real browser (Debian's Chromium driven by playwright-core), against a running
// Kiln: sign in, deploy a function by dropping its file, invoke it and see its output and log
// line, find it in the invocations list, read the metrics page, create a scoped token and see
// what it may and may not see, revoke it and see its requests fail; make a sandbox, see its ingress
// count, suspend, resume (the count carries on), fork and terminate it. axe-core checks every page
// (no serious or critical violation); the page must log no error (a CSP refusal would be one).
// Screenshots go to $KILN_SCREENSHOTS (and the README's three to $KILN_DOCS_SCREENSHOTS if set).
//
// Run by runtime/kiln/tests/all/console.rs, which starts Kiln and passes, in the environment:
// KILN_URL, KILN_TOKEN (admin), KILN_UI_LINK (what `kiln ui` printed), KILN_FUNCTION_FILE (guests/wat/logger.wat),
// KILN_SANDBOX_COMPONENT (guests/http-counter, built), KILN_CHROMIUM.

import { readFile, mkdir, copyFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env('KILN_URL');
const adminToken = env('KILN_TOKEN');
const uiLink = env('KILN_UI_LINK');
const functionFile = env('KILN_FUNCTION_FILE');
const sandboxComponent = env('KILN_SANDBOX_COMPONENT');
const shots = env('KILN_SCREENSHOTS');
const docs = process.env.KILN_DOCS_SCREENSHOTS;
const axeSource = await readFile(require.resolve('axe-core/axe.min.js'), 'utf8');

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function step(message) {
  console.log(`browser: ${message}`);
}

const browser = await chromium.launch({
  executablePath: process.env.KILN_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run'],
});
const problems = [];
const checkedPages = [];

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    // A 401/403/404 the console asked for and handled shows as a failed load: expected.
    if (message.type() === 'error' && !message.text().startsWith('Failed to load resource')) {
      problems.push(`console error: ${message.text()}`);
    }
  });
  page.on('dialog', (dialog) => dialog.accept());
  return page;
}

/** axe-core on the page as it is: no serious or critical violation. */
async function accessible(page, name) {
  await page.evaluate(axeSource);
  const results = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = results.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  checkedPages.push(name);
  check(bad.length === 0, `axe on ${name}: ${bad.map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`).join('; ')}`);
}

async function screenshot(page, name) {
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  if (docs && ['console-functions', 'console-invocation', 'console-metrics'].includes(name)) {
    await copyFile(file, path.join(docs, `${name}.png`));
  }
}

await mkdir(shots, { recursive: true });
let admin = null;
try {
  admin = await newPage();

  step('sign in through the link `kiln ui` prints');
  await admin.goto(uiLink);
  await admin.getByRole('heading', { name: 'Functions' }).waitFor();
  await admin.getByText('No function yet').waitFor();
  check(!admin.url().includes(adminToken), `the token stayed in the address: ${admin.url()}`);
  await accessible(admin, 'functions (empty)');

  step('deploy by dropping the file, with a config from the form');
  await admin.getByRole('link', { name: 'Deploy a function' }).click();
  await admin.getByRole('heading', { name: 'Deploy a function' }).waitFor();
  await accessible(admin, 'deploy');
  const bytes = [...(await readFile(functionFile))];
  const fileName = path.basename(functionFile);
  const transfer = await admin.evaluateHandle(([data, name]) => {
    const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(data)], name, { type: 'application/octet-stream' }));
    return dt;
  }, [bytes, fileName]);
  await admin.dispatchEvent('#drop', 'drop', { dataTransfer: transfer });
  await admin.locator('#deploy-chosen').getByText(fileName).waitFor();
  const name = await admin.locator('#deploy-name').inputValue();
  check(name === 'logger', `the name was not taken from the file: ${name}`);
  await admin.getByLabel('Timeout (ms)').fill('5000');
  await admin.getByLabel('Environment, one KEY=value a line').fill('GREETING=hello');
  await admin.getByRole('button', { name: 'Deploy', exact: true }).click();
  await admin.locator('#deploy-result').getByText('Deployed logger@1').waitFor();

  step('the function page: version, config, digest');
  await admin.locator('#deploy-result').getByRole('link', { name: 'logger@1' }).click();
  await admin.getByRole('heading', { name: 'logger', exact: true }).waitFor();
  await admin.getByRole('table', { name: 'Versions of logger, newest first' }).waitFor();
  const config = await admin.locator('#function-config').textContent();
  check(config.includes('"timeout_ms": 5000') && config.includes('"GREETING": "hello"'), `config not shown: ${config}`);

  step('invoke with a JSON input: output, status, duration, log line');
  await admin.getByLabel('Input (JSON)').fill('{"message": "hello from the browser"}');
  await admin.getByRole('button', { name: 'Invoke', exact: true }).click();
  await admin.locator('#invoke-output').getByText('hello from the browser').waitFor();
  const status = await admin.locator('#invoke-status').textContent();
  check(status.includes('200') && status.includes('succeeded'), `status: ${status}`);
  const took = await admin.locator('#invoke-duration').textContent();
  check(/\d.*(µs|ms|s)$/.test(took.trim()), `duration: ${took}`);
  await admin.locator('#invoke-log').getByText('logger: handling a request').waitFor();
  const invocationId = (await admin.locator('dd a[href^="#/invocations/"]').textContent()).trim();
  await accessible(admin, 'function');
  await screenshot(admin, 'console-invocation');

  // More traffic, through the API: successes, and a function that traps every time.
  const statuses = await admin.evaluate(async (token) => {
    const auth = { Authorization: `Bearer ${token}` };
    const seen = [];
    for (let i = 0; i < 24; i += 1) {
      seen.push((await fetch('/v1/functions/logger/invoke', { method: 'POST', body: `{"n": ${i}}`, headers: auth })).status);
    }
    const trap = '(module (func (export "_start") unreachable))';
    seen.push((await fetch('/v1/functions/crash', { method: 'PUT', body: trap, headers: { ...auth, 'Content-Type': 'application/wasm' } })).status);
    for (let i = 0; i < 3; i += 1) {
      seen.push((await fetch('/v1/functions/crash/invoke', { method: 'POST', headers: auth })).status);
    }
    return seen;
  }, adminToken);
  check(statuses.join() === [...Array(24).fill(200), 201, 502, 502, 502].join(), `statuses: ${statuses}`);

  step('the functions list');
  await admin.getByRole('link', { name: 'Functions', exact: true }).click();
  await admin.getByRole('table', { name: 'Deployed functions, latest version of each' }).getByRole('link', { name: 'logger' }).waitFor();
  await accessible(admin, 'functions');
  await screenshot(admin, 'console-functions');

  step('the invocation in the list, then its page with its log');
  await admin.getByRole('link', { name: 'Invocations', exact: true }).click();
  const row = admin.getByRole('row').filter({ hasText: invocationId });
  await row.waitFor();
  check((await row.textContent()).includes('sync'), 'the invocation is not shown as sync');
  await admin.getByLabel('State').selectOption('failed');
  await admin.getByRole('button', { name: 'Filter' }).click();
  await admin.getByRole('row').filter({ hasText: 'crash@1' }).first().waitFor();
  check(await row.count() === 0, 'a succeeded invocation is listed as failed');
  await admin.getByLabel('Function').fill('logger');
  await admin.getByRole('button', { name: 'Filter' }).click();
  await admin.getByText('No invocation matches.').waitFor();
  await admin.getByLabel('Function').fill('');
  await admin.getByLabel('State').selectOption('succeeded');
  await admin.getByRole('button', { name: 'Filter' }).click();
  await row.waitFor();
  await accessible(admin, 'invocations');
  await screenshot(admin, 'invocations');
  await row.getByRole('link', { name: invocationId }).click();
  await admin.locator('#invocation-log').getByText('logger: handling a request').waitFor();
  await admin.getByRole('heading', { name: 'Synchronous invocation' }).waitFor();
  await accessible(admin, 'invocation');
  await screenshot(admin, 'invocation-page');

  step('an asynchronous invocation: its record, log and result link');
  await admin.goto(`${base}/ui/#/functions/logger`);
  await admin.getByLabel('Input (JSON)').fill('{"later": true}');
  await admin.getByRole('button', { name: 'Invoke asynchronously' }).click();
  await admin.locator('#invoke-result').getByRole('link').click();
  await admin.getByRole('heading', { name: 'Asynchronous invocation' }).waitFor();
  // Queued or running when the page loaded, it reloads itself until it has finished.
  await admin.locator('#result-link').waitFor();
  await admin.locator('#invocation-result').getByText('"later": true').waitFor();
  await admin.locator('#invocation-log').getByText('logger: handling a request').waitFor();

  step('the metrics page');
  await admin.getByRole('link', { name: 'Metrics', exact: true }).click();
  const card = admin.getByRole('region', { name: 'logger' });
  await card.waitFor();
  const stats = await card.locator('.stats').textContent();
  check(/Invocations26/.test(stats.replace(/\s/g, '')), `metrics: ${stats}`);
  check(/p50\d/.test(stats.replace(/\s/g, '')) && /Errorrate0\.00%/.test(stats.replace(/\s/g, '')), `metrics: ${stats}`);
  const crashStats = (await admin.getByRole('region', { name: 'crash' }).locator('.stats').textContent()).replace(/\s/g, '');
  check(crashStats.includes('Invocations3') && crashStats.includes('Errorrate100.0%'), `metrics of crash: ${crashStats}`);
  await accessible(admin, 'metrics');
  await screenshot(admin, 'console-metrics');

  step('a scoped token: created, signed in with, limited');
  await admin.getByRole('link', { name: 'Tokens', exact: true }).click();
  await admin.getByLabel('Functions (comma-separated)').fill('logger');
  await admin.getByRole('button', { name: 'Create' }).click();
  const secret = (await admin.locator('#token-secret').textContent()).trim();
  check(secret.length > 20, 'no secret shown');
  await accessible(admin, 'tokens');
  await screenshot(admin, 'tokens');

  const scoped = await newPage();
  await scoped.goto(`${base}/ui/`);
  await scoped.getByLabel('Token').fill(secret);
  await scoped.getByRole('button', { name: 'Sign in' }).click();
  await scoped.getByText('This token may not see this').waitFor();
  await accessible(scoped, 'functions (scoped token, refused)');
  await scoped.getByLabel('Open a function this token may invoke').fill('logger');
  await scoped.getByRole('button', { name: 'Open' }).click();
  await scoped.getByLabel('Input (JSON)').fill('{"scoped": true}');
  await scoped.getByRole('button', { name: 'Invoke', exact: true }).click();
  await scoped.locator('#invoke-output').getByText('"scoped": true').waitFor();
  await scoped.getByRole('link', { name: 'Invocations', exact: true }).click();
  await scoped.getByRole('row').filter({ hasText: invocationId }).waitFor();
  await scoped.getByRole('link', { name: 'Tokens', exact: true }).click();
  await scoped.getByText('This token may not see this').waitFor();
  await screenshot(scoped, 'scoped-token');

  step('revoke it: its requests fail');
  await admin.getByRole('button', { name: /^Revoke / }).click();
  await admin.getByText('No scoped token.').waitFor();
  await scoped.getByRole('link', { name: 'Invocations', exact: true }).click();
  await scoped.getByText('Kiln refused the token').waitFor();
  await scoped.getByRole('heading', { name: 'Sign in to Kiln' }).waitFor();
  const direct = await scoped.evaluate(async (token) => (await fetch('/v1/functions/logger/invoke', { method: 'POST', headers: { Authorization: `Bearer ${token}` } })).status, secret);
  check(direct === 401, `a revoked token's invoke answered ${direct}`);
  await accessible(scoped, 'sign-in');
  await screenshot(scoped, 'revoked');

  step('the sandboxes page: create, suspend, resume, fork, terminate');
  await admin.getByRole('link', { name: 'Sandboxes', exact: true }).click();
  await admin.getByText('No sandbox.').waitFor();
  await accessible(admin, 'sandboxes (empty)');
  const deployed = await fetch(`${base}/v1/functions/counter`, { method: 'PUT', headers: { Authorization: `Bearer ${adminToken}` }, body: await readFile(sandboxComponent) });
  check(deployed.status === 201, `deploying counter: ${deployed.status} ${await deployed.text()}`);
  await admin.getByLabel('New sandbox of function').fill('counter');
  await admin.getByRole('button', { name: 'Create' }).click();
  const created = admin.locator('[aria-live] .done', { hasText: /^Created sbx_/ });
  await created.waitFor();
  const sandboxId = (await created.textContent()).match(/sbx_[a-z0-9]+/)[0];
  const sandboxRow = (id) => admin.getByRole('row').filter({ hasText: id });
  const stateOf = async (id) => (await sandboxRow(id).locator('.badge').first().textContent()).trim();
  const waitState = async (id, state) => {
    await sandboxRow(id).locator('.badge', { hasText: state }).waitFor();
    check(await stateOf(id) === state, `sandbox ${id} is ${await stateOf(id)}, not ${state}`);
  };
  await waitState(sandboxId, 'running');
  // Its ingress answers, and counts: the state the page suspends and resumes.
  const ingress = (await sandboxRow(sandboxId).locator('code').nth(1).textContent()).trim();
  check(ingress === `/sbx/${sandboxId}/`, `ingress ${ingress}`);
  const count = async () => admin.evaluate(async ([url, token]) => (await (await fetch(url, { headers: { Authorization: `Bearer ${token}` } })).text()), [ingress, adminToken]);
  const first = await count();
  await sandboxRow(sandboxId).getByRole('button', { name: 'suspend' }).click();
  await waitState(sandboxId, 'suspended');
  check(await sandboxRow(sandboxId).getByRole('button', { name: 'suspend' }).isDisabled(), 'suspend is enabled on a suspended sandbox');
  await sandboxRow(sandboxId).getByRole('button', { name: 'resume' }).click();
  await waitState(sandboxId, 'running');
  const second = await count();
  check(first !== second && first.length > 0, `the counter did not carry on across suspend and resume: ${first} then ${second}`);
  await sandboxRow(sandboxId).getByRole('button', { name: 'fork' }).click();
  await admin.getByRole('row').filter({ hasText: 'counter@1' }).nth(1).waitFor();
  await accessible(admin, 'sandboxes');
  await screenshot(admin, 'sandboxes');
  await sandboxRow(sandboxId).getByRole('button', { name: 'terminate' }).click();
  await waitState(sandboxId, 'terminated');
  check((await sandboxRow(sandboxId).textContent()).includes('—'), 'a terminated sandbox still offers actions');

  check(problems.length === 0, problems.join('\n'));
  console.log(`browser: passed; axe checked ${checkedPages.length} pages: ${checkedPages.join(', ')}`);
} catch (error) {
  // What the page showed when it went wrong.
  if (admin) await admin.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
