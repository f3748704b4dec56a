// The views. Each is mount(main, params) → { update(what), unmount() }: it draws once,
// then redraws the parts that depend on `what` changed (from the event stream).

import { call, get, ApiError, Offline, setToken } from './api.js';
import { h, fill, mb, cpu, ms, num, ago, badge, endpointLink, bar, confirmDialog, toast } from './dom.js';
import { store, loadTasks, loadTask, loadNodes, loadHealth, loadCluster } from './store.js';

/** A clear message for a failed call, never a blank region. */
export function problem(e) {
  if (e instanceof ApiError) {
    if (e.status === 401) return `Not logged in (401): ${e.message}`;
    if (e.status === 403) return `Your token's role may not do this (403): ${e.message}`;
    return `${e.message} (${e.status} ${e.code}${e.field ? `, field ${e.field}` : ''})`;
  }
  if (e instanceof Offline) return `No answer: ${e.message}.`;
  return String(e && e.message ? e.message : e);
}

function errorBox(e) {
  return h('p', { class: 'error', role: 'alert' }, problem(e));
}

async function act(what, fn) {
  try {
    await fn();
    toast(what);
  } catch (e) {
    toast(problem(e), 'error');
  }
}

const mayAct = () => store.role !== 'reader';

/** A performance mark the first time a view shows real data (the bench reads them). */
function markOnce(name) {
  if (!performance.getEntriesByName(name, 'mark').length) performance.mark(name);
}

// ---------------------------------------------------------------- overview

export function overview(main) {
  const verdict = h('section', { 'aria-labelledby': 'h-verdict' });
  const control = h('section', { 'aria-labelledby': 'h-control' });
  const data = h('section', { 'aria-labelledby': 'h-data' });
  const deps = h('section', { 'aria-labelledby': 'h-deps' });
  fill(main, h('h1', {}, 'Overview'), verdict, h('div', { class: 'grid' }, control, data), deps);

  function reasons(hl) {
    const out = [];
    const cp = hl.control_plane || {};
    if (!cp.leader) out.push('No leader is known: writes are refused until one is elected.');
    if (cp.quorum === false) out.push('The leader has lost its quorum of managers.');
    if (cp.apply_lag > 100) out.push(`This manager is ${num(cp.apply_lag)} entries behind its log.`);
    for (const n of (hl.data_plane && hl.data_plane.nodes) || []) {
      if (n.engine_ok === false) out.push(`Node ${n.node}: its Docker engine does not answer (tasks are not declared dead).`);
      if (n.disk_pressure) out.push(`Node ${n.node}: disk nearly full.`);
      if (n.unknown_placements > 0) out.push(`Node ${n.node} is ${n.status}: ${num(n.unknown_placements)} placement(s) in unknown state, running under cached authority if alive.`);
    }
    const d = hl.dependencies || {};
    for (const b of d.breakers || []) if (b.state !== 'closed') out.push(`Breaker ${b.name} is ${b.state}${b.retry_in_ms ? `, retry in ${ms(b.retry_in_ms)}` : ''}.`);
    for (const b of d.bulkheads || []) if (b.limit && b.in_use >= b.limit) out.push(`Bulkhead ${b.name} is full (${b.in_use}/${b.limit}, ${b.waiting} waiting).`);
    return out;
  }

  function drawVerdict() {
    const hl = store.health;
    if (!hl) return fill(verdict, h('h2', { id: 'h-verdict' }, 'Health'), h('p', {}, 'Loading…'));
    const rs = reasons(hl);
    markOnce('holdfast:overview-ready');
    fill(
      verdict,
      h('h2', { id: 'h-verdict' }, 'Health ', h('span', { class: `verdict v-${hl.status}`, id: 'health-status' }, hl.status)),
      rs.length ? h('ul', { class: 'reasons' }, rs.map((r) => h('li', {}, r))) : h('p', {}, 'Nothing needs attention.'),
    );
  }

  function drawControl() {
    const hl = store.health;
    const c = store.cluster;
    const cp = (hl && hl.control_plane) || {};
    const leader = c && c.leader ? c.leader.id : cp.leader;
    fill(
      control,
      h('h2', { id: 'h-control' }, 'Control plane'),
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'Leader'), h('dd', {}, leader || 'none'),
        h('dt', {}, 'Term'), h('dd', {}, num(cp.term)),
        h('dt', {}, 'Quorum'), h('dd', {}, cp.quorum ? 'yes' : 'no', ` (${num(cp.voters)} voter${cp.voters === 1 ? '' : 's'})`),
        h('dt', {}, 'Commit index'), h('dd', {}, num(cp.commit_index)),
        h('dt', {}, 'Apply lag'), h('dd', {}, `${num(cp.apply_lag)} entries`),
        h('dt', {}, 'Last quorum ack'), h('dd', {}, cp.millis_since_quorum_ack === null || cp.millis_since_quorum_ack === undefined ? '—' : `${ms(cp.millis_since_quorum_ack)} ago`),
      ),
      c && c.members
        ? h(
            'table',
            {},
            h('caption', {}, 'Members'),
            h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Member'), h('th', { scope: 'col' }, 'Role'), h('th', { scope: 'col' }, 'API'), h('th', { scope: 'col' }, 'Last applied'), h('th', { scope: 'col' }, 'Version'))),
            h('tbody', {}, c.members.map((m) => h('tr', {}, h('td', {}, m.id, m.id === leader ? h('span', { class: 'badge s-leader' }, 'leader') : null), h('td', {}, m.role), h('td', {}, m.api), h('td', {}, num(m.last_applied)), h('td', {}, m.version || '—')))),
          )
        : null,
    );
  }

  function drawData() {
    const nodes = store.nodes || [];
    const byStatus = {};
    for (const n of nodes) byStatus[n.status] = (byStatus[n.status] || 0) + 1;
    const hn = (store.health && store.health.data_plane && store.health.data_plane.nodes) || [];
    const live = hn.reduce((a, n) => a + (n.live_placements || 0), 0);
    const unknown = hn.reduce((a, n) => a + (n.unknown_placements || 0), 0);
    fill(
      data,
      h('h2', { id: 'h-data' }, 'Data plane'),
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'Nodes'), h('dd', {}, nodes.length ? Object.entries(byStatus).map(([s, c]) => [badge(s), ` ${c} `]) : 'none registered'),
        h('dt', {}, 'Live placements'), h('dd', {}, num(live)),
        h('dt', {}, 'Unknown placements'), h('dd', { class: unknown ? 'warn' : '' }, num(unknown)),
        h('dt', {}, 'Judged by'), h('dd', {}, (store.health && store.health.data_plane && store.health.data_plane.judged_by) || '—'),
      ),
      h('p', {}, h('a', { href: '#/nodes' }, 'Nodes'), ' · ', h('a', { href: '#/tasks' }, 'Tasks')),
    );
  }

  function drawDeps() {
    const d = (store.health && store.health.dependencies) || { breakers: [], bulkheads: [] };
    fill(
      deps,
      h('h2', { id: 'h-deps' }, 'Dependencies'),
      h(
        'div',
        { class: 'grid' },
        h('table', {}, h('caption', {}, 'Circuit breakers'), h('thead', {}, h('tr', {}, ['Name', 'State', 'Failures', 'Rejected'].map((t) => h('th', { scope: 'col' }, t)))), h('tbody', {}, (d.breakers || []).map((b) => h('tr', {}, h('td', {}, b.name), h('td', {}, badge(b.state)), h('td', {}, num(b.consecutive_failures)), h('td', {}, num(b.rejected_total)))))),
        h('table', {}, h('caption', {}, 'Bulkheads'), h('thead', {}, h('tr', {}, ['Name', 'In use', 'Waiting', 'Rejected'].map((t) => h('th', { scope: 'col' }, t)))), h('tbody', {}, (d.bulkheads || []).map((b) => h('tr', {}, h('td', {}, b.name), h('td', {}, `${num(b.in_use)} / ${num(b.limit)}`), h('td', {}, num(b.waiting)), h('td', {}, num(b.rejected_total)))))),
      ),
    );
  }

  const draw = () => {
    drawVerdict();
    drawControl();
    drawData();
    drawDeps();
  };
  draw();
  const reload = () => Promise.all([loadHealth(), loadCluster(), loadNodes(false)]).catch((e) => fill(verdict, h('h2', { id: 'h-verdict' }, 'Health'), errorBox(e)));
  reload();
  return { update: (w) => (['health', 'cluster', 'nodes'].includes(w) ? draw() : null), refresh: reload, needsRefreshOn: () => true, poll: true };
}

