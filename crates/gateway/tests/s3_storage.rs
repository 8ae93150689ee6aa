//! File storage in a real S3-protocol server (moto on 127.0.0.1): `POST /v1/files` into the
//! bucket, `GET /v1/files/{id}` streamed back in ranged GETs, metadata that survives a new
//! store instance, delete, readiness, and damaged objects detected on download.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, StorageBackend, StorageConfig, router};
use kiln_test_support::Moto;
use kiln_upload::{S3, S3Config, UploadClient, UploadConfig, UploadFile};
use serde_json::Value;
use support::noise_png;
use tower_service::Service as _;

fn s3_config(moto: &Moto, bucket: &str) -> S3Config {
    S3Config {
        endpoint: moto.endpoint(),
        bucket: bucket.into(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        session_token: None,
        path_style: true,
        key_prefix: "kiln/files/".into(),
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        public_base_url: None,
    }
}

fn storage(moto: &Moto, bucket: &str, create: bool) -> StorageConfig {
    let mut client = UploadConfig::default();
    client.retry.max_retries = 2;
    client.retry.initial_backoff = Duration::from_millis(20);
    StorageConfig {
        backend: StorageBackend::S3,
        s3: Some(s3_config(moto, bucket)),
        create_bucket: create,
        download_chunk_bytes: 64 << 10,
        client,
        ..StorageConfig::default()
    }
}

async fn gateway(storage: StorageConfig) -> (AppState, axum::Router) {
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    // Uploads other than images wait in a spool directory of their own while they stream.
    let files_dir = tempfile::tempdir().unwrap().keep();
    let config = GatewayConfig {
        storage,
        files_dir,
        max_body_bytes: 16 << 20,
        ..GatewayConfig::default()
    };
    let state = AppState::new(config, broker).await.unwrap();
    let router = router(state.clone());
    (state, router)
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Result<bytes::Bytes, String>,
}

impl Resp {
    fn bytes(&self) -> &[u8] {
        self.body.as_ref().unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(self.bytes()).unwrap()
    }
}

async fn call(
    app: &mut axum::Router,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    call_with(app, method, uri, ct, body, &[]).await
}

async fn call_with(
    app: &mut axum::Router,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app.call(req.body(Body::from(body)).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string()),
    }
}

