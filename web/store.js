// What the UI knows about the cluster, kept current from the event stream: tasks by id
// (refreshed one by one as their events arrive), nodes, health, cluster, recent events.

import { get, getAll, ApiError } from './api.js';

export const store = {
  /** id → task as GET /v1/tasks answers it. */
  tasks: new Map(),
  tasksLoaded: false,
  nodes: null,
  /** id → GET /v1/nodes/{id} (disconnected intervals, node events). */
  nodeDetail: new Map(),
  health: null,
  cluster: null,
  /** Newest last, at most MAX_EVENTS. */
  events: [],
  /** admin | operator | reader | limited (not admin, exact role unknown) | open (no auth). */
  role: 'unknown',
  /** Count of task changes, so views can tell they must redraw. */
  taskVersion: 0,
};

const MAX_EVENTS = 1000;
const subs = new Set();

/** fn(what) on every change; what is 'tasks' | 'nodes' | 'health' | 'cluster' | 'events'. */
export function subscribe(fn) {
  subs.add(fn);
  return () => subs.delete(fn);
}

function notify(what) {
  for (const fn of subs) {
    try {
      fn(what);
    } catch (e) {
      console.error(e);
    }
  }
}

let tasksLoading = null;
/** Loads every task (following `next` if the server pages). */
export function loadTasks() {
  if (tasksLoading) return tasksLoading;
  tasksLoading = (async () => {
    try {
      const list = await getAll('/v1/tasks', 'tasks');
      const map = new Map();
      for (const t of list) map.set(t.id, t);
      store.tasks = map;
      store.tasksLoaded = true;
      store.taskVersion++;
      notify('tasks');
    } finally {
      tasksLoading = null;
    }
  })();
  return tasksLoading;
}

/** Fetches one task into the store (removing it on 404). */
export async function loadTask(id) {
  try {
    const t = await get(`/v1/tasks/${encodeURIComponent(id)}`);
    store.tasks.set(t.id, t);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) store.tasks.delete(id);
    else throw e;
  }
  store.taskVersion++;
  notify('tasks');
}

export async function loadNodes(withDetail = true) {
  const r = await get('/v1/nodes');
  store.nodes = r.nodes || [];
  if (withDetail) {
    // Intervals and node history come with the per-node answer; a handful of nodes is
    // the edge case this UI serves, so fetch them for the first 50.
    await Promise.all(
      store.nodes.slice(0, 50).map(async (n) => {
        try {
          store.nodeDetail.set(n.id, await get(`/v1/nodes/${encodeURIComponent(n.id)}`));
        } catch {
          /* the list still shows */
        }
      }),
    );
  }
  notify('nodes');
}

export async function loadHealth() {
  store.health = await get('/v1/health', { okStatuses: [503] });
  notify('health');
}

export async function loadCluster() {
  store.cluster = await get('/v1/cluster');
  notify('cluster');
}

// Task refreshes are batched: many events for the same task cost one GET.
const pendingTasks = new Set();
let taskTimer = null;
function refreshTaskSoon(id) {
  if (!id) return;
  pendingTasks.add(id);
  if (taskTimer) return;
  taskTimer = setTimeout(async () => {
    taskTimer = null;
    const ids = [...pendingTasks];
    pendingTasks.clear();
    try {
      if (ids.length > 50 && store.tasksLoaded) await loadTasks();
      else await Promise.all(ids.map((id) => loadTask(id)));
    } catch {
      /* the next event or reconnect catches up */
    }
  }, 200);
}

/** Which task an event concerns. Placement ids are `<task>.<n>`. */
export function taskOf(kind, data) {
  const d = (data && data.detail) || {};
  if (d.task_id) return d.task_id;
  if (kind.startsWith('task.')) return data.subject;
  if (kind.startsWith('placement.')) return String(data.subject || '').split('.')[0];
  return null;
}

/** One event from the stream. */
export function handleEvent(kind, data) {
  if (kind === 'lagged') {
    // Events were lost: read everything again.
    if (store.tasksLoaded) loadTasks().catch(() => {});
    notify('resync');
    return;
  }
  if (!data || typeof data !== 'object') return;
  store.events.push(data);
  if (store.events.length > MAX_EVENTS) store.events.splice(0, store.events.length - MAX_EVENTS);
  notify('events');
  const task = taskOf(kind, data);
  if (task && (store.tasksLoaded || store.tasks.has(task))) refreshTaskSoon(task);
  notify('event:' + kind);
}