// ---------------------------------------------------------------- nodes

function timeline(intervals, sinceMs) {
  const now = Date.now();
  const from = Math.min(sinceMs || now - 3600000, ...intervals.map((i) => i.from_ms));
  const span = Math.max(1, now - from);
  const track = h('div', { class: 'timeline', role: 'img' });
  for (const i of intervals) {
    const seg = h('div', { class: 'gap' + (i.to_ms ? '' : ' open'), title: `${new Date(i.from_ms).toLocaleString()} → ${i.to_ms ? new Date(i.to_ms).toLocaleString() : 'now'}` });
    seg.style.left = `${((i.from_ms - from) / span) * 100}%`;
    seg.style.width = `${Math.max(0.5, (((i.to_ms || now) - i.from_ms) / span) * 100)}%`;
    track.append(seg);
  }
  track.setAttribute('aria-label', intervals.length ? `${intervals.length} disconnected interval(s) since ${new Date(from).toLocaleString()}` : 'never disconnected');
  return h('div', {}, track, h('div', { class: 'timeaxis' }, h('span', {}, ago(from)), h('span', {}, 'now')));
}

export function nodes(main) {
  const list = h('div', { class: 'cards', id: 'node-list' });
  const status = h('p', {}, 'Loading…');
  fill(main, h('h1', {}, 'Nodes'), status, list);

  function card(n) {
    const d = store.nodeDetail.get(n.id) || {};
    const cap = n.capacity || {};
    const res = n.reserved || {};
    const free = n.free || {};
    const used = (total, f) => (f === null || f === undefined ? null : Math.max(0, total - f));
    const intervals = d.disconnected || [];
    const actions = h('div', { class: 'actions' });
    if (mayAct()) {
      actions.append(
        h('button', {
          type: 'button',
          class: 'drain',
          'data-key': `${n.id}:drain`,
          onclick: async () => {
            const enable = !n.draining;
            if (!(await confirmDialog(enable ? `Drain node ${n.id}? Its tasks move to other nodes.` : `Stop draining node ${n.id}?`, enable ? 'Drain' : 'Stop draining'))) return;
            await act(enable ? `Draining ${n.id}` : `${n.id} no longer draining`, () => call('POST', `/v1/nodes/${encodeURIComponent(n.id)}/drain`, { body: { enable } }));
            loadNodes().catch(() => {});
          },
        }, n.draining ? 'Stop draining' : 'Drain'),
        h('button', {
          type: 'button',
          class: 'eligibility',
          'data-key': `${n.id}:eligibility`,
          onclick: async () => {
            const eligible = !n.eligible;
            if (!(await confirmDialog(eligible ? `Let the scheduler place new tasks on ${n.id}?` : `Place no new tasks on ${n.id}? Running ones stay.`, eligible ? 'Make eligible' : 'Make ineligible'))) return;
            await act(`${n.id} is now ${eligible ? 'eligible' : 'ineligible'}`, () => call('POST', `/v1/nodes/${encodeURIComponent(n.id)}/eligibility`, { body: { eligible } }));
            loadNodes().catch(() => {});
          },
        }, n.eligible ? 'Make ineligible' : 'Make eligible'),
      );
    }
    return h(
      'article',
      { class: 'card node', id: `node-${n.id}`, 'data-status': n.status, 'data-draining': String(!!n.draining) },
      h('header', {}, h('h2', {}, n.id), badge(n.status), n.draining ? badge('draining') : null, n.eligible ? null : badge('ineligible'), n.engine_ok === false ? badge('engine-down') : n.engine_ok ? badge('engine-ok') : null),
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'Address'), h('dd', {}, n.address || '—'),
        h('dt', {}, 'Status since'), h('dd', {}, ago(n.status_since_ms)),
        h('dt', {}, 'Last seen'), h('dd', {}, n.last_seen_ms_ago === null || n.last_seen_ms_ago === undefined ? 'not by this manager' : `${ms(n.last_seen_ms_ago)} ago`),
        h('dt', {}, 'Placements'), h('dd', {}, num(n.placements)),
        h('dt', {}, 'Labels'), h('dd', {}, Object.keys(n.labels || {}).length ? Object.entries(n.labels).map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`)) : 'none'),
        n.drain_deadline_ms ? [h('dt', {}, 'Drain deadline'), h('dd', {}, ago(n.drain_deadline_ms))] : null,
      ),
      bar('CPU', cap.cpu_millis, [{ label: 'reserved', value: res.cpu_millis, cls: 'reserved' }], cpu),
      bar('Memory', cap.memory_mb, [{ label: 'reserved', value: res.memory_mb, cls: 'reserved' }, { label: 'in use (measured)', value: used(cap.memory_mb, free.memory_mb), cls: 'used' }], mb),
      bar('Disk', cap.disk_mb, [{ label: 'reserved', value: res.disk_mb, cls: 'reserved' }, { label: 'in use (measured)', value: used(cap.disk_mb, free.disk_mb), cls: 'used' }], mb),
      h('h3', {}, 'Disconnected'),
      timeline(intervals, n.registered_ms || (d.events && d.events[0] && d.events[0].at_ms)),
      intervals.length ? h('ul', { class: 'intervals' }, intervals.map((i) => h('li', {}, ago(i.from_ms), ' → ', i.to_ms ? ago(i.to_ms) : 'still disconnected', i.to_ms ? ` (${ms(i.to_ms - i.from_ms)})` : ''))) : null,
      actions,
    );
  }

  const draw = () => {
    const ns = store.nodes;
    if (!ns) return;
    fill(status, `${ns.length} node${ns.length === 1 ? '' : 's'}`);
    // Redraws must not take the keyboard focus away from a button.
    const focused = list.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    fill(list, ns.map(card));
    if (focused) list.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
  };
  draw();
  const reload = () => loadNodes().catch((e) => fill(status, errorBox(e)));
  reload();
  return { update: (w) => (w === 'nodes' ? draw() : null), refresh: reload, needsRefreshOn: (k) => k.startsWith('node.') || k.startsWith('placement.'), poll: true };
}

// ---------------------------------------------------------------- tasks

const STATES = ['pending', 'starting', 'running', 'restarting', 'unknown', 'stopping', 'stopped', 'completed', 'failed'];

function currentPlacement(t) {
  return (t.placements || []).find((p) => p.current) || null;
}

export function tasks(main, params) {
  const q = params;
  const stateSel = h('select', { id: 'f-state', name: 'state' }, h('option', { value: '' }, 'any state'), STATES.map((s) => h('option', { value: s }, s)));
  stateSel.value = q.get('state') || '';
  const nodeSel = h('select', { id: 'f-node', name: 'node' }, h('option', { value: '' }, 'any node'));
  const nameIn = h('input', { id: 'f-name', name: 'name', type: 'search', placeholder: 'name or id', value: q.get('name') || '', autocomplete: 'off' });
  const count = h('p', { id: 'task-count', 'aria-live': 'polite' }, 'Loading…');
  const spacerTop = h('tr', { class: 'spacer', 'aria-hidden': 'true' });
  const spacerBottom = h('tr', { class: 'spacer', 'aria-hidden': 'true' });
  const body = h('tbody', { id: 'task-rows' });
  const scroller = h(
    'div',
    { class: 'vlist', id: 'task-scroller', tabindex: '0', 'aria-label': 'Tasks' },
    h('table', { class: 'tasks' }, h('thead', {}, h('tr', {}, ['Task', 'Name', 'State', 'Node', 'Restarts', 'Endpoints', 'Created', ''].map((t) => h('th', { scope: 'col' }, t)))), body),
  );
  fill(
    main,
    h('h1', {}, 'Tasks'),
    h(
      'form',
      { class: 'filters', role: 'search', onsubmit: (e) => e.preventDefault() },
      h('label', {}, 'State ', stateSel),
      h('label', {}, 'Node ', nodeSel),
      h('label', {}, 'Name ', nameIn),
      mayAct() ? h('a', { href: '#/tasks/new', class: 'button', id: 'new-task' }, 'Submit a task') : null,
    ),
    count,
    scroller,
  );

  let rows = [];
  const ROW = 36; // px; the CSS fixes each row to this height.

  function filter() {
    const st = stateSel.value;
    const nd = nodeSel.value;
    const nm = nameIn.value.trim().toLowerCase();
    rows = [];
    for (const t of store.tasks.values()) {
      if (st && t.state !== st) continue;
      const p = currentPlacement(t);
      if (nd && (!p || p.node !== nd)) continue;
      if (nm && !t.name.toLowerCase().includes(nm) && !t.id.toLowerCase().includes(nm)) continue;
      rows.push(t);
    }
    rows.sort((a, b) => b.created_ms - a.created_ms || (a.id < b.id ? -1 : 1));
    fill(count, `${num(rows.length)} of ${num(store.tasks.size)} task${store.tasks.size === 1 ? '' : 's'}`);
  }

  function row(t) {
    const p = currentPlacement(t);
    return h(
      'tr',
      { 'data-id': t.id, 'data-state': t.state },
      h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(t.id)}` }, t.id)),
      h('td', { class: 'name' }, t.name),
      h('td', {}, badge(t.state)),
      h('td', {}, p ? p.node : '—'),
      h('td', {}, num(t.restarts)),
      h('td', { class: 'eps' }, (t.endpoints || []).map(endpointLink)),
      h('td', {}, ago(t.created_ms)),
      h('td', {}, mayAct() && t.desired === 'run' ? h('button', { type: 'button', class: 'stop small', onclick: () => stopTask(t) }, 'Stop') : null),
    );
  }

  /** Draws only the rows in view (plus a margin): thousands of tasks stay fast. */
  function paint() {
    const view = scroller.clientHeight || 600;
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW) - 10);
    const last = Math.min(rows.length, Math.ceil((scroller.scrollTop + view) / ROW) + 10);
    spacerTop.style.height = `${first * ROW}px`;
    spacerBottom.style.height = `${(rows.length - last) * ROW}px`;
    const frag = [spacerTop];
    for (let i = first; i < last; i++) frag.push(row(rows[i]));
    frag.push(spacerBottom);
    body.replaceChildren(...frag);
  }

  function nodesOptions() {
    const seen = new Set();
    for (const t of store.tasks.values()) for (const p of t.placements || []) seen.add(p.node);
    const want = q.get('node') || nodeSel.value;
    const have = [...nodeSel.options].slice(1).map((o) => o.value);
    const names = [...seen].sort();
    if (names.join() !== have.join()) fill(nodeSel, h('option', { value: '' }, 'any node'), names.map((n) => h('option', { value: n }, n)));
    nodeSel.value = want && names.includes(want) ? want : nodeSel.value;
  }

  function draw() {
    nodesOptions();
    filter();
    paint();
    markOnce('holdfast:tasks-ready');
  }

  function syncUrl() {
    const p = new URLSearchParams();
    if (stateSel.value) p.set('state', stateSel.value);
    if (nodeSel.value) p.set('node', nodeSel.value);
    if (nameIn.value.trim()) p.set('name', nameIn.value.trim());
    const s = p.toString();
    history.replaceState(null, '', `#/tasks${s ? '?' + s : ''}`);
  }
  const onFilter = () => {
    syncUrl();
    filter();
    scroller.scrollTop = 0;
    paint();
  };
  stateSel.addEventListener('change', onFilter);
  nodeSel.addEventListener('change', onFilter);
  nameIn.addEventListener('input', onFilter);
  let ticking = false;
  scroller.addEventListener('scroll', () => {
    if (ticking) return;
    ticking = true;
    requestAnimationFrame(() => {
      ticking = false;
      paint();
    });
  });

  if (store.tasksLoaded) draw();
  const reload = () => loadTasks().catch((e) => fill(count, errorBox(e)));
  reload();
  return { update: (w) => (w === 'tasks' ? draw() : null), refresh: reload, needsRefreshOn: () => false };
}

