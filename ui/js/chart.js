// The overview's throughput chart: ended tasks per minute over the last hour, stacked by
// outcome, as inline SVG.

const NS = 'http://www.w3.org/2000/svg';

function el(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

// buckets: [{start_ms, counts: {succeeded, failed, canceled, expired}}], oldest first.
export function throughputChart(buckets) {
  const W = 600;
  const H = 120;
  const pad = 2;
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', preserveAspectRatio: 'none' });
  const max = Math.max(1, ...buckets.map((b) => total(b.counts)));
  const bw = W / Math.max(1, buckets.length);
  const title = el('title', {});
  const sum = buckets.reduce((a, b) => a + total(b.counts), 0);
  title.textContent = `${sum} tasks ended in the last hour; peak ${max} a minute`;
  svg.append(title);
  svg.append(el('line', { x1: 0, y1: H - pad, x2: W, y2: H - pad, class: 'axis' }));
  buckets.forEach((b, i) => {
    const c = b.counts || {};
    const parts = [
      ['ok', c.succeeded || 0],
      ['bad', (c.failed || 0) + (c.expired || 0)],
      ['other', c.canceled || 0],
    ];
    let y = H - pad;
    for (const [cls, n] of parts) {
      if (!n) continue;
      const hgt = (n / max) * (H - pad - 4);
      y -= hgt;
      const r = el('rect', { x: i * bw + 1, y, width: Math.max(1, bw - 2), height: hgt, class: cls });
      const t = el('title', {});
      t.textContent = `${new Date(b.start_ms).toLocaleTimeString()}: ${n} ${cls === 'ok' ? 'succeeded' : cls === 'bad' ? 'failed' : 'canceled'}`;
      r.append(t);
      svg.append(r);
    }
  });
  return svg;
}

export function total(c) {
  return Object.values(c || {}).reduce((a, n) => a + n, 0);
}

// Failure rate: failed and expired over everything that ended.
export function failureRate(buckets) {
  let all = 0;
  let bad = 0;
  for (const b of buckets) {
    all += total(b.counts);
    bad += (b.counts?.failed || 0) + (b.counts?.expired || 0);
  }
  return { all, bad, rate: all ? bad / all : 0 };
}
