//! `kiln serve` and `kiln worker --demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use kiln_broker::{Broker, PostgresOptions, PostgresQueue, SqliteOptions, SqliteQueue};
use kiln_gateway::{AppState, hash_secret};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};

use crate::demo;
use crate::settings::{QueueBackend, Settings};

/// Task types of the built-in demo worker.
const DEMO_TYPES: &[&str] = &["txt2img", "img2img", "delete_asset"];

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
                    queue: s.store.queue_options(),
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
                queue: s.store.queue_options(),
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
    let demo_token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    if s.demo_worker.enabled {
        gw.known_task_types
            .extend(DEMO_TYPES.iter().map(|t| t.to_string()));
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
        let worker = demo_worker_builder(
            url,
            Some(demo_token.clone()),
            s.server.data_dir.join("demo-worker"),
            s.demo_worker.slots,
            s.demo_worker.models.clone(),
        );
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

    let providers = if s.gateway.openai.providers.is_empty() {
        None
    } else {
        let worker = crate::provider::worker(
            format!("ws://{local}/v1/workers/connect"),
            Some(demo_token.clone()),
            s.server.data_dir.join("provider-worker"),
            &s.gateway.openai.providers,
        )?;
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
            queue: s.store.queue_options(),
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
    let worker = demo_worker_builder(url, token, state_dir, slots, models);
    let handle = worker.handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        handle.shutdown();
    });
    worker.run().await?;
    Ok(())
}

/// The files API of the gateway, as the demo worker uses it.
#[derive(Clone)]
pub(crate) struct FilesApi {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    owned: PathBuf,
}

pub(crate) fn bad_input(msg: impl Into<String>) -> TaskError {
    TaskError {
        code: "invalid_input".into(),
        message: msg.into(),
        retryable: false,
    }
}

pub(crate) fn transient(msg: impl Into<String>) -> TaskError {
    TaskError {
        code: "files_api".into(),
        message: msg.into(),
        retryable: true,
    }
}

impl FilesApi {
    /// The files API of the gateway whose worker socket is `url`; files this worker
    /// creates are listed in `<state_dir>/owned-files`.
    pub(crate) fn new(url: &str, token: Option<String>, state_dir: &std::path::Path) -> Self {
        let base = url
            .replacen("ws://", "http://", 1)
            .replacen("wss://", "https://", 1)
            .split("/v1/")
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        Self {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
            owned: state_dir.join("owned-files"),
        }
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        ct: Option<&str>,
    ) -> Result<(u16, String, Bytes), TaskError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transient(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| transient(e.to_string()))?;
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transient(e.to_string()))?
                .to_bytes();
            Ok::<_, TaskError>((status, ct, body))
        };
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .map_err(|_| transient("files API timed out"))?
    }

    pub(crate) async fn upload(&self, bytes: Vec<u8>, ct: &str) -> Result<Value, TaskError> {
        let (status, _, body) = self
            .call(hyper::Method::POST, "/v1/files", bytes, Some(ct))
            .await?;
        if status != 201 {
            return Err(transient(format!(
                "upload answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| transient(format!("upload answer is not JSON: {e}")))?;
        if let Some(id) = v["id"].as_str() {
            use tokio::io::AsyncWriteExt as _;
            let line = format!("{id}\n");
            if let Ok(mut f) = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.owned)
                .await
            {
                let _ = f.write_all(line.as_bytes()).await;
            }
        }
        Ok(
            json!({"id": v["id"], "content_type": v["content_type"], "bytes": v["bytes"], "width": v["width"], "height": v["height"], "sha256": v["sha256"]}),
        )
    }

    pub(crate) async fn download(&self, id: &str) -> Result<Bytes, TaskError> {
        let (status, _, body) = self
            .call(
                hyper::Method::GET,
                &format!("/v1/files/{id}"),
                Vec::new(),
                None,
            )
            .await?;
        match status {
            200 => Ok(body),
            404 => Err(bad_input(format!("no file {id}"))),
            s => Err(transient(format!("download answered {s}"))),
        }
    }

    async fn owns(&self, id: &str) -> bool {
        tokio::fs::read_to_string(&self.owned)
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l == id)
    }
}

fn demo_worker_builder(
    url: String,
    token: Option<String>,
    state_dir: PathBuf,
    slots: u32,
    models: Vec<String>,
) -> Worker {
    let api = FilesApi::new(&url, token.clone(), &state_dir);
    let cfg = WorkerConfig {
        url,
        token,
        state_dir,
        slots,
        models,
        labels: vec!["demo".into()],
        ..WorkerConfig::default()
    };
    let (a1, a2, a3) = (api.clone(), api.clone(), api);
    Worker::new(cfg)
        .handler("txt2img", move |ctx| txt2img(a1.clone(), ctx))
        .handler("img2img", move |ctx| img2img(a2.clone(), ctx))
        .handler("delete_asset", move |ctx| delete_asset(a3.clone(), ctx))
}

fn encode_png(img: &image::DynamicImage) -> Result<Vec<u8>, TaskError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| TaskError {
            code: "encode".into(),
            message: e.to_string(),
            retryable: false,
        })?;
    Ok(out.into_inner())
}

/// Sends coarse-to-fine previews of `img`: `input.partial_images` of them (0 to 3),
/// default 2.
fn send_previews(ctx: &TaskContext, img: &image::DynamicImage) {
    let count = ctx.input["partial_images"].as_u64().unwrap_or(2).min(3) as u32;
    for (bytes, mime) in demo::previews(img, count) {
        if let Err(e) = ctx.preview(&bytes, mime) {
            tracing::warn!(message = "preview not sent", error = %e);
        }
    }
}

