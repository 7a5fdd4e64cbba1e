// Metrics: per function, the last hour from the series Kiln keeps itself (GET /v1/metrics):
// invocations per second, error rate, p50 and p99, and a bar per minute.

import { json } from './api.js';
import { h, ms, percent, problem, show } from './dom.js';

const REFRESH_MS = 10_000;

export async function page(main) {
  const body = h('div', {}, h('p', {}, 'Loading…'));
  show(main, h('h1', {}, 'Metrics'), h('p', { class: 'hint' }, 'The last hour, by minute, kept in memory by the server since it started. Refreshed every 10 s.'), body);
  const load = async () => {
    try {
      const { functions } = await json('/v1/metrics');
      if (functions.length === 0) {
        show(body, h('p', { class: 'empty' }, 'No invocation since the server started.'));
        return;
      }
      show(body, functions.map(card));
    } catch (error) {
      show(body, problem(error));
    }
  };
  await load();
  const timer = setInterval(load, REFRESH_MS);
  return () => clearInterval(timer);
}

function card(f) {
  const id = `metrics-${f.function}`;
  return h('section', { class: 'card metrics', 'aria-labelledby': id },
    h('h2', { id }, h('a', { href: `#/functions/${f.function}` }, f.function)),
    h('dl', { class: 'stats' },
      stat('Invocations/s', f.rate_per_s.toFixed(f.rate_per_s < 1 ? 3 : 1)),
      stat('Invocations', f.hour.invocations.toLocaleString()),
      stat('Error rate', percent(f.hour.error_rate)),
      stat('p50', ms(f.hour.p50_ms)),
      stat('p99', ms(f.hour.p99_ms)),
      stat('Rejected', f.hour.rejected.toLocaleString())),
    chart(`Invocations per minute of ${f.function}`, f.minutes, (m) => m.invocations, (m) => m.errors, (v) => `${v}`),
    chart(`p99 duration per minute of ${f.function}, ms`, f.minutes, (m) => m.p99_ms ?? 0, () => 0, (v) => ms(v)));
}

function stat(label, value) {
  return h('div', {}, h('dt', {}, label), h('dd', {}, value));
}

/** A bar per minute (oldest left); the error part of a bar in the error colour. */
function chart(title, minutes, value, errors, label) {
  const width = 600;
  const height = 80;
  const top = Math.max(1, ...minutes.map(value));
  const step = width / minutes.length;
  const bars = minutes.map((m, i) => {
    const v = value(m);
    const e = Math.min(errors(m), v);
    const barHeight = (v / top) * (height - 4);
    const errorHeight = (e / top) * (height - 4);
    const x = (i * step).toFixed(1);
    const tip = `${new Date(m.start).toLocaleTimeString()}: ${label(v)}${e ? `, ${e} errors` : ''}`;
    return h('g', {},
      h('title', {}, tip),
      h('rect', { x, y: (height - barHeight).toFixed(1), width: (step - 1).toFixed(1), height: barHeight.toFixed(1), class: 'bar' }),
      e ? h('rect', { x, y: (height - errorHeight).toFixed(1), width: (step - 1).toFixed(1), height: errorHeight.toFixed(1), class: 'bar error' }) : null);
  });
  return h('figure', {},
    h('svg', { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': `${title}; highest ${label(top)}`, class: 'chart' },
      h('line', { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: 'axis' }), bars),
    h('figcaption', {}, `${title} — 60 minutes, the current one at the right; highest ${label(top)}`));
}
