// Functions: the list, one function (its versions, config and an invoke form), and deploy by
// file drop.

import { failure, json, request, session } from './api.js';
import { badge, duration, h, problem, shortDigest, show, table, when } from './dom.js';

export async function list(main) {
  show(main, h('h1', {}, 'Functions'), h('p', {}, 'Loading…'));
  const actions = h('p', { class: 'actions' }, h('a', { class: 'button', href: '#/deploy' }, 'Deploy a function'));
  try {
    const { functions } = await json('/v1/functions');
    show(main, h('h1', {}, 'Functions'), actions,
      table('Deployed functions, latest version of each', [
        ['Name', (f) => h('a', { href: `#/functions/${f.name}` }, f.name)],
        ['Version', (f) => f.version],
        ['Kind', (f) => f.kind],
        ['Tier', (f) => f.tier],
        ['Runtime', (f) => (f.runtime ? `${f.runtime.language} (${f.runtime.interpreter} ${f.runtime.version})` : '—')],
        ['Digest', (f) => shortDigest(f.digest)],
        ['Deployed', (f) => when(f.created_at)],
      ], functions, 'No function yet: deploy one.'));
  } catch (error) {
    // A function-scoped token may not list functions, but may open (and invoke) its own by name.
    show(main, h('h1', {}, 'Functions'), problem(error), error.status === 403 ? openByName() : null);
  }
}

function openByName() {
  const input = h('input', { id: 'open-name', name: 'name', pattern: '[a-z0-9][a-z0-9_\\-]{0,63}', required: true });
  return h('form', { class: 'card', onsubmit: (event) => {
    event.preventDefault();
    location.hash = `#/functions/${input.value}`;
  } }, h('label', { for: 'open-name' }, 'Open a function this token may invoke'), input,
  h('button', { type: 'submit' }, 'Open'));
}

export async function detail(main, name) {
  const about = h('section', { 'aria-labelledby': 'about-heading' }, h('h2', { id: 'about-heading' }, 'Versions'), h('p', {}, 'Loading…'));
  show(main, h('h1', {}, name), invokePanel(name), about);
  try {
    const record = await json(`/v1/functions/${name}`);
    const versions = [...record.versions].reverse();
    show(about,
      h('h2', { id: 'about-heading' }, 'Versions'),
      h('dl', { class: 'facts' },
        fact('Latest', record.handle), fact('Kind', record.kind), fact('Tier', record.tier),
        fact('Runtime', record.runtime ? `${record.runtime.language} · ${record.runtime.interpreter} ${record.runtime.version}` : 'none (a Wasm artifact)'),
        fact('Digest', h('code', {}, record.digest)),
        record.snapshot_digest ? fact('Snapshot', h('code', {}, record.snapshot_digest)) : null),
      h('h3', {}, 'Config'),
      h('pre', { class: 'code', id: 'function-config' }, JSON.stringify(record.config, null, 2)),
      table(`Versions of ${name}, newest first`, [
        ['Version', (v) => v.handle],
        ['Digest', (v) => shortDigest(v.digest)],
        ['Deployed', (v) => when(v.created_at)],
      ], versions),
      h('p', { class: 'actions' },
        h('a', { href: `#/invocations?function=${name}` }, 'Invocations'), ' · ',
        h('button', { type: 'button', class: 'danger', onclick: () => remove(name) }, `Delete ${name}`)));
  } catch (error) {
    show(about, h('h2', { id: 'about-heading' }, 'Versions'), problem(error));
  }
}

function fact(term, value) {
  return [h('dt', {}, term), h('dd', {}, value)];
}

async function remove(name) {
  if (!confirm(`Delete ${name} and all its versions?`)) return;
  try {
    await request(`/v1/functions/${name}`, { method: 'DELETE' });
    location.hash = '#/functions';
  } catch (error) {
    alert(error.message);
  }
}

