"""The gateway's files API (``POST /v1/files``) from a worker: streamed uploads, retried
across gateway restarts."""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import socket
import time
import urllib.parse
from typing import IO, Any, Callable, Dict, Optional, Tuple, Union

UploadData = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]]
"""What :meth:`Task.upload` takes: bytes, a file path, or a binary file object (streamed)."""

RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)
"""Answers after which an upload is sent again (the gateway restarting or overloaded)."""

_BLOCK = 1 << 20


class UploadError(Exception):
    """An upload the gateway refused for good (e.g. 413 too large, 415 type not allowed),
    or one that kept failing until the retry deadline. ``status`` is the last HTTP status
    (``None`` when no answer came), ``body`` the gateway's JSON error when there was one."""

    def __init__(self, message: str, status: Optional[int] = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        """Whether a later attempt of the task may succeed."""
        return self.status is None or self.status in RETRY_STATUSES


def http_base(ws_url: str) -> Tuple[str, str, int]:
    """``(scheme, host, port)`` of the HTTP API behind a worker WebSocket URL."""
    u = urllib.parse.urlsplit(ws_url)
    scheme = "https" if u.scheme in ("wss", "https") else "http"
    port = u.port or (443 if scheme == "https" else 80)
    return scheme, u.hostname or "127.0.0.1", port


def _open_body(data: UploadData) -> Tuple[Any, int, Callable[[], Any], Callable[[], None]]:
    """(body, length, rewind, close) for bytes, a path or a seekable file object."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        b = bytes(data)
        return b, len(b), lambda: None, lambda: None
    if isinstance(data, (str, os.PathLike)):
        f = open(data, "rb")  # noqa: SIM115 - closed by the returned close()
        size = os.fstat(f.fileno()).st_size
        return f, size, lambda: f.seek(0), f.close
    if hasattr(data, "read") and hasattr(data, "seek"):
        start = data.tell()
        data.seek(0, io.SEEK_END)
        size = data.tell() - start
        data.seek(start)
        return data, size, lambda: data.seek(start), lambda: None
    raise TypeError("upload data must be bytes, a file path or a seekable binary file object")


def upload(
    ws_url: str,
    data: UploadData,
    content_type: str,
    token: Optional[str] = None,
    *,
    deadline_s: float = 300.0,
    timeout_s: float = 60.0,
    should_stop: Callable[[], bool] = lambda: False,
    query: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Uploads ``data`` with ``content_type`` and returns the gateway's file object
    (``id``, ``url``, ``content_type``, ``bytes``, ``sha256``, ...).

    The body is streamed in 1 MiB blocks (a file is never read whole into memory).
    Connection failures and 408/425/429/5xx answers are retried with full-jitter backoff
    (0.5 s doubling to 10 s, honouring ``Retry-After``) until ``deadline_s`` has passed, so
    an upload survives a gateway restart. Other answers raise :class:`UploadError` at once.
    ``should_stop`` is checked between attempts (a cancelled task stops retrying).
    """
    scheme, host, port = http_base(ws_url)
    path = "/v1/files" + ("?" + urllib.parse.urlencode(query) if query else "")
    body, length, rewind, close = _open_body(data)
    headers = {"Content-Type": content_type, "Content-Length": str(length)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    give_up = time.monotonic() + deadline_s
    attempt = 0
    try:
        while True:
            attempt += 1
            status: Optional[int] = None
            err: str
            wait_hint: Optional[float] = None
            conn_cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(host, port, timeout=timeout_s, blocksize=_BLOCK)
            try:
                rewind()
                try:
                    conn.request("POST", path, body=body, headers=headers)
                except OSError:
                    # The gateway may have answered (413, 415) and closed while the body was
                    # still going out: read that answer rather than retrying blindly.
                    if conn.sock is None:
                        raise
                    conn.sock.settimeout(2)
                resp = conn.getresponse()
                status = resp.status
                raw = resp.read()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                if 200 <= status < 300 and isinstance(parsed, dict):
                    return parsed
                err = f"POST /v1/files answered {status}: {raw[:500].decode('utf-8', 'replace')}"
                if status not in RETRY_STATUSES:
                    raise UploadError(err, status, parsed)
                ra = resp.getheader("Retry-After")
                if ra and ra.strip().isdigit():
                    wait_hint = float(ra.strip())
            except (OSError, http.client.HTTPException, socket.timeout) as e:
                err = f"POST /v1/files failed: {e.__class__.__name__}: {e}"
            finally:
                conn.close()
            delay = random.uniform(0, min(10.0, 0.5 * 2 ** (attempt - 1)))
            if wait_hint is not None:
                delay = max(delay, wait_hint)
            if should_stop() or time.monotonic() + delay > give_up:
                raise UploadError(f"{err} (gave up after {attempt} attempts)", status)
            time.sleep(delay)
    finally:
        close()
