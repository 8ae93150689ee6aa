"""Results waiting for their ``result_ack``, one JSON file per lease under
``<state_dir>/outbox/``, written and fsync'd before the result is sent.

The layout is the Rust SDK's (``{"task_id", "attempt", "result"}``), so both read each
other's state. An entry survives a crash of the process and, because the file and its
directory are fsync'd, a power loss too.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Dict, List, Optional

from .protocol import Result, _decode, _encode


def fsync_dir(path: str) -> None:
    """Makes a rename or create in ``path`` durable (a no-op where directories can't be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the
    directory): after a crash the file holds either the old or the new bytes."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


class Entry:
    """One stored result with the (task, attempt) it belongs to."""

    __slots__ = ("task_id", "attempt", "result")

    def __init__(self, task_id: str, attempt: int, result: Result) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.result = result

    def to_json(self) -> bytes:
        return json.dumps(
            {"task_id": self.task_id, "attempt": self.attempt, "result": _encode(self.result)},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Entry":
        raw = json.loads(data)
        return cls(str(raw["task_id"]), int(raw["attempt"]), _decode(Result, raw["result"]))


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class Outbox:
    """The on-disk outbox. Thread-safe: handler threads write, the connection removes."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "outbox")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: Dict[str, Entry] = {}
        for name in sorted(os.listdir(self.dir)):
            p = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                _unlink(p)  # torn by a crash before its rename: never acknowledged or sent
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(p, "rb") as f:
                    e = Entry.from_json(f.read())
            except (OSError, ValueError, KeyError, TypeError):
                continue
            self._pending[e.result.lease] = e

    def _path(self, lease: str) -> str:
        return os.path.join(self.dir, _UNSAFE.sub("", lease) + ".json")

    def put(self, e: Entry) -> None:
        """Stores ``e`` durably (blocking: call it off the event loop)."""
        write_durably(self._path(e.result.lease), e.to_json())
        with self._lock:
            self._pending[e.result.lease] = e

    def replace(self, e: Entry) -> None:
        """Rewrites a stored entry (e.g. an oversized result turned into an error)."""
        self.put(e)

    def remove(self, lease: str) -> None:
        """Forgets ``lease`` after its ``result_ack``. A crash before the unlink leaves an
        entry that is resent and answered ``accepted: false``: harmless."""
        with self._lock:
            if self._pending.pop(lease, None) is None:
                return
        _unlink(self._path(lease))

    def get(self, lease: str) -> Optional[Entry]:
        with self._lock:
            return self._pending.get(lease)

    def all(self) -> List[Entry]:
        """The entries waiting for their ``result_ack``."""
        with self._lock:
            return list(self._pending.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def load_worker_id(state_dir: str, new_id: Any) -> str:
    """The worker id persisted in ``<state_dir>/worker_id``, created (durably) on first use."""
    path = os.path.join(state_dir, "worker_id")
    try:
        with open(path, encoding="utf-8") as f:
            wid = f.read().strip()
        if wid:
            return wid
    except OSError:
        pass
    wid = str(new_id())
    write_durably(path, wid.encode())
    return wid