/** The invoke form: a JSON editor, then the answer's status, duration, output and log. */
function invokePanel(name) {
  const input = h('textarea', { id: 'invoke-input', name: 'input', rows: 6, spellcheck: false, class: 'code' });
  input.value = '{"hello": "world"}';
  const version = h('input', { id: 'invoke-version', name: 'version', type: 'number', min: 1, placeholder: 'latest' });
  const validity = h('p', { class: 'hint', id: 'invoke-validity', 'aria-live': 'polite' });
  const result = h('div', { id: 'invoke-result', 'aria-live': 'polite' });
  const checkJson = () => {
    try {
      if (input.value.trim()) JSON.parse(input.value);
      validity.textContent = '';
    } catch (error) {
      validity.textContent = `Not JSON (${error.message}); it is sent as it is.`;
    }
  };
  input.addEventListener('input', checkJson);
  const run = async (asynchronous) => {
    const query = version.value ? `?version=${version.value}` : '';
    const path = `/v1/functions/${name}/${asynchronous ? 'invoke-async' : 'invoke'}${query}`;
    show(result, h('p', {}, 'Running…'));
    const started = performance.now();
    const response = await fetch(path, {
      method: 'POST',
      body: input.value,
      headers: { Authorization: `Bearer ${session.token()}`, 'Content-Type': 'application/json' },
    });
    const elapsed = performance.now() - started;
    // A function's failure is an answer to show; Kiln refusing the request is not.
    if (!asynchronous && [400, 401, 403, 404, 413, 429].includes(response.status) || (asynchronous && !response.ok)) {
      show(result, problem(await failure(response)));
      return;
    }
    const text = await response.text();
    if (asynchronous && response.status === 202) {
      const { id } = JSON.parse(text);
      show(result, h('p', {}, 'Queued as ', h('a', { href: `#/invocations/${id}` }, id), '.'));
      return;
    }
    const id = response.headers.get('x-kiln-invocation-id');
    const us = response.headers.get('x-kiln-duration-us');
    const log = h('pre', { class: 'code log', id: 'invoke-log' }, id ? 'Loading the log…' : '—');
    show(result,
      h('dl', { class: 'facts' },
        fact('Status', h('span', { id: 'invoke-status' }, badge(response.ok ? 'succeeded' : 'failed'), ` ${response.status}`)),
        fact('Duration', h('span', { id: 'invoke-duration' }, us ? duration(Number(us)) : `${elapsed.toFixed(1)} ms (round trip)`)),
        fact('Version', response.headers.get('x-kiln-version') ?? '—'),
        fact('Invocation', id ? h('a', { href: `#/invocations/${id}` }, id) : '—')),
      h('h3', {}, 'Output'), h('pre', { class: 'code', id: 'invoke-output' }, pretty(text)),
      h('h3', {}, 'Log'), log);
    if (id) showLog(log, id);
  };
  return h('section', { class: 'card', 'aria-labelledby': 'invoke-heading' },
    h('h2', { id: 'invoke-heading' }, 'Invoke'),
    h('label', { for: 'invoke-input' }, 'Input (JSON)'), input, validity,
    h('div', { class: 'row' },
      h('label', { for: 'invoke-version' }, 'Version'), version,
      h('button', { type: 'button', id: 'invoke', onclick: () => run(false) }, 'Invoke'),
      h('button', { type: 'button', class: 'quiet', onclick: () => run(true) }, 'Invoke asynchronously')),
    result);
}

/** JSON indented when it is JSON; anything else as it came. */
export function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** Fills `element` with an invocation's log (the guest's stderr), or says why there is none. */
export async function showLog(element, id) {
  try {
    const response = await request(`/v1/invocations/${id}/logs`);
    const text = await response.text();
    element.textContent = text || '(empty)';
  } catch (error) {
    element.textContent = error.status === 404 ? 'No log kept: the invocation wrote nothing to stderr.' : error.message;
  }
}