async function stopTask(t) {
  if (!(await confirmDialog(`Stop task ${t.id} (${t.name})?`, 'Stop task'))) return;
  await act(`Stopping ${t.id}`, () => call('DELETE', `/v1/tasks/${encodeURIComponent(t.id)}`));
  loadTask(t.id).catch(() => {});
}

// ---------------------------------------------------------------- submit

export const ECHO_SPEC = {
  name: 'echo',
  image: 'holdfast/echo:latest',
  command: ['echo', '--listen', '0.0.0.0:7777'],
  ports: [{ container: 7777, host: 0 }],
  resources: { cpu_millis: 100, memory_mb: 64, disk_mb: 50 },
  kind: 'service',
  restart: { policy: 'on-failure', max_attempts: 3, delay_ms: 1000, max_delay_ms: 60000 },
  health: { http: { path: '/health', port: 7777 }, interval_ms: 2000, timeout_ms: 1000, failures: 3 },
  offline: { mode: 'keep', lost_after_ms: 60000, replace: true },
};

/** 128 random bits as hex (crypto.randomUUID needs a secure context; this does not). */
function randomKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return 'ui-' + [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
}

/** Selects the text of `field` (a dotted path such as `resources.memory_mb`) in the editor. */
function selectField(area, field) {
  const parts = String(field).split(/[.[\]]+/).filter((p) => p && !/^\d+$/.test(p));
  let at = 0;
  for (const part of parts) {
    const i = area.value.indexOf(`"${part}"`, at);
    if (i < 0) break;
    at = i;
    if (part === parts[parts.length - 1]) {
      area.focus();
      area.setSelectionRange(i, i + part.length + 2);
      return;
    }
  }
}

