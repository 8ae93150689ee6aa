"""Scenario fixtures: the real `kiln serve` on a free 127.0.0.1 port with its own data
directory and the demo worker off, and real worker processes; all stopped by pid.

The binary is $TEST_KILN_BIN (default: <repo>/target/debug/kiln; build it with
`cargo build -p kiln`). Not KILN_*: the server reads those as settings.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

SDK = pathlib.Path(__file__).resolve().parents[1]
REPO = SDK.parents[1]
TASK_TYPES = "sleepy,t_sleep,t_fail,t_big,t_cancel,t_async,t_upload,t_preview,t_flood"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def kiln_bin():
    b = os.environ.get("TEST_KILN_BIN") or str(REPO / "target" / "debug" / "kiln")
    if not os.path.exists(b):
        pytest.fail(f"no kiln binary at {b}: run `cargo build -p kiln` first")
    return b


def wait_until(cond, secs, what):
    until = time.time() + secs
    while True:
        v = cond()
        if v:
            return v
        assert time.time() < until, f"timed out after {secs} s waiting for {what}"
        time.sleep(0.05)


class Server:
    """One `kiln serve`; `kill9()` and `start()` again keep its port and data directory."""

    def __init__(self, root, env=None):
        self.data = os.path.join(root, "data")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/workers/connect"
        self.log_path = os.path.join(root, "server.log")
        self.env = dict(
            os.environ,
            KILN_SERVER__LISTEN=f"127.0.0.1:{self.port}",
            KILN_SERVER__DATA_DIR=self.data,
            KILN_SERVER__SHUTDOWN_GRACE="2s",
            KILN_DEMO_WORKER__ENABLED="false",
            KILN_GATEWAY__KNOWN_TASK_TYPES=TASK_TYPES,
            KILN_BROKER__HEARTBEAT="2s",
            KILN_LOG__FILTER="info",
            KILN_LOG__FORMAT="json",
            **(env or {}),
        )
        self.proc = None

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([kiln_bin(), "serve"], env=self.env, stdout=log, stderr=log)
        log.close()

        def up():
            assert self.proc.poll() is None, f"kiln exited: {self.log()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, 30, "kiln to listen")
        return self

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # --- HTTP -----------------------------------------------------------------------------

    def call(self, method, path, body=None, headers=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        h = {"content-type": "application/json"} if body is not None else {}
        h.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw

    def submit(self, task_type, input=None, **extra):
        status, body = self.call("POST", "/v1/tasks", {"task_type": task_type, "input": input or {}, **extra})
        assert status == 202, (status, body)
        return body["id"]

    def task(self, tid):
        status, body = self.call("GET", f"/v1/tasks/{tid}")
        assert status == 200, (status, body)
        return body

    def wait_status(self, tid, want, secs=30):
        last = {}

        def check():
            last["t"] = self.task(tid)
            return last["t"]["status"] in want

        try:
            wait_until(check, secs, f"task {tid} to be {want}")
        except AssertionError:
            raise AssertionError(f"task {tid} is {last['t']['status']}, not {want}: {last['t']}") from None
        return last["t"]


class WorkerProc:
    """A worker process: tests/worker_app.py (`extra_args` appended to its command line), or
    an example given as `script` with `args`."""

    def __init__(self, server, state_dir, log_path, slots=1, script=None, args=None, grace_s=30.0, url=None,
                 extra_args=()):
        self.state_dir = state_dir
        self.log_path = log_path
        self.out_path = f"{log_path}.out"
        if script is None:
            cmd = [sys.executable, str(SDK / "tests" / "worker_app.py"), "--url", url or server.ws_url,
                   "--state-dir", state_dir, "--log", log_path, "--slots", str(slots), "--grace-s", str(grace_s),
                   *extra_args]
        else:
            cmd = [sys.executable, str(script), *args]
        env = dict(os.environ, PYTHONPATH=str(SDK / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        out.close()

    def events(self, event=None, task=None):
        try:
            with open(self.log_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in rows if (event is None or r["event"] == event) and (task is None or r["task"] == task)]

    def output(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def worker_id(self):
        return wait_until(lambda: _read(os.path.join(self.state_dir, "worker_id")), 10, "the worker id")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@pytest.fixture
def env(request):
    """A server (started) plus a way to start workers; everything stopped afterwards."""
    root = tempfile.mkdtemp(prefix="kiln-pysdk-")
    server = Server(root).start()
    workers = []

    class Env:
        pass

    e = Env()
    e.root = root
    e.server = server
    e.log = os.path.join(root, "events.jsonl")
    e.state = os.path.join(root, "worker-state")

    def worker(**kw):
        kw.setdefault("state_dir", e.state)
        kw.setdefault("log_path", e.log)
        wp = WorkerProc(server, **kw)
        workers.append(wp)
        return wp

    e.worker = worker
    yield e
    for w in workers:
        w.stop()
    server.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        sys.stderr.write(f"\nkept for inspection: {root} (server.log, events.jsonl, worker output)\n")
        for w in workers:
            sys.stderr.write(f"--- worker output {w.out_path}:\n{w.output()[-3000:]}\n")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class Proxy:
    """A TCP forwarder on a free 127.0.0.1 port; `cut()` drops every open connection (a
    network blip) and keeps accepting new ones."""

    def __init__(self, port):
        import threading

        self.target = port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/workers/connect"
        self.conns = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
                self.accepted += 1
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.lsock.close()
        self.cut()
