//! Upload validation through the real router: truncated PNG and WebP and a broken lossless
//! WebP are refused with a JSON 422 instead of being stored, a PNG whose `iCCP` chunk
//! inflates to 256 MiB is stored without inflating it (peak RSS measured in a child process), and an operator can forget a
//! worker's identity.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::Cursor;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, Queue as _, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, router};
use kiln_test_support::child::{peak_rss_kib, reported, run_test};
use kiln_test_support::png::{chunk, zlib_zeros};
use serde_json::Value;
use tower_service::Service as _;

struct Gw {
    _dir: tempfile::TempDir,
    app: axum::Router,
    queue: std::sync::Arc<SqliteQueue>,
}

async fn gateway() -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue.clone(), BrokerConfig::default());
    let config = GatewayConfig {
        files_dir: dir.path().join("files"),
        ..GatewayConfig::default()
    };
    let state = AppState::new(config, broker).await.unwrap();
    Gw {
        _dir: dir,
        app: router(state),
        queue,
    }
}

impl Gw {
    async fn call(&self, method: &str, uri: &str, ct: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:8080");
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        let resp = self
            .app
            .clone()
            .call(b.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }

    async fn upload(&self, ct: &str, body: Vec<u8>) -> (u16, Value) {
        self.call("POST", "/v1/files", Some(ct), body).await
    }
}

fn encoded(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 13) as u8, ((x * y) % 253) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn assert_refused(r: &(u16, Value), what: &str) {
    assert_eq!(r.0, 422, "{what}: {}", r.1);
    let msg = r.1["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.starts_with("not a valid image/"), "{what}: {msg}");
}

#[tokio::test]
async fn truncated_and_broken_images_are_not_stored() {
    let gw = gateway().await;
    let png = encoded(300, 200, image::ImageFormat::Png);
    let (status, body) = gw.upload("image/png", png.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(300), Some(200))
    );
    for cut in [png.len() / 2, png.len() - 12] {
        let r = gw.upload("image/png", png[..cut].to_vec()).await;
        assert_refused(&r, &format!("PNG cut at {cut}"));
    }
    let webp = encoded(300, 200, image::ImageFormat::WebP);
    assert_eq!(gw.upload("image/webp", webp.clone()).await.0, 201);
    let r = gw
        .upload("image/webp", webp[..webp.len() / 2].to_vec())
        .await;
    assert_refused(&r, "truncated WebP");
    let mut broken = webp.clone();
    for b in broken[40..].iter_mut() {
        *b = 0xFF;
    }
    assert_refused(&gw.upload("image/webp", broken).await, "broken VP8L");
    // The recorded type is what the bytes are (docs/PROTOCOL.md, section 7): a PNG called
    // WebP is checked and stored as the PNG it is; bytes that are no image are refused.
    let (status, body) = gw.upload("image/webp", png).await;
    assert_eq!(status, 201, "a PNG called WebP: {body}");
    assert_eq!(body["content_type"], "image/png", "{body}");
    let r = gw
        .upload("image/webp", b"plain text, not an image at all".to_vec())
        .await;
    assert_eq!(r.0, 422, "text called WebP: {}", r.1);
}

const CHILD: &str = "KILN_UPLOAD_BOMB_CHILD";

/// Run in a child process by `an_iccp_bomb_upload_costs_little_memory`: one upload of a
/// 1.7 MB PNG whose `iCCP` inflates to 256 MiB, then the process's peak RSS.
#[tokio::test]
async fn iccp_bomb_upload_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let gw = gateway().await;
    let png = encoded(64, 48, image::ImageFormat::Png);
    let mut payload = b"bomb\0\0".to_vec();
    payload.extend_from_slice(&zlib_zeros(1 + 258 * 1_040_000));
    let mut bomb = png[..33].to_vec();
    bomb.extend_from_slice(&chunk(b"iCCP", &payload));
    bomb.extend_from_slice(&png[33..]);
    let before = peak_rss_kib();
    let (status, body) = gw.upload("image/png", bomb.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["bytes"].as_u64(), Some(bomb.len() as u64), "{body}");
    println!(
        "VmHWM_KIB {} before_kib {before} upload_bytes {}",
        peak_rss_kib(),
        bomb.len()
    );
}

#[test]
fn an_iccp_bomb_upload_costs_little_memory() {
    let text = run_test("iccp_bomb_upload_child", &[(CHILD, "1")]);
    let kib = reported(&text, "VmHWM_KIB");
    assert!(kib < 96 * 1024, "peak RSS {kib} KiB for one upload");
}

#[tokio::test]
async fn an_operator_forgets_a_worker_identity() {
    let gw = gateway().await;
    assert!(gw.queue.set_identity("gpu-01", "ab", 1).await.unwrap());
    let (status, body) = gw
        .call("DELETE", "/v1/workers/gpu-01/identity", None, vec![])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.queue.identity("gpu-01").await.unwrap(), None);
    let (status, body) = gw
        .call("DELETE", "/v1/workers/gpu-01/identity", None, vec![])
        .await;
    assert_eq!(status, 404, "{body}");
}
