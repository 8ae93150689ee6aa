//! The real `kiln serve` over real TCP: slow and idle connections are closed after the
//! configured timeouts while `/healthz` keeps answering, hyper's own error answers carry
//! the JSON error body, and `kiln config hash-key --scope` makes a key with that scope.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{call, post_json, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (EOF or reset), at most `limit`; the time
/// it took, or `None` if the connection was still open.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One raw request; the status and the body of the answer (read until the server closes).
async fn raw(base: &str, request: &[u8]) -> (u16, Vec<u8>) {
    let mut conn = TcpStream::connect(addr(base)).await.unwrap();
    // The server may answer and close before the whole request is written.
    let _ = conn.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_connections_are_closed_and_healthz_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        dir.path(),
        &[
            ("KILN_SERVER__HEADER_READ_TIMEOUT", "1500ms"),
            ("KILN_SERVER__IDLE_TIMEOUT", "3s"),
            ("KILN_GATEWAY__SSE_HEARTBEAT", "1s"),
            ("KILN_DEMO_WORKER__ENABLED", "false"),
        ],
    );
    let opened = Instant::now();
    let mut slow = Vec::new();
    for i in 0..120 {
        let mut c = TcpStream::connect(addr(&s.base)).await.unwrap();
        c.write_all(format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-{i}: ").as_bytes())
            .await
            .unwrap();
        slow.push(c);
    }
    // With all of them open, a new client is answered at once.
    let t = Instant::now();
    let h = call(&s.base, "GET", "/healthz", "", &[]).await;
    assert_eq!(h.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Each slow connection is closed once its head has taken longer than the timeout, and
    // not much later.
    for (i, c) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(6).saturating_sub(opened.elapsed());
        assert!(
            closed_within(c, left).await.is_some(),
            "slow connection {i} still open after {:?}",
            opened.elapsed()
        );
    }
    let all_closed = opened.elapsed();
    assert!(all_closed >= Duration::from_millis(1400), "{all_closed:?}");

    // A connection that sends nothing, and one kept alive after its answer, are closed
    // after the idle timeout.
    let mut silent = TcpStream::connect(addr(&s.base)).await.unwrap();
    let mut kept = TcpStream::connect(addr(&s.base)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    for c in [&mut silent, &mut kept] {
        let closed = closed_within(c, Duration::from_secs(8)).await;
        assert!(closed.is_some(), "an idle connection stayed open");
        let took = idle_since.elapsed();
        assert!(took >= Duration::from_millis(2500), "closed after {took:?}");
    }
    assert_eq!(call(&s.base, "GET", "/healthz", "", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_cannot_parse_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[("KILN_DEMO_WORKER__ENABLED", "false")]);
    let long = format!(
        "GET /v1/tasks?x={} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "a".repeat(70_000)
    );
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let cases: [(&[u8], u16, &str); 3] = [
        (long.as_bytes(), 414, "uri_too_long"),
        (huge.as_bytes(), 431, "headers_too_large"),
        (
            b"GET /\x01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            400,
            "malformed_request",
        ),
    ];
    for (req, status, code) in cases {
        let (got, body) = raw(&s.base, req).await;
        assert_eq!(got, status);
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        assert_eq!(v["error"]["code"], code);
    }
    // The server is fine afterwards.
    assert_eq!(call(&s.base, "GET", "/healthz", "", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_key_with_a_scope_makes_a_read_only_key() {
    let hash = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["config", "hash-key"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let reader = hash(&["--scope", "read", "reader-key"]);
    assert!(reader.starts_with("read:sha256:"), "{reader}");
    let admin = hash(&["admin-key"]);
    assert!(admin.starts_with("sha256:"), "{admin}");
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("{reader},{admin}");
    let s = start(dir.path(), &[("KILN_GATEWAY__API_KEY_HASHES", &keys)]);
    let task = json!({"task_type": "txt2img", "input": {"prompt": "x", "width": 16, "height": 16}});
    let r = [("authorization", "Bearer reader-key")];
    assert_eq!(call(&s.base, "GET", "/v1/tasks", "", &r).await.status, 200);
    let refused = post_json(&s.base, "/v1/tasks", task.clone(), &r).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"]["code"], "forbidden");
    let a = [("authorization", "Bearer admin-key")];
    let ok = post_json(&s.base, "/v1/tasks", task, &a).await;
    assert_eq!(ok.status, 202);
    // The in-process demo worker, holding a worker token of its own, still deletes the files
    // it made (delete_asset); an outside worker token could not.
    let id = ok.json()["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(20);
    let t = loop {
        let t = call(&s.base, "GET", &format!("/v1/tasks/{id}"), "", &a)
            .await
            .json();
        if t["status"] == "succeeded" {
            break t;
        }
        assert!(Instant::now() < until, "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let file = t["output"]["files"][0]["id"].as_str().unwrap().to_owned();
    let del = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "delete_asset", "input": {"file_id": file}}),
        &a,
    )
    .await;
    assert_eq!(del.status, 202);
    let id = del.json()["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let t = call(&s.base, "GET", &format!("/v1/tasks/{id}"), "", &a)
            .await
            .json();
        if t["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < until && t["status"] != "failed", "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = call(&s.base, "GET", &format!("/v1/files/{file}"), "", &a).await;
    assert_eq!(gone.status, 404);
    // A malformed scope stops the start, naming the key.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "check"])
        .env("KILN_GATEWAY__API_KEY_HASHES", format!("root:{admin}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gateway.api_key_hashes"));
}
