//! kiln-broker: a durable task queue and the dispatcher that feeds `kiln.v1` worker
//! sessions.
//!
//! Tasks live in a [`Queue`] store: `SqliteQueue` (one WAL file) is the embedded default;
//! with the `postgres` feature, `PostgresQueue` lets several gateway instances share one
//! database; with the `redis` feature, `RedisQueue`. Every change a store makes to a task is
//! decided by the pure functions of [`lifecycle`], so the three behave alike. Tasks are
//! stored before `submit` returns, so an accepted task survives a kill -9
//! of the process. Each attempt gets its own lease; any frame from the worker
//! renews its leases, and a lease lapses only after `lease` without renewal, so long jobs
//! run once without tuning. Results are accepted by compare-and-set on the lease (first
//! finisher wins). Workers never get more tasks than their free slots.
//!
//! A session runs over any `Stream` of received text frames and `Sink` of text frames to
//! send, so the gateway adapts its WebSocket and tests use channels:
//!
//! ```
//! use futures_util::StreamExt;
//! use kiln_broker::{Broker, BrokerConfig, NewTask, SqliteQueue};
//! use kiln_protocol::{Envelope, Message, messages::*};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
//! let broker = Broker::new(queue, BrokerConfig::default());
//! let (task, created) = broker
//!     .submit(NewTask { task_type: "txt2img".into(), input: serde_json::json!({"prompt": "a fox"}), ..Default::default() })
//!     .await
//!     .unwrap();
//! assert!(created);
//!
//! // A worker: frames in through one channel, frames out through another.
//! let (to_gw, from_worker) = futures_channel::mpsc::unbounded::<Result<String, std::io::Error>>();
//! let (to_worker, mut from_gw) = futures_channel::mpsc::unbounded::<String>();
//! tokio::spawn(broker.clone().serve_session(from_worker, to_worker));
//! let hello = Hello { worker_id: "w1".into(), boot_id: "b1".into(), slots: 1,
//!     capabilities: Capabilities { task_types: vec!["txt2img".into()], ..Default::default() },
//!     resume: None, inflight: vec![], outbox: vec![], worker_secret: None };
//! to_gw.unbounded_send(Ok(Envelope::new(Message::Hello(hello), 0).encode())).unwrap();
//! let welcome = Envelope::decode(&from_gw.next().await.unwrap(), 1 << 20).unwrap();
//! assert!(matches!(welcome.message, Message::Welcome(_)));
//! let assign = Envelope::decode(&from_gw.next().await.unwrap(), 1 << 20).unwrap();
//! let Message::Assign(a) = assign.message else { panic!() };
//! assert_eq!(a.tasks[0].task_id, task.id);
//! # }
//! ```

mod broker;
mod config;
mod dispatch;
mod hello;
pub mod lifecycle;
mod model;
pub mod outbox;
mod preview;
mod previews;
mod queue;
mod session;
mod store;
mod sweeper;

pub use broker::{Broker, SessionEnd, WorkerInfo, now_ms};
pub use config::BrokerConfig;
pub use lifecycle::{Ending, TaskEvent, TaskEventKind};
pub use model::*;
pub use outbox::{
    DeliveryAttempt, DeliveryOutcome, Message, MessageRecord, MessageState, NewMessage, Outbox,
    WebhookEndpoint,
};
pub use queue::{
    ASSIGN_FAILED, Notification, Notifications, Queue, QueueFuture, QueueOptions, Sweep,
};
#[cfg(feature = "postgres")]
pub use store::postgres::{PostgresOptions, PostgresQueue};
#[cfg(feature = "redis")]
pub use store::redis::{RedisOptions, RedisQueue};
pub use store::sqlite::{SqliteExecutor, SqliteOptions, SqliteQueue};
