// Browser tests of the operator console: headless Debian chromium driven by playwright-core,
// against the real `kiln serve` (built-in demo worker) on a free 127.0.0.1 port with a
// throwaway data directory. Screenshots of every page go to target/ui-screenshots/.
//
// Run: node --test tests/ui/console.test.mjs  (scripts/ui-tests.sh builds kiln first)

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.CONSOLE_TEST_BIN || path.join(process.env.CARGO_TARGET_DIR || path.join(root, 'target'), 'debug/kiln');
const SHOTS = path.join(root, 'target/ui-screenshots');
const STEP = 20_000;
mkdirSync(SHOTS, { recursive: true });

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// Starts `kiln serve`; resolves once it printed its address and /healthz answers.
async function startKiln({ port, data, env = {} }) {
  const child = spawn(BIN, ['serve'], {
    env: {
      ...process.env,
      KILN_SERVER__LISTEN: `127.0.0.1:${port}`,
      KILN_SERVER__DATA_DIR: data,
      KILN_SERVER__SHUTDOWN_GRACE: '1s',
      KILN_LOG__FILTER: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const line = await new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: child.stdout });
    const t = setTimeout(() => reject(new Error('kiln did not start in 30 s')), 30_000);
    rl.once('line', (l) => {
      clearTimeout(t);
      resolve(l);
    });
    child.once('exit', (c) => reject(new Error(`kiln exited with ${c}`)));
  });
  assert.match(line, /^kiln listening on http:\/\/127\.0\.0\.1:\d+$/);
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(`${base}/healthz`)).ok) break;
    } catch {
      // not yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    base,
    child,
    async stop() {
      if (child.exitCode !== null) return;
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await done;
      clearTimeout(t);
    },
  };
}

