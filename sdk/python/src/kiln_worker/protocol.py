"""The kiln.v1 wire format: the envelope and one dataclass per message ``type``.

Mirrors ``kiln-protocol`` (Rust) field for field, so every golden frame in
``crates/protocol/tests/golden/`` decodes into these types and encodes back to the same
JSON. Receivers ignore unknown fields; optional fields that are ``None`` are left out.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

VERSION = "1"
"""The protocol version carried in every envelope."""

SUBPROTOCOL = "kiln.v1"
"""The WebSocket subprotocol sent as ``Sec-WebSocket-Protocol``."""

RESULT_CANCELED = "canceled"
"""``result.status`` of a task stopped after a ``cancel`` (the task status's spelling; the
gateway also accepts ``cancelled``)."""

DEFAULT_MAX_FRAME_BYTES = 1 << 20
"""The largest frame a gateway accepts by default (``broker.max_frame_bytes``): 1 MiB."""

# Close codes (docs/PROTOCOL.md section 5).
CLOSE_AUTH = 4001
CLOSE_VERSION = 4002
CLOSE_REPLACED = 4003
CLOSE_PROTOCOL = 4004
CLOSE_IDENTITY = 4005
CLOSE_TOO_BIG = 1009
CLOSE_SLOW_CONSUMER = 4008
CLOSE_HEARTBEAT_TIMEOUT = 4009
CLOSE_RESTART = 1012
CLOSE_TRY_LATER = 1013


def should_reconnect(code: int) -> bool:
    """Whether a worker reconnects after this close code: everything but 4001 (bad token),
    4002 (version) and 4005 (worker identity not proven)."""
    return code not in (CLOSE_AUTH, CLOSE_VERSION, CLOSE_IDENTITY)


def retry_after_ms(reason: str) -> Optional[int]:
    """The ``retry_after_ms=<n>`` hint in a close reason, if any."""
    for part in (reason or "").split(";"):
        part = part.strip()
        if part.startswith("retry_after_ms="):
            try:
                return int(part[len("retry_after_ms=") :].strip())
            except ValueError:
                continue
    return None


def now_ms() -> int:
    """Unix time in milliseconds."""
    return int(time.time() * 1000)


class DecodeError(ValueError):
    """A frame that could not be decoded; ``code`` is ``malformed``, ``unknown_type`` or
    ``version``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


T = TypeVar("T")


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None and f.metadata.get("omit_none", True):
                continue
            out[f.metadata.get("wire", f.name)] = _encode(v)
        return out
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _hints(cls: type) -> Dict[str, Any]:
    cached = cls.__dict__.get("_hints_cache")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "_hints_cache", cached)
    return cached


def _decode_value(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _decode_value(inner[0], v) if len(inner) == 1 else v
    if origin in (list, List) and args:
        if not isinstance(v, list):
            raise TypeError(f"expected a list, got {type(v).__name__}")
        return [_decode_value(args[0], x) for x in v]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode(tp, v)
    if tp is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise TypeError(f"expected an integer, got {v!r}")
    if tp is str and not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    if tp is bool and not isinstance(v, bool):
        raise TypeError(f"expected a boolean, got {v!r}")
    if tp is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise TypeError(f"expected a number, got {v!r}")
    return v


def _decode(cls: Type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        wire = f.metadata.get("wire", f.name)
        if wire in data:
            kwargs[f.name] = _decode_value(hints[f.name], data[wire])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}: missing field {wire!r}")
    return cls(**kwargs)


# --- payloads -----------------------------------------------------------------------------


@dataclass
class Capabilities:
    """What a worker can run: task types, models, labels (routing)."""

    task_types: List[str] = field(default_factory=list)
    models: List[str] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)


@dataclass
class Resume:
    """Where a reconnecting worker left off: the session and the highest control seq seen."""

    session: str
    last_seq: int


@dataclass
class Hello:
    """``hello`` (worker to gateway): the first frame of every connection."""

    worker_id: str
    boot_id: str
    slots: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    resume: Optional[Resume] = None
    inflight: List[str] = field(default_factory=list)
    outbox: List[str] = field(default_factory=list)
    worker_secret: Optional[str] = None
    """The secret the gateway issued to this worker_id in an earlier welcome."""


@dataclass
class Timers:
    """Timers of a session, milliseconds."""

    heartbeat_ms: int = 15000
    lease_ms: int = 90000
    dead_after_ms: int = 45000


@dataclass
class Welcome:
    """``welcome`` (gateway to worker): the answer to ``hello``."""

    session: str
    timers: Timers
    resumed: bool
    keep: List[str] = field(default_factory=list)
    drop: List[str] = field(default_factory=list)
    worker_secret: Optional[str] = None
    """A newly issued worker secret (first registration): persist it, send it in every hello."""
    max_frame_bytes: Optional[int] = None
    """The gateway's frame limit; absent means 1 MiB."""


@dataclass
class TaskAssignment:
    """One task inside an ``assign``."""

    task_id: str
    attempt: int
    lease: str
    task_type: str
    input: Any = field(default=None, metadata={"omit_none": False})
    request_id: Optional[str] = None
    priority: int = 0
    deadline: Optional[int] = None
    model: Optional[str] = None


@dataclass
class Assign:
    """``assign`` (gateway to worker): tasks to start, never more than the free slots."""

    seq: int
    tasks: List[TaskAssignment]


@dataclass
class Ack:
    """``ack`` (worker to gateway): every control message up to ``seq`` arrived."""

    seq: int


@dataclass
class RejectMsg:
    """``reject`` (worker to gateway): the worker will not run this lease."""

    lease: str
    reason: str
    retryable: bool