export function submit(main) {
  const area = h('textarea', { id: 'spec', name: 'spec', rows: '22', spellcheck: 'false', 'aria-describedby': 'spec-help spec-error', autocomplete: 'off' });
  area.value = JSON.stringify(ECHO_SPEC, null, 2);
  const err = h('p', { id: 'spec-error', class: 'error', role: 'alert', hidden: true });
  const key = h('input', { id: 'idem', name: 'idempotency', placeholder: 'optional', maxlength: '128', autocomplete: 'off' });
  const send = h('button', { type: 'submit', id: 'submit-task' }, 'Submit');
  const form = h(
    'form',
    {
      class: 'submit',
      onsubmit: async (e) => {
        e.preventDefault();
        err.hidden = true;
        area.removeAttribute('aria-invalid');
        try {
          JSON.parse(area.value);
        } catch (x) {
          err.hidden = false;
          err.dataset.field = '';
          fill(err, `The spec is not valid JSON: ${x.message}`);
          area.setAttribute('aria-invalid', 'true');
          return;
        }
        send.disabled = true;
        try {
          // Always idempotent: a submission whose answer was lost is sent again with the
          // same key, and the manager answers with the task it already made.
          const idem = key.value || randomKey();
          let r;
          for (let attempt = 0; ; attempt++) {
            try {
              r = await call('POST', '/v1/tasks', { body: area.value, extraHeaders: { 'Idempotency-Key': idem } });
              break;
            } catch (x) {
              if (!(x instanceof Offline) || attempt >= 2) throw x;
              await new Promise((ok) => setTimeout(ok, 700));
            }
          }
          toast(`Task ${r.id} submitted`);
          location.hash = `#/tasks/${encodeURIComponent(r.id)}`;
        } catch (x) {
          err.hidden = false;
          area.setAttribute('aria-invalid', 'true');
          if (x instanceof ApiError && x.field) {
            err.dataset.field = x.field;
            fill(err, h('strong', { class: 'field' }, x.field), ': ', x.message);
            selectField(area, x.field);
          } else {
            err.dataset.field = '';
            fill(err, problem(x));
          }
        } finally {
          send.disabled = false;
        }
      },
    },
    h('label', { for: 'spec' }, 'Task spec (JSON)'),
    h('p', { id: 'spec-help', class: 'hint' }, 'Prefilled with the echo task. Only "image" is required; unknown fields are refused.'),
    area,
    err,
    h('label', { for: 'idem' }, 'Idempotency key (optional; one is made for each submission, so a retry never makes a second task) '),
    key,
    h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => (area.value = JSON.stringify(ECHO_SPEC, null, 2)) }, 'Reset to the echo task'), send),
  );
  fill(main, h('h1', {}, 'Submit a task'), form);
  return { update: () => {}, needsRefreshOn: () => false };
}

