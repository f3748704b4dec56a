// Small DOM and formatting helpers. Everything is built with createElement and
// textContent: no HTML strings, so no data from the API is ever parsed as markup.

/** h('a', {href, class, onclick}, child, ...): one element. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of el. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

/** Megabytes (as the API counts them, MiB) with a unit that fits. */
export function mb(v) {
  if (v === null || v === undefined) return '—';
  if (v >= 1024 * 1024) return `${nf.format(v / 1024 / 1024)} TiB`;
  if (v >= 1024) return `${nf.format(v / 1024)} GiB`;
  return `${nf.format(v)} MiB`;
}

/** CPU in millicores as cores. */
export function cpu(millis) {
  if (millis === null || millis === undefined) return '—';
  return `${nf.format(millis / 1000)} CPU`;
}

export function ms(v) {
  if (v === null || v === undefined) return '—';
  if (v < 1000) return `${Math.round(v)} ms`;
  if (v < 60000) return `${nf.format(v / 1000)} s`;
  if (v < 3600000) return `${nf.format(v / 60000)} min`;
  return `${nf.format(v / 3600000)} h`;
}

export function num(v) {
  return v === null || v === undefined ? '—' : nf.format(v);
}

const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

function relative(at) {
  const d = (at - Date.now()) / 1000;
  const a = Math.abs(d);
  if (a < 45) return rtf.format(Math.round(d), 'second');
  if (a < 2700) return rtf.format(Math.round(d / 60), 'minute');
  if (a < 64800) return rtf.format(Math.round(d / 3600), 'hour');
  return rtf.format(Math.round(d / 86400), 'day');
}

/** A <time> showing "3 minutes ago", the absolute time on hover. */
export function ago(atMs) {
  if (!atMs) return h('span', {}, '—');
  const d = new Date(atMs);
  return h('time', { datetime: d.toISOString(), title: d.toLocaleString(), dataset: { ms: String(atMs) } }, relative(atMs));
}

/** Keeps every relative time on the page current. */
export function tickTimes() {
  for (const t of document.querySelectorAll('time[data-ms]')) t.textContent = relative(Number(t.dataset.ms));
}

/** A state badge; the class colours it. */
export function badge(state, extra) {
  return h('span', { class: `badge s-${String(state).replace(/[^a-z_-]/gi, '')}` + (extra ? ' ' + extra : '') }, state);
}

/** Endpoint `host:port` as a link to it. */
export function endpointLink(ep) {
  return h('a', { href: `http://${ep}/`, target: '_blank', rel: 'noopener noreferrer', class: 'endpoint' }, ep);
}

/**
 * A labelled bar: capacity as the full width, reserved and measured use as segments.
 * parts: [{label, value, cls}]
 */
export function bar(label, capacity, parts, fmt) {
  const track = h('div', { class: 'bar', role: 'img' });
  const desc = [];
  for (const p of parts) {
    if (p.value === null || p.value === undefined) continue;
    const pct = capacity > 0 ? Math.max(0, Math.min(100, (p.value / capacity) * 100)) : 0;
    const seg = h('div', { class: `seg ${p.cls}` });
    seg.style.width = `${pct}%`;
    track.append(seg);
    desc.push(`${p.label} ${fmt(p.value)}`);
  }
  const text = `${label}: ${desc.join(', ')} of ${fmt(capacity)}`;
  track.setAttribute('aria-label', text);
  return h('div', { class: 'barrow' }, h('span', { class: 'barlabel' }, label), track, h('span', { class: 'bartext' }, desc.join(' · ') + ` / ${fmt(capacity)}`));
}

/** Asks to confirm in a modal <dialog>; resolves true or false. */
export function confirmDialog(question, action) {
  return new Promise((resolve) => {
    const yes = h('button', { type: 'submit', value: 'yes', class: 'danger', id: 'confirm-yes' }, action);
    const no = h('button', { type: 'submit', value: 'no', id: 'confirm-no' }, 'Cancel');
    const dlg = h('dialog', { class: 'confirm', 'aria-labelledby': 'confirm-q' }, h('form', { method: 'dialog' }, h('p', { id: 'confirm-q' }, question), h('div', { class: 'actions' }, no, yes)));
    dlg.addEventListener('close', () => {
      resolve(dlg.returnValue === 'yes');
      dlg.remove();
    });
    document.body.append(dlg);
    dlg.showModal();
    no.focus();
  });
}

/** A short-lived message at the top of the page. */
export function toast(text, kind = 'info') {
  const box = document.getElementById('toasts');
  if (!box) return;
  const t = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
  box.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}
