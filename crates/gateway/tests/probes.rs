//! Attacker probes through the real router: every `image_url` of a JSON edit that points at
//! a non-global address, in any spelling (decimal, octal and hex IPv4, IPv4-mapped IPv6,
//! `0.0.0.0`), a non-http scheme or a redirect to a private address is refused before a
//! connection is made to it; a listener on 127.0.0.1 counts the connections.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, router};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower_service::Service as _;

async fn gateway(allow_loopback: bool) -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let mut config = GatewayConfig {
        files_dir: dir.path().join("files"),
        queue_unknown_task_types: true,
        ..GatewayConfig::default()
    };
    config.openai.image_urls.enabled = true;
    config.openai.image_urls.allow_loopback = allow_loopback;
    config.openai.image_urls.timeout = std::time::Duration::from_secs(3);
    let state = AppState::new(config, broker).await.unwrap();
    (dir, router(state))
}

/// A listener on 127.0.0.1 that answers every connection with `answer` and counts them.
async fn listener(answer: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        }
    });
    (port, hits)
}

async fn edit(app: &axum::Router, url: &str) -> (u16, Value) {
    let body = json!({"prompt": "mirror", "images": [{"image_url": url}]}).to_string();
    let req = Request::post("/v1/images/edits")
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().call(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_at_non_global_addresses_are_refused_before_connecting() {
    let (_dir, app) = gateway(false).await;
    let (port, hits) = listener(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let urls = [
        format!("http://127.0.0.1:{port}/a.png"),
        format!("http://localhost:{port}/a.png"),
        format!("http://2130706433:{port}/a.png"),
        format!("http://0177.0.0.1:{port}/a.png"),
        format!("http://0x7f.1:{port}/a.png"),
        format!("http://0x7f000001:{port}/a.png"),
        format!("http://127.1:{port}/a.png"),
        format!("http://[::1]:{port}/a.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/a.png"),
        format!("http://[::ffff:7f00:1]:{port}/a.png"),
        format!("http://[::127.0.0.1]:{port}/a.png"),
        format!("http://0.0.0.0:{port}/a.png"),
        format!("http://0:{port}/a.png"),
        "http://10.0.0.1/a.png".to_owned(),
        "http://172.16.0.1/a.png".to_owned(),
        "http://192.168.1.1/a.png".to_owned(),
        "http://100.64.0.1/a.png".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fe80::1]/a.png".to_owned(),
        "http://[fd00::1]/a.png".to_owned(),
        "http://[64:ff9b::7f00:1]/a.png".to_owned(),
        "http://255.255.255.255/a.png".to_owned(),
        "http://224.0.0.1/a.png".to_owned(),
        "file:///etc/passwd".to_owned(),
        format!("ftp://127.0.0.1:{port}/a.png"),
        format!("gopher://127.0.0.1:{port}/_a"),
        format!("ws://127.0.0.1:{port}/a.png"),
        "//127.0.0.1/a.png".to_owned(),
    ];
    for url in &urls {
        let started = std::time::Instant::now();
        let (status, v) = edit(&app, url).await;
        assert_eq!(status, 400, "{url}: {v}");
        assert_eq!(v["error"]["param"], "images", "{url}: {v}");
        // Refused by the address check, not by a timeout.
        assert!(
            started.elapsed().as_secs() < 3,
            "{url}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a refused URL was connected to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_private_address_is_not_followed() {
    // Loopback allowed (a test upstream on this machine) but not private addresses: the
    // upstream's redirect to the metadata address is refused, never fetched.
    let (_dir, app) = gateway(true).await;
    let (port, hits) = listener(
        b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/meta-data/\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let (status, v) = edit(&app, &format!("http://127.0.0.1:{port}/a.png")).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("redirect"),
        "{v}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
