// Tokens: scoped (invoke-only) tokens — create for named functions, list, revoke. Admin only.

import { json, post, request } from './api.js';
import { h, problem, show, table, when } from './dom.js';

export async function page(main) {
  const listing = h('div', {}, h('p', {}, 'Loading…'));
  const created = h('div', { id: 'token-created', 'aria-live': 'polite' });
  const functions = h('input', { id: 'token-functions', name: 'functions', required: true, placeholder: 'hello, other', autocomplete: 'off' });
  const ttl = h('input', { id: 'token-ttl', name: 'ttl_s', type: 'number', min: 1, placeholder: 'until revoked' });
  const form = h('form', { class: 'card', onsubmit: async (event) => {
    event.preventDefault();
    const names = functions.value.split(/[\s,]+/).filter(Boolean);
    try {
      const token = await post('/v1/tokens', ttl.value ? { functions: names, ttl_s: Number(ttl.value) } : { functions: names });
      show(created, h('div', { class: 'done' },
        h('p', {}, `Token ${token.id} may invoke ${token.functions.join(', ')}. Its secret is shown only now:`),
        h('pre', { class: 'code', id: 'token-secret' }, token.token)));
      await load();
    } catch (error) {
      show(created, problem(error));
    }
  } },
  h('h2', {}, 'New scoped token'),
  h('p', { class: 'hint' }, 'A scoped token may invoke the functions it names (sync and async), read their invocations, and reach their sandboxes; nothing else.'),
  h('div', { class: 'grid' },
    h('div', { class: 'field' }, h('label', { for: 'token-functions' }, 'Functions (comma-separated)'), functions),
    h('div', { class: 'field' }, h('label', { for: 'token-ttl' }, 'Lifetime (seconds)'), ttl)),
  h('button', { type: 'submit', id: 'create-token' }, 'Create'), created);

  const load = async () => {
    try {
      const { tokens } = await json('/v1/tokens');
      show(listing, table('Scoped tokens', [
        ['Id', (t) => h('code', {}, t.id)],
        ['Functions', (t) => t.functions.join(', ')],
        ['Created', (t) => when(t.created_at)],
        ['Expires', (t) => (t.expires_at ? when(t.expires_at) : 'when revoked')],
        ['', (t) => h('button', { type: 'button', class: 'danger', 'data-token': t.id, onclick: () => revoke(t.id) }, `Revoke ${t.id}`)],
      ], tokens, 'No scoped token.'));
    } catch (error) {
      show(listing, problem(error));
    }
  };
  const revoke = async (id) => {
    if (!confirm(`Revoke token ${id}? Requests with it fail from now on.`)) return;
    try {
      await request(`/v1/tokens/${id}`, { method: 'DELETE' });
      await load();
    } catch (error) {
      show(listing, problem(error));
    }
  };
  show(main, h('h1', {}, 'Tokens'), form, h('h2', {}, 'Scoped tokens'), listing);
  await load();
}
