//! The files API with any content type: uploads streamed to the local store, the type read
//! from the content, the allow-list, size limits, single byte ranges, the image path as
//! before; plus the task-type check with no worker connected and the worker subprotocol.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, FilesConfig, GatewayConfig, router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::noise_png;
use tower_service::Service as _;

struct Gw {
    _dir: tempfile::TempDir,
    spool: std::path::PathBuf,
    app: axum::Router,
}

async fn gateway(files: FilesConfig, tweak: impl FnOnce(&mut GatewayConfig)) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let mut config = GatewayConfig {
        files_dir: dir.path().join("files"),
        files,
        ..GatewayConfig::default()
    };
    tweak(&mut config);
    let spool = config.files_dir.join(".incoming");
    let state = AppState::new(config, broker).await.unwrap();
    Gw {
        _dir: dir,
        spool,
        app: router(state),
    }
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn call(app: &mut axum::Router, req: Request<Body>) -> Resp {
    let resp = app.call(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn upload(app: &mut axum::Router, query: &str, ct: Option<&str>, body: Vec<u8>) -> Resp {
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("/v1/files{query}"));
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    call(app, req.body(Body::from(body)).unwrap()).await
}

async fn get(app: &mut axum::Router, id: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = Request::builder().uri(format!("/v1/files/{id}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    call(app, req.body(Body::empty()).unwrap()).await
}

/// `n` pseudo-random bytes after `head` (incompressible, reproducible).
fn body_after(head: &[u8], n: usize, seed: u64) -> Vec<u8> {
    let mut out = head.to_vec();
    let mut x = seed.max(1);
    while out.len() < head.len() + n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(head.len() + n);
    out
}

const MP4: &[u8] = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41";

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn spool_is_empty(gw: &Gw) -> bool {
    std::fs::read_dir(&gw.spool).unwrap().next().is_none()
}

#[tokio::test]
async fn a_video_round_trips_with_its_sniffed_type() {
    let mut gw = gateway(FilesConfig::default(), |_| {}).await;
    // 3 MB: far more than one chunk, and more than the old 32 MiB image path would matter.
    let mp4 = body_after(MP4, 3 << 20, 7);
    let r = upload(
        &mut gw.app,
        "",
        Some("application/octet-stream"),
        mp4.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let f = r.json();
    assert_eq!(f["content_type"], "video/mp4");
    assert_eq!(f["bytes"], mp4.len() as u64);
    assert_eq!(f["sha256"], hex::encode(Sha256::digest(&mp4)));
    assert_eq!(f["width"], Value::Null);
    let id = f["id"].as_str().unwrap();
    assert_eq!(r.header("location"), format!("/v1/files/{id}"));
    let g = get(&mut gw.app, id, &[]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.header("content-type"), "video/mp4");
    assert_eq!(g.header("accept-ranges"), "bytes");
    assert_eq!(g.header("content-length"), mp4.len().to_string());
    assert_eq!(g.header("x-content-type-options"), "nosniff");
    assert!(g.body.as_ref() == mp4.as_slice(), "downloaded bytes differ");
    assert!(
        spool_is_empty(&gw),
        "the spool keeps nothing after a stored upload"
    );
}

#[tokio::test]
async fn the_recorded_type_comes_from_the_content() {
    let mut gw = gateway(FilesConfig::default(), |_| {}).await;
    let webm = b"\x1A\x45\xDF\xA3\x9F\x42\x86\x81\x01\x42\x82\x84webm\x42\x87\x81\x04".to_vec();
    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        // The content wins over a wrong or missing declaration.
        (
            Some("text/plain"),
            body_after(b"%PDF-1.7\n", 5000, 1),
            "application/pdf",
        ),
        (
            None,
            body_after(b"PK\x03\x04\x14\0\0\0", 5000, 2),
            "application/zip",
        ),
        (
            Some("video/mp4"),
            body_after(&webm, 20_000, 3),
            "video/webm",
        ),
        (
            None,
            body_after(b"RIFF\x24\0\0\0WAVEfmt ", 9000, 4),
            "audio/wav",
        ),
        (
            None,
            body_after(b"ID3\x04\0\0\0\0\0\0", 9000, 5),
            "audio/mpeg",
        ),
        (None, body_after(b"OggS\0\x02\0\0", 9000, 6), "audio/ogg"),
        (None, body_after(b"fLaC\0\0\0\x22", 9000, 7), "audio/flac"),
        (
            None,
            body_after(b"\x1A\x45\xDF\xA3\x9F\x42\x82\x88matroska", 9000, 8),
            "video/x-matroska",
        ),
        // Text: JSON or plain when nothing more specific is declared.
        (
            None,
            br#"{"frames": 120, "fps": 24}"#.to_vec(),
            "application/json",
        ),
        (
            Some("application/octet-stream"),
            b"[1, 2, 3]".to_vec(),
            "application/json",
        ),
        (
            Some("text/plain; charset=utf-8"),
            b"hello\n".to_vec(),
            "text/plain",
        ),
        // A declared text type the sniffer cannot tell apart is kept.
        (Some("text/csv"), b"a,b\n1,2\n".to_vec(), "text/csv"),
        // A declared text type on binary content is not believed.
        (
            Some("application/json"),
            vec![0, 1, 2, 3, 0xFE],
            "application/octet-stream",
        ),
        // Unknown binary keeps a specific declared type, else octet-stream.
        (
            Some("model/gltf-binary"),
            vec![0x67, 0x6C, 0x54, 0x46, 2, 0, 0, 0, 0],
            "model/gltf-binary",
        ),
        (None, vec![0, 1, 2, 3, 0xFE], "application/octet-stream"),
    ];
    for (declared, body, want) in cases {
        let r = upload(&mut gw.app, "", declared, body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{want}: {:?}", r.body);
        assert_eq!(r.json()["content_type"], want, "declared {declared:?}");
        let g = get(&mut gw.app, r.json()["id"].as_str().unwrap(), &[]).await;
        assert_eq!(g.header("content-type"), want);
        assert!(g.body.as_ref() == body.as_slice(), "{want}: bytes differ");
    }
    // Uploaded HTML is served sandboxed, so it runs no script with the API's origin.
    let r = upload(
        &mut gw.app,
        "",
        Some("text/html"),
        b"<script>1</script>".to_vec(),
    )
    .await;
    let g = get(&mut gw.app, r.json()["id"].as_str().unwrap(), &[]).await;
    assert_eq!(g.header("content-type"), "text/html");
    assert_eq!(g.header("content-security-policy"), "sandbox");
}

#[tokio::test]
async fn multipart_uploads_stream_too() {
    let mut gw = gateway(FilesConfig::default(), |_| {}).await;
    let mp4 = body_after(MP4, 1 << 20, 9);
    // (An unknown field beside the file is refused: `tests/params.rs`.)
    let mut body = b"--XyZ\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\nContent-Type: video/mp4\r\n\r\n"
        .to_vec();
    body.extend_from_slice(&mp4);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let r = upload(
        &mut gw.app,
        "",
        Some("multipart/form-data; boundary=XyZ"),
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.json()["content_type"], "video/mp4");
    assert_eq!(r.json()["bytes"], mp4.len() as u64);
    let g = get(&mut gw.app, r.json()["id"].as_str().unwrap(), &[]).await;
    assert!(g.body.as_ref() == mp4.as_slice());
}

#[tokio::test]
async fn single_byte_ranges() {
    let mut gw = gateway(FilesConfig::default(), |_| {}).await;
    let mp4 = body_after(MP4, 100_000, 11);
    let n = mp4.len();
    let r = upload(&mut gw.app, "", Some("video/mp4"), mp4.clone()).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let etag = get(&mut gw.app, &id, &[]).await.header("etag").to_owned();
    let cases: &[(&str, usize, usize)] = &[
        ("bytes=0-9", 0, 9),
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=99990-", 99_990, n - 1),
        ("bytes=-500", n - 500, n - 1),
        ("bytes=100-999999999", 100, n - 1),
    ];
    for &(range, start, end) in cases {
        let g = get(&mut gw.app, &id, &[("range", range)]).await;
        assert_eq!(g.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            g.header("content-range"),
            format!("bytes {start}-{end}/{n}"),
            "{range}"
        );
        assert_eq!(
            g.header("content-length"),
            (end - start + 1).to_string(),
            "{range}"
        );
        assert!(g.body.as_ref() == &mp4[start..=end], "{range}: wrong bytes");
    }
    // Outside the file: 416 with the size, as JSON.
    for range in [format!("bytes={n}-"), "bytes=-0".to_owned()] {
        let g = get(&mut gw.app, &id, &[("range", &range)]).await;
        assert_eq!(g.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(g.header("content-range"), format!("bytes */{n}"));
        assert_eq!(g.json()["error"]["code"], "range_not_satisfiable");
    }
    // Several ranges, another unit, a stale If-Range: the whole file.
    for h in [
        vec![("range", "bytes=0-1,5-6")],
        vec![("range", "items=0-1")],
        vec![("range", "bytes=0-9"), ("if-range", "\"stale\"")],
    ] {
        let g = get(&mut gw.app, &id, &h).await;
        assert_eq!(g.status, StatusCode::OK, "{h:?}");
        assert_eq!(g.body.len(), n);
    }
    let g = get(
        &mut gw.app,
        &id,
        &[("range", "bytes=0-9"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(g.status, StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn the_allow_list_and_the_size_limits() {
    let files = FilesConfig {
        allowed_types: vec!["image/*".into(), "video/mp4".into()],
        max_bytes: 200_000,
        max_image_bytes: 50_000,
        ..FilesConfig::default()
    };
    let mut gw = gateway(files, |_| {}).await;
    // A ZIP declared as an MP4 is still a ZIP: refused with a JSON 415 naming the type.
    let zip = body_after(b"PK\x03\x04\x14\0\0\0", 1000, 1);
    let r = upload(&mut gw.app, "", Some("video/mp4"), zip).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "unsupported_media_type");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("application/zip") && msg.contains("image/*, video/mp4"),
        "{msg}"
    );
    assert_eq!(
        upload(&mut gw.app, "", Some("text/plain"), b"hi".to_vec())
            .await
            .status,
        415
    );
    // Allowed types pass.
    let r = upload(&mut gw.app, "", None, body_after(MP4, 1000, 2)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = upload(&mut gw.app, "", Some("image/png"), png(20, 20)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // Over files.max_bytes: 413 whether announced by Content-Length or found while streaming.
    let big = body_after(MP4, 250_000, 3);
    let r = upload(&mut gw.app, "", None, big.clone()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let chunks = big
        .chunks(10_000)
        .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
        .collect::<Vec<_>>();
    let streamed = Body::from_stream(futures_util::stream::iter(chunks));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/files")
        .body(streamed)
        .unwrap();
    let r = call(&mut gw.app, req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.body);
    assert!(
        spool_is_empty(&gw),
        "a refused upload leaves nothing behind"
    );
    // Images are held in memory: their own, smaller limit.
    let big_png = noise_png(150, 150, 1);
    assert!(big_png.len() > 50_000 && big_png.len() < 200_000);
    let r = upload(&mut gw.app, "", Some("image/png"), big_png).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.body);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("50000")
    );
    // Empty: 422.
    assert_eq!(
        upload(&mut gw.app, "", Some("video/mp4"), vec![])
            .await
            .status,
        422
    );
}

#[tokio::test]
async fn images_are_checked_and_compressed_as_before() {
    let mut gw = gateway(FilesConfig::default(), |_| {}).await;
    let p = png(64, 48);
    let r = upload(&mut gw.app, "", Some("image/png"), p.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let f = r.json();
    assert_eq!(
        (
            f["content_type"].as_str(),
            f["width"].as_u64(),
            f["height"].as_u64()
        ),
        (Some("image/png"), Some(64), Some(48))
    );
    // Compression on request: JPEG out, within the limits.
    let r = upload(&mut gw.app, "?max_dim=32", Some("image/png"), p.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.json()["content_type"], "image/jpeg");
    assert_eq!(r.json()["width"], 32);
    // A declared image that is not one: 422 as before.
    let r = upload(&mut gw.app, "", Some("image/png"), b"not a png".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json()["error"]["code"], "invalid_field");
    // A broken PNG (right magic, bad header): 422 from the image check.
    let mut broken = p[..40].to_vec();
    broken[16] = 0xFF;
    let r = upload(&mut gw.app, "", Some("image/png"), broken).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
    // Compression parameters apply to images only.
    let r = upload(
        &mut gw.app,
        "?max_bytes=1000",
        Some("video/mp4"),
        body_after(MP4, 100, 1),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("video/mp4")
    );
}

async fn create_task(app: &mut axum::Router, task_type: &str) -> Resp {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/tasks")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"task_type": task_type, "input": {}}).to_string(),
        ))
        .unwrap();
    call(app, req).await
}

#[tokio::test]
async fn task_types_with_no_worker_connected() {
    let mut gw = gateway(FilesConfig::default(), |c| {
        c.known_task_types = vec!["talking_head".into()];
    })
    .await;
    // Declared: queued although no worker is connected.
    let r = create_task(&mut gw.app, "talking_head").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(r.json()["status"], "queued");
    // Unknown: 422 that says exactly how to declare it, and does not pretend workers serve
    // something.
    let r = create_task(&mut gw.app, "lip_sync").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    for part in [
        "\"lip_sync\"",
        "no worker is connected",
        "gateway.known_task_types = [\"lip_sync\"]",
        "KILN_GATEWAY__KNOWN_TASK_TYPES=lip_sync",
        "7days",
    ] {
        assert!(msg.contains(part), "{part:?} missing from {msg:?}");
    }
    assert!(!msg.contains("connected workers serve"), "{msg}");
}

#[tokio::test]
async fn remembered_task_types_are_queued_and_the_window_can_be_off() {
    // A worker of another instance (or before a restart) said hello with `upscale`.
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    kiln_broker::Queue::note_task_types(
        queue.as_ref(),
        &["upscale".to_owned()],
        kiln_broker::now_ms(),
    )
    .await
    .unwrap();
    for (window, want) in [(Duration::from_secs(3600), 202), (Duration::ZERO, 422)] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::with_queue(queue.clone(), BrokerConfig::default());
        let config = GatewayConfig {
            files_dir: dir.path().join("files"),
            remember_task_types: window,
            ..GatewayConfig::default()
        };
        let mut app = router(AppState::new(config, broker).await.unwrap());
        let r = create_task(&mut app, "upscale").await;
        assert_eq!(r.status.as_u16(), want, "window {window:?}: {:?}", r.body);
    }
}

/// A raw WebSocket upgrade request to a real listener; returns the response head.
async fn upgrade(addr: std::net::SocketAddr, protocol: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let proto = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /v1/workers/connect HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{proto}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout_at(until, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    // The body of an error answer follows the head; read what is there.
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_socket_requires_the_kiln_v1_subprotocol() {
    let gw = gateway(FilesConfig::default(), |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, gw.app).await });
    let refused = upgrade(addr, None).await;
    assert!(refused.starts_with("http/1.1 400"), "{refused}");
    assert!(
        refused.contains("subprotocol_required") && refused.contains("kiln.v1"),
        "{refused}"
    );
    let other = upgrade(addr, Some("chat, superchat")).await;
    assert!(other.starts_with("http/1.1 400"), "{other}");
    let ok = upgrade(addr, Some("chat, kiln.v1")).await;
    assert!(ok.starts_with("http/1.1 101"), "{ok}");
    assert!(ok.contains("sec-websocket-protocol: kiln.v1"), "{ok}");
    server.abort();
}
