// Overview: workers, queue depth, throughput over the last hour, paused state, live feed.

import { actionError, api } from './api.js';
import { ago, badge, clear, confirmAction, h, throttle, toast } from './dom.js';
import { failureRate, throughputChart } from './chart.js';

function workerState(w) {
  if (!w.connected) return 'offline';
  return w.draining ? 'draining' : 'online';
}

function gpuText(g) {
  if (!g) return '';
  const parts = [];
  if (g.util !== undefined && g.util !== null) parts.push(`${Math.round(g.util)} %`);
  if (g.mem_used_mb !== undefined && g.mem_total_mb) parts.push(`${(g.mem_used_mb / 1024).toFixed(1)} / ${(g.mem_total_mb / 1024).toFixed(1)} GiB`);
  return parts.join(' · ');
}

export function render(main, { live }) {
  const stats = h('div', { class: 'grid', id: 'stats' });
  const workersBox = h('div', { class: 'scroll', id: 'workers' }, h('p', { class: 'empty' }, 'Loading…'));
  const queueBox = h('div', { class: 'scroll', id: 'queue' }, h('p', { class: 'empty' }, 'Loading…'));
  const chartBox = h('div', { class: 'chart', id: 'throughput' });
  const feedList = h('ul', { class: 'feed', id: 'feed', 'aria-live': 'off' });
  const pauseBtn = h('button', { id: 'pause', type: 'button' }, 'Pause queue');
  const pausedBadge = h('span', { id: 'paused-badge' });
  let alive = true;
  clear(main,
    h('h1', {}, 'Overview'),
    stats,
    h('section', { class: 'card', 'aria-labelledby': 'h-workers' }, h('h2', { id: 'h-workers' }, 'Workers'), workersBox),
    h('section', { class: 'card', 'aria-labelledby': 'h-queue' },
      h('div', { class: 'row' }, h('h2', { id: 'h-queue' }, 'Queue'), pausedBadge, pauseBtn),
      queueBox),
    h('section', { class: 'card', 'aria-labelledby': 'h-tp' },
      h('h2', { id: 'h-tp' }, 'Throughput, last hour'), chartBox,
      h('div', { class: 'row axis-labels' }, h('span', {}, '60 min ago'), h('span', {}, 'now')),
      h('div', { class: 'legend' }, h('span', {}, h('i', { class: 'ok' }), 'succeeded'), h('span', {}, h('i', { class: 'bad' }), 'failed / expired'), h('span', {}, h('i', { class: 'other' }), 'canceled'))),
    h('section', { class: 'card', 'aria-labelledby': 'h-feed' }, h('h2', { id: 'h-feed' }, 'Live events'), feedList));

  let workers = [];
  let queue = { rows: [], paused: false, exact: true };
  let tp = [];

  function renderStats() {
    const count = (s) => workers.filter((w) => workerState(w) === s).length;
    const on = workers.filter((w) => w.connected);
    const used = on.reduce((a, w) => a + w.inflight, 0);
    const total = on.reduce((a, w) => a + w.slots, 0);
    const sum = (k) => queue.rows.reduce((a, r) => a + r[k], 0);
    const fr = failureRate(tp);
    clear(stats,
      h('div', { class: 'card', id: 'stat-workers' }, h('div', { class: 'muted' }, 'Workers'),
        h('div', { class: 'stat' }, `${count('online')} `, h('small', {}, `online · ${count('draining')} draining · ${count('offline')} offline`))),
      h('div', { class: 'card', id: 'stat-slots' }, h('div', { class: 'muted' }, 'Slots'),
        h('div', { class: 'stat' }, `${used} `, h('small', {}, `used of ${total}`))),
      h('div', { class: 'card', id: 'stat-queue' }, h('div', { class: 'muted' }, 'Queue'),
        h('div', { class: 'stat' }, `${sum('queued') + sum('retry_waiting')} `, h('small', {}, `waiting · ${sum('running')} running · ${sum('dead')} dead`))),
      h('div', { class: 'card', id: 'stat-rate' }, h('div', { class: 'muted' }, 'Last hour'),
        h('div', { class: 'stat' }, `${fr.all} `, h('small', {}, `ended · ${(fr.rate * 100).toFixed(1)} % failed`))));
  }

  function renderWorkers() {
    if (!workers.length) {
      clear(workersBox, h('p', { class: 'empty' }, 'No worker has connected. Tasks wait in the queue until one does.'));
      return;
    }
    clear(workersBox, h('table', {},
      h('thead', {}, h('tr', {}, ['Worker', 'State', 'Slots', 'Task types', 'Models', 'Last heartbeat', 'GPU', ''].map((c, i) => h('th', { class: i === 2 ? 'num' : i === 5 || i === 6 ? 'hide-sm' : null }, c)))),
      h('tbody', {}, workers.map((w) => {
        const st = workerState(w);
        const drain = h('button', {
          type: 'button', disabled: st !== 'online', 'aria-label': `Drain worker ${w.worker_id}`,
          onclick: async () => {
            if (!(await confirmAction(`Drain worker ${w.worker_id}? It finishes its running tasks and takes no new ones.`, 'Drain'))) return;
            try {
              await api(`/v1/workers/${encodeURIComponent(w.worker_id)}/drain`, { method: 'POST' });
              toast(`Draining ${w.worker_id}`);
            } catch (e) {
              toast(actionError(e));
            }
          },
        }, 'Drain');
        const caps = w.capabilities || {};
        return h('tr', { 'data-worker': w.worker_id },
          h('td', {}, h('code', {}, w.worker_id)),
          h('td', {}, badge(st)),
          h('td', { class: 'num' }, `${w.inflight} / ${w.slots}`),
          h('td', {}, (caps.task_types || []).join(', ')),
          h('td', {}, (caps.models || []).join(', ') || h('span', { class: 'muted' }, 'none')),
          h('td', { class: 'hide-sm' }, w.last_seen ? ago(w.last_seen) : ''),
          h('td', { class: 'hide-sm' }, gpuText(w.gpu) || h('span', { class: 'muted' }, 'not reported')),
          h('td', {}, drain));
      }))));
  }

  function renderQueue() {
    clear(pausedBadge, queue.paused ? badge('paused') : h('span', { class: 'muted' }, 'dispatching'));
    pauseBtn.textContent = queue.paused ? 'Resume queue' : 'Pause queue';
    if (!queue.rows.length) {
      clear(queueBox, h('p', { class: 'empty' }, 'Nothing queued, running or dead.'));
      return;
    }
    clear(queueBox, h('table', {},
      h('thead', {}, h('tr', {}, ['Task type', 'Model', 'Queued', 'Retry-waiting', 'Running', 'Dead'].map((c, i) => h('th', { class: i > 1 ? 'num' : null }, c)))),
      h('tbody', {}, queue.rows.map((r) => h('tr', { 'data-type': r.task_type },
        h('td', {}, h('a', { href: `#/tasks?task_type=${encodeURIComponent(r.task_type)}` }, r.task_type)),
        h('td', {}, r.model || h('span', { class: 'muted' }, 'any')),
        h('td', { class: 'num' }, r.queued),
        h('td', { class: 'num' }, r.retry_waiting),
        h('td', { class: 'num' }, r.running),
        h('td', { class: 'num' }, r.dead ? h('a', { href: `#/tasks?status=failed&task_type=${encodeURIComponent(r.task_type)}` }, r.dead) : 0))))),
    queue.exact ? '' : h('p', { class: 'muted' }, 'Counts are lower bounds (more than 5000 tasks in a state).'));
  }

  function renderChart() {
    const fr = failureRate(tp);
    clear(chartBox, throughputChart(tp), fr.all ? '' : h('p', { class: 'empty' }, 'No task ended in the last hour.'));
  }

  const loadWorkers = async () => {
    const r = await api('/v1/workers');
    if (!alive) return;
    workers = r.data;
    queue.paused = r.paused;
    renderWorkers();
    renderStats();
    renderQueue();
  };
  const loadQueue = async () => {
    const q = await api('/v1/queue');
    if (!alive) return;
    queue = q;
    renderQueue();
    renderStats();
  };
  const loadTp = async () => {
    const t = (await api('/v1/queue/throughput')).buckets;
    if (!alive) return;
    tp = t;
    renderChart();
    renderStats();
  };
  // Network failures are the live feed's to report (it reconnects and resyncs); a page left
  // meanwhile renders nothing.
  const quiet = (f) => () => {
    if (!alive) return undefined;
    return f().catch((e) => {
      if (alive && e.status && e.status !== 401) toast(`Cannot load: ${e.message}`);
    });
  };
  const refreshWorkers = throttle(quiet(loadWorkers), 250);
  const refreshQueue = throttle(quiet(loadQueue), 1000);
  const refreshTp = throttle(quiet(loadTp), 2000);

  pauseBtn.addEventListener('click', async () => {
    const resume = queue.paused;
    const ok = await confirmAction(resume ? 'Resume dispatching queued tasks to workers?' : 'Pause the queue? Tasks are still accepted but none is dispatched until you resume.', resume ? 'Resume' : 'Pause');
    if (!ok) return;
    try {
      const r = await api(`/v1/admin/queue/${resume ? 'resume' : 'pause'}`, { method: 'POST' });
      queue.paused = r.paused;
      renderQueue();
    } catch (e) {
      toast(actionError(e));
    }
  });

  function note(kind, data) {
    const what = data.worker_id && kind.startsWith('worker.') ? data.worker_id
      : data.task_id ? data.task_id : data.task_type ? `${data.task_type}: ${data.queued} queued, ${data.running} running` : '';
    const item = h('li', {}, h('span', { class: 'muted mono' }, new Date().toLocaleTimeString(undefined, { hour12: false })), h('strong', {}, kind),
      data.task_id ? h('a', { href: `#/tasks/${data.task_id}`, class: 'mono' }, what) : h('span', { class: 'mono' }, what),
      data.status ? badge(data.status) : '');
    feedList.prepend(item);
    while (feedList.children.length > 50) feedList.lastChild.remove();
  }

  const off = live.on((kind, data) => {
    if (kind === 'resync') {
      refreshWorkers();
      refreshQueue();
      refreshTp();
      return;
    }
    if (kind !== 'worker.updated') note(kind, data);
    if (kind.startsWith('worker.') || kind.startsWith('queue.paused') || kind.startsWith('queue.resumed')) refreshWorkers();
    if (kind.startsWith('task.') || kind === 'queue.backlog') refreshQueue();
    if (kind === 'task.completed') refreshTp();
  });
  quiet(loadWorkers)();
  quiet(loadQueue)();
  quiet(loadTp)();
  document.title = 'Overview · kiln console';
  return () => {
    alive = false;
    off();
  };
}