fn direct(moto: &Moto, bucket: &str) -> (S3, UploadClient) {
    (
        S3::new(s3_config(moto, bucket)).unwrap(),
        UploadClient::new(UploadConfig::default()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_stream_restart_delete_ready() {
    let Some(moto) = Moto::start() else { return };
    let (state, mut app) = gateway(storage(&moto, "kiln-files", true)).await;

    // 300x300 noise: ~270 KB, five ranged GETs of 64 KiB.
    let png = noise_png(300, 300, 1);
    let r = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("image/png"),
        png.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let f = r.json();
    let id = f["id"].as_str().unwrap().to_owned();
    assert_eq!(f["bytes"], png.len() as u64);
    assert_eq!(
        (f["width"].as_u64(), f["height"].as_u64()),
        (Some(300), Some(300))
    );

    // The objects are in the bucket under the prefix: content and JSON metadata.
    let (s3, client) = direct(&moto, "kiln-files");
    let stored = s3
        .get_object(&client, &format!("kiln/files/{id}"))
        .await
        .unwrap();
    assert!(stored.as_ref() == png.as_slice(), "bucket object differs");
    let sidecar: Value = serde_json::from_slice(
        &s3.get_object(&client, &format!("kiln/files/{id}.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["sha256"], f["sha256"]);
    assert!(sidecar["store_ms"].as_u64().is_some());

    // Streamed back byte for byte with the right headers.
    let g = call(&mut app, "GET", &format!("/v1/files/{id}"), None, vec![]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.headers["content-type"], "image/png");
    assert_eq!(g.headers["content-length"], png.len().to_string().as_str());
    assert!(g.bytes() == png.as_slice(), "downloaded bytes differ");

    // A new store instance (a restarted server) serves the file from its stored metadata.
    drop(app);
    drop(state);
    let (state, mut app) = gateway(storage(&moto, "kiln-files", false)).await;
    let meta = state.files().meta(&id).await.unwrap().unwrap();
    assert_eq!(meta.bytes, png.len() as u64);
    let g = call(&mut app, "GET", &format!("/v1/files/{id}"), None, vec![]).await;
    assert!(g.bytes() == png.as_slice(), "bytes differ after restart");

    // Compressed upload: the compression time is kept in the metadata.
    let c = call(
        &mut app,
        "POST",
        "/v1/files?max_bytes=60000&max_dim=200",
        Some("image/png"),
        png.clone(),
    )
    .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    let cid = c.json()["id"].as_str().unwrap().to_owned();
    assert!(c.json()["bytes"].as_u64().unwrap() <= 60_000);
    let cmeta = state.files().meta(&cid).await.unwrap().unwrap();
    assert!(cmeta.compress_ms.is_some(), "{cmeta:?}");
    assert!(meta.compress_ms.is_none());

    // Ready: the probe writes into the bucket.
    let ready = call(&mut app, "GET", "/readyz", None, vec![]).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.json());
    assert_eq!(ready.json()["storage"]["backend"], "s3");
    assert_eq!(ready.json()["storage"]["writable"], true);

    // Delete: both objects go; a second delete and a download are 404.
    let d = call(&mut app, "DELETE", &format!("/v1/files/{id}"), None, vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    let gone = s3
        .get_object(&client, &format!("kiln/files/{id}"))
        .await
        .unwrap_err();
    assert_eq!(gone.status(), Some(404));
    for (m, want) in [
        ("GET", StatusCode::NOT_FOUND),
        ("DELETE", StatusCode::NOT_FOUND),
    ] {
        let r = call(&mut app, m, &format!("/v1/files/{id}"), None, vec![]).await;
        assert_eq!(r.status, want, "{m}");
        assert_eq!(r.json()["error"]["code"], "not_found");
    }
    let metrics = call(&mut app, "GET", "/metrics", None, vec![]).await;
    let text = String::from_utf8_lossy(metrics.bytes()).into_owned();
    // This instance accepted only the compressed upload.
    let uploaded = cmeta.bytes;
    assert!(
        text.contains(&format!("kiln_bytes_uploaded_total {uploaded}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_put_and_damaged_objects() {
    let Some(moto) = Moto::start() else { return };
    let (_state, mut app) = gateway(storage(&moto, "kiln-big", true)).await;
    // Above the 5 MiB multipart threshold: CreateMultipartUpload + 2 parts + complete.
    let big = noise_png(1400, 1400, 2);
    assert!(big.len() > 5 << 20);
    let r = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("image/png"),
        big.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let g = call(&mut app, "GET", &format!("/v1/files/{id}"), None, vec![]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(g.bytes() == big.as_slice(), "multipart object differs");

    // Overwrite the content behind the gateway's back: same length, other bytes. The
    // download starts (headers are sent) and then breaks off at the SHA-256 check.
    let small = noise_png(200, 200, 3);
    let s = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("image/png"),
        small.clone(),
    )
    .await;
    let sid = s.json()["id"].as_str().unwrap().to_owned();
    let (s3, client) = direct(&moto, "kiln-big");
    let mut tampered = small.clone();
    tampered[small.len() / 2] ^= 0xff;
    client
        .upload(&s3, &UploadFile::new(tampered, sid.clone(), "image/png"))
        .await
        .unwrap();
    let g = call(&mut app, "GET", &format!("/v1/files/{sid}"), None, vec![]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        g.body.is_err(),
        "a damaged object must not download cleanly"
    );

    // Shorter than the metadata says: also a broken download, never silently short.
    client
        .upload(
            &s3,
            &UploadFile::new(small[..1000].to_vec(), sid.clone(), "image/png"),
        )
        .await
        .unwrap();
    let g = call(&mut app, "GET", &format!("/v1/files/{sid}"), None, vec![]).await;
    assert!(g.status != StatusCode::OK || g.body.is_err());

    // Content removed but metadata left: 404, not a broken response.
    s3.delete_object(&client, &format!("kiln/files/{sid}"))
        .await
        .unwrap();
    let g = call(&mut app, "GET", &format!("/v1/files/{sid}"), None, vec![]).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_streams_into_the_bucket_from_a_file_and_back_in_ranges() {
    let Some(moto) = Moto::start() else { return };
    let (state, mut app) = gateway(storage(&moto, "kiln-video", true)).await;
    // 12 MB of MP4-like bytes: above the 5 MiB multipart threshold, parts read from the
    // spooled file.
    let mut video = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41".to_vec();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while video.len() < 12 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        video.extend_from_slice(&x.to_le_bytes());
    }
    let n = video.len();
    let r = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("application/octet-stream"),
        video.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.json()["content_type"], "video/mp4");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // The object's last bytes, read from the bucket directly.
    let (s3, client) = direct(&moto, "kiln-video");
    let tail = s3
        .get_object_range(&client, &format!("kiln/files/{id}"), n as u64 - 4096, 4096)
        .await
        .unwrap();
    assert!(tail.as_ref() == &video[n - 4096..], "bucket object differs");
    let spool = state.config().files_dir.join(".incoming");
    assert!(
        std::fs::read_dir(spool).unwrap().next().is_none(),
        "spooled file left behind"
    );

    let g = call(&mut app, "GET", &format!("/v1/files/{id}"), None, vec![]).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.headers["accept-ranges"], "bytes");
    assert!(g.bytes() == video.as_slice(), "download differs");
    // Ranges that cross the 64 KiB chunks of the ranged GETs, and the tail.
    for (range, start, end) in [
        ("bytes=100000-300000", 100_000, 300_000),
        ("bytes=-10", n - 10, n - 1),
        (&*format!("bytes={}-", n - 70_000), n - 70_000, n - 1),
    ] {
        let g = call_with(
            &mut app,
            "GET",
            &format!("/v1/files/{id}"),
            None,
            vec![],
            &[("range", range)],
        )
        .await;
        assert_eq!(g.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            g.headers["content-range"],
            format!("bytes {start}-{end}/{n}").as_str()
        );
        assert!(g.bytes() == &video[start..=end], "{range}: wrong bytes");
    }
    let g = call_with(
        &mut app,
        "GET",
        &format!("/v1/files/{id}"),
        None,
        vec![],
        &[("range", &format!("bytes={n}-"))],
    )
    .await;
    assert_eq!(g.status, StatusCode::RANGE_NOT_SATISFIABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_not_ready() {
    let Some(moto) = Moto::start() else { return };
    let (_state, mut app) = gateway(storage(&moto, "never-created", false)).await;
    let ready = call(&mut app, "GET", "/readyz", None, vec![]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.json();
    assert_eq!(body["checks"]["file_store"], false);
    let err = body["storage"]["error"].as_str().unwrap();
    assert!(err.contains("NoSuchBucket"), "{err}");
    // An upload into it fails with a JSON error, not a hang or a panic.
    let r = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("image/png"),
        noise_png(8, 8, 4),
    )
    .await;
    assert!(r.status.is_server_error(), "{:?}", r.status);
    assert!(r.json()["error"]["code"].is_string());

    // Nothing listens at the endpoint: connects fail (never sent), are retried and counted,
    // readiness says why, and an upload is a retryable 503.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cfg = storage(&moto, "kiln-files", false);
    if let Some(s3) = cfg.s3.as_mut() {
        s3.endpoint = format!("http://127.0.0.1:{port}");
    }
    let (_state, mut app) = gateway(cfg).await;
    let ready = call(&mut app, "GET", "/readyz", None, vec![]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json()["storage"]["error"].is_string());
    let r = call(
        &mut app,
        "POST",
        "/v1/files",
        Some("image/png"),
        noise_png(8, 8, 4),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.json());
    assert_eq!(r.json()["error"]["retryable"], true);
    let metrics = call(&mut app, "GET", "/metrics", None, vec![]).await;
    let text = String::from_utf8_lossy(metrics.bytes()).into_owned();
    // Two retries for the probe's PUT, two for the upload's.
    assert!(
        text.contains("kiln_retries_total{class=\"not_sent\"} 4"),
        "{text}"
    );
}
