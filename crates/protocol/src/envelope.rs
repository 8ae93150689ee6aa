//! The envelope every frame travels in, and its encoding.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::messages::*;

/// The protocol version carried in every envelope.
pub const VERSION: &str = "1";

/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "kiln.v1";

/// Largest frame the gateway accepts by default: 1 MiB. Bulk data goes over HTTP.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// A message: its `type` and typed payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// `hello`, worker -> gateway.
    Hello(Hello),
    /// `welcome`, gateway -> worker.
    Welcome(Welcome),
    /// `assign`, gateway -> worker.
    Assign(Assign),
    /// `ack`, worker -> gateway.
    Ack(Ack),
    /// `reject`, worker -> gateway.
    Reject(Reject),
    /// `progress`, worker -> gateway.
    Progress(Progress),
    /// `preview`, worker -> gateway.
    Preview(Preview),
    /// `result`, worker -> gateway.
    Result(TaskResult),
    /// `result_ack`, gateway -> worker.
    ResultAck(ResultAck),
    /// `cancel`, gateway -> worker.
    Cancel(Cancel),
    /// `release`, worker -> gateway.
    Release(Release),
    /// `drain`, gateway -> worker.
    Drain(Drain),
    /// `bye`, either way.
    Bye(Bye),
    /// `hb`, worker -> gateway.
    Heartbeat(Heartbeat),
    /// `hb_ack`, gateway -> worker.
    HeartbeatAck(HeartbeatAck),
    /// `error`, either way: the envelope's `error` and `error_msg` say what was wrong with
    /// an earlier frame. The payload is empty.
    Error,
}

impl Message {
    /// The `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Assign(_) => "assign",
            Message::Ack(_) => "ack",
            Message::Reject(_) => "reject",
            Message::Progress(_) => "progress",
            Message::Preview(_) => "preview",
            Message::Result(_) => "result",
            Message::ResultAck(_) => "result_ack",
            Message::Cancel(_) => "cancel",
            Message::Release(_) => "release",
            Message::Drain(_) => "drain",
            Message::Bye(_) => "bye",
            Message::Heartbeat(_) => "hb",
            Message::HeartbeatAck(_) => "hb_ack",
            Message::Error => "error",
        }
    }

    /// The control sequence number of `assign`, `cancel` and `drain`.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Message::Assign(m) => Some(m.seq),
            Message::Cancel(m) => Some(m.seq),
            Message::Drain(m) => Some(m.seq),
            _ => None,
        }
    }

    fn payload(&self) -> Result<Value, serde_json::Error> {
        match self {
            Message::Hello(m) => serde_json::to_value(m),
            Message::Welcome(m) => serde_json::to_value(m),
            Message::Assign(m) => serde_json::to_value(m),
            Message::Ack(m) => serde_json::to_value(m),
            Message::Reject(m) => serde_json::to_value(m),
            Message::Progress(m) => serde_json::to_value(m),
            Message::Preview(m) => serde_json::to_value(m),
            Message::Result(m) => serde_json::to_value(m),
            Message::ResultAck(m) => serde_json::to_value(m),
            Message::Cancel(m) => serde_json::to_value(m),
            Message::Release(m) => serde_json::to_value(m),
            Message::Drain(m) => serde_json::to_value(m),
            Message::Bye(m) => serde_json::to_value(m),
            Message::Heartbeat(m) => serde_json::to_value(m),
            Message::HeartbeatAck(m) => serde_json::to_value(m),
            Message::Error => Ok(Value::Object(Default::default())),
        }
    }

    fn from_payload(type_name: &str, payload: Value) -> Result<Self, DecodeError> {
        fn p<T: serde::de::DeserializeOwned>(t: &str, v: Value) -> Result<T, DecodeError> {
            serde_json::from_value(v)
                .map_err(|e| DecodeError::Malformed(format!("{t} payload: {e}")))
        }
        let t = type_name;
        Ok(match t {
            "hello" => Message::Hello(p(t, payload)?),
            "welcome" => Message::Welcome(p(t, payload)?),
            "assign" => Message::Assign(p(t, payload)?),
            "ack" => Message::Ack(p(t, payload)?),
            "reject" => Message::Reject(p(t, payload)?),
            "progress" => Message::Progress(p(t, payload)?),
            "preview" => Message::Preview(p(t, payload)?),
            "result" => Message::Result(p(t, payload)?),
            "result_ack" => Message::ResultAck(p(t, payload)?),
            "cancel" => Message::Cancel(p(t, payload)?),
            "release" => Message::Release(p(t, payload)?),
            "drain" => Message::Drain(p(t, payload)?),
            "bye" => Message::Bye(p(t, payload)?),
            "hb" => Message::Heartbeat(p(t, payload)?),
            "hb_ack" => Message::HeartbeatAck(p(t, payload)?),
            "error" => Message::Error,
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        })
    }
}