async function apiCall(base, p, { method = 'GET', body, key } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const r = await fetch(`${base}${p}`, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const text = await r.text();
  return { status: r.status, json: text ? JSON.parse(text) : null };
}

async function waitFor(fn, what, ms = STEP) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// A fresh profile each time (`--user-data-dir`, which playwright passes for a persistent
// context). Returns the context: `newPage()` and `close()` as a browser has.
async function launch() {
  const profile = mkdtempSync(path.join(os.tmpdir(), 'kiln-ui-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  return { browser: context, profile };
}

async function newPage(b, width, height) {
  const page = await b.browser.newPage();
  await page.setViewportSize({ width, height });
  page.setDefaultTimeout(STEP);
  return page;
}

// Every console error and uncaught exception of a page, unless `quiet` is set.
function watch(page) {
  const errors = [];
  const state = { quiet: false };
  page.on('console', (m) => {
    if (m.type() === 'error' && !state.quiet) errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  return { errors, state };
}

describe('console without API keys', () => {
  let kiln;
  let data;
  let port;
  let b;
  let page;
  let watched;

  before(async () => {
    data = mkdtempSync(path.join(os.tmpdir(), 'kiln-ui-'));
    port = await freePort();
    kiln = await startKiln({ port, data });
    b = await launch();
    page = await newPage(b, 1920, 1080);
    watched = watch(page);
  });

  after(async () => {
    await b?.browser.close();
    await kiln?.stop();
    if (b) rmSync(b.profile, { recursive: true, force: true });
    if (data) rmSync(data, { recursive: true, force: true });
  });

  test('serves the console with its content types and cache headers', async () => {
    const r = await fetch(`${kiln.base}/ui`, { redirect: 'manual' });
    assert.equal(r.status, 308);
    const index = await fetch(`${kiln.base}/ui/`);
    assert.equal(index.headers.get('content-type'), 'text/html; charset=utf-8');
    assert.equal(index.headers.get('cache-control'), 'no-cache');
    assert.match(index.headers.get('content-security-policy'), /default-src 'none'/);
    const js = await fetch(`${kiln.base}/ui/js/app.js`);
    assert.equal(js.headers.get('content-type'), 'text/javascript; charset=utf-8');
    const again = await fetch(`${kiln.base}/ui/js/app.js`, { headers: { 'if-none-match': js.headers.get('etag') } });
    assert.equal(again.status, 304);
    assert.equal((await fetch(`${kiln.base}/ui/nope.js`)).status, 404);
  });

  test('the overview shows the worker and the queue', async () => {
    await page.goto(`${kiln.base}/ui`);
    const row = page.locator('#workers tr[data-worker]');
    await row.first().waitFor();
    assert.match(await row.first().innerText(), /online/);
    assert.match(await row.first().innerText(), /txt2img/);
    await page.locator('#live.on').waitFor();
    assert.match(await page.locator('#stat-workers').innerText(), /1\s+online/);
    await page.locator('#queue').waitFor();
    assert.match(await page.locator('#paused-badge').innerText(), /dispatching/);
    // The queue fills live: pause dispatch, submit, see the row without a reload.
    await apiCall(kiln.base, '/v1/admin/queue/pause', { method: 'POST' });
    await page.locator('#paused-badge .badge.s-paused').waitFor();
    const t = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'txt2img', input: { prompt: 'queued while paused', width: 64, height: 64 } } });
    assert.equal(t.status, 202);
    const qrow = page.locator('#queue tr[data-type="txt2img"]');
    await qrow.waitFor();
    await waitFor(async () => /txt2img\s+any\s+1\s+0\s+0/.test(await qrow.innerText()), 'one queued txt2img task in the overview');
    await page.screenshot({ path: path.join(SHOTS, 'overview-paused.png'), fullPage: true });
    await apiCall(kiln.base, '/v1/admin/queue/resume', { method: 'POST' });
    await page.locator('#paused-badge .badge.s-paused').waitFor({ state: 'detached' });
    await apiCall(kiln.base, `/v1/tasks/${t.json.id}/cancel`, { method: 'POST' });
  });

  test('a task submitted through the API appears and turns succeeded without a reload', async () => {
    await page.goto(`${kiln.base}/ui/#/tasks`);
    await page.locator('#tasks').waitFor();
    const before = page.url();
    const t = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'txt2img', input: { prompt: 'a kiln at dusk', width: 256, height: 192 } } });
    assert.equal(t.status, 202);
    const row = page.locator(`tr[data-task="${t.json.id}"]`);
    await row.waitFor();
    await page.locator(`tr[data-task="${t.json.id}"][data-status="succeeded"]`).waitFor();
    assert.equal(page.url(), before);
    await page.screenshot({ path: path.join(SHOTS, 'tasks.png'), fullPage: true });

    // Filters and paging go to the server.
    await page.selectOption('#f-status', 'succeeded');
    await page.fill('#f-type', 'txt2img');
    await page.click('#filters button[type=submit]');
    await page.waitForURL(/status=succeeded/);
    await page.locator(`tr[data-task="${t.json.id}"]`).waitFor();
    assert.equal(await page.locator('tr[data-status="canceled"]').count(), 0);

    // Its page: timeline, attempts, stages and the output image.
    await page.locator(`tr[data-task="${t.json.id}"] a`).click();
    await page.waitForURL(new RegExp(`#/tasks/${t.json.id}$`));
    await page.locator('#timeline li[data-kind="completed"]').waitFor();
    assert.ok((await page.locator('#timeline li').count()) >= 3, 'timeline has queued, running, completed');
    await page.locator('#task-status .s-succeeded').waitFor();
    await page.locator('#attempts td.mono').first().waitFor();
    await page.locator('#waterfall .seg').first().waitFor();
    const img = page.locator('#outputs img');
    await img.waitFor();
    await waitFor(() => img.evaluate((e) => e.complete && e.naturalWidth === 256 && e.naturalHeight === 192), 'the output image decoded at 256x192');
    assert.match(await page.locator('#raw').textContent(), /"status": "succeeded"/);
    await page.screenshot({ path: path.join(SHOTS, 'task.png'), fullPage: true });
  });

  test('an edit shows its input and output images inline', async () => {
    const src = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'txt2img', input: { prompt: 'reference', width: 96, height: 64 } } });
    const done = await waitFor(async () => {
      const t = (await apiCall(kiln.base, `/v1/tasks/${src.json.id}`)).json;
      return t.status === 'succeeded' && t;
    }, 'the reference image');
    const ref = done.output.files[0].id;
    const t = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'img2img', input: { image: ref, prompt: 'mirror', width: 80, height: 40 } } });
    assert.equal(t.status, 202, JSON.stringify(t.json));
    await page.goto(`${kiln.base}/ui/#/tasks/${t.json.id}`);
    await page.locator('#task-status .s-succeeded').waitFor();
    const input = page.locator('#inputs img');
    await waitFor(() => input.evaluate((e) => e.complete && e.naturalWidth === 96 && e.naturalHeight === 64), 'the input image at 96x64');
    const output = page.locator('#outputs img');
    await waitFor(() => output.evaluate((e) => e.complete && e.naturalWidth === 80 && e.naturalHeight === 40), 'the output image at 80x40');
  });

  test('cancel from the console cancels the task', async () => {
    await apiCall(kiln.base, '/v1/admin/queue/pause', { method: 'POST' });
    const t = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'txt2img', input: { prompt: 'to be canceled' } } });
    await page.goto(`${kiln.base}/ui/#/tasks/${t.json.id}`);
    await page.locator('#task-status .s-queued').waitFor();
    await page.click('#cancel');
    await page.locator('#confirm[open]').waitFor();
    // Keep: nothing happens.
    await page.click('#confirm-no');
    assert.equal((await apiCall(kiln.base, `/v1/tasks/${t.json.id}`)).json.status, 'queued');
    await page.click('#cancel');
    await page.click('#confirm-yes');
    await page.locator('#task-status .s-canceled').waitFor();
    await page.locator('#timeline li[data-kind="completed"]').waitFor();
    assert.equal((await apiCall(kiln.base, `/v1/tasks/${t.json.id}`)).json.status, 'canceled');
    await apiCall(kiln.base, '/v1/admin/queue/resume', { method: 'POST' });
  });

  test('pause and resume from the overview, keyboard only', async () => {
    await page.goto(`${kiln.base}/ui/#/`);
    await page.locator('#workers tr[data-worker]').first().waitFor();
    await page.focus('#pause');
    await page.keyboard.press('Enter');
    await page.locator('#confirm[open]').waitFor();
    await page.keyboard.press('Tab');
    await page.keyboard.press('Enter');
    await waitFor(async () => (await apiCall(kiln.base, '/v1/workers')).json.paused === true, 'the queue paused');
    await page.locator('#paused-badge .s-paused').waitFor();
    await page.click('#pause');
    await page.click('#confirm-yes');
    await waitFor(async () => (await apiCall(kiln.base, '/v1/workers')).json.paused === false, 'the queue resumed');
    // Nav links are reachable with the keyboard.
    await page.focus('nav a[data-nav="tasks"]');
    await page.keyboard.press('Enter');
    await page.waitForURL(/#\/tasks$/);
  });

  test('the overview recovers after the server restarts', async () => {
    await page.goto(`${kiln.base}/ui/#/`);
    await page.locator('#live.on').waitFor();
    watched.state.quiet = true; // connection refused while it is down is expected
    await kiln.stop();
    await page.locator('#live.off').waitFor();
    kiln = await startKiln({ port, data });
    await page.locator('#live.on').waitFor({ timeout: 40_000 });
    await page.locator('#workers tr[data-worker] .s-online').first().waitFor({ timeout: 40_000 });
    watched.state.quiet = false;
    const t = await apiCall(kiln.base, '/v1/tasks', { method: 'POST', body: { task_type: 'txt2img', input: { prompt: 'after restart', width: 32, height: 32 } } });
    await page.locator(`#feed a[href="#/tasks/${t.json.id}"]`).first().waitFor();
    await page.screenshot({ path: path.join(SHOTS, 'overview.png'), fullPage: true });
  });

  test('works at 375 px wide', async () => {
    await page.setViewportSize({ width: 375, height: 800 });
    await page.goto(`${kiln.base}/ui/#/`);
    await page.locator('#workers tr[data-worker]').first().waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `page is ${overflow} px wider than the phone`);
    await page.screenshot({ path: path.join(SHOTS, 'overview-375.png'), fullPage: true });
    await page.goto(`${kiln.base}/ui/#/tasks`);
    await page.locator('#tasks tr[data-task]').first().waitFor();
    const o2 = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(o2 <= 0, `tasks page is ${o2} px wider than the phone`);
    await page.screenshot({ path: path.join(SHOTS, 'tasks-375.png'), fullPage: true });
    await page.setViewportSize({ width: 1920, height: 1080 });
  });

  test('drain from the overview', async () => {
    await page.goto(`${kiln.base}/ui/#/`);
    const drain = page.locator('#workers tr[data-worker] button', { hasText: 'Drain' }).first();
    await drain.click();
    await page.click('#confirm-yes');
    // The feed reports the drain; the demo worker then finishes, says bye and disconnects.
    await page.locator('#feed li', { hasText: 'worker.draining' }).first().waitFor();
    await page.locator('#workers tr[data-worker] :is(.s-draining, .s-offline)').first().waitFor();
    const w = (await apiCall(kiln.base, '/v1/workers')).json.data[0];
    assert.ok(w.draining || !w.connected, JSON.stringify(w));
  });

  test('no console errors on any page', () => {
    assert.deepEqual(watched.errors, []);
  });
});

