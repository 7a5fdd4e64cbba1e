// The console's shell: sign-in, navigation, and the hash router that renders one page at a time.

import { session } from './api.js';
import { h, show } from './dom.js';
import * as functions from './functions.js';
import * as invocations from './invocations.js';
import * as metrics from './metrics.js';
import * as tokens from './tokens.js';
import * as sandboxes from './sandboxes.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signOut = document.getElementById('sign-out');

// `/ui/#token=…` (what `kiln ui` prints) signs in at once; the token then leaves the address bar
// and the history, so it is not bookmarked or shared by accident.
function takeTokenFromAddress() {
  const match = location.hash.match(/^#token=([^&]+)/);
  if (!match) return;
  session.signIn(decodeURIComponent(match[1]));
  history.replaceState(null, '', location.pathname + '#/functions');
}

// Each route: a pattern on the hash and the page that renders it.
const routes = [
  [/^#\/functions\/?$/, () => functions.list(main)],
  [/^#\/deploy$/, () => functions.deploy(main)],
  [/^#\/functions\/([a-z0-9][a-z0-9_-]*)$/, (name) => functions.detail(main, name)],
  [/^#\/invocations\/([0-9a-f-]+)$/, (id) => invocations.detail(main, id)],
  [/^#\/invocations\/?$/, () => invocations.list(main)],
  [/^#\/metrics\/?$/, () => metrics.page(main)],
  [/^#\/tokens\/?$/, () => tokens.page(main)],
  [/^#\/sandboxes\/?$/, () => sandboxes.page(main)],
];

let leave = null;

async function render() {
  takeTokenFromAddress();
  if (typeof leave === 'function') leave();
  leave = null;
  const signedIn = Boolean(session.token());
  nav.hidden = !signedIn;
  signOut.hidden = !signedIn;
  if (!signedIn) return signInForm();
  const hash = location.hash.split('?')[0] || '#/functions';
  for (const link of nav.querySelectorAll('a')) {
    const current = hash.startsWith(link.getAttribute('href'));
    if (current) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  for (const [pattern, page] of routes) {
    const match = hash.match(pattern);
    if (match) {
      leave = await page(...match.slice(1));
      return;
    }
  }
  show(main, h('h1', {}, 'Not found'), h('p', {}, 'No such page. ', h('a', { href: '#/functions' }, 'Functions')));
}

function signInForm(reason) {
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', required: true });
  const form = h('form', { class: 'card sign-in', onsubmit: (event) => {
    event.preventDefault();
    session.signIn(input.value.trim());
    // Changing the hash renders through `hashchange`; otherwise render the page asked for.
    if (!location.hash.startsWith('#/')) location.hash = '#/functions';
    else render();
  } },
  h('h1', {}, 'Sign in to Kiln'),
  reason ? h('p', { class: 'problem', role: 'alert' }, reason) : null,
  h('p', {}, 'Paste a token: the admin token (', h('code', {}, 'kiln ui'), ' prints a link that signs in with it) or a function-scoped one.'),
  h('label', { for: 'token' }, 'Token'),
  input,
  h('button', { type: 'submit' }, 'Sign in'));
  show(main, form);
  input.focus();
}

window.addEventListener('kiln:unauthorized', (event) => {
  session.signOut();
  nav.hidden = true;
  signOut.hidden = true;
  // After the page that made the request has shown its own error, which this replaces.
  setTimeout(() => signInForm(`Kiln refused the token: ${event.detail}`), 0);
});
signOut.addEventListener('click', () => {
  session.signOut();
  render();
});
window.addEventListener('hashchange', render);
render();
