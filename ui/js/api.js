// The API client: every call carries the operator's key as a bearer token.

const KEY = 'kiln.apiKey';
let authRequired = false;

export function getKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || '';
}

export function setKey(key, remember) {
  sessionStorage.setItem(KEY, key);
  if (remember) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export function setAuthRequired(v) {
  authRequired = v;
}

export function needsKey() {
  return authRequired && !getKey();
}

export function authHeaders() {
  const k = getKey();
  return k ? { Authorization: `Bearer ${k}` } : {};
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, { method = 'GET', body } = {}) {
  if (needsKey()) throw new ApiError(401, 'unauthorized', 'an API key is needed');
  const headers = { Accept: 'application/json', ...authHeaders() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  const text = await r.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!r.ok) {
    const e = json && json.error ? json.error : {};
    const err = new ApiError(r.status, e.code || `http_${r.status}`, e.message || `HTTP ${r.status}`);
    if (r.status === 401) window.dispatchEvent(new CustomEvent('kiln:unauthorized'));
    throw err;
  }
  return json;
}

// What an action's failure means to an operator.
export function actionError(e) {
  if (e.status === 401) return 'Your key was refused.';
  if (e.status === 403) return 'This key may read but not act (read-only).';
  return `${e.message} (${e.code})`;
}

// A stored file, fetched with the key and shown from memory.
const blobs = new Map();
export async function fileUrl(url) {
  if (blobs.has(url)) return blobs.get(url);
  const r = await fetch(url, { headers: authHeaders() });
  if (!r.ok) throw new ApiError(r.status, `http_${r.status}`, `file: HTTP ${r.status}`);
  const u = URL.createObjectURL(await r.blob());
  blobs.set(url, u);
  return u;
}
