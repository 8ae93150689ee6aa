//! The files API and task-type acceptance against the real `kiln serve` (demo worker off):
//!
//! 1. `a_200_mb_video_round_trips_with_bounded_server_memory`: a 200 MB MP4-like body is
//!    streamed up (64 KiB chunks, generated on the fly) and down again, compared byte for
//!    byte with the regenerated stream, while the server's peak RSS (`VmHWM` in
//!    `/proc/<pid>/status`) grows by less than 64 MiB; then a ranged GET near the end.
//! 2. `a_worker_that_went_offline_still_gets_its_backlog`: a real worker (kiln-worker, over
//!    the socket) serving `upscale` says hello and leaves; tasks of `upscale` are then
//!    queued with no worker connected, also after kill -9 of the server and a restart;
//!    unknown types get 422 saying how to declare them; the worker comes back and the
//!    backlog runs.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_test_support::child::proc_status_kib;
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};
use support::{call, post_json, start, wait_status};

const CHUNK: usize = 64 << 10;
const TOTAL: u64 = 200 << 20;
const MP4: &[u8] = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41";

/// Chunk `i` of the generated video: pseudo-random bytes, an MP4 `ftyp` box first.
fn chunk(i: u64) -> Bytes {
    let mut out = Vec::with_capacity(CHUNK);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    if i == 0 {
        out[..MP4.len()].copy_from_slice(MP4);
    }
    Bytes::from(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_video_round_trips_with_bounded_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[("KILN_DEMO_WORKER__ENABLED", "false")]);
    let pid = s.child.id();
    let before = proc_status_kib(pid, "VmRSS");

    let n = TOTAL / CHUNK as u64;
    let frames = futures_util::stream::iter(
        (0..n).map(|i| Ok::<_, std::convert::Infallible>(Frame::data(chunk(i)))),
    );
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(format!("{}/v1/files", s.base))
        .header("content-type", "video/mp4")
        .header("content-length", TOTAL.to_string())
        .body(StreamBody::new(frames))
        .unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(300), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let upload_s = started.elapsed().as_secs_f64();
    let f: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(f["content_type"], "video/mp4");
    assert_eq!(f["bytes"], TOTAL);
    let id = f["id"].as_str().unwrap().to_owned();
    let after_upload = proc_status_kib(pid, "VmHWM");

    // Down again, compared with the regenerated stream as it arrives.
    let client: Client<_, http_body_util::Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let resp = client
        .get(format!("{}/v1/files/{id}", s.base).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], TOTAL.to_string().as_str());
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    let mut body = resp.into_body();
    let (mut pos, mut expect, mut expect_at) = (0u64, chunk(0), 0u64);
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(frame) = body.frame().await {
        assert!(Instant::now() < deadline, "download took too long");
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            let i = pos / CHUNK as u64;
            if i != expect_at {
                (expect, expect_at) = (chunk(i), i);
            }
            let off = (pos % CHUNK as u64) as usize;
            let take = rest.len().min(CHUNK - off);
            assert!(
                rest[..take] == expect[off..off + take],
                "bytes differ in chunk {i} at offset {off}"
            );
            pos += take as u64;
            rest = &rest[take..];
        }
    }
    assert_eq!(pos, TOTAL, "download length");
    let download_s = started.elapsed().as_secs_f64();
    let peak = proc_status_kib(pid, "VmHWM");
    eprintln!(
        "200 MiB upload {upload_s:.1} s, download {download_s:.1} s; server RSS before {} MiB, \
         peak after upload {} MiB, peak after download {} MiB",
        before / 1024,
        after_upload / 1024,
        peak / 1024
    );
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "server memory grew by {} MiB for a 200 MiB file",
        peak.saturating_sub(before) / 1024
    );
    // The stored file is the whole upload.
    let on_disk = dir.path().join("files").join(&id);
    assert_eq!(std::fs::metadata(on_disk).unwrap().len(), TOTAL);

    // A seek near the end: 206 with the right bytes.
    let last = TOTAL - 1;
    let r = call(
        &s.base,
        "GET",
        &format!("/v1/files/{id}"),
        "",
        &[("range", &format!("bytes={}-", TOTAL - 100))],
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.headers["content-range"],
        format!("bytes {}-{last}/{TOTAL}", TOTAL - 100).as_str()
    );
    assert!(r.body[..] == chunk(n - 1)[CHUNK - 100..]);
}

/// A real worker serving `upscale`, connected until the returned handle shuts it down.
fn worker(
    base: &str,
    state: &std::path::Path,
) -> (kiln_worker::WorkerHandle, tokio::task::JoinHandle<()>) {
    let cfg = WorkerConfig {
        url: format!(
            "{}/v1/workers/connect",
            base.replacen("http://", "ws://", 1)
        ),
        state_dir: state.to_owned(),
        slots: 2,
        ..WorkerConfig::default()
    };
    let w = Worker::new(cfg).handler("upscale", |ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"scaled": ctx.input["n"]}))
    });
    let handle = w.handle();
    let run = tokio::spawn(async move {
        let _ = w.run().await;
    });
    (handle, run)
}

async fn connected(base: &str) -> usize {
    call(base, "GET", "/v1/workers", "", &[]).await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["connected"] == true)
        .count()
}

async fn wait_connected(base: &str, want: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while connected(base).await != want {
        assert!(Instant::now() < until, "expected {want} connected workers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_went_offline_still_gets_its_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [("KILN_DEMO_WORKER__ENABLED", "false")];
    let mut s = start(&data, &env);
    // Never seen and not declared: 422 with the way to declare it, no "connected workers
    // serve" when none is connected.
    let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "upscale"}), &[]).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("no worker is connected"), "{msg}");
    assert!(
        msg.contains("KILN_GATEWAY__KNOWN_TASK_TYPES=upscale"),
        "{msg}"
    );

    // The GPU box connects once, then goes offline.
    let (h, run) = worker(&s.base, &dir.path().join("worker"));
    wait_connected(&s.base, 1).await;
    h.shutdown();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap()
        .unwrap();
    wait_connected(&s.base, 0).await;

    // Its type is still accepted: the tasks wait.
    let mut ids = Vec::new();
    for n in 0..2 {
        let r = post_json(
            &s.base,
            "/v1/tasks",
            json!({"task_type": "upscale", "input": {"n": n}}),
            &[],
        )
        .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert_eq!(r.json()["status"], "queued");
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "lip_sync"}), &[]).await;
    assert_eq!(r.status, 422);

    // After kill -9 and a restart the type is still remembered (it is in the queue store).
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);
    let s = start(&data, &env);
    let r = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "upscale", "input": {"n": 2}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    ids.push(r.json()["id"].as_str().unwrap().to_owned());

    // The GPU boots again: the backlog runs.
    let (h, run) = worker(&s.base, &dir.path().join("worker"));
    for (n, id) in ids.iter().enumerate() {
        let t = wait_status(&s.base, id, "succeeded", 30).await;
        assert_eq!(t["output"]["scaled"], n);
    }
    h.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(20), run).await;
}
