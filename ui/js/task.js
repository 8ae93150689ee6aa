// One task: summary, actions, progress, timeline of every event (live), attempts, stage
// waterfall, input and output media, raw JSON.

import { actionError, api, fileUrl } from './api.js';
import { badge, clear, confirmAction, fmtMs, fmtTime, h, throttle, toast } from './dom.js';
import { openStream } from './sse.js';

const FILE_ID = /^file_[0-9a-f]{32}$/;

// File ids named anywhere in a task's input.
function inputFiles(v, out = new Set()) {
  if (typeof v === 'string' && FILE_ID.test(v)) out.add(v);
  else if (Array.isArray(v)) v.forEach((x) => inputFiles(x, out));
  else if (v && typeof v === 'object') Object.values(v).forEach((x) => inputFiles(x, out));
  return out;
}

function media(url, contentType, caption) {
  const fig = h('figure', {});
  const isVideo = (contentType || '').startsWith('video/');
  const el = isVideo ? h('video', { controls: true, preload: 'metadata' }) : h('img', { alt: caption, loading: 'lazy' });
  fig.append(el, h('figcaption', {}, caption));
  fileUrl(url).then((u) => {
    el.src = u;
  }).catch((e) => {
    fig.append(h('p', { class: 'muted' }, `Cannot load: ${e.message}`));
  });
  return fig;
}

function waterfall(t) {
  const tm = t.timings || {};
  const bars = [];
  let at = 0;
  const add = (name, ms, cls) => {
    if (ms === undefined || ms === null) return;
    bars.push({ name, start: at, ms, cls });
    at += ms;
  };
  if (tm.compress_ms !== undefined) bars.push({ name: 'compress references', start: 0, ms: tm.compress_ms, cls: '' });
  add('queued', tm.queued_ms, '');
  add('dispatch', tm.dispatch_ms, '');
  const runStart = at;
  add('run', tm.run_ms, '');
  let w = runStart;
  for (const [k, v] of Object.entries(tm.worker || {})) {
    bars.push({ name: `worker: ${k.replace(/_ms$/, '')}`, start: w, ms: v, cls: 'worker' });
    w += v;
  }
  if (tm.upload_ms !== undefined && !(tm.worker && 'upload_ms' in tm.worker)) bars.push({ name: 'upload outputs', start: w, ms: tm.upload_ms, cls: 'worker' });
  if (!bars.length) return h('p', { class: 'empty' }, 'No stage timings yet.');
  const end = Math.max(1, ...bars.map((b) => b.start + b.ms));
  const grid = h('div', { class: 'wf', id: 'waterfall', 'aria-label': 'Stage timings' });
  for (const b of bars) {
    const seg = h('div', { class: `seg ${b.cls}` });
    seg.style.left = `${(b.start / end) * 100}%`;
    seg.style.width = `${Math.max(0.3, (b.ms / end) * 100)}%`;
    grid.append(h('div', {}, b.name), h('div', { class: 'track', title: `${b.name}: ${fmtMs(b.ms)}` }, seg), h('div', { class: 'val' }, fmtMs(b.ms)));
  }
  return grid;
}

function eventText(kind, d) {
  if (kind === 'progress') {
    const pct = d.percent ?? (d.total ? Math.round((100 * d.step) / d.total) : null);
    return `${d.stage || 'progress'} ${d.step ?? ''}${d.total ? ` / ${d.total}` : ''}${pct !== null ? ` (${pct} %)` : ''}`;
  }
  if (kind === 'status') {
    const bits = [d.status];
    if (d.attempt) bits.push(`attempt ${d.attempt}`);
    if (d.worker_id) bits.push(`on ${d.worker_id}`);
    if (d.cancel_requested) bits.push('cancel requested');
    if (d.error) bits.push(`error: ${d.error.code || ''} ${d.error.message || ''}`);
    return bits.join(' · ');
  }
  if (kind === 'completed') return `${d.status}${d.error ? ` — ${d.error.code}: ${d.error.message}` : ''}`;
  return JSON.stringify(d);
}