@dataclass
class Progress:
    """``progress`` (worker to gateway): how far a task is."""

    lease: str
    stage: Optional[str] = None
    step: int = 0
    total: int = 0
    eta_ms: Optional[int] = None


#: Largest preview carried inline, bytes (before base64); larger previews go through the
#: files API and are named by ``file``.
MAX_PREVIEW_BYTES = 64 * 1024
#: Image types a preview may have.
PREVIEW_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")


@dataclass
class Preview:
    """``preview`` (worker to gateway): a partial image of a running task; exactly one of
    ``data`` (base64) and ``file`` (a file id) is set."""

    lease: str
    mime: str
    index: int = 0
    data: Optional[str] = None
    file: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None


@dataclass
class TaskError:
    """A task failure inside a ``result``."""

    code: str
    message: str
    retryable: bool = False


@dataclass
class Result:
    """``result`` (worker to gateway): how a lease ended; kept in the outbox until
    ``result_ack``."""

    lease: str
    status: str  # "ok" | "error" | "canceled" (gateways also accept "cancelled")
    output: Any = None
    error: Optional[TaskError] = None
    usage: Any = None
    timings: Optional[Dict[str, int]] = None


@dataclass
class ResultAck:
    """``result_ack`` (gateway to worker): recorded or refused; either way clear the outbox."""

    lease: str
    accepted: bool
    reason: Optional[str] = None


@dataclass
class Cancel:
    """``cancel`` (gateway to worker): stop this lease and answer ``result{cancelled}``."""

    seq: int
    lease: str
    reason: str = ""


@dataclass
class Release:
    """``release`` (worker to gateway): give a lease back without failing it."""

    lease: str


@dataclass
class Drain:
    """``drain`` (gateway to worker): finish what you run, take nothing new."""

    seq: int
    deadline: Optional[int] = None


@dataclass
class Bye:
    """``bye`` (either side): the sender closes on purpose."""

    reason: str = ""


@dataclass
class GpuStats:
    """GPU statistics carried by ``hb``."""

    util: Optional[float] = None
    mem_used_mb: Optional[int] = None
    mem_total_mb: Optional[int] = None


@dataclass
class Heartbeat:
    """``hb`` (worker to gateway): alive; renews every lease and reports free slots."""

    ack_seq: int
    free: int
    inflight: List[str] = field(default_factory=list)
    gpu: Optional[GpuStats] = None


@dataclass
class HeartbeatAck:
    """``hb_ack`` (gateway to worker): leases are renewed until ``renewed_until`` (Unix ms)."""

    renewed_until: int


@dataclass
class ErrorMsg:
    """``error`` (either side): the payload is empty; code and text are in the envelope."""


MESSAGE_TYPES: Dict[str, type] = {
    "hello": Hello,
    "welcome": Welcome,
    "assign": Assign,
    "ack": Ack,
    "reject": RejectMsg,
    "progress": Progress,
    "preview": Preview,
    "result": Result,
    "result_ack": ResultAck,
    "cancel": Cancel,
    "release": Release,
    "drain": Drain,
    "bye": Bye,
    "hb": Heartbeat,
    "hb_ack": HeartbeatAck,
    "error": ErrorMsg,
}
_TYPE_NAMES = {cls: name for name, cls in MESSAGE_TYPES.items()}


def type_name(message: Any) -> str:
    """The ``type`` string of a payload dataclass."""
    return _TYPE_NAMES[type(message)]


@dataclass
class Envelope:
    """One frame: the envelope fields with a typed ``message`` inside."""

    message: Any
    ts: int = 0
    source: Optional[str] = None
    target: Optional[str] = None
    request_id: Optional[str] = None
    trace_id: Optional[str] = None
    task_type: Optional[str] = None
    error: Optional[str] = None
    error_msg: Optional[str] = None
    result: Any = None
    """Legacy result slot, read only when ``payload.output`` is absent."""

    def to_dict(self) -> Dict[str, Any]:
        """The frame as a JSON object."""
        out: Dict[str, Any] = {
            "type": type_name(self.message),
            "version": VERSION,
            "ts": self.ts,
            "payload": _encode(self.message),
        }
        for k in ("source", "target", "request_id", "trace_id", "task_type", "error", "error_msg", "result"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def encode(self) -> str:
        """The frame as JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> "Envelope":
        """Decodes a frame; raises :class:`DecodeError`. Unknown fields are ignored."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise DecodeError("malformed", f"malformed frame: {e}") from None
        if not isinstance(raw, dict):
            raise DecodeError("malformed", "malformed frame: not a JSON object")
        version = raw.get("version")
        if version != VERSION:
            raise DecodeError("version", f"unsupported protocol version {version!r}")
        kind = raw.get("type")
        mcls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if mcls is None:
            raise DecodeError("unknown_type", f"unknown message type {kind!r}")
        payload = raw.get("payload")
        try:
            message: Any = _decode(mcls, {} if payload is None else payload)
            ts = _decode_value(int, raw.get("ts", 0)) or 0
            strs = {
                k: _decode_value(Optional[str], raw.get(k))
                for k in ("source", "target", "request_id", "trace_id", "task_type", "error", "error_msg")
            }
        except TypeError as e:
            raise DecodeError("malformed", f"{kind} payload: {e}") from None
        if isinstance(message, Result) and message.output is None:
            message.output = raw.get("result")
        return cls(message=message, ts=ts, result=raw.get("result"), **strs)


def frame(message: Any, source: Optional[str] = None, **envelope: Any) -> str:
    """Encodes ``message`` in an envelope stamped now."""
    return Envelope(message=message, ts=now_ms(), source=source, **envelope).encode()
