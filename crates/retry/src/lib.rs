//! kiln-retry: a retry policy that decides by what is known about the server having
//! processed a request.
//!
//! Each failed attempt is classified ([`Class`]): never sent, refused by the server
//! (HTTP/2 GOAWAY NO_ERROR, REFUSED_STREAM), maybe processed (resets, EOF, timeouts), a
//! response status, or permanent. The policy replays only what is safe, waits with a
//! jittered exponential backoff, honours `Retry-After`, and stops at whichever bound comes
//! first: the attempt cap, the overall deadline, or a retry budget shared by all requests to
//! the same host.
//!
//! ```
//! use std::time::Duration;
//! use kiln_retry::{Class, Failure, RetryConfig, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let policy = RetryPolicy::new(RetryConfig {
//!     initial_backoff: Duration::from_millis(100),
//!     ..RetryConfig::default()
//! })
//! .expect("valid config");
//!
//! // The first attempt meets a 503, the second succeeds.
//! let mut calls = 0;
//! let done = policy
//!     .request("api.example.com")
//!     .run(
//!         |_attempt| {
//!             calls += 1;
//!             let n = calls;
//!             async move { if n == 1 { Err(503u16) } else { Ok("uploaded") } }
//!         },
//!         |status: &u16| Failure::new(Class::Response { status: *status }),
//!     )
//!     .await
//!     .expect("second attempt succeeds");
//! assert_eq!(done.value, "uploaded");
//! assert_eq!(done.attempts.len(), 2);
//! # }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `tokio` | yes | [`Request::run`], the async runner on tokio's timer |
//!
//! Without `tokio` the crate is the policy core ([`RetryPolicy::start`],
//! [`RetryState::on_failure`]) with no runtime dependency.

mod budget;
mod class;
mod config;
mod error;
mod policy;
mod pushback;
#[cfg(feature = "tokio")]
mod runner;
mod schedule;

pub use budget::RetryBudget;
pub use class::{Class, Failure, is_idempotent_method};
pub use config::{BudgetConfig, InvalidConfig, Jitter, RetryConfig};
pub use error::{AttemptLog, RetryError};
pub use policy::{Decision, RetryEvent, RetryPolicy, RetryState, StopReason};
pub use pushback::{parse_ratelimit_reset, parse_retry_after, pushback_from_headers};
#[cfg(feature = "tokio")]
pub use runner::{AttemptInfo, Completed, Request};