/// One frame: the envelope fields existing workers speak, with a typed message inside.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The message (`type` + `payload`).
    pub message: Message,
    /// Sender, e.g. `worker:<worker_id>` or `gateway`.
    pub source: Option<String>,
    /// Receiver.
    pub target: Option<String>,
    /// Send time, Unix ms.
    pub ts: u64,
    /// The task's idempotency key, when the message concerns one task.
    pub request_id: Option<String>,
    /// W3C trace id (32 lowercase hex digits) or a whole `traceparent` header value.
    pub trace_id: Option<String>,
    /// The task type, when the message concerns one task.
    pub task_type: Option<String>,
    /// Error code (on `error` frames).
    pub error: Option<String>,
    /// Error text (on `error` frames).
    pub error_msg: Option<String>,
    /// Legacy result slot: older workers put a task's output here; kiln.v1 uses
    /// `payload.output` and reads this only when that is absent.
    pub result: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default)]
    ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_type: Option<String>,
    #[serde(default)]
    payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_msg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than the frame limit.
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    Oversized {
        /// Frame size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or fields of the wrong shape.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A `type` this version does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A `version` other than "1".
    #[error("unsupported protocol version {0:?} (this side speaks \"1\")")]
    Version(String),
}

impl DecodeError {
    /// The error code sent back in an `error` envelope: `oversized`, `malformed`,
    /// `unknown_type`, `version`.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::Version(_) => "version",
        }
    }

    /// Whether the connection must close at once (a version mismatch cannot get better).
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::Version(_))
    }
}

/// What [`Envelope::peek`] reads of a frame too large to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    /// The frame's `type`.
    pub kind: String,
    /// `payload.lease`, when there is one.
    pub lease: Option<String>,
}

#[derive(Deserialize)]
struct RawPeek {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: PeekPayload,
}

#[derive(Deserialize, Default)]
struct PeekPayload {
    #[serde(default)]
    lease: Option<String>,
}

impl Envelope {
    /// Reads only the `type` and `payload.lease` of a frame (one already received, over the
    /// frame limit): other fields are skipped without being built, so the receiver can
    /// answer an oversized `result` for its lease. `None` when the text is not an envelope.
    pub fn peek(text: &str) -> Option<Peek> {
        let raw: RawPeek = serde_json::from_str(text).ok()?;
        Some(Peek {
            kind: raw.kind,
            lease: raw.payload.lease,
        })
    }

    /// A new envelope around `message`, stamped with `ts` (Unix ms).
    pub fn new(message: Message, ts: u64) -> Self {
        Self {
            message,
            source: None,
            target: None,
            ts,
            request_id: None,
            trace_id: None,
            task_type: None,
            error: None,
            error_msg: None,
            result: None,
        }
    }

    /// An `error` envelope answering a bad frame.
    pub fn error_reply(err: &DecodeError, ts: u64) -> Self {
        Self {
            error: Some(err.code().to_owned()),
            error_msg: Some(err.to_string()),
            ..Self::new(Message::Error, ts)
        }
    }

    /// Sets `source`.
    pub fn from_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Encodes to JSON text.
    pub fn encode(&self) -> String {
        let raw = Raw {
            kind: self.message.type_name().to_owned(),
            version: VERSION.to_owned(),
            source: self.source.clone(),
            target: self.target.clone(),
            ts: self.ts,
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            task_type: self.task_type.clone(),
            // Payload structs hold only strings, numbers and JSON values: cannot fail.
            payload: self.message.payload().unwrap_or(Value::Null),
            error: self.error.clone(),
            error_msg: self.error_msg.clone(),
            result: self.result.clone(),
        };
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Decodes a frame of at most `max_bytes`. Unknown fields are ignored.
    pub fn decode(text: &str, max_bytes: usize) -> Result<Self, DecodeError> {
        if text.len() > max_bytes {
            return Err(DecodeError::Oversized {
                size: text.len(),
                limit: max_bytes,
            });
        }
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if raw.version != VERSION {
            return Err(DecodeError::Version(raw.version));
        }
        let mut message = Message::from_payload(&raw.kind, raw.payload)?;
        if let Message::Result(r) = &mut message
            && r.output.is_none()
        {
            r.output.clone_from(&raw.result);
        }
        Ok(Self {
            message,
            source: raw.source,
            target: raw.target,
            ts: raw.ts,
            request_id: raw.request_id,
            trace_id: raw.trace_id,
            task_type: raw.task_type,
            error: raw.error,
            error_msg: raw.error_msg,
            result: raw.result,
        })
    }
}