fn dim(v: &Value, key: &str, default: u32) -> Result<u32, TaskError> {
    match &v[key] {
        Value::Null => Ok(default),
        x => x
            .as_u64()
            .filter(|n| (1..=u64::from(demo::MAX_SIDE)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                bad_input(format!(
                    "{key} must be an integer from 1 to {}",
                    demo::MAX_SIDE
                ))
            }),
    }
}

/// `n` of an input: how many images to make (1 to 10).
fn count(v: &Value) -> Result<u32, TaskError> {
    match &v["n"] {
        Value::Null => Ok(1),
        x => x
            .as_u64()
            .filter(|n| (1..=10).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| bad_input("n must be an integer from 1 to 10")),
    }
}

async fn txt2img(api: FilesApi, ctx: TaskContext) -> Result<Value, TaskError> {
    let input = ctx.input.clone();
    let prompt = input["prompt"]
        .as_str()
        .ok_or_else(|| bad_input("input.prompt (string) is required"))?
        .to_owned();
    let (w, h) = (dim(&input, "width", 512)?, dim(&input, "height", 512)?);
    let seed = input["seed"].as_u64().unwrap_or(0);
    let n = count(&input)?;
    let mut files = Vec::new();
    for i in 0..n {
        let c = ctx.clone();
        let p = prompt.clone();
        let png = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let img = demo::txt2img(&p, seed + u64::from(i), w, h, |step, total| {
                c.progress("render", u64::from(i * total + step), u64::from(n * total))
            });
            c.record_stage("render", started.elapsed());
            let img = image::DynamicImage::ImageRgb8(img);
            if i == 0 {
                send_previews(&c, &img);
            }
            let started = Instant::now();
            let png = encode_png(&img);
            c.record_stage("encode", started.elapsed());
            png
        })
        .await
        .map_err(|e| transient(e.to_string()))??;
        if ctx.is_cancelled() {
            return Err(TaskError {
                code: "canceled".into(),
                message: "canceled".into(),
                retryable: false,
            });
        }
        files.push(ctx.timed("upload", api.upload(png, "image/png")).await?);
    }
    Ok(json!({"files": files, "seed": seed, "generator": "kiln demo (procedural, not a model)"}))
}

/// The reference file ids of an img2img input: `images` (several) or `image` (one).
fn reference_ids(input: &Value) -> Result<Vec<String>, TaskError> {
    let ids: Vec<String> = match input["images"].as_array() {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        None => input["image"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
    };
    if ids.is_empty() || ids.len() > 16 {
        return Err(bad_input(
            "input.image (a file id) or input.images (1 to 16 file ids) is required",
        ));
    }
    Ok(ids)
}

fn decode(data: &[u8]) -> Result<image::DynamicImage, TaskError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| bad_input(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| bad_input(format!("cannot decode the input image: {e}")))
}

async fn img2img(api: FilesApi, ctx: TaskContext) -> Result<Value, TaskError> {
    let input = ctx.input.clone();
    let ids = reference_ids(&input)?;
    let prompt = input["prompt"].as_str().unwrap_or("").to_owned();
    let max_side = dim(&input, "max_side", 1024)?;
    let size = match (&input["width"], &input["height"]) {
        (Value::Null, Value::Null) => None,
        _ => Some((dim(&input, "width", 512)?, dim(&input, "height", 512)?)),
    };
    let n = count(&input)?;
    let total = ids.len() as u64 + u64::from(n) + 1;
    let mut data = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        ctx.progress("download", i as u64, total);
        data.push(ctx.timed("download", api.download(id)).await?);
    }
    ctx.progress("transform", ids.len() as u64, total);
    let c = ctx.clone();
    let (pngs, applied) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let refs = data
            .iter()
            .map(|d| decode(d))
            .collect::<Result<Vec<_>, _>>()?;
        c.record_stage("decode", started.elapsed());
        let started = Instant::now();
        let (outs, applied) = demo::edit(refs, &prompt, max_side, size, n);
        c.record_stage("render", started.elapsed());
        if let Some(first) = outs.first() {
            send_previews(&c, first);
        }
        let started = Instant::now();
        let pngs = outs.iter().map(encode_png).collect::<Result<Vec<_>, _>>()?;
        c.record_stage("encode", started.elapsed());
        Ok::<_, TaskError>((pngs, applied))
    })
    .await
    .map_err(|e| transient(e.to_string()))??;
    let mut files = Vec::new();
    for (i, png) in pngs.into_iter().enumerate() {
        ctx.progress("upload", ids.len() as u64 + 1 + i as u64, total);
        files.push(ctx.timed("upload", api.upload(png, "image/png")).await?);
    }
    Ok(json!({"files": files, "transforms": applied, "references": ids.len()}))
}

async fn delete_asset(api: FilesApi, ctx: TaskContext) -> Result<Value, TaskError> {
    let id = ctx.input["file_id"]
        .as_str()
        .ok_or_else(|| bad_input("input.file_id is required"))?
        .to_owned();
    if !api.owns(&id).await {
        return Err(TaskError {
            code: "not_owner".into(),
            message: format!("this worker did not create {id}"),
            retryable: false,
        });
    }
    let (status, _, _) = api
        .call(
            hyper::Method::DELETE,
            &format!("/v1/files/{id}"),
            Vec::new(),
            None,
        )
        .await?;
    match status {
        204 => Ok(json!({"deleted": id})),
        404 => Ok(json!({"deleted": id, "already_gone": true})),
        s => Err(transient(format!("delete answered {s}"))),
    }
}