// ---------------------------------------------------------------- task detail

/** How the authority story reads in the timeline. */
const STORY = {
  placed: ['placed', 'Placed on a node with a fence'],
  'cached-authority': ['authority', 'Ran under cached authority (lease expired, manager unreachable)'],
  'stopped-on-expiry': ['authority', 'Lease expired: suspended (offline mode exclusive)'],
  resumed: ['authority', 'Resumed: a manager renewed the lease'],
  'authority-renewed': ['authority', 'Authority renewed by a manager'],
  replaced: ['fence', 'Replaced by a higher fence'],
  reconciled: ['fence', 'Reconciled after the node returned'],
  'stale-report': ['fence', 'Report from a stale fence kept as history'],
  'stop-requested': ['stop', 'Stop requested'],
  'invalid-report': ['warn', 'Report refused: not an allowed transition'],
};

export function taskDetail(main, params, id) {
  const head = h('div', {});
  const placements = h('section', { 'aria-labelledby': 'h-pl' });
  const history = h('section', { 'aria-labelledby': 'h-hist' });
  const logs = h('pre', { id: 'logs', class: 'logs', tabindex: '0', 'aria-label': 'Logs' }, '');
  const logsMsg = h('p', { id: 'logs-msg', class: 'hint' });
  const tail = h('select', { id: 'logs-tail' }, [100, 200, 1000, 5000].map((n) => h('option', { value: String(n) }, `last ${n} lines`)));
  tail.value = '200';
  const follow = h('input', { type: 'checkbox', id: 'logs-follow' });
  const spec = h('pre', { class: 'spec' });
  fill(
    main,
    h('p', {}, h('a', { href: '#/tasks' }, '← Tasks')),
    head,
    placements,
    history,
    h(
      'section',
      { 'aria-labelledby': 'h-logs' },
      h('h2', { id: 'h-logs' }, 'Logs'),
      h('div', { class: 'filters' }, h('label', {}, 'Show ', tail), h('label', {}, follow, ' Follow'), h('button', { type: 'button', id: 'logs-refresh', onclick: () => loadLogs() }, 'Refresh')),
      logsMsg,
      logs,
    ),
    h('details', {}, h('summary', {}, 'Spec'), spec),
  );

  let loadingLogs = false;
  let logsAgain = false;
  async function loadLogs() {
    if (loadingLogs) {
      logsAgain = true;
      return;
    }
    loadingLogs = true;
    logsAgain = false;
    try {
      const text = await get(`/v1/tasks/${encodeURIComponent(id)}/logs?tail=${tail.value}`, { text: true });
      const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
      logs.textContent = text || '';
      fill(logsMsg, text ? `${num(text.split('\n').filter(Boolean).length)} lines, fetched ` : 'No output yet, fetched ', ago(Date.now()));
      if (atEnd || follow.checked) logs.scrollTop = logs.scrollHeight;
    } catch (e) {
      fill(logsMsg, problem(e));
    } finally {
      loadingLogs = false;
      if (logsAgain) loadLogs();
    }
  }
  tail.addEventListener('change', loadLogs);
  const poll = setInterval(() => {
    if (follow.checked && document.visibilityState === 'visible') loadLogs();
  }, 2000);

  let logsFor = null;
  function draw() {
    const t = store.tasks.get(id);
    if (!t) return;
    const cur = currentPlacement(t);
    // A new placement or a new observed state may mean new output: fetch it again.
    const key = cur ? `${cur.id}/${cur.observed}/${cur.restarts}` : null;
    if (key !== logsFor) {
      logsFor = key;
      if (cur) loadLogs();
    }
    fill(
      head,
      h('h1', {}, 'Task ', h('span', { class: 'mono' }, t.id), ' ', badge(t.state, 'task-state')),
      h(
        'dl',
        { class: 'facts' },
        h('dt', {}, 'Name'), h('dd', {}, t.name),
        h('dt', {}, 'Image'), h('dd', { class: 'mono' }, t.spec && t.spec.image),
        h('dt', {}, 'Desired'), h('dd', {}, t.desired),
        h('dt', {}, 'Node'), h('dd', {}, cur ? cur.node : '—'),
        h('dt', {}, 'Endpoints'), h('dd', { id: 'task-endpoints' }, (t.endpoints || []).length ? t.endpoints.map(endpointLink) : 'none'),
        h('dt', {}, 'Restarts'), h('dd', {}, num(t.restarts)),
        t.exit_code !== null && t.exit_code !== undefined ? [h('dt', {}, 'Exit code'), h('dd', {}, String(t.exit_code))] : null,
        t.reason ? [h('dt', {}, 'Reason'), h('dd', {}, t.reason)] : null,
        h('dt', {}, 'Created'), h('dd', {}, ago(t.created_ms)),
        h('dt', {}, 'Updated'), h('dd', {}, ago(t.updated_ms)),
      ),
      mayAct() && t.desired === 'run' ? h('div', { class: 'actions' }, h('button', { type: 'button', class: 'danger', id: 'stop-task', onclick: () => stopTask(t) }, 'Stop task')) : null,
    );
    fill(
      placements,
      h('h2', { id: 'h-pl' }, 'Placements'),
      (t.placements || []).length
        ? h(
            'div',
            { class: 'scrollx' },
            h(
              'table',
              {},
              h('thead', {}, h('tr', {}, ['Placement', 'Node', 'Fence', 'Desired', 'Observed', 'Restarts', 'Exit code', 'Endpoints', 'Updated'].map((x) => h('th', { scope: 'col' }, x)))),
              h(
                'tbody',
                {},
                [...t.placements].sort((a, b) => b.fence - a.fence).map((p) =>
                  h(
                    'tr',
                    { class: p.current ? 'current' : 'old' },
                    h('td', { class: 'mono' }, p.id, p.current ? h('span', { class: 'badge s-current' }, 'current') : null),
                    h('td', {}, p.node, p.node_status !== 'ready' ? [' ', badge(p.node_status)] : null),
                    h('td', {}, num(p.fence)),
                    h('td', {}, p.desired),
                    h('td', {}, badge(p.observed)),
                    h('td', {}, num(p.restarts)),
                    h('td', {}, p.exit_code === null || p.exit_code === undefined ? '—' : String(p.exit_code)),
                    h('td', {}, (p.endpoints || []).map(endpointLink)),
                    h('td', {}, ago(p.updated_ms)),
                  ),
                ),
              ),
            ),
          )
        : h('p', {}, 'Not placed yet.', t.reason ? ` ${t.reason}` : ''),
    );
    const items = [];
    for (const p of t.placements || []) for (const e of p.events || []) items.push({ ...e, placement: p.id, fence: p.fence });
    items.sort((a, b) => a.at_ms - b.at_ms);
    fill(
      history,
      h('h2', { id: 'h-hist' }, 'History'),
      h('p', { class: 'hint' }, 'Marked: ', h('span', { class: 'k-authority mark' }, 'authority'), ' ', h('span', { class: 'k-fence mark' }, 'fencing'), ' ', h('span', { class: 'k-stop mark' }, 'stops')),
      items.length
        ? h(
            'ol',
            { class: 'history', id: 'history' },
            items.map((e) => {
              const s = STORY[e.what];
              return h(
                'li',
                { class: s ? `k-${s[0]}` : 'k-state', 'data-what': e.what },
                ago(e.at_ms),
                ' ',
                h('span', { class: 'mono' }, e.placement),
                ' ',
                h('strong', {}, s ? s[1] : e.what),
                e.detail ? h('span', { class: 'detail' }, ` — ${e.detail}`) : null,
              );
            }),
          )
        : h('p', {}, 'No history yet.'),
    );
    spec.textContent = JSON.stringify(t.spec, null, 2);
  }

  fill(head, h('h1', {}, 'Task ', h('span', { class: 'mono' }, id)), h('p', {}, 'Loading…'));
  draw();
  const reload = () =>
    loadTask(id)
      .then(() => {
        if (!store.tasks.has(id)) fill(head, h('h1', {}, 'Task ', id), errorBox(new ApiError(404, 'not_found', `no task with id ${id}`)));
      })
      .catch((e) => fill(head, h('h1', {}, 'Task ', id), errorBox(e)));
  reload();
  return { update: (w) => (w === 'tasks' ? draw() : null), refresh: reload, needsRefreshOn: () => false, unmount: () => clearInterval(poll) };
}

