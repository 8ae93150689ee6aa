//! `kiln serve` and `kiln worker --demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kiln_broker::{Broker, PostgresOptions, PostgresQueue, SqliteOptions, SqliteQueue};
use kiln_gateway::{AppState, hash_secret};
use kiln_worker::WorkerConfig;

use crate::demo;
use crate::settings::{QueueBackend, Settings};

pub(crate) async fn serve(s: Settings) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(&s.server.data_dir)
        .await
        .with_context(|| {
            format!(
                "cannot create server.data_dir {}",
                s.server.data_dir.display()
            )
        })?;
    let broker = match s.queue.backend {
        QueueBackend::Sqlite => {
            let q = SqliteQueue::open(
                &s.queue_path(),
                SqliteOptions {
                    queue: s.queue_options(),
                    sync_full: s.store.sync_full,
                    ..SqliteOptions::default()
                },
            )
            .with_context(|| format!("cannot open the queue at {}", s.queue_path().display()))?;
            Broker::new(std::sync::Arc::new(q), s.broker.clone())
        }
        QueueBackend::Postgres => {
            let q = PostgresQueue::open(PostgresOptions {
                url: s.queue.postgres_url.clone(),
                schema: s.queue.postgres_schema.clone(),
                pool_size: s.queue.postgres_pool_size,
                queue: s.queue_options(),
                ..PostgresOptions::default()
            })
            .await
            .context("cannot open the PostgreSQL queue (queue.postgres_url)")?;
            Broker::new(std::sync::Arc::new(q), s.broker.clone())
        }
        QueueBackend::Redis => open_redis(&s)
            .await
            .with_context(|| format!("cannot open the Redis queue at {}", s.queue_desc()))?,
    };
    let mut gw = s.gateway.clone();
    gw.files_dir = s.files_dir();
    gw.storage = s.storage.clone();
    gw.files = s.files.clone();
    gw.webhooks = s.webhooks.clone();
    let demo_token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    if s.demo_worker.enabled {
        gw.known_task_types
            .extend(demo::TASK_TYPES.iter().map(|t| t.to_string()));
    }
    let openai_types = gw.openai.task_types();
    gw.known_task_types.extend(openai_types);
    // The in-process workers' token never leaves the process.
    gw.in_process_worker_token_hashes
        .push(hash_secret(&demo_token));
    let no_keys = gw.api_key_hashes.is_empty();
    let state = AppState::new(gw, broker.clone()).await?;
    let app = kiln_gateway::router(state.clone());
    let listener = tokio::net::TcpListener::bind(s.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", s.server.listen))?;
    let addr = listener.local_addr()?;
    if no_keys {
        tracing::warn!(message = "no API keys configured: serving without auth, on loopback only", %addr);
    }
    let files = match &s.storage.s3 {
        Some(b) => format!(
            "s3 {}/{}{}",
            b.endpoint,
            b.bucket,
            if b.key_prefix.is_empty() {
                String::new()
            } else {
                format!(" prefix {}", b.key_prefix)
            }
        ),
        None => s.files_dir().display().to_string(),
    };
    tracing::info!(message = "listening", %addr, queue = %s.queue_desc(), %files);
    println!("kiln listening on http://{addr}");

    // The in-process workers connect over loopback, also when listening on all addresses.
    let local = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let demo = if s.demo_worker.enabled {
        let url = format!("ws://{local}/v1/workers/connect");
        let worker = demo::worker(demo_config(
            url,
            Some(demo_token.clone()),
            s.server.data_dir.join("demo-worker"),
            s.demo_worker.slots,
            s.demo_worker.models.clone(),
        ));
        let handle = worker.handle();
        let task = tokio::spawn(async move {
            if let Err(e) = worker.run().await {
                tracing::error!(message = "demo worker stopped", error = %e);
            }
        });
        Some((handle, task))
    } else {
        None
    };

    let providers = if s.providers.is_empty() {
        None
    } else {
        let cfg = WorkerConfig {
            url: format!("ws://{local}/v1/workers/connect"),
            token: Some(demo_token.clone()),
            state_dir: s.server.data_dir.join("provider-worker"),
            labels: vec!["provider".into()],
            ..WorkerConfig::default()
        };
        let worker =
            kiln_provider::worker(cfg, &s.providers).context("gateway.openai.providers")?;
        let handle = worker.handle();
        let task = tokio::spawn(async move {
            if let Err(e) = worker.run().await {
                tracing::error!(message = "provider runner stopped", error = %e);
            }
        });
        Some((handle, task))
    };

    let grace = s.server.shutdown_grace;
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let shutdown_state = state.clone();
    let limits = crate::listen::Limits {
        header_read_timeout: s.server.header_read_timeout,
        idle_timeout: s.server.idle_timeout,
    };
    let server = crate::listen::serve(listener, app, limits, async move {
        shutdown_signal().await;
        tracing::info!(
            message = "shutting down: draining workers and streams",
            grace_ms = grace.as_millis() as u64
        );
        shutdown_state.begin_shutdown();
        let _ = stopped_tx.send(true);
    });
    let mut stopped = stopped_rx.clone();
    tokio::select! {
        () = server => {}
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(message = "grace period over; closing worker connections");
            broker.close_all(kiln_protocol::close::RESTART, &kiln_protocol::close::reason_with_retry_after("restarting", 2000));
        }
    }
    for (handle, task) in demo.into_iter().chain(providers) {
        handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!(message = "stopped");
    Ok(())
}

/// The broker over the shared Redis queue.
async fn open_redis(s: &Settings) -> anyhow::Result<std::sync::Arc<Broker>> {
    #[cfg(feature = "redis")]
    {
        let q = kiln_broker::RedisQueue::connect(kiln_broker::RedisOptions {
            url: s.queue.redis_url.clone(),
            prefix: s.queue.redis_prefix.clone(),
            request_id_ttl: s.queue.redis_request_id_ttl,
            queue: s.queue_options(),
            ..kiln_broker::RedisOptions::default()
        })
        .await?;
        Ok(Broker::new(std::sync::Arc::new(q), s.broker.clone()))
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = s;
        anyhow::bail!("this kiln was built without the `redis` feature")
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub(crate) async fn demo_worker(
    url: String,
    token: Option<String>,
    state_dir: PathBuf,
    slots: u32,
    models: Vec<String>,
) -> anyhow::Result<()> {
    let worker = demo::worker(demo_config(url, token, state_dir, slots, models));
    let handle = worker.handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        handle.shutdown();
    });
    worker.run().await?;
    Ok(())
}

/// The demo worker's configuration: labelled `demo`, serving `models`.
fn demo_config(
    url: String,
    token: Option<String>,
    state_dir: PathBuf,
    slots: u32,
    models: Vec<String>,
) -> WorkerConfig {
    WorkerConfig {
        url,
        token,
        state_dir,
        slots,
        models,
        labels: vec!["demo".into()],
        ..WorkerConfig::default()
    }
}
