// Sandboxes: long-lived instances — list by state, create one, suspend, resume, fork, terminate.

import { json, post, request } from './api.js';
import { badge, h, hashQuery, problem, show, table, when } from './dom.js';

const STATES = ['starting', 'running', 'suspending', 'suspended', 'resuming', 'terminated', 'failed'];

export async function page(main) {
  const query = hashQuery();
  const state = h('select', { id: 'sandbox-state', name: 'state' }, h('option', { value: '' }, 'any'),
    STATES.map((s) => h('option', { value: s, selected: query.get('state') === s }, s)));
  state.addEventListener('change', () => {
    location.hash = state.value ? `#/sandboxes?state=${state.value}` : '#/sandboxes';
  });
  const listing = h('div', {}, h('p', {}, 'Loading…'));
  const message = h('div', { 'aria-live': 'polite' });
  const fn = h('input', { id: 'sandbox-function', name: 'function', required: true, pattern: '[a-z0-9][a-z0-9_\\-]{0,63}' });
  const create = h('form', { class: 'row', onsubmit: async (event) => {
    event.preventDefault();
    try {
      const sandbox = await post('/v1/sandboxes', { function: fn.value });
      show(message, h('p', { class: 'done' }, `Created ${sandbox.id}.`));
      await load();
    } catch (error) {
      show(message, problem(error));
    }
  } }, h('label', { for: 'sandbox-function' }, 'New sandbox of function'), fn, h('button', { type: 'submit' }, 'Create'));

  const act = async (id, action) => {
    try {
      if (action === 'terminate') {
        if (!confirm(`Terminate ${id}? Its state is deleted.`)) return;
        await request(`/v1/sandboxes/${id}`, { method: 'DELETE' });
      } else {
        await post(`/v1/sandboxes/${id}/${action}`, action === 'fork' ? { count: 1 } : {});
      }
      show(message, h('p', { class: 'done' }, `${action}: done for ${id}.`));
    } catch (error) {
      show(message, problem(error));
    }
    await load();
  };
  const actions = (s) => {
    const live = !['terminated', 'failed'].includes(s.state);
    const button = (action, enabled) => h('button', { type: 'button', class: action === 'terminate' ? 'danger small' : 'quiet small', disabled: !enabled, onclick: () => act(s.id, action) }, action);
    return live ? [button('suspend', s.state === 'running'), button('resume', s.state === 'suspended'), button('fork', s.state === 'running' || s.state === 'suspended'), button('terminate', true)] : '—';
  };
  const load = async () => {
    const params = new URLSearchParams();
    if (query.get('state')) params.set('state', query.get('state'));
    try {
      const { sandboxes } = await json(`/v1/sandboxes?${params}`);
      show(listing, table('Sandboxes, oldest first', [
        ['Id', (s) => h('code', {}, s.id)],
        ['Function', (s) => `${s.function}@${s.version}`],
        ['Tier', (s) => s.tier],
        ['State', (s) => [badge(s.state), s.error ? h('span', { class: 'hint' }, ` ${s.error}`) : null]],
        ['Created', (s) => when(s.created_at)],
        ['Last active', (s) => when(s.last_active_at)],
        ['Ingress', (s) => (s.ingress_url ? h('code', {}, s.ingress_url) : '—')],
        ['Actions', actions],
      ], sandboxes, 'No sandbox.'));
    } catch (error) {
      show(listing, problem(error));
    }
  };
  show(main, h('h1', {}, 'Sandboxes'),
    h('div', { class: 'row' }, h('label', { for: 'sandbox-state' }, 'State'), state), create, message, listing);
  await load();
}
