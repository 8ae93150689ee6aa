//! The LISTEN side: other instances' announcements become [`Notification`]s.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::u;
use crate::lifecycle::TaskEvent;
use crate::queue::Notification;
use crate::store::{Result, event_from_row};

/// The `application_name` of the LISTEN connections of `schema`'s instances: writers
/// announce a change only while a connection of that name other than their own listener's
/// exists (see [`super::PostgresQueue`]).
pub(super) fn listener_name(schema: &str) -> String {
    format!("kiln_listen_{schema}")
}

/// Keeps one connection LISTENing on the channel and turns other instances' announcements
/// into notifications; reconnects after a second when the connection drops. `own_pid` holds
/// the listening connection's backend pid (0 while not connected), which writers skip when
/// they look for listeners.
pub(super) async fn listen(
    mut pg: tokio_postgres::Config,
    pool: Pool,
    schema: String,
    channel: String,
    instance: String,
    out: mpsc::Sender<Notification>,
    own_pid: Arc<AtomicI32>,
) {
    pg.application_name(listener_name(&schema));
    loop {
        own_pid.store(0, Ordering::Relaxed);
        match pg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (msg_tx, mut msgs) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = stream.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if msg_tx.send(n.payload().to_owned()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(message = "queue listener connection failed", error = %e);
                                break;
                            }
                        }
                    }
                });
                let listening = async {
                    let pid: i32 = client
                        .query_one("SELECT pg_backend_pid()", &[])
                        .await?
                        .try_get(0)?;
                    own_pid.store(pid, Ordering::Relaxed);
                    client.batch_execute(&format!("LISTEN \"{channel}\"")).await
                };
                match listening.await {
                    Ok(()) => {
                        // Anything announced while not listening is unknown: let dispatch look.
                        if !offer(&out, Notification::TasksReady) {
                            driver.abort();
                            return;
                        }
                        while let Some(payload) = msgs.recv().await {
                            if !forward(&payload, &pool, &schema, &instance, &out).await {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(message = "LISTEN failed", error = %e),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(message = "queue listener cannot connect", error = %e),
        }
        if out.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Handles one announcement. False when nobody listens any more.
async fn forward(
    payload: &str,
    pool: &Pool,
    schema: &str,
    instance: &str,
    out: &mpsc::Sender<Notification>,
) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(payload) else {
        return true;
    };
    if v["src"].as_str() == Some(instance) {
        return true;
    }
    let mut events: Vec<TaskEvent> =
        serde_json::from_value(v["events"].clone()).unwrap_or_default();
    if let Some(ids) = v["ids"].as_array() {
        let ids: Vec<i64> = ids.iter().filter_map(Value::as_i64).collect();
        let fetched = async {
            let c = pool.get().await?;
            let sql = format!(
                "SELECT id, task_id, kind, data, ts FROM {schema}.events WHERE id = ANY($1) ORDER BY id"
            );
            let rows = c.query(&sql, &[&ids]).await?;
            rows.iter().map(row_to_event).collect::<Result<Vec<_>>>()
        };
        match fetched.await {
            Ok(v) => events = v,
            Err(e) => tracing::warn!(message = "cannot read announced events", error = %e),
        }
    }
    if v["ready"].as_bool() == Some(true) && !offer(out, Notification::TasksReady) {
        return false;
    }
    events
        .into_iter()
        .all(|e| offer(out, Notification::Event(e)))
}

/// Queues a notification; when the broker falls behind it is dropped (dispatch also polls
/// every sweep interval). False when nobody listens any more.
fn offer(out: &mpsc::Sender<Notification>, n: Notification) -> bool {
    match out.try_send(n) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(message = "queue notifications dropped: the broker falls behind");
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

pub(super) fn row_to_event(r: &Row) -> Result<TaskEvent> {
    let data: String = r.try_get(3)?;
    let kind: String = r.try_get(2)?;
    event_from_row(r.try_get(0)?, r.try_get(1)?, &kind, &data, u(r.try_get(4)?))
}