// ---------------------------------------------------------------- events

export function events(main, params) {
  const kindIn = h('input', { id: 'f-kind', type: 'search', placeholder: 'task. / node. / placement.observed', value: params.get('kind') || '', autocomplete: 'off' });
  const list = h('ol', { class: 'events', id: 'event-list', reversed: true });
  const note = h('p', { class: 'hint', 'aria-live': 'polite' });
  fill(main, h('h1', {}, 'Events'), h('form', { class: 'filters', role: 'search', onsubmit: (e) => e.preventDefault() }, h('label', {}, 'Kind starts with ', kindIn)), note, list);
  const draw = () => {
    const k = kindIn.value.trim();
    const shown = store.events.filter((e) => !k || String(e.kind).startsWith(k)).slice(-300).reverse();
    fill(note, `${num(shown.length)} event(s) since this page opened, newest first; live.`);
    fill(
      list,
      shown.map((e) =>
        h(
          'li',
          { 'data-kind': e.kind },
          ago(e.at_ms),
          ' ',
          h('code', {}, e.kind),
          ' ',
          taskLinkOr(e),
          e.detail && Object.keys(e.detail).length ? h('span', { class: 'detail mono' }, ' ' + JSON.stringify(e.detail)) : null,
        ),
      ),
    );
  };
  kindIn.addEventListener('input', () => {
    history.replaceState(null, '', `#/events${kindIn.value.trim() ? '?kind=' + encodeURIComponent(kindIn.value.trim()) : ''}`);
    draw();
  });
  draw();
  return { update: (w) => (w === 'events' ? draw() : null), needsRefreshOn: () => false };
}