export function deploy(main) {
  const name = h('input', { id: 'deploy-name', name: 'name', required: true, pattern: '[a-z0-9][a-z0-9_\\-]{0,63}', autocomplete: 'off' });
  // Not `required`: a dropped file never reaches the input, and the submit checks for one.
  const file = h('input', { id: 'deploy-file', name: 'code', type: 'file' });
  const chosen = h('span', { id: 'deploy-chosen' }, 'No file yet.');
  let code = null;
  const take = (dropped) => {
    code = dropped;
    chosen.textContent = `${dropped.name} (${dropped.size.toLocaleString()} bytes)`;
    if (!name.value) name.value = dropped.name.replace(/\.[^.]*$/, '').toLowerCase().replace(/[^a-z0-9_-]/g, '-').slice(0, 64);
  };
  file.addEventListener('change', () => file.files[0] && take(file.files[0]));
  const zone = h('div', { class: 'drop', id: 'drop' },
    h('p', {}, 'Drop a Wasm module or component (.wasm, .wat), a source file (.rb, .py, .js) or an archive here, or '),
    h('label', { for: 'deploy-file', class: 'button quiet' }, 'choose a file'), file, h('p', {}, chosen));
  zone.addEventListener('dragover', (event) => {
    event.preventDefault();
    zone.classList.add('over');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    zone.classList.remove('over');
    if (event.dataTransfer.files[0]) take(event.dataTransfer.files[0]);
  });
  const field = (id, label, control, hint) => h('div', { class: 'field' }, h('label', { for: id }, label), control, hint ? h('p', { class: 'hint' }, hint) : null);
  const tier = h('select', { id: 'cfg-tier', name: 'tier' }, h('option', { value: 'wasm' }, 'wasm'), h('option', { value: 'microvm' }, 'microvm'));
  const runtime = h('select', { id: 'cfg-runtime', name: 'runtime' },
    h('option', { value: '' }, 'by the file (Wasm, or source by its extension)'),
    ['ruby', 'python', 'javascript'].map((l) => h('option', { value: l }, l)));
  const number = (id, placeholder) => h('input', { id, name: id, type: 'number', min: 1, placeholder });
  const timeout = number('cfg-timeout', '10000');
  const memory = number('cfg-memory', '128');
  const concurrency = number('cfg-concurrency', '64');
  const env = h('textarea', { id: 'cfg-env', name: 'env', rows: 3, class: 'code', placeholder: 'KEY=value' });
  const hosts = h('textarea', { id: 'cfg-hosts', name: 'allowed_hosts', rows: 2, class: 'code', placeholder: 'https://api.example.com' });
  const isPublic = h('input', { id: 'cfg-public', name: 'public', type: 'checkbox' });
  const outcome = h('div', { id: 'deploy-result', 'aria-live': 'polite' });

  const config = () => {
    const value = { tier: tier.value };
    if (runtime.value) value.runtime = runtime.value;
    if (timeout.value) value.timeout_ms = Number(timeout.value);
    if (memory.value) value.memory_mb = Number(memory.value);
    if (concurrency.value) value.max_concurrency = Number(concurrency.value);
    const vars = env.value.split('\n').map((l) => l.trim()).filter(Boolean);
    if (vars.length) value.env = Object.fromEntries(vars.map((l) => [l.split('=')[0], l.split('=').slice(1).join('=')]));
    const allowed = hosts.value.split('\n').map((l) => l.trim()).filter(Boolean);
    if (allowed.length) value.allowed_hosts = allowed;
    if (isPublic.checked) value.public = true;
    return value;
  };
  const form = h('form', { class: 'card', onsubmit: async (event) => {
    event.preventDefault();
    if (!code) {
      show(outcome, h('p', { class: 'problem', role: 'alert' }, 'Drop or choose a file first.'));
      return;
    }
    const body = new FormData();
    body.append('code', code, code.name);
    body.append('config', JSON.stringify(config()));
    show(outcome, h('p', {}, 'Deploying… (validate, store, compile)'));
    try {
      const response = await request(`/v1/functions/${name.value}`, { method: 'PUT', body });
      const version = await response.json();
      show(outcome, h('p', { class: 'done' }, response.status === 201 ? 'Deployed ' : 'Unchanged: ',
        h('a', { href: `#/functions/${version.name}` }, version.handle), ` (${version.kind}, ${version.tier}).`));
    } catch (error) {
      show(outcome, problem(error));
    }
  } },
  zone,
  field('deploy-name', 'Name', name, 'Lowercase letters, digits, - and _; up to 64.'),
  h('fieldset', {}, h('legend', {}, 'Config (every field optional)'),
    h('div', { class: 'grid' },
      field('cfg-tier', 'Tier', tier), field('cfg-runtime', 'Language runtime', runtime),
      field('cfg-timeout', 'Timeout (ms)', timeout), field('cfg-memory', 'Memory (MB)', memory),
      field('cfg-concurrency', 'Max concurrency', concurrency),
      h('div', { class: 'field check' }, isPublic, h('label', { for: 'cfg-public' }, 'Public HTTP trigger (no token)'))),
    field('cfg-env', 'Environment, one KEY=value a line', env),
    field('cfg-hosts', 'Allowed outbound hosts, one a line', hosts)),
  h('button', { type: 'submit', id: 'deploy' }, 'Deploy'),
  outcome);
  show(main, h('h1', {}, 'Deploy a function'), form);
}
