// Invocations: the list (sync and async, filtered by function and state) and one invocation with
// its log and, for a succeeded asynchronous one, its result.

import { json } from './api.js';
import { badge, duration, h, hashQuery, problem, show, table, when } from './dom.js';
import { pretty, showLog } from './functions.js';

const STATES = ['queued', 'running', 'succeeded', 'failed'];

export async function list(main) {
  const query = hashQuery();
  const fn = h('input', { id: 'filter-function', name: 'function', value: query.get('function') ?? '', placeholder: 'any', pattern: '[a-z0-9][a-z0-9_\\-]{0,63}' });
  const state = h('select', { id: 'filter-state', name: 'state' }, h('option', { value: '' }, 'any'),
    STATES.map((s) => h('option', { value: s, selected: query.get('state') === s }, s)));
  const filters = h('form', { class: 'row filters', onsubmit: (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    if (fn.value) next.set('function', fn.value);
    if (state.value) next.set('state', state.value);
    location.hash = `#/invocations?${next}`;
  } }, h('label', { for: 'filter-function' }, 'Function'), fn, h('label', { for: 'filter-state' }, 'State'), state,
  h('button', { type: 'submit' }, 'Filter'));
  const results = h('div', {}, h('p', {}, 'Loading…'));
  show(main, h('h1', {}, 'Invocations'), filters, results);

  const rows = [];
  const more = async (before) => {
    const params = new URLSearchParams();
    for (const key of ['function', 'state']) if (query.get(key)) params.set(key, query.get(key));
    params.set('limit', '50');
    if (before) params.set('before', before);
    try {
      const page = await json(`/v1/invocations?${params}`);
      rows.push(...page.invocations);
      show(results,
        table('Invocations, newest first', [
          ['Started', (i) => when(i.created_at)],
          ['Invocation', (i) => h('a', { href: `#/invocations/${i.id}`, class: 'id' }, i.id)],
          ['Function', (i) => h('a', { href: `#/functions/${i.function}` }, `${i.function}@${i.version}`)],
          ['Mode', (i) => i.mode],
          ['State', (i) => badge(i.state)],
          ['Duration', (i) => duration(i.duration_us)],
          ['Log', (i) => (i.logs_url ? h('a', { href: `#/invocations/${i.id}` }, 'log') : 'none')],
        ], rows, 'No invocation matches.'),
        page.next_before ? h('button', { type: 'button', class: 'quiet', onclick: () => more(page.next_before) }, 'Older') : null,
        h('p', { class: 'hint' }, 'Synchronous successes that wrote nothing to stderr are kept in memory only (the newest 10,000).'));
    } catch (error) {
      show(results, problem(error));
    }
  };
  await more(null);
}

// While an asynchronous invocation is queued or running, its page reloads itself.
let refresh = null;

export async function detail(main, id) {
  clearTimeout(refresh);
  const record = h('section', { 'aria-labelledby': 'record-heading' }, h('p', {}, 'Loading…'));
  const log = h('pre', { class: 'code log', id: 'invocation-log' }, 'Loading…');
  show(main, h('h1', {}, 'Invocation'), h('p', {}, h('code', {}, id)), record,
    h('section', { 'aria-labelledby': 'log-heading' }, h('h2', { id: 'log-heading' }, 'Log (the guest’s stderr)'), log));
  showLog(log, id);
  try {
    const invocation = await json(`/v1/invocations/${id}`);
    const output = h('pre', { class: 'code', id: 'invocation-result' }, '—');
    show(record, h('h2', { id: 'record-heading' }, 'Asynchronous invocation'),
      h('dl', { class: 'facts' },
        fact('Function', h('a', { href: `#/functions/${invocation.function}` }, `${invocation.function}@${invocation.version}`)),
        fact('State', badge(invocation.state)),
        fact('Attempts', invocation.attempts),
        fact('Submitted', when(invocation.created_at)),
        fact('Finished', when(invocation.finished_at)),
        fact('Duration', duration(invocation.duration_us)),
        fact('Result', invocation.result_url ? h('a', { href: invocation.result_url, id: 'result-link' }, 'signed link (no token needed until it expires)') : '—')),
      invocation.error ? h('pre', { class: 'code' }, JSON.stringify(invocation.error, null, 2)) : null,
      invocation.result_url ? [h('h3', {}, 'Output'), output] : null);
    if (invocation.result_url) {
      const response = await fetch(invocation.result_url);
      output.textContent = response.ok ? pretty(await response.text()) : `${response.status}`;
    }
    if (invocation.state === 'queued' || invocation.state === 'running') {
      refresh = setTimeout(() => detail(main, id), 1000);
    }
  } catch (error) {
    // Synchronous invocations have no record beyond their log (and the list's line).
    if (error.status === 404) show(record, h('h2', { id: 'record-heading' }, 'Synchronous invocation'),
      h('p', {}, 'Its output went to the caller; Kiln keeps its log, if it wrote one.'));
    else show(record, problem(error));
  }
  return () => clearTimeout(refresh);
}

function fact(term, value) {
  return [h('dt', {}, term), h('dd', {}, value)];
}