function taskLinkOr(e) {
  const kind = String(e.kind);
  if (kind.startsWith('task.') || kind.startsWith('placement.')) {
    const t = (e.detail && e.detail.task_id) || String(e.subject).split('.')[0];
    return h('a', { href: `#/tasks/${encodeURIComponent(t)}` }, e.subject);
  }
  if (kind.startsWith('node.')) return h('a', { href: '#/nodes' }, e.subject);
  return h('span', {}, e.subject);
}

// ---------------------------------------------------------------- audit

export function audit(main) {
  const box = h('div', {}, h('p', {}, 'Loading…'));
  fill(main, h('h1', {}, 'Audit'), h('p', { class: 'hint' }, 'Every mutating API call, who made it and its result; newest first.'), box);
  const reload = async () => {
    try {
      const r = await get('/v1/audit?limit=500');
      fill(
        box,
        h(
          'div',
          { class: 'scrollx' },
          h(
            'table',
            { id: 'audit' },
            h('thead', {}, h('tr', {}, ['When', 'Who', 'Action', 'Subject', 'Result', 'Index'].map((x) => h('th', { scope: 'col' }, x)))),
            h('tbody', {}, (r.entries || []).map((e) => h('tr', {}, h('td', {}, ago(e.at_ms)), h('td', {}, e.who), h('td', { class: 'mono' }, e.action), h('td', { class: 'mono' }, e.subject), h('td', {}, badge(e.result === 'ok' ? 'ok' : e.result)), h('td', {}, num(e.index))))),
          ),
        ),
      );
    } catch (e) {
      fill(box, errorBox(e));
    }
  };
  reload();
  return { update: () => {}, refresh: reload, needsRefreshOn: () => true };
}

// ---------------------------------------------------------------- admin

