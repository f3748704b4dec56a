// Talking to the holdfast API: bearer token, the one error shape, connection state,
// and the event stream read with fetch() (EventSource cannot send an Authorization header).

const TOKEN_KEY = 'holdfast.token';

/** The API token of this tab (sessionStorage: gone when the tab closes). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An answer that was not 2xx, in the API's error shape. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

/** The manager could not be reached at all. */
export class Offline extends Error {}

const listeners = new Set();
let online = true;

/** Calls fn(online:boolean, info) whenever the connection state changes or retries. */
export function onConnection(fn) {
  listeners.add(fn);
}

function tell(state, info) {
  online = state;
  for (const fn of listeners) fn(state, info || {});
}

export function isOnline() {
  return online;
}

const authListeners = new Set();
/** Calls fn(error) when the API refuses the token (401) so the app can ask for one. */
export function onAuthFailure(fn) {
  authListeners.add(fn);
}

function headers(extra) {
  const h = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    /* not JSON */
  }
  const e = body && body.error;
  if (e) return new ApiError(resp.status, e.code, e.message, e.field);
  return new ApiError(resp.status, 'http_' + resp.status, `${resp.status} ${resp.statusText}`.trim(), null);
}

/**
 * One API call. Resolves with the parsed JSON (or text), rejects with ApiError or Offline.
 * A 503 `/v1/health` still carries its verdict, so `okStatuses` can accept it.
 */
export async function call(method, path, { body, text = false, okStatuses = [], timeoutMs = 15000, extraHeaders = {} } = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: headers({ ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}), ...extraHeaders }),
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
      signal: ctl.signal,
      cache: 'no-store',
    });
  } catch (e) {
    clearTimeout(timer);
    if (online) tell(false, { reason: 'the manager did not answer' });
    throw new Offline(e && e.name === 'AbortError' ? 'the manager did not answer in time' : 'the manager cannot be reached');
  }
  try {
    if (!resp.ok && !okStatuses.includes(resp.status)) {
      const err = await errorOf(resp);
      if (resp.status === 401) for (const fn of authListeners) fn(err);
      throw err;
    }
    if (text) return await resp.text();
    const ct = resp.headers.get('content-type') || '';
    return ct.includes('json') ? await resp.json() : await resp.text();
  } finally {
    clearTimeout(timer);
  }
}

export const get = (path, opts) => call('GET', path, opts);

/**
 * GET a list that may page (`limit`, `after`, answer `next`): follows `next` until it is
 * null. A server that does not page simply answers everything at once without `next`.
 */
export async function getAll(path, key, pageSize = 1000) {
  const sep = path.includes('?') ? '&' : '?';
  let out = [];
  let after = null;
  for (let i = 0; i < 1000; i++) {
    const url = `${path}${sep}limit=${pageSize}` + (after ? `&after=${encodeURIComponent(after)}` : '');
    // A page of thousands of tasks with their placements is megabytes: allow it time.
    const page = await get(url, { timeoutMs: 60000 });
    out = out.concat(page[key] || []);
    if (!page.next || page.next === after) return out;
    after = page.next;
  }
  return out;
}

/**
 * Parses a server-sent event stream from a ReadableStream of bytes.
 * Calls onEvent({event, id, data}) per complete event.
 */
export async function parseSse(stream, onEvent, signal) {
  const reader = stream.getReader();
  const dec = new TextDecoder();
  let buf = '';
  let ev = { event: 'message', data: [], id: null };
  try {
    for (;;) {
      if (signal && signal.aborted) return;
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\n|\r/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (ev.data.length) onEvent({ event: ev.event, id: ev.id, data: ev.data.join('\n') });
          ev = { event: 'message', data: [], id: ev.id };
          continue;
        }
        if (line.startsWith(':')) continue;
        const c = line.indexOf(':');
        const field = c < 0 ? line : line.slice(0, c);
        let val = c < 0 ? '' : line.slice(c + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') ev.event = val;
        else if (field === 'data') ev.data.push(val);
        else if (field === 'id') ev.id = val;
      }
    }
  } finally {
    try {
      reader.releaseLock();
    } catch {
      /* already released */
    }
  }
}

/**
 * Keeps one `/v1/events` stream open for as long as the page lives: reconnects with
 * exponential backoff (with jitter) and `Last-Event-ID`, reports the connection state,
 * and calls onOpen(wasDown) on every (re)connect so the app can catch up.
 */
export function streamEvents({ onEvent, onOpen }) {
  let lastId = null;
  let attempt = 0;
  let stopped = false;
  const maxDelay = 8000;

  async function loop() {
    while (!stopped) {
      let failure = null;
      const ctl = new AbortController();
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (lastId) h['Last-Event-ID'] = lastId;
        const connectTimer = setTimeout(() => ctl.abort(), 10000);
        const resp = await fetch('/v1/events', { headers: h, cache: 'no-store', signal: ctl.signal });
        clearTimeout(connectTimer);
        if (resp.status === 401) {
          const err = await errorOf(resp);
          for (const fn of authListeners) fn(err);
          return;
        }
        if (!resp.ok || !resp.body) {
          failure = (await errorOf(resp)).message;
        } else {
          const wasDown = !online || attempt > 0;
          attempt = 0;
          if (!online) tell(true, {});
          onOpen(wasDown);
          await parseSse(resp.body, (e) => {
            if (e.id) lastId = e.id;
            let data = e.data;
            try {
              data = JSON.parse(e.data);
            } catch {
              /* keep text */
            }
            onEvent(e.event, data);
          });
          failure = 'the event stream ended';
        }
      } catch (e) {
        failure = 'the manager cannot be reached';
      }
      if (stopped) return;
      attempt += 1;
      const delay = Math.min(maxDelay, 500 * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
      tell(false, { reason: failure, retryAt: Date.now() + delay, attempt });
      await new Promise((r) => setTimeout(r, delay));
    }
  }
  loop();
  return () => {
    stopped = true;
  };
}
