// Server-sent events over fetch (EventSource cannot send an Authorization header): named
// events with ids, resumed with Last-Event-ID after a dropped connection, with backoff.

import { authHeaders } from './api.js';

export function openStream(path, { onEvent, onOpen, onState, endOn }) {
  let lastId = null;
  let stopped = false;
  let ctrl = null;
  let delay = 1000;
  let timer = null;

  async function connect() {
    if (stopped) return;
    ctrl = new AbortController();
    const headers = { Accept: 'text/event-stream', ...authHeaders() };
    if (lastId) headers['Last-Event-ID'] = lastId;
    let ended = false;
    try {
      const r = await fetch(path, { headers, signal: ctrl.signal, cache: 'no-store' });
      if (r.status === 401 || r.status === 403 || r.status === 404) {
        onState?.('refused', r.status);
        return;
      }
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      delay = 1000;
      onState?.('live');
      onOpen?.(lastId !== null);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let m;
        while ((m = /\r?\n\r?\n/.exec(buf)) !== null) {
          const block = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          const ev = parse(block);
          if (!ev) continue;
          if (ev.id) lastId = ev.id;
          onEvent(ev.event, ev.data, ev.id);
          if (endOn && endOn(ev.event)) ended = true;
        }
      }
    } catch (e) {
      if (stopped || e.name === 'AbortError') return;
    }
    if (stopped || ended) return;
    onState?.('reconnecting');
    timer = setTimeout(connect, delay);
    delay = Math.min(delay * 2, 15000);
  }

  connect();
  return {
    close() {
      stopped = true;
      clearTimeout(timer);
      ctrl?.abort();
    },
  };
}

function parse(block) {
  let event = 'message';
  let id = null;
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(':')) continue;
    const c = line.indexOf(':');
    const field = c < 0 ? line : line.slice(0, c);
    const value = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') id = value;
  }
  if (!data.length) return null;
  let parsed;
  try {
    parsed = JSON.parse(data.join('\n'));
  } catch {
    parsed = data.join('\n');
  }
  return { event, data: parsed, id };
}
