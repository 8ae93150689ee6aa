//! `kiln_provider::worker` as an embedder runs it: a real gateway on loopback (worker socket
//! and files API) and an upstream OpenAI-compatible API that answers with an image. A task
//! of the provider's type is run by the provider worker, its image stored as a kiln file.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use base64::Engine as _;
use kiln_broker::{Broker, BrokerConfig, NewTask, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, hash_secret, router};
use kiln_protocol::TaskState;
use kiln_provider::{ProviderConfig, task_type};
use kiln_worker::{Files, WorkerConfig};
use serde_json::{Value, json};

/// A small PNG, as the upstream returns it.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(3, 2, image::Rgb([200, 40, 40]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// An upstream that answers every generation with [`png`] and records the bodies it got.
async fn upstream(status: u16) -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/v1/images/generations",
        post(move |Json(body): Json<Value>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(body);
                let b64 = base64::engine::general_purpose::STANDARD.encode(png());
                let code = axum::http::StatusCode::from_u16(status).unwrap();
                let answer = if status == 200 {
                    json!({"data": [{"b64_json": b64, "revised_prompt": "a red cat"}],
                           "usage": {"total_tokens": 7}})
                } else {
                    json!({"error": {"message": "no such model"}})
                };
                (code, Json(answer))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/v1"), seen)
}

/// A gateway on loopback taking worker token `wt`; returns its broker and worker URL.
async fn gateway(dir: &std::path::Path) -> (Arc<Broker>, String) {
    let queue = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let config = GatewayConfig {
        files_dir: dir.join("files"),
        worker_token_hashes: vec![hash_secret("wt")],
        ..GatewayConfig::default()
    };
    let state = AppState::new(config, broker.clone()).await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(l, app).await });
    (broker, format!("ws://{addr}/v1/workers/connect"))
}

async fn wait_terminal(b: &Broker, id: &str) -> kiln_broker::Task {
    for _ in 0..200 {
        let t = b.queue().get(id).await.unwrap().unwrap();
        if t.state.is_terminal() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} did not finish")
}

async fn run_one(
    status: u16,
) -> (
    kiln_broker::Task,
    Vec<Value>,
    WorkerConfig,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let (base_url, seen) = upstream(status).await;
    let (broker, url) = gateway(dir.path()).await;
    let mut providers = BTreeMap::new();
    providers.insert(
        "acme".to_owned(),
        ProviderConfig {
            base_url,
            allow_loopback: true,
            max_retries: 0,
            ..ProviderConfig::default()
        },
    );
    let cfg = WorkerConfig {
        url,
        token: Some("wt".into()),
        state_dir: dir.path().join("provider"),
        ..WorkerConfig::default()
    };
    let worker = kiln_provider::worker(cfg.clone(), &providers).unwrap();
    let handle = worker.handle();
    let run = tokio::spawn(worker.run());
    let (task, _) = broker
        .submit(NewTask {
            task_type: task_type("acme"),
            input: json!({"operation": "generate", "model": "up-1", "prompt": "a cat", "n": 1}),
            ..NewTask::default()
        })
        .await
        .unwrap();
    let done = wait_terminal(&broker, &task.id).await;
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    (done, seen, cfg, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_task_is_run_upstream_and_its_image_stored() {
    let (t, seen, cfg, _dir) = run_one(200).await;
    assert_eq!(t.state, TaskState::Succeeded, "{:?}", t.error);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["prompt"], "a cat");
    assert_eq!(seen[0]["model"], "up-1");
    assert_eq!(seen[0]["response_format"], "b64_json");
    assert!(
        seen[0].get("operation").is_none(),
        "kiln's fields stay home"
    );
    let out = t.output.unwrap();
    assert_eq!(out["revised_prompts"], json!(["a red cat"]));
    assert_eq!(out["usage"]["total_tokens"], 7);
    assert_eq!(out["upstream"]["provider"], "acme");
    assert_eq!(out["upstream"]["attempts"].as_array().unwrap().len(), 1);
    let id = out["files"][0]["id"].as_str().unwrap();
    let stored = Files::new(&cfg).download(id).await.unwrap();
    assert_eq!(stored.to_vec(), png());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_fails_the_task_with_the_upstream_message() {
    let (t, seen, _, _dir) = run_one(400).await;
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(seen.len(), 1, "a 4xx is final");
    let e = t.error.unwrap();
    assert_eq!(e.code, "upstream_rejected");
    assert!(!e.retryable);
    assert!(e.message.contains("no such model"), "{}", e.message);
}
