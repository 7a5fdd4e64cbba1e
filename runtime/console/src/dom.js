// Small DOM helpers: the console builds its pages from elements (never from HTML strings, so
// nothing a function or a guest wrote can become markup).

/** An element: h('a', {href: '#/x'}, 'text', child, ...). `on*` attributes become listeners. */
export function h(tag, attributes = {}, ...children) {
  const svg = ['svg', 'rect', 'line', 'text', 'title', 'g', 'polyline'].includes(tag);
  const element = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'class') element.setAttribute('class', value);
    else if (name in element && !svg && typeof value !== 'string') element[name] = value;
    else element.setAttribute(name, value === true ? '' : value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces what `element` shows. */
export function show(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

/** A table with a caption (for screen readers too): columns are [heading, row => cell]. */
export function table(caption, columns, rows, empty = 'Nothing yet.') {
  if (rows.length === 0) return h('p', { class: 'empty' }, empty);
  return h('table', {},
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, columns.map(([heading]) => h('th', { scope: 'col' }, heading)))),
    h('tbody', {}, rows.map((row) => h('tr', {}, columns.map(([, cell]) => h('td', {}, cell(row)))))));
}

/** What went wrong, said for a person: a refused scope is not a crash. */
export function problem(error) {
  const status = error.status;
  let title = 'Something went wrong';
  if (status === 403) title = 'This token may not see this';
  else if (status === 404) title = 'Not found';
  else if (status >= 500) title = 'Kiln could not do it';
  else if (status >= 400) title = 'Refused';
  return h('div', { class: 'problem', role: 'alert' },
    h('strong', {}, title), status ? ` (${status} ${error.code})` : '', h('p', {}, error.message));
}

export function when(rfc3339) {
  if (!rfc3339) return '—';
  const date = new Date(rfc3339);
  return h('time', { datetime: rfc3339, title: rfc3339 }, date.toLocaleString());
}

export function duration(us) {
  if (us === null || us === undefined) return '—';
  if (us < 1000) return `${us} µs`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(us < 10_000 ? 2 : 1)} ms`;
  return `${(us / 1_000_000).toFixed(2)} s`;
}

export function ms(value) {
  return value === undefined || value === null ? '—' : `${value < 10 ? value.toFixed(2) : value.toFixed(1)} ms`;
}

export function percent(ratio) {
  return ratio === undefined || ratio === null ? '—' : `${(ratio * 100).toFixed(ratio < 0.1 ? 2 : 1)} %`;
}

/** A state as a badge, so it reads at a glance and is still text. */
export function badge(state) {
  return h('span', { class: `badge ${state}` }, state);
}

export function shortDigest(digest) {
  return h('code', { title: digest }, digest.replace(/^sha256:/, '').slice(0, 12));
}

/** The query of the current hash route (#/page?x=1). */
export function hashQuery() {
  const query = location.hash.split('?')[1] ?? '';
  return new URLSearchParams(query);
}
