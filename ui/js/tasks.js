// Tasks: the list with filters (status, type, model, worker, creation time) and cursor
// paging; rows update live.

import { api } from './api.js';
import { badge, clear, fmtMs, fmtTime, h, throttle, toast } from './dom.js';

const STATUSES = ['', 'queued', 'running', 'succeeded', 'failed', 'canceled', 'expired'];
const FIELDS = ['status', 'task_type', 'model', 'worker', 'created_after', 'created_before'];

function toLocalInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

function duration(t) {
  if (!t.started_at) return '';
  const end = t.completed_at ? Date.parse(t.completed_at) : Date.now();
  return fmtMs(end - Date.parse(t.started_at));
}

export function render(main, { params, live }) {
  let alive = true;
  const filters = Object.fromEntries(FIELDS.map((f) => [f, params.get(f) || '']));
  const inputs = {
    status: h('select', { id: 'f-status', name: 'status' }, STATUSES.map((s) => h('option', { value: s, selected: s === filters.status }, s || 'any'))),
    task_type: h('input', { id: 'f-type', name: 'task_type', value: filters.task_type, placeholder: 'e.g. txt2img' }),
    model: h('input', { id: 'f-model', name: 'model', value: filters.model }),
    worker: h('input', { id: 'f-worker', name: 'worker', value: filters.worker }),
    created_after: h('input', { id: 'f-after', name: 'created_after', type: 'datetime-local', value: toLocalInput(filters.created_after) }),
    created_before: h('input', { id: 'f-before', name: 'created_before', type: 'datetime-local', value: toLocalInput(filters.created_before) }),
  };
  const form = h('form', {
    class: 'card filters', id: 'filters', role: 'search',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [k, el] of Object.entries(inputs)) {
        let v = el.value.trim();
        if (v && el.type === 'datetime-local') v = new Date(v).toISOString();
        if (v) q.set(k, v);
      }
      location.hash = `#/tasks${q.toString() ? `?${q}` : ''}`;
    },
  },
  h('label', { for: 'f-status' }, 'Status', inputs.status),
  h('label', { for: 'f-type' }, 'Task type', inputs.task_type),
  h('label', { for: 'f-model' }, 'Model', inputs.model),
  h('label', { for: 'f-worker' }, 'Worker', inputs.worker),
  h('label', { for: 'f-after' }, 'Created after', inputs.created_after),
  h('label', { for: 'f-before' }, 'Created before', inputs.created_before),
  h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary' }, 'Apply'), h('a', { href: '#/tasks' }, 'Clear')));

  const body = h('tbody', { id: 'task-rows' });
  const more = h('button', { type: 'button', id: 'more', hidden: true }, 'Load more');
  const empty = h('p', { class: 'empty', hidden: true }, 'No task matches.');
  clear(main, h('h1', {}, 'Tasks'), form,
    h('section', { class: 'card' },
      h('div', { class: 'scroll' }, h('table', { id: 'tasks' },
        h('thead', {}, h('tr', {}, ['Task', 'Type', 'Model', 'Status', 'Worker', 'Created', 'Run time'].map((c, i) => h('th', { class: i === 2 || i === 4 || i === 6 ? 'hide-sm' : null }, c)))),
        body)),
      empty, h('div', { class: 'row' }, more)));

  const rows = new Map();
  let cursor = null;

  function row(t) {
    return h('tr', { 'data-task': t.id, 'data-status': t.status },
      h('td', {}, h('a', { href: `#/tasks/${t.id}`, class: 'mono' }, t.id)),
      h('td', {}, t.task_type),
      h('td', { class: 'hide-sm' }, t.model || ''),
      h('td', {}, badge(t.status)),
      h('td', { class: 'hide-sm mono' }, t.attempts.length ? t.attempts[t.attempts.length - 1].worker : ''),
      h('td', {}, fmtTime(t.created_at)),
      h('td', { class: 'hide-sm' }, duration(t)));
  }

  function put(t, atTop) {
    const r = row(t);
    const old = rows.get(t.id);
    if (old) old.replaceWith(r);
    else if (atTop) body.prepend(r);
    else body.append(r);
    rows.set(t.id, r);
    empty.hidden = rows.size > 0;
  }

  function query(extra) {
    const q = new URLSearchParams({ limit: '50' });
    for (const f of FIELDS) if (filters[f]) q.set(f, filters[f]);
    for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
    return `/v1/tasks?${q}`;
  }

  async function load(reset) {
    try {
      const page = await api(query(reset || !cursor ? {} : { cursor }));
      if (!alive) return;
      if (reset) {
        body.replaceChildren();
        rows.clear();
      }
      for (const t of page.data) put(t, false);
      cursor = page.next_cursor;
      more.hidden = !cursor;
      empty.hidden = rows.size > 0;
    } catch (e) {
      if (alive && e.status && e.status !== 401) toast(`Cannot list tasks: ${e.message}`);
    }
  }
  more.addEventListener('click', () => load(false));

  function matches(t) {
    if (filters.status && t.status !== filters.status) return false;
    if (filters.task_type && t.task_type !== filters.task_type) return false;
    if (filters.model && t.model !== filters.model) return false;
    if (filters.worker && !t.attempts.some((a) => a.worker === filters.worker)) return false;
    if (filters.created_after && Date.parse(t.created_at) < Date.parse(filters.created_after)) return false;
    if (filters.created_before && Date.parse(t.created_at) >= Date.parse(filters.created_before)) return false;
    return true;
  }

  // A task that changed: update its row, or add it on top when it is new and matches.
  const pending = new Set();
  const flush = throttle(async () => {
    const ids = [...pending];
    pending.clear();
    if (ids.length > 10) {
      // Busy: one request for the first page instead of one per task.
      await load(true);
      return;
    }
    for (const id of ids) {
      try {
        const t = await api(`/v1/tasks/${id}`);
        if (!alive) return;
        if (matches(t)) put(t, !rows.has(id));
        else if (rows.has(id)) {
          rows.get(id).remove();
          rows.delete(id);
        }
      } catch {
        // Gone or unreadable: leave the row as it is.
      }
    }
  }, 500);

  const off = live.on((kind, data) => {
    if (kind === 'resync') {
      load(true);
      return;
    }
    if (!kind.startsWith('task.') || !data.task_id) return;
    if (rows.has(data.task_id) || kind === 'task.queued') {
      pending.add(data.task_id);
      flush();
    }
  });
  load(true);
  document.title = 'Tasks · kiln console';
  return () => {
    alive = false;
    off();
  };
}