describe('console with API keys', () => {
  const KEY = 'ui-test-key-0123456789';
  let kiln;
  let data;
  let b;

  before(async () => {
    data = mkdtempSync(path.join(os.tmpdir(), 'kiln-ui-keys-'));
    const hash = `sha256:${createHash('sha256').update(KEY).digest('hex')}`;
    kiln = await startKiln({ port: await freePort(), data, env: { KILN_GATEWAY__API_KEY_HASHES: hash } });
    b = await launch();
  });

  after(async () => {
    await b?.browser.close();
    await kiln?.stop();
    if (b) rmSync(b.profile, { recursive: true, force: true });
    if (data) rmSync(data, { recursive: true, force: true });
  });

  test('refuses to load data without a key, and loads with one', async () => {
    const page = await newPage(b, 1280, 800);
    const watched = watch(page);
    const apiRequests = [];
    page.on('request', (r) => {
      if (new URL(r.url()).pathname.startsWith('/v1/')) apiRequests.push(r.url());
    });
    // The API itself refuses.
    assert.equal((await apiCall(kiln.base, '/v1/workers')).status, 401);
    assert.equal((await apiCall(kiln.base, '/v1/events')).status, 401);
    await page.goto(`${kiln.base}/ui/#/tasks`);
    await page.locator('#login').waitFor();
    assert.equal(await page.locator('#tasks, #workers').count(), 0);
    assert.deepEqual(apiRequests, [], 'nothing is requested without a key');
    await page.screenshot({ path: path.join(SHOTS, 'login.png') });
    assert.deepEqual(watched.errors, []);

    // A wrong key is refused (the 401 it gets is logged by the browser; that one is expected).
    watched.state.quiet = true;
    await page.fill('#key', 'wrong');
    await page.click('#login button[type=submit]');
    await waitFor(async () => /refused/.test(await page.locator('#login-error').innerText()), 'the refusal');
    watched.state.quiet = false;

    await page.fill('#key', KEY);
    await page.keyboard.press('Enter');
    await page.locator('#tasks').waitFor();
    await page.goto(`${kiln.base}/ui/#/`);
    await page.locator('#workers tr[data-worker] .s-online').first().waitFor();
    await page.locator('#live.on').waitFor();
    assert.ok(apiRequests.length > 0);
    // The key is kept for the tab only.
    assert.equal(await page.evaluate(() => localStorage.getItem('kiln.apiKey')), null);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('kiln.apiKey')), KEY);
    assert.deepEqual(watched.errors, []);
    await page.close();
  });
});
