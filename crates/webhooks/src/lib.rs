//! kiln-webhooks: [Standard Webhooks](https://www.standardwebhooks.com) signing and
//! verification, the retry schedule, and an SSRF-checked HTTP sender.
//!
//! ```
//! use kiln_webhooks::{Secret, Signer, SigningKey, Verifier, VerifyError};
//!
//! // Keys as configured: `whsec_<base64>` secrets (v1, HMAC-SHA256) and optionally a
//! // `whsk_<base64 seed>` Ed25519 key (v1a), whose `whpk_…` public key receivers get.
//! let secret = Secret::generate().expect("random");
//! let key = SigningKey::generate().expect("random");
//! let signer = Signer::new(vec![secret.clone()], Some(key.clone())).expect("a key");
//!
//! let body = br#"{"type":"task.completed","timestamp":"2026-01-01T00:00:00Z","data":{}}"#;
//! let now = 1_767_225_600; // Unix seconds
//! let headers = signer.headers("msg_2b5f0c", now, body).expect("valid id");
//! assert!(headers.signature.starts_with("v1,"));
//! assert!(headers.signature.contains(" v1a,"));
//!
//! // A receiver holding either key verifies the delivery...
//! let ts = headers.timestamp.to_string();
//! let by_secret = Verifier::new(vec![secret.clone()], vec![]);
//! let by_public_key = Verifier::new(vec![], vec![key.public_key()]);
//! by_secret.verify(&headers.id, &ts, &headers.signature, body, now + 2).expect("valid");
//! by_public_key.verify(&headers.id, &ts, &headers.signature, body, now + 2).expect("valid");
//!
//! // ...and refuses a changed body or a stale replay (tolerance: 5 minutes).
//! let changed = by_secret.verify(&headers.id, &ts, &headers.signature, b"{}", now);
//! assert_eq!(changed, Err(VerifyError::NoMatchingSignature));
//! let replayed = by_secret.verify(&headers.id, &ts, &headers.signature, body, now + 3600);
//! assert!(replayed.unwrap_err().is_stale());
//! ```
//!
//! - Keys ([`Secret`], [`SigningKey`], [`PublicKey`]): `whsec_`, `whsk_` and `whpk_`
//!   followed by the standard base64 of the key bytes (a 24-64-byte secret, the 32-byte
//!   Ed25519 seed, the 32-byte public key), as the official libraries write them. `Debug`
//!   never shows secret material.
//! - [`Signer`]: the `webhook-signature` value, `v1,<base64 HMAC-SHA256 of
//!   "{id}.{timestamp}.{body}">` per secret (several during a rotation) and
//!   `v1a,<base64 Ed25519 signature of the same content>`, space-separated; and
//!   [`WebhookHeaders`], all three headers.
//! - [`Verifier`]: what a receiver does, with a typed [`VerifyError`]; constant-time.
//! - [`Schedule`]: when each attempt is due (the spec's schedule by default, jittered ±10 %),
//!   [`Schedule::delay_after`] returns `None` when the message is exhausted.
//! - [`send`] (feature `http`, on by default): one POST attempt through kiln-upload's
//!   SSRF-checked connection, returning an [`Attempt`] with its [`Outcome`].
//!
//! Signing, verification and the schedule need no async runtime:
//! `--no-default-features` builds them without tokio or hyper.

mod keys;
mod schedule;
#[cfg(feature = "http")]
mod send;
mod sign;
mod verify;

pub use keys::{
    GENERATED_SECRET_LEN, KeyError, MAX_SECRET_LEN, MIN_SECRET_LEN, PublicKey, Secret, SigningKey,
    new_message_id,
};
pub use schedule::{DEFAULT_SCHEDULE_S, JITTER, MAX_DELAY_S, Schedule, ScheduleError};
#[cfg(feature = "http")]
pub use send::{Attempt, EXCERPT_CHARS, Outcome, SendConfig, send};
pub use sign::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SignError, Signer, WebhookHeaders};
pub use verify::{DEFAULT_TOLERANCE, Verifier, VerifyError};
