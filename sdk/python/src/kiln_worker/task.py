"""What a handler sees of its task: input, progress, cancellation, stage timings, uploads."""

from __future__ import annotations

import base64
import contextlib
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Union

from . import files as _files
from .protocol import MAX_PREVIEW_BYTES, PREVIEW_TYPES, Preview, Progress

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker


class Cancelled(Exception):
    """Raised by :meth:`Task.check_cancelled` and :meth:`Task.sleep` once the gateway has
    cancelled the task (or the worker gave the lease up). Let it propagate: the SDK then
    answers ``result {status: "canceled"}``."""


class Reject(Exception):
    """Raise from a handler to refuse a task: ``raise Reject("model not loaded",
    retryable=True)``. Retryable: the task goes back to the queue without counting the
    attempt (and the gateway may skip this worker for it for a while); not retryable: the
    attempt fails with code ``rejected``."""

    def __init__(self, reason: str = "rejected by worker", retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class TaskFailed(Exception):
    """Raise from a handler to fail the attempt with a machine-readable ``code`` (e.g.
    ``out_of_memory``) and say whether another attempt may succeed. Any other exception
    fails the attempt with code ``handler_error`` and ``"<Type>: <message>"``."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


FileRef = Union[str, Dict[str, Any]]


def _check_preview_type(mime: str) -> None:
    if mime not in PREVIEW_TYPES:
        raise ValueError(f"preview type {mime!r} is not one of {', '.join(PREVIEW_TYPES)}")


class Task:
    """One attempt of a task, handed to the handler. Every method is thread-safe.

    Attributes: ``id``, ``attempt`` (1-based), ``lease``, ``task_type``, ``input`` (the
    client's JSON), ``request_id``, ``priority``, ``deadline`` (Unix ms or ``None``),
    ``model`` (the model the task needs, one of the worker's ``models``, or ``None``).
    """

    def __init__(self, worker: "Worker", a: Any) -> None:
        self._worker = worker
        self.id: str = a.task_id
        self.attempt: int = a.attempt
        self.lease: str = a.lease
        self.task_type: str = a.task_type
        self.input: Any = a.input
        self.request_id: Optional[str] = a.request_id
        self.priority: int = a.priority
        self.deadline: Optional[int] = a.deadline
        self.model: Optional[str] = a.model
        self._cancel = threading.Event()
        self._cancel_reason = ""
        self._dropped = False
        self._lock = threading.Lock()
        self._timings: Dict[str, int] = {}
        self._stage: Optional[str] = None
        self._pending: Optional[Progress] = None
        self._last_sent = 0.0
        self._flush_scheduled = False
        self._done = False
        self._async_cancel: Optional[Any] = None  # set while an async handler runs
        self._previews = 0

    # --- progress -------------------------------------------------------------------------

    def progress(
        self, step: int, total: int = 0, stage: Optional[str] = None, eta_ms: Optional[int] = None
    ) -> None:
        """Reports progress (``total`` 0 means unknown; ``stage`` defaults to the current
        :meth:`stage`). Rate-limited and coalesced: at most one frame per
        ``progress_interval_s`` (default 0.5 s) per task, the latest value wins, and the last
        one is sent when the interval ends. Lossy by design: dropped while disconnected."""
        msg = Progress(
            lease=self.lease,
            stage=stage if stage is not None else self._stage,
            step=max(0, int(step)),
            total=max(0, int(total)),
            eta_ms=None if eta_ms is None else max(0, int(eta_ms)),
        )
        interval = self._worker.progress_interval_s
        send = None
        with self._lock:
            if self._done:
                return
            self._pending = msg
            now = time.monotonic()
            wait = self._last_sent + interval - now
            if wait <= 0:
                send, self._pending, self._last_sent = msg, None, now
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._worker._call_later(wait, self._flush)
        if send is not None:
            self._worker._send_threadsafe(send, self)

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            msg, self._pending = self._pending, None
            if msg is None or self._done:
                return
            self._last_sent = time.monotonic()
        self._worker._send_threadsafe(msg, self)

    # --- previews -------------------------------------------------------------------------

    def preview(self, data: bytes, mime: str) -> None:
        """Sends a preview image of the task (a coarse render, an intermediate step): at most
        ``MAX_PREVIEW_BYTES`` (64 KiB) of ``image/png``, ``image/jpeg``, ``image/webp`` or
        ``image/gif``; a larger one raises ``ValueError`` (upload it with :meth:`upload` and
        send :meth:`preview_file`). Lossy like progress: the gateway keeps the latest and
        rate-limits them per task (a burst of 4, then 4 a second by default)."""
        _check_preview_type(mime)
        data = bytes(data)
        if not data:
            raise ValueError("the preview is empty")
        if len(data) > MAX_PREVIEW_BYTES:
            raise ValueError(
                f"the preview is {len(data)} bytes, over the {MAX_PREVIEW_BYTES}-byte inline limit; "
                "upload it and send preview_file(file_id, mime)"
            )
        width = height = None
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
        self._send_preview(
            Preview(lease=self.lease, mime=mime, data=base64.b64encode(data).decode("ascii"), width=width, height=height)
        )

    def preview_file(self, file_id: str, mime: str) -> None:
        """Sends a preview uploaded with :meth:`upload` (for previews over the inline limit)."""
        _check_preview_type(mime)
        if not file_id:
            raise ValueError("the preview file id is empty")
        self._send_preview(Preview(lease=self.lease, mime=mime, file=file_id))

    def _send_preview(self, msg: Preview) -> None:
        with self._lock:
            if self._done:
                return
            msg.index, self._previews = self._previews, self._previews + 1
        self._worker._send_threadsafe(msg, self)

    # --- cancellation ---------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the gateway cancelled the task (or the worker gave its lease up)."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raises :class:`Cancelled` if the task was cancelled; call it between steps."""
        if self._cancel.is_set():
            raise Cancelled(self._cancel_reason or "cancelled")

    def sleep(self, seconds: float) -> None:
        """Sleeps up to ``seconds``, raising :class:`Cancelled` as soon as a cancel arrives."""
        if self._cancel.wait(max(0.0, seconds)):
            raise Cancelled(self._cancel_reason or "cancelled")

    def _signal_cancel(self, reason: str, dropped: bool = False) -> None:
        self._cancel_reason = reason
        self._dropped = self._dropped or dropped
        self._cancel.set()
        hook = self._async_cancel
        if hook is not None:
            hook()

    # --- timings --------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a stage of this attempt: ``with task.stage("upload"): ...`` adds the
        milliseconds to the result's ``timings["upload_ms"]`` (a repeated stage adds up) and
        makes ``name`` the default stage of :meth:`progress` meanwhile."""
        previous, self._stage = self._stage, name
        started = time.monotonic()
        try:
            yield
        finally:
            self.record_stage(name, time.monotonic() - started)
            self._stage = previous

    def record_stage(self, name: str, seconds: float) -> None:
        """Adds ``seconds`` to ``timings["<name>_ms"]`` of the result."""
        key = f"{name}_ms"
        with self._lock:
            self._timings[key] = self._timings.get(key, 0) + int(round(seconds * 1000))

    def _take_timings(self) -> Optional[Dict[str, int]]:
        with self._lock:
            self._done = True
            self._pending = None
            return dict(self._timings) or None

    # --- files ----------------------------------------------------------------------------

    def upload(self, data: "_files.UploadData", mime: str) -> Dict[str, Any]:
        """Stores ``data`` (bytes, a file path or a binary file object, streamed) through
        the gateway's files API with content type ``mime`` and returns the file object
        (``id``, ``url``, ``content_type``, ``bytes``, ``sha256``, ...). Retried across
        gateway restarts for up to ``upload_deadline_s`` (default 300 s); a refusal (413,
        415, ...) raises :class:`~kiln_worker.UploadError`. Blocking: from an ``async def``
        handler use ``await asyncio.to_thread(task.upload, data, mime)``."""
        w = self._worker
        return _files.upload(
            w.url,
            data,
            mime,
            w.token,
            deadline_s=w.upload_deadline_s,
            should_stop=lambda: self._cancel.is_set(),
        )

    @staticmethod
    def files(*refs: Union[FileRef, List[FileRef]]) -> Dict[str, Any]:
        """The output convention for files: ``task.files(f1, f2)`` (file objects from
        :meth:`upload`, or file ids) gives ``{"files": [{"id": ..., "content_type": ...}, ...]}``;
        the gateway adds each file's ``url`` when it shows the task."""
        out: List[Dict[str, Any]] = []
        flat: List[FileRef] = []
        for r in refs:
            flat.extend(r if isinstance(r, list) else [r])
        for r in flat:
            if isinstance(r, str):
                out.append({"id": r})
            elif isinstance(r, dict) and isinstance(r.get("id"), str):
                keep = ("id", "content_type", "bytes", "width", "height", "sha256")
                out.append({k: r[k] for k in keep if r.get(k) is not None})
            else:
                raise TypeError("task.files() takes file objects from task.upload() or file ids")
        return {"files": out}

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, attempt={self.attempt}, task_type={self.task_type!r})"
