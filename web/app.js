// Boot, routing (hash routes, so every view has a URL), login, the connection banner
// and live updates from /v1/events.

import { get, token, setToken, onConnection, onAuthFailure, streamEvents, ApiError } from './api.js';
import { h, fill, tickTimes, ms } from './dom.js';
import { store, subscribe, handleEvent, loadTasks } from './store.js';
import * as views from './views.js';

const main = document.getElementById('main');
const banner = document.getElementById('banner');
const who = document.getElementById('who');
const nav = document.getElementById('nav');

const ROUTES = [
  ['overview', 'Overview', /^\/?$/, (p) => views.overview(main, p)],
  ['nodes', 'Nodes', /^\/nodes$/, (p) => views.nodes(main, p)],
  ['new', null, /^\/tasks\/new$/, (p) => views.submit(main, p)],
  ['task', null, /^\/tasks\/([^/]+)$/, (p, m) => views.taskDetail(main, p, decodeURIComponent(m[1]))],
  ['tasks', 'Tasks', /^\/tasks$/, (p) => views.tasks(main, p)],
  ['events', 'Events', /^\/events$/, (p) => views.events(main, p)],
  ['audit', 'Audit', /^\/audit$/, (p) => views.audit(main, p)],
  ['admin', 'Admin', /^\/admin$/, (p) => views.admin(main, p)],
  ['login', null, /^\/login$/, (p) => views.login(main, p, loginMessage)],
];
const LINKS = { overview: '#/', nodes: '#/nodes', tasks: '#/tasks', events: '#/events', audit: '#/audit', admin: '#/admin' };

let current = null;
let currentName = '';
let loginMessage = '';
let started = false;

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, query] = raw.split('?');
  return { path: path.startsWith('/') ? path : '/' + path, params: new URLSearchParams(query || '') };
}

function drawNav() {
  const adminOnly = store.role !== 'admin' && store.role !== 'open' && store.role !== 'unknown';
  fill(
    nav,
    h(
      'ul',
      {},
      Object.entries(LINKS)
        .filter(([name]) => !(adminOnly && (name === 'audit' || name === 'admin')))
        .map(([name, href]) => h('li', {}, h('a', { href, 'aria-current': currentName === name || (name === 'tasks' && (currentName === 'task' || currentName === 'new')) ? 'page' : null }, ROUTES.find((r) => r[0] === name)[1]))),
    ),
  );
  fill(who, token() ? `role: ${store.role}` : store.role === 'open' ? 'no login needed here' : '', token() ? h('button', { type: 'button', id: 'logout', class: 'small', onclick: logout }, 'Log out') : null);
}

function logout() {
  setToken('');
  loginMessage = 'Logged out.';
  location.hash = '#/login';
}

function route() {
  const { path, params } = parseHash();
  if (current && current.unmount) current.unmount();
  current = null;
  for (const [name, , re, make] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    currentName = name;
    drawNav();
    try {
      current = make(params, m);
    } catch (e) {
      console.error(e);
      fill(main, h('h1', {}, 'Something went wrong'), h('p', { class: 'error', role: 'alert' }, String(e && e.message)));
    }
    document.title = `holdfast · ${ROUTES.find((r) => r[0] === name)[1] || name}`;
    main.focus({ preventScroll: true });
    return;
  }
  currentName = '';
  drawNav();
  fill(main, h('h1', {}, 'Not found'), h('p', {}, 'No view at ', h('code', {}, location.hash), '. ', h('a', { href: '#/' }, 'Overview')));
}

subscribe((what) => {
  if (current && current.update) current.update(what);
});

// Views that read more than tasks refresh, at most every 500 ms, after events.
let refreshTimer = null;
function refreshSoon(kind) {
  if (!current || !current.refresh || !current.needsRefreshOn || !current.needsRefreshOn(kind)) return;
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (current && current.refresh) current.refresh();
  }, 500);
}

// ---------------------------------------------------------------- connection banner

let bannerTimer = null;
onConnection((up, info) => {
  clearInterval(bannerTimer);
  if (up) {
    banner.hidden = true;
    banner.dataset.state = 'up';
    return;
  }
  banner.hidden = false;
  banner.dataset.state = 'down';
  const draw = () => {
    const left = info.retryAt ? Math.max(0, info.retryAt - Date.now()) : null;
    fill(banner, h('strong', {}, 'Lost contact with the manager'), ` (${info.reason || 'no answer'}). `, left === null ? 'Retrying…' : `Retrying in ${ms(Math.ceil(left / 1000) * 1000)}${info.attempt > 1 ? ` (attempt ${info.attempt})` : ''}…`, ' Work on the nodes carries on under their leases.');
  };
  draw();
  bannerTimer = setInterval(draw, 1000);
});

onAuthFailure((e) => {
  loginMessage = token() ? `The manager refused this token (${e.status}): ${e.message}` : `This manager needs an API token (${e.status}): ${e.message}`;
  if (currentName !== 'login') location.hash = '#/login';
  else route();
});

// ---------------------------------------------------------------- role

async function detectRole() {
  try {
    const me = await get('/v1/tokens/self');
    if (me && me.role) return me.role;
  } catch (e) {
    if (!(e instanceof ApiError) || (e.status !== 404 && e.status !== 405)) {
      if (e instanceof ApiError && e.status === 401) throw e;
    }
  }
  try {
    await get('/v1/tokens');
    return 'admin';
  } catch (e) {
    if (e instanceof ApiError && e.status === 403) {
      // Not admin. Without a self endpoint the exact role is only a hint in the message;
      // the server decides every call anyway, and a refusal is shown where it happens.
      const m = /has (reader|operator)\b/.exec(e.message || '');
      return m ? m[1] : 'limited';
    }
    if (e instanceof ApiError && e.status === 404) return 'open';
    if (e instanceof ApiError && e.status === 401) throw e;
    return 'unknown';
  }
}

// ---------------------------------------------------------------- boot

async function start() {
  // `/#token=<t>` logs in once; the fragment is cleared so it is not left in history.
  const m = location.hash.match(/^#token=([^&]*)/);
  if (m) {
    setToken(decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search + '#/');
  }
  window.addEventListener('hashchange', route);
  setInterval(tickTimes, 15000);
  // Liveness (last seen, measured free resources, apply lag) changes without events:
  // views that show it read it again every 10 s while the tab is visible.
  setInterval(() => {
    if (current && current.poll && current.refresh && document.visibilityState === 'visible') current.refresh();
  }, 10000);
  if (parseHash().path === '/login') {
    route();
    return;
  }
  try {
    store.role = await detectRole();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return; // onAuthFailure shows the login view
  }
  route();
  if (started) return;
  started = true;
  streamEvents({
    onEvent: (kind, data) => {
      handleEvent(kind, data);
      refreshSoon(kind);
    },
    onOpen: (wasDown) => {
      if (!wasDown) return;
      // Back after an outage: read everything again, the stream only has what is new.
      if (store.tasksLoaded) loadTasks().catch(() => {});
      if (current && current.refresh) current.refresh();
    },
  });
}

start();
