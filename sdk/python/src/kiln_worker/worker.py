"""The worker: connection loop, handlers on their own threads, heartbeats, outbox,
reconnects, drain and graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import websockets
from websockets.asyncio.client import connect as ws_connect

from . import protocol as p
from .outbox import Entry, Outbox, load_worker_id, write_durably
from .task import Cancelled, Reject, Task, TaskFailed

log = logging.getLogger("kiln_worker")

FINISHED_KEPT = 1024
"""How many finished (task, attempt) results are remembered to answer a replayed assign."""

RESULT_TOO_LARGE = "result_too_large"
"""Error code of a result whose frame would exceed the gateway's frame limit."""


class WorkerRefused(Exception):
    """The gateway refused the worker for good (bad token: 4001/401/403; unsupported
    version: 4002). Fix the configuration before running again."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"gateway closed the connection with {code} ({reason}); not reconnecting")
        self.code = code
        self.reason = reason


def _jitter(ms: int) -> float:
    spread = max(ms // 5, 1)
    return (ms - spread + random.randint(0, 2 * spread)) / 1000.0


class Worker:
    """A kiln worker: register handlers with :meth:`handler`, then :meth:`run`.

    ``url`` is the gateway's worker endpoint (``ws://host:8080/v1/workers/connect``);
    ``token`` the worker token (sent as ``Authorization: Bearer``, also for uploads);
    ``state_dir`` holds the persisted worker id and the result outbox (one directory per
    worker process); ``slots`` is how many tasks run at once; ``models`` and ``labels`` are
    routing capabilities (a task naming a model goes only to workers listing it).

    Keyword-only tuning, with defaults: ``max_frame_bytes`` (1 MiB, the gateway's
    ``broker.max_frame_bytes``), ``shutdown_grace_s`` (30: on stop or drain, wait this long
    for running tasks and their ``result_ack``, then release the rest),
    ``reconnect_base_s`` (1) / ``reconnect_cap_s`` (60) / ``reset_after_s`` (60): full-jitter
    reconnect backoff, ``progress_interval_s`` (0.5), ``upload_deadline_s`` (300),
    ``max_incoming_frame_bytes`` (16 MiB: a larger gateway frame is answered
    ``error/oversized`` and ignored).
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        state_dir: str = "kiln-worker",
        slots: int = 1,
        models: Optional[List[str]] = None,
        labels: Optional[List[str]] = None,
        *,
        max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES,
        shutdown_grace_s: float = 30.0,
        reconnect_base_s: float = 1.0,
        reconnect_cap_s: float = 60.0,
        reset_after_s: float = 60.0,
        progress_interval_s: float = 0.5,
        upload_deadline_s: float = 300.0,
        max_incoming_frame_bytes: int = 16 << 20,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.url = url
        self.token = token
        self.state_dir = state_dir
        self.slots = int(slots)
        self.models = list(models or [])
        self.labels = list(labels or [])
        self.max_frame_bytes = int(max_frame_bytes)
        self.shutdown_grace_s = float(shutdown_grace_s)
        self.reconnect_base_s = float(reconnect_base_s)
        self.reconnect_cap_s = float(reconnect_cap_s)
        self.reset_after_s = float(reset_after_s)
        self.progress_interval_s = float(progress_interval_s)
        self.upload_deadline_s = float(upload_deadline_s)
        self.max_incoming_frame_bytes = int(max_incoming_frame_bytes)
        self._secret: Optional[str] = None
        self._frame_limit = self.max_frame_bytes  # min(max_frame_bytes, welcome.max_frame_bytes)
        self._handlers: Dict[str, Callable[[Task], Any]] = {}
        self._gpu_fn: Optional[Callable[[], Any]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._running: Dict[str, Task] = {}
        self._finished: "collections.OrderedDict[Tuple[str, int], p.Result]" = collections.OrderedDict()
        self._queue: Optional["asyncio.Queue[Optional[str]]"] = None
        self._session: Optional[List[Any]] = None  # [session, last_seq]
        self._stopping = False
        self._drain_started: Optional[float] = None
        self._force = False
        self._stop_event: Optional[asyncio.Event] = None
        self.worker_id = ""
        self.boot_id = ""
        self._outbox: Optional[Outbox] = None

    # --- registration ---------------------------------------------------------------------

    def handler(self, task_type: str) -> Callable[[Callable[[Task], Any]], Callable[[Task], Any]]:
        """Decorator registering the handler of ``task_type``: a plain function (run on its
        own thread, so heartbeats never stop while it computes) or an ``async def`` (run in
        its own event loop on its own thread; a cancel cancels it). It returns the task's
        output (any JSON value, e.g. ``task.files(f)``), or raises."""

        def register(fn: Callable[[Task], Any]) -> Callable[[Task], Any]:
            self._handlers[task_type] = fn
            return fn

        return register

    def gpu_stats(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Registers ``fn() -> {"util": %, "mem_used_mb": int, "mem_total_mb": int}``, called
        (on a thread, at most 2 s) for every heartbeat; usable as a decorator."""
        self._gpu_fn = fn
        return fn

    # --- running --------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until stopped (SIGTERM/SIGINT, :meth:`stop`, or a ``drain`` from the
        gateway) or refused (:class:`WorkerRefused`). On stop it takes no new work, lets
        running tasks finish within ``shutdown_grace_s`` (a second signal ends the wait),
        releases what still runs, sends ``bye`` and returns."""
        asyncio.run(self.run_async())

    def stop(self) -> None:
        """Starts a graceful shutdown (thread-safe; a second call ends the grace period)."""
        loop = self._loop
        if loop is None:
            self._stopping = True
            return
        loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self, repeat_forces: bool = True) -> None:
        if self._stopping and repeat_forces:
            self._force = True
            log.info("second stop request: releasing running tasks now")
        self._stopping = True
        if self._drain_started is None:
            self._drain_started = time.monotonic()
        if self._stop_event is not None:
            self._stop_event.set()

    async def run_async(self) -> None:
        """:meth:`run` for callers that own an event loop (signal handlers are installed
        only on the main thread)."""
        if not self._handlers:
            raise ValueError("no handlers registered")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._begin_stop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._begin_stop)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        await loop.run_in_executor(None, self._open_state)
        log.info("worker starting worker_id=%s boot_id=%s url=%s", self.worker_id, self.boot_id, self.url)
        attempt = 0
        try:
            while True:
                if self._stopping and (not self._running or self._grace_over()):
                    return
                started = time.monotonic()
                outcome = await self._connection()
                if outcome is None:
                    return
                code, reason = outcome
                self._queue = None
                if not p.should_reconnect(code):
                    raise WorkerRefused(code, reason)
                if code == p.CLOSE_REPLACED:
                    self._session = None
                if time.monotonic() - started >= self.reset_after_s:
                    attempt = 0
                delay = random.uniform(0, min(self.reconnect_cap_s, self.reconnect_base_s * 2**attempt))
                attempt = min(attempt + 1, 30)
                hint = p.retry_after_ms(reason)
                if hint is not None:
                    delay = max(delay, hint / 1000.0)
                if self._stopping and (not self._running or self._grace_over()):
                    return
                log.info("reconnecting code=%s reason=%s delay_ms=%d", code, reason, int(delay * 1000))
                if self._stopping:  # the stop event is set already: sleep, within the grace
                    assert self._drain_started is not None
                    left = self.shutdown_grace_s - (time.monotonic() - self._drain_started)
                    await asyncio.sleep(max(0.05, min(delay, left)))
                    continue
                try:
                    await asyncio.wait_for(self._stop_event.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._loop = None

    def _open_state(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        self.worker_id = load_worker_id(self.state_dir, lambda: f"worker_{uuid.uuid4().hex}")
        self.boot_id = f"boot_{uuid.uuid4().hex}"
        self._outbox = Outbox(self.state_dir)
        self._secret = _read_text(os.path.join(self.state_dir, "worker_secret"))
        for e in self._outbox.all():
            fixed = self._size_checked(e.result)
            if fixed is not e.result:  # an oversized result would be dropped on every send
                e = Entry(e.task_id, e.attempt, fixed)
                self._outbox.replace(e)
            self._remember(e.task_id, e.attempt, e.result)

    def _store_secret(self, secret: str) -> None:
        path = os.path.join(self.state_dir, "worker_secret")
        write_durably(path, secret.encode(), mode=0o600)
        self._secret = secret

    def _grace_over(self) -> bool:
        return self._force or (
            self._drain_started is not None and time.monotonic() - self._drain_started >= self.shutdown_grace_s
        )

    def _remember(self, task_id: str, attempt: int, r: p.Result) -> None:
        self._finished[(task_id, attempt)] = r
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    # --- one connection -------------------------------------------------------------------

    def _frame(self, m: Any, task: Optional[Task] = None, **envelope: Any) -> str:
        if task is not None:
            envelope.update(task_type=task.task_type, request_id=task.request_id)
        return p.frame(m, source=f"worker:{self.worker_id}", **envelope)

    async def _connection(self) -> Optional[Tuple[int, str]]:
        """One connection; ``None`` when the worker is done (bye sent)."""
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            ws = await ws_connect(
                self.url,
                subprotocols=[p.SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers=headers,
                open_timeout=10,
                max_size=None,  # checked per frame against max_incoming_frame_bytes
                compression=None,
            )
        except websockets.exceptions.InvalidStatus as e:
            status = e.response.status_code
            if status in (401, 403):
                return p.CLOSE_AUTH, f"gateway answered {status}"
            return 1006, f"gateway answered {status}"
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
            return 1006, f"connect failed: {e}"
        try:
            return await self._session_loop(ws)
        except websockets.exceptions.ConnectionClosed as e:
            return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (1006, "connection lost")
        finally:
            self._queue = None
            await ws.close()

    async def _session_loop(self, ws: Any) -> Optional[Tuple[int, str]]:
        assert self._outbox is not None
        queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue()
        # Snapshot and queue in one step of the loop: a result finishing later is in
        # `inflight` here and goes through the queue after the welcome.
        self._queue = queue
        pending = self._outbox.all()
        await ws.send(self._frame(self._hello(pending)))
        try:
            text = await asyncio.wait_for(ws.recv(), timeout=10)
            welcome = p.Envelope.decode(text).message
        except asyncio.TimeoutError:
            return 1006, "no welcome"
        except p.DecodeError as e:
            return p.CLOSE_PROTOCOL, f"expected welcome: {e}"
        if not isinstance(welcome, p.Welcome):
            return p.CLOSE_PROTOCOL, "expected welcome"
        if welcome.worker_secret and welcome.worker_secret != self._secret:
            # Durable before anything else happens in this session: without it the next
            # hello could not prove this worker's identity.
            await asyncio.get_running_loop().run_in_executor(None, self._store_secret, welcome.worker_secret)
        limit = welcome.max_frame_bytes or p.DEFAULT_MAX_FRAME_BYTES
        self._frame_limit = min(self.max_frame_bytes, limit)
        if not welcome.resumed or self._session is None:
            self._session = [welcome.session, 0]
        for lease in welcome.drop:
            t = self._running.pop(lease, None)
            if t is not None:
                t._signal_cancel("dropped by the gateway", dropped=True)
        log.info(
            "connected session=%s resumed=%s keep=%d drop=%d outbox=%d",
            welcome.session, welcome.resumed, len(welcome.keep), len(welcome.drop), len(pending),
        )
        for entry in pending:
            r = self._size_checked(entry.result)
            if r is not entry.result:  # the gateway's limit is lower than when it was stored
                fixed = Entry(entry.task_id, entry.attempt, r)
                await asyncio.get_running_loop().run_in_executor(None, self._outbox.replace, fixed)
            await ws.send(self._frame(r))
        hb_ms = max(int(welcome.timers.heartbeat_ms), 50)
        jobs = [
            asyncio.ensure_future(self._reader(ws)),
            asyncio.ensure_future(self._writer(ws, queue)),
            asyncio.ensure_future(self._ticker(ws, queue, hb_ms)),
        ]
        try:
            done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    def _hello(self, pending: List[Entry]) -> p.Hello:
        return p.Hello(
            worker_id=self.worker_id,
            boot_id=self.boot_id,
            slots=self.slots,
            capabilities=p.Capabilities(task_types=sorted(self._handlers), models=self.models, labels=self.labels),
            resume=p.Resume(session=self._session[0], last_seq=self._session[1]) if self._session else None,
            inflight=list(self._running),
            outbox=[e.result.lease for e in pending],
            worker_secret=self._secret,
        )

    async def _writer(self, ws: Any, queue: "asyncio.Queue[Optional[str]]") -> Optional[Tuple[int, str]]:
        while True:
            text = await queue.get()
            if text is None:  # bye was the last frame
                await ws.close(1000, "bye")
                return None
            await ws.send(text)

    def _put(self, m: Any, task: Optional[Task] = None, **envelope: Any) -> None:
        if self._queue is not None:
            self._queue.put_nowait(self._frame(m, task, **envelope))

    async def _reader(self, ws: Any) -> Optional[Tuple[int, str]]:
        assert self._outbox is not None
        async for text in ws:
            if not isinstance(text, str):
                continue
            if len(text) > self.max_incoming_frame_bytes:
                e = p.DecodeError("oversized", f"frame of {len(text)} bytes exceeds the {self.max_incoming_frame_bytes}-byte limit")
                log.warning("oversized frame from gateway: %s", e)
                self._put(p.ErrorMsg(), error=e.code, error_msg=str(e))
                continue
            try:
                env = p.Envelope.decode(text)
            except p.DecodeError as e:
                log.warning("bad frame from gateway: %s", e)
                continue
            m = env.message
            seq = getattr(m, "seq", None) if isinstance(m, (p.Assign, p.Cancel, p.Drain)) else None
            if seq is not None and self._session is not None:
                if seq <= self._session[1]:
                    continue  # replayed twice; already handled
                self._session[1] = seq
            if isinstance(m, p.Assign):
                for a in m.tasks:
                    if self._stopping:
                        # Refused as retryable (not counted): the gateway then holds the task
                        # back from this worker for a while instead of offering it again.
                        self._put(p.RejectMsg(lease=a.lease, reason="worker is shutting down", retryable=True))
                        continue
                    self._start(a)
                self._put(p.Ack(seq=m.seq))
            elif isinstance(m, p.Cancel):
                t = self._running.get(m.lease)
                if t is not None:
                    log.info("cancel task_id=%s reason=%s", t.id, m.reason)
                    t._signal_cancel(m.reason or "cancelled")
                self._put(p.Ack(seq=m.seq))
            elif isinstance(m, p.Drain):
                log.info("drain requested by the gateway")
                self._begin_stop(repeat_forces=False)
                self._put(p.Ack(seq=m.seq))
            elif isinstance(m, p.ResultAck):
                if not m.accepted:
                    log.info("result not accepted lease=%s reason=%s", m.lease, m.reason)
                await asyncio.get_running_loop().run_in_executor(None, self._outbox.remove, m.lease)
            elif isinstance(m, p.ErrorMsg):
                log.warning("gateway reported an error: %s %s", env.error, env.error_msg)
        code = ws.close_code if ws.close_code is not None else 1006
        return code, ws.close_reason or ""

    async def _ticker(self, ws: Any, queue: "asyncio.Queue[Optional[str]]", hb_ms: int) -> Optional[Tuple[int, str]]:
        assert self._outbox is not None
        next_hb = time.monotonic() + _jitter(hb_ms)
        bye_at: Optional[float] = None
        while True:
            if self._stopping and ((not self._running and len(self._outbox) == 0) or self._grace_over()):
                for lease, t in list(self._running.items()):
                    # Given back uncounted, as `release` does; a retryable reject also keeps
                    # the gateway from offering it straight back to this stopping worker.
                    t._signal_cancel("worker shutting down", dropped=True)
                    self._put(p.RejectMsg(lease=lease, reason="worker shutting down", retryable=True))
                self._running.clear()
                if bye_at is None:
                    # A release can make the gateway assign again just before bye: linger a
                    # moment so the reader releases such assigns too (bounded, once).
                    self._put(p.Heartbeat(ack_seq=self._session[1] if self._session else 0, free=0))
                    bye_at = time.monotonic() + 0.3
                if time.monotonic() >= bye_at:
                    self._put(p.Bye(reason="shutting down"))
                    queue.put_nowait(None)
                    await asyncio.sleep(3600)  # the writer ends the connection
            if time.monotonic() >= next_hb:
                next_hb = time.monotonic() + _jitter(hb_ms)
                gpu = await self._gpu()
                ack = self._session[1] if self._session else 0
                self._put(
                    p.Heartbeat(
                        ack_seq=ack, free=max(self.slots - len(self._running), 0), inflight=list(self._running), gpu=gpu
                    )
                )
            await asyncio.sleep(0.05)

    async def _gpu(self) -> Optional[p.GpuStats]:
        if self._gpu_fn is None:
            return None
        try:
            loop = asyncio.get_running_loop()
            v = await asyncio.wait_for(loop.run_in_executor(None, self._gpu_fn), timeout=2)
            if isinstance(v, p.GpuStats) or v is None:
                return v
            return p.GpuStats(
                util=None if v.get("util") is None else float(v["util"]),
                mem_used_mb=None if v.get("mem_used_mb") is None else int(v["mem_used_mb"]),
                mem_total_mb=None if v.get("mem_total_mb") is None else int(v["mem_total_mb"]),
            )
        except Exception as e:  # statistics are optional: never let them break heartbeats
            log.debug("gpu_stats failed: %s", e)
            return None

    # --- tasks ----------------------------------------------------------------------------

    def _start(self, a: p.TaskAssignment) -> None:
        if a.lease in self._running:
            return
        stored = self._finished.get((a.task_id, a.attempt))
        if stored is not None:  # a replayed assign: answer with the stored result
            r = p.Result(**{**stored.__dict__, "lease": a.lease})
            self._put(r)
            return
        fn = self._handlers.get(a.task_type)
        if fn is None:
            self._put(p.RejectMsg(lease=a.lease, reason=f"no handler for task type {a.task_type}", retryable=False))
            return
        task = Task(self, a)
        self._running[a.lease] = task
        th = threading.Thread(target=self._run_task, args=(task, fn), name=f"kiln-task-{a.task_id}", daemon=True)
        th.start()

    def _run_task(self, task: Task, fn: Callable[[Task], Any]) -> None:
        started = time.monotonic()
        log.info("task started task_id=%s attempt=%d task_type=%s", task.id, task.attempt, task.task_type)
        error: Optional[p.TaskError] = None
        output: Any = None
        try:
            if inspect.iscoroutinefunction(fn):
                output = asyncio.run(self._run_async_handler(task, fn))
            else:
                output = fn(task)
        except Reject as r:
            self._on_loop(self._rejected, task, r)
            return
        except (Exception, asyncio.CancelledError) as e:
            if task.cancelled:
                error = None
            elif isinstance(e, TaskFailed):
                error = p.TaskError(code=e.code, message=e.message, retryable=e.retryable)
            else:
                error = p.TaskError(code="handler_error", message=f"{type(e).__name__}: {e}")
                log.warning("task failed task_id=%s: %s", task.id, error.message)
        if error is None and not task.cancelled:
            try:
                json.dumps(output)
            except (TypeError, ValueError) as e:
                error = p.TaskError(code="invalid_output", message=f"the handler's output is not JSON: {e}")
        timings = task._take_timings()
        if task.cancelled and error is None:
            result = p.Result(lease=task.lease, status=p.RESULT_CANCELED, timings=timings)
        elif error is not None:
            result = p.Result(lease=task.lease, status="error", error=error, timings=timings)
        else:
            result = p.Result(lease=task.lease, status="ok", output=output, timings=timings)
        result = self._size_checked(result, task)
        entry = Entry(task.id, task.attempt, result)
        if not task._dropped:
            assert self._outbox is not None
            try:
                self._outbox.put(entry)
            except OSError as e:
                log.error("outbox write failed: %s", e)
        log.info(
            "task finished task_id=%s attempt=%d status=%s run_ms=%d",
            task.id, task.attempt, result.status, int((time.monotonic() - started) * 1000),
        )
        self._on_loop(self._finished_task, task, entry)

    async def _run_async_handler(self, task: Task, fn: Callable[[Task], Any]) -> Any:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        task._async_cancel = lambda: loop.call_soon_threadsafe(me.cancel)
        if task.cancelled:
            raise Cancelled("cancelled")
        try:
            return await fn(task)
        finally:
            task._async_cancel = None

    def _size_checked(self, r: p.Result, task: Optional[Task] = None) -> p.Result:
        if r.status == "error" and r.error is not None and r.error.code == RESULT_TOO_LARGE:
            return r
        size = len(self._frame(r, task).encode())
        limit = self._frame_limit
        if size <= limit:
            return r
        msg = (
            f"result of {size} bytes exceeds the {limit}-byte frame limit; upload large outputs with the "
            'files API (POST /v1/files, task.upload(data, mime)) and return {"files":[{"id":...}]} (task.files(f))'
        )
        log.warning("result too large lease=%s: %s", r.lease, msg)
        return p.Result(lease=r.lease, status="error", error=p.TaskError(code=RESULT_TOO_LARGE, message=msg), timings=r.timings)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed: the worker stopped
                pass

    def _finished_task(self, task: Task, entry: Entry) -> None:
        if self._running.get(task.lease) is task:
            del self._running[task.lease]
        if task._dropped:
            return
        self._remember(task.id, task.attempt, entry.result)
        self._put(entry.result, task)

    def _rejected(self, task: Task, r: Reject) -> None:
        if self._running.get(task.lease) is task:
            del self._running[task.lease]
        if not task._dropped:
            self._put(p.RejectMsg(lease=task.lease, reason=r.reason, retryable=r.retryable), task)

    def _send_threadsafe(self, m: Any, task: Optional[Task] = None) -> None:
        self._on_loop(self._put, m, task)

    def _call_later(self, delay: float, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.call_later, delay, fn)
            except RuntimeError:
                pass


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None