export function admin(main) {
  const tokens = h('section', { 'aria-labelledby': 'h-tokens' }, h('h2', { id: 'h-tokens' }, 'API tokens'), h('p', {}, 'Loading…'));
  const members = h('section', { 'aria-labelledby': 'h-members' });
  fill(main, h('h1', {}, 'Admin'), tokens, members);

  const name = h('input', { id: 'tok-name', required: true, maxlength: '64', autocomplete: 'off' });
  const role = h('select', { id: 'tok-role' }, ['reader', 'operator', 'admin'].map((r) => h('option', { value: r }, r)));
  const ttl = h('input', { id: 'tok-ttl', type: 'number', min: '1', placeholder: 'never', inputmode: 'numeric' });
  const secret = h('div', { 'aria-live': 'polite' });

  async function loadTokens() {
    try {
      const r = await get('/v1/tokens');
      const list = r.tokens || r;
      fill(
        tokens,
        h('h2', { id: 'h-tokens' }, 'API tokens'),
        h(
          'form',
          {
            class: 'filters',
            onsubmit: async (e) => {
              e.preventDefault();
              const body = { name: name.value, role: role.value };
              if (ttl.value) body.ttl_ms = Number(ttl.value) * 3600000;
              try {
                const t = await call('POST', '/v1/tokens', { body });
                fill(secret, h('p', { class: 'secret' }, `Token for ${t.name} (${t.role}), shown once: `, h('code', { id: 'new-token' }, t.token)));
                name.value = '';
                loadTokens();
              } catch (x) {
                fill(secret, errorBox(x));
              }
            },
          },
          h('label', {}, 'Name ', name),
          h('label', {}, 'Role ', role),
          h('label', {}, 'Expires after (hours) ', ttl),
          h('button', { type: 'submit' }, 'Create token'),
        ),
        secret,
        h(
          'table',
          {},
          h('thead', {}, h('tr', {}, ['Name', 'Role', 'Id', 'Created', 'Expires', ''].map((x) => h('th', { scope: 'col' }, x)))),
          h(
            'tbody',
            {},
            (Array.isArray(list) ? list : []).map((t) =>
              h(
                'tr',
                {},
                h('td', {}, t.name),
                h('td', {}, t.role),
                h('td', { class: 'mono' }, t.id),
                h('td', {}, ago(t.created_ms), t.created_by ? ` by ${t.created_by}` : ''),
                h('td', {}, t.expires_ms ? ago(t.expires_ms) : 'never'),
                h('td', {}, t.revoked_ms ? [badge('revoked'), ' ', ago(t.revoked_ms)] : h('button', { type: 'button', class: 'small danger', onclick: async () => {
                  if (!(await confirmDialog(`Revoke token ${t.name}? Clients using it get 401 at once.`, 'Revoke'))) return;
                  await act(`Revoked ${t.name}`, () => call('DELETE', `/v1/tokens/${encodeURIComponent(t.id)}`));
                  loadTokens();
                } }, 'Revoke')),
              ),
            ),
          ),
        ),
      );
    } catch (e) {
      const msg = e instanceof ApiError && e.status === 404 ? 'This manager has no token API.' : problem(e);
      fill(tokens, h('h2', { id: 'h-tokens' }, 'API tokens'), h('p', { class: 'error', role: 'alert' }, msg));
    }
  }

  async function loadMembers() {
    try {
      await loadCluster();
      const c = store.cluster;
      fill(
        members,
        h('h2', { id: 'h-members' }, 'Managers'),
        h(
          'table',
          {},
          h('thead', {}, h('tr', {}, ['Member', 'Role', 'API', 'Cluster', 'Last applied', ''].map((x) => h('th', { scope: 'col' }, x)))),
          h(
            'tbody',
            {},
            (c.members || []).map((m) =>
              h(
                'tr',
                {},
                h('td', {}, m.id, c.leader && c.leader.id === m.id ? h('span', { class: 'badge s-leader' }, 'leader') : null),
                h('td', {}, m.role),
                h('td', {}, m.api),
                h('td', {}, m.cluster),
                h('td', {}, num(m.last_applied)),
                h('td', {}, (c.members || []).length > 1 ? h('button', { type: 'button', class: 'small danger', onclick: async () => {
                  if (!(await confirmDialog(`Remove manager ${m.id} from the cluster?`, 'Remove member'))) return;
                  await act(`Removed ${m.id}`, () => call('DELETE', `/v1/cluster/members/${encodeURIComponent(m.id)}`));
                  loadMembers();
                } }, 'Remove') : null),
              ),
            ),
          ),
        ),
      );
    } catch (e) {
      fill(members, h('h2', { id: 'h-members' }, 'Managers'), errorBox(e));
    }
  }
  loadTokens();
  loadMembers();
  return { update: () => {}, refresh: () => loadMembers(), needsRefreshOn: () => false };
}

// ---------------------------------------------------------------- login

export function login(main, params, message) {
  const input = h('input', { id: 'token', name: 'token', type: 'password', required: true, autocomplete: 'off', 'aria-describedby': 'login-msg' });
  const msg = h('p', { id: 'login-msg', class: message ? 'error' : 'hint', role: message ? 'alert' : null }, message || 'Paste an API token. It stays in this browser tab only (session storage).');
  fill(
    main,
    h('h1', {}, 'Log in'),
    h(
      'form',
      {
        class: 'login',
        onsubmit: (e) => {
          e.preventDefault();
          setToken(input.value.trim());
          location.hash = '#/';
          location.reload();
        },
      },
      msg,
      h('label', { for: 'token' }, 'API token'),
      input,
      h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'login-submit' }, 'Log in')),
      h('p', { class: 'hint' }, 'The first manager writes an admin token to admin.token in its data directory; `holdfast token create` makes others.'),
    ),
  );
  input.focus();
  return { update: () => {}, needsRefreshOn: () => false };
}