export function render(main, { id }) {
  let alive = true;
  const head = h('div', { id: 'task-head' });
  const progress = h('div', { id: 'task-progress' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline', 'aria-live': 'polite' });
  const attempts = h('div', { class: 'scroll', id: 'attempts' });
  const wf = h('div', { id: 'stages' });
  const inputs = h('div', { class: 'media', id: 'inputs' });
  const outputs = h('div', { class: 'media', id: 'outputs' });
  const raw = h('pre', { class: 'json', id: 'raw', tabindex: '0' });
  clear(main,
    h('p', {}, h('a', { href: '#/tasks' }, '← Tasks')),
    head, progress,
    h('div', { class: 'grid' },
      h('section', { class: 'card', 'aria-labelledby': 'h-tl' }, h('h2', { id: 'h-tl' }, 'Timeline'), timeline),
      h('section', { class: 'card', 'aria-labelledby': 'h-st' }, h('h2', { id: 'h-st' }, 'Stages'), wf)),
    h('section', { class: 'card', 'aria-labelledby': 'h-at' }, h('h2', { id: 'h-at' }, 'Attempts'), attempts),
    h('section', { class: 'card', 'aria-labelledby': 'h-out' }, h('h2', { id: 'h-out' }, 'Output'), outputs),
    h('section', { class: 'card', 'aria-labelledby': 'h-in' }, h('h2', { id: 'h-in' }, 'Input'), inputs),
    h('section', { class: 'card' }, h('details', {}, h('summary', {}, 'Raw JSON'), raw)));

  let shownOutputs = '';
  let shownInputs = '';

  function show(t) {
    const canCancel = t.status === 'queued' || t.status === 'running';
    const cancel = h('button', {
      type: 'button', id: 'cancel', class: 'danger', disabled: !canCancel || t.cancel_requested,
      onclick: async () => {
        if (!(await confirmAction(`Cancel task ${t.id}? ${t.status === 'running' ? 'Its worker is told to stop.' : 'It leaves the queue.'}`, 'Cancel task'))) return;
        try {
          show(await api(`/v1/tasks/${t.id}/cancel`, { method: 'POST' }));
          toast('Cancel requested');
        } catch (e) {
          toast(actionError(e));
        }
      },
    }, t.cancel_requested ? 'Cancel requested' : 'Cancel task');
    const canRetry = t.status === 'failed' || t.status === 'expired' || t.status === 'canceled';
    const retry = canRetry ? h('button', {
      type: 'button', id: 'retry',
      onclick: async () => {
        if (!(await confirmAction(`Run task ${t.id} again as a new attempt?`, 'Retry task'))) return;
        try {
          show(await api(`/v1/tasks/${t.id}/retry`, { method: 'POST' }));
          toast('Queued again');
        } catch (e) {
          toast(actionError(e));
        }
      },
    }, 'Retry task') : '';
    const eta = t.waiting_for_worker ? 'waiting for a worker (none serving it is online)'
      : t.estimated_start_s !== null ? `starts in about ${t.estimated_start_s} s${t.estimated_finish_s !== null ? `, done in about ${t.estimated_finish_s} s` : ''}` : '—';
    clear(head,
      h('h1', {}, h('span', { class: 'mono' }, t.id), ' ', h('span', { id: 'task-status' }, badge(t.status)), t.dead_lettered ? [' ', badge('dead')] : ''),
      h('div', { class: 'card' },
        h('dl', { class: 'kv' },
          h('dt', {}, 'Type'), h('dd', {}, t.task_type),
          h('dt', {}, 'Model'), h('dd', {}, t.model || '—'),
          h('dt', {}, 'Labels'), h('dd', {}, t.labels.join(', ') || '—'),
          h('dt', {}, 'Priority'), h('dd', {}, t.priority),
          h('dt', {}, 'Created'), h('dd', {}, fmtTime(t.created_at)),
          h('dt', {}, 'Started'), h('dd', {}, fmtTime(t.started_at) || '—'),
          h('dt', {}, 'Ended'), h('dd', {}, fmtTime(t.completed_at) || '—'),
          t.queue_position !== null ? [h('dt', {}, 'Queue position'), h('dd', {}, t.queue_position), h('dt', {}, 'Estimate'), h('dd', { id: 'task-eta' }, eta)] : '',
          t.error ? [h('dt', {}, 'Error'), h('dd', { class: 's-failed' }, `${t.error.code}: ${t.error.message}`)] : ''),
        h('div', { class: 'row end' }, retry, cancel)));
    if (t.progress && t.status === 'running') {
      const pct = t.progress.percent ?? (t.progress.total ? (100 * t.progress.step) / t.progress.total : 0);
      const bar = h('div', {});
      bar.style.width = `${Math.min(100, pct)}%`;
      clear(progress, h('div', { class: 'progress', role: 'progressbar', 'aria-valuenow': Math.round(pct), 'aria-valuemin': 0, 'aria-valuemax': 100 }, bar),
        h('p', { class: 'muted' }, `${t.progress.stage || ''} ${Math.round(pct)} %`));
    } else clear(progress);
    clear(attempts, t.attempts.length ? h('table', {},
      h('thead', {}, h('tr', {}, ['#', 'Worker', 'Started', 'Ended', 'Took', 'Error'].map((c) => h('th', {}, c)))),
      h('tbody', {}, t.attempts.map((a) => h('tr', {},
        h('td', {}, a.attempt), h('td', { class: 'mono' }, a.worker), h('td', {}, fmtTime(a.started_at)),
        h('td', {}, fmtTime(a.ended_at)), h('td', {}, a.ended_at ? fmtMs(Date.parse(a.ended_at) - Date.parse(a.started_at)) : 'running'),
        h('td', { class: a.error ? 's-failed' : '' }, a.error || ''))))) : h('p', { class: 'empty' }, 'Not started yet.'));
    clear(wf, waterfall(t));
    const files = (t.output && Array.isArray(t.output.files)) ? t.output.files.filter((f) => f.url) : [];
    const outKey = files.map((f) => f.url).join();
    if (outKey !== shownOutputs) {
      shownOutputs = outKey;
      clear(outputs, files.length ? files.map((f) => media(f.url, f.content_type, `${f.id} · ${f.content_type || ''}${f.width ? ` · ${f.width}×${f.height}` : ''}`)) : h('p', { class: 'empty' }, t.status === 'succeeded' ? 'No files in the output.' : 'No output yet.'));
    }
    const ins = [...inputFiles(t.input)];
    const inKey = ins.join();
    if (inKey !== shownInputs || !inputs.childElementCount) {
      shownInputs = inKey;
      clear(inputs, ins.length ? ins.map((f) => media(`/v1/files/${f}`, '', f)) : h('p', { class: 'empty' }, 'No input images.'));
    }
    raw.textContent = JSON.stringify(t, null, 2);
    document.title = `${t.id} · kiln console`;
  }

  const reload = throttle(async () => {
    try {
      const t = await api(`/v1/tasks/${encodeURIComponent(id)}`);
      if (alive) show(t);
    } catch (e) {
      if (!alive || !e.status) return;
      if (e.status === 404) clear(head, h('h1', {}, 'No such task'), h('p', {}, id));
      else if (e.status !== 401) toast(`Cannot load the task: ${e.message}`);
    }
  }, 250);

  const seen = new Set();
  const stream = openStream(`/v1/tasks/${encodeURIComponent(id)}/events`, {
    onEvent: (kind, data, evId) => {
      if (evId && seen.has(evId)) return;
      if (evId) seen.add(evId);
      const when = data.ts ? new Date(data.ts) : new Date();
      timeline.append(h('li', { 'data-kind': kind },
        h('span', { class: 'when' }, when.toLocaleTimeString(undefined, { hour12: false, hour: '2-digit', minute: '2-digit', second: '2-digit', fractionalSecondDigits: 3 })),
        h('strong', {}, kind), ' ', eventText(kind, data)));
      reload();
    },
    onOpen: () => reload(),
    endOn: (kind) => kind === 'completed',
  });
  reload();
  return () => {
    alive = false;
    stream.close();
  };
}
