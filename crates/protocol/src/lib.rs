//! kiln-protocol: the `kiln.v1` wire protocol between the kiln gateway and GPU workers.
//!
//! Every frame is one JSON envelope — `type, version, source, target, ts, request_id,
//! trace_id, task_type, payload, error, error_msg, result` — with a typed payload per
//! `type`. Unknown fields are ignored; unknown types, malformed and oversized frames are
//! [`DecodeError`]s that the receiver answers with an `error` envelope. The full
//! specification, enough to write a worker in another language, is `docs/PROTOCOL.md`.
//!
//! ```
//! use kiln_protocol::{Envelope, Message, messages::Ack, DEFAULT_MAX_FRAME_BYTES};
//!
//! let frame = Envelope::new(Message::Ack(Ack { seq: 7 }), 1_700_000_000_000).encode();
//! assert!(frame.contains(r#""type":"ack""#));
//! let back = Envelope::decode(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
//! assert_eq!(back.message, Message::Ack(Ack { seq: 7 }));
//!
//! let err = Envelope::decode(r#"{"type":"teleport","version":"1"}"#, 1024).unwrap_err();
//! assert_eq!(err.code(), "unknown_type");
//! ```
//!
//! This crate is serde only: no runtime, no WebSocket library, so workers in any Rust
//! stack can depend on it.

pub mod close;
mod envelope;
pub mod messages;
mod state;

pub use envelope::{
    DEFAULT_MAX_FRAME_BYTES, DecodeError, Envelope, Message, Peek, SUBPROTOCOL, VERSION,
};
pub use state::{TaskState, now_ms, trace_id};
