// The console: hash routes (#/, #/tasks, #/tasks/<id>), the key prompt, and the one live
// feed (GET /v1/events) that every page listens to.

import { api, forgetKey, getKey, needsKey, setAuthRequired, setKey } from './api.js';
import { agoText, clear, h } from './dom.js';
import { openStream } from './sse.js';
import * as overview from './overview.js';
import * as tasks from './tasks.js';
import * as task from './task.js';

const main = document.getElementById('main');
const liveEl = document.getElementById('live');
const listeners = new Set();
let feed = null;
let cleanup = null;

function setLive(state) {
  liveEl.className = `live ${state === 'live' ? 'on' : state === 'starting' ? '' : 'off'}`;
  liveEl.textContent = state === 'live' ? 'live' : state === 'reconnecting' ? 'reconnecting…' : state;
}

// Pages subscribe to the live feed; `resync` reaches them after every (re)connection.
const live = {
  on(fn) {
    listeners.add(fn);
    return () => listeners.delete(fn);
  },
};

function startFeed() {
  if (feed) return;
  feed = openStream('/v1/events', {
    onEvent: (kind, data) => {
      for (const fn of listeners) fn(kind, data);
    },
    onOpen: () => {
      for (const fn of listeners) fn('resync', {});
    },
    onState: (s) => setLive(s === 'refused' ? 'key refused' : s),
  });
}

function stopFeed() {
  feed?.close();
  feed = null;
}

function loginPage(message) {
  document.getElementById('signout').hidden = true;
  setLive('locked');
  const input = h('input', {
    id: 'key', type: 'password', autocomplete: 'current-password', required: true,
    'aria-describedby': 'key-help',
  });
  const remember = h('input', { id: 'remember', type: 'checkbox' });
  const err = h('p', { class: 'muted', id: 'login-error', role: 'alert' }, message || '');
  const form = h('form', {
    class: 'card login', id: 'login',
    onsubmit: async (e) => {
      e.preventDefault();
      const k = input.value.trim();
      if (!k) return;
      setKey(k, remember.checked);
      try {
        await api('/v1/workers');
        route();
      } catch (x) {
        forgetKey();
        err.textContent = x.status === 401 ? 'That key was refused.' : `Cannot check the key: ${x.message}`;
        input.focus();
      }
    },
  },
  h('h1', {}, 'kiln console'),
  h('p', { id: 'key-help' }, 'This server needs an API key. It is kept in this browser tab (or, if you tick the box, in this browser) and sent as a bearer token.'),
  h('label', { for: 'key' }, 'API key', input),
  h('p', {}, h('label', { class: 'row' }, remember, 'Remember on this device')),
  h('div', { class: 'row end' }, h('button', { class: 'primary', type: 'submit' }, 'Open console')),
  err);
  clear(main, form);
  input.focus();
}

function route() {
  cleanup?.();
  cleanup = null;
  document.getElementById('toast').classList.remove('show');
  if (needsKey()) {
    stopFeed();
    loginPage();
    return;
  }
  document.getElementById('signout').hidden = !getKey();
  startFeed();
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  const params = new URLSearchParams(query || '');
  let page = 'overview';
  let m;
  if ((m = path.match(/^\/tasks\/([^/]+)$/))) {
    page = 'tasks';
    cleanup = task.render(main, { id: decodeURIComponent(m[1]), live });
  } else if (path === '/tasks') {
    page = 'tasks';
    cleanup = tasks.render(main, { params, live });
  } else {
    cleanup = overview.render(main, { live });
  }
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.nav === page) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// Relative times stay current without asking the server anything.
setInterval(() => {
  for (const t of document.querySelectorAll('time[data-ago]')) t.textContent = agoText(Number(t.dataset.ago));
}, 1000);

document.getElementById('signout').addEventListener('click', () => {
  forgetKey();
  stopFeed();
  route();
});
window.addEventListener('kiln:unauthorized', () => {
  forgetKey();
  stopFeed();
  cleanup?.();
  cleanup = null;
  loginPage('The key was refused; enter another.');
});
window.addEventListener('hashchange', () => {
  route();
  main.focus();
});

async function start() {
  setLive('starting');
  try {
    const r = await fetch('config.json', { cache: 'no-store' });
    const cfg = await r.json();
    setAuthRequired(Boolean(cfg.auth));
  } catch {
    setAuthRequired(true);
  }
  route();
}

start();
