//! Faults reproduced with a real nginx over TLS + HTTP/2 on 127.0.0.1. Each test asserts
//! the exact outcome: success through safe replay, or the precise typed error.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_upload::{
    AttemptError, Class, Multipart, Payload, PresignedPut, UploadClient, UploadError, UploadFile,
};
use support::{Nginx, Pki, backend_block, client, free_port};

fn image(n: usize) -> UploadFile {
    let data: Vec<u8> = (0..n).map(|i| (i * 31 % 256) as u8).collect();
    UploadFile::new(data, "ref.png", "image/png")
}

fn multipart(port: u16, path: &str) -> Multipart {
    Multipart::new(format!("https://127.0.0.1:{port}{path}").parse().unwrap())
}

/// Uploads `n` files with `concurrency` tasks; returns the results in order.
async fn many(
    c: &UploadClient,
    target: Arc<Multipart>,
    n: usize,
    concurrency: usize,
    size: usize,
) -> Vec<Result<kiln_upload::UploadResult, UploadError>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let file = Arc::new(image(size));
    let mut handles = Vec::new();
    for _ in 0..n {
        let (c, t, f, sem) = (c.clone(), target.clone(), file.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.upload(t.as_ref(), &f).await
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn transport(e: &UploadError) -> (Class, Option<&'static str>) {
    match e.last_attempt_error() {
        Some(AttemptError::Transport {
            class, h2_reason, ..
        }) => (*class, *h2_reason),
        other => panic!("expected a transport error, got {other:?} ({e})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_after_n_requests_is_replayed_for_post() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           keepalive_requests 5; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    // No client-side rotation: the server's GOAWAY must be survived by replay.
    let mut cfg = pki.client_config();
    cfg.max_requests_per_connection = 1_000_000;
    let (c, counters) = client(cfg);
    let results = many(&c, Arc::new(multipart(front, "/upload")), 60, 12, 200_000).await;
    for r in &results {
        let r = r.as_ref().unwrap_or_else(|e| panic!("upload failed: {e}"));
        assert!(
            r.url
                .as_deref()
                .unwrap_or("")
                .starts_with("https://img.example/")
        );
    }
    let s = counters.snapshot();
    assert_eq!(s.uploads_ok, 60);
    assert!(
        s.connections >= 60 / 5,
        "nginx allows 5 requests per connection: {s:?}"
    );
    assert!(
        s.transparent_retries >= 1,
        "GOAWAY must have refused some streams: {s:?}"
    );
    assert_eq!(
        s.failed_attempts, s.retries,
        "every failure was replayed: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_before_keepalive_requests_avoids_goaway() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           keepalive_requests 5; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    let mut cfg = pki.client_config();
    cfg.max_requests_per_connection = 5;
    let (c, counters) = client(cfg);
    let results = many(&c, Arc::new(multipart(front, "/upload")), 40, 8, 50_000).await;
    assert!(results.iter().all(Result::is_ok));
    let s = counters.snapshot();
    // 40 requests / 5 per connection = 8; spares opened ahead of need add at most
    // ceil(8 x 8 in flight / 5) = 13 (headroom at most 8), and the first burst's own connect
    // one more.
    assert!(
        (8..=22).contains(&s.connections),
        "40 requests / 5 per connection: {s:?}"
    );
    assert_eq!(s.retries, 0, "rotation must prevent every GOAWAY: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_close_race_is_survived() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           keepalive_timeout 300ms; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    // Two clients: one whose pool idles out first (no race), one that races the server.
    for idle in [Duration::from_millis(200), Duration::from_secs(10)] {
        let mut cfg = pki.client_config();
        cfg.pool_idle_timeout = idle;
        let (c, counters) = client(cfg);
        let t = multipart(front, "/upload");
        let f = image(20_000);
        for i in 0..16u64 {
            c.upload(&t, &f)
                .await
                .unwrap_or_else(|e| panic!("idle {idle:?}, upload {i}: {e}"));
            tokio::time::sleep(Duration::from_millis(285 + (i % 4) * 10)).await;
        }
        let s = counters.snapshot();
        assert_eq!(s.uploads_ok, 16);
        if idle < Duration::from_millis(300) {
            assert_eq!(
                s.reused, 0,
                "a 200 ms pool never reuses after 285 ms: {s:?}"
            );
            assert_eq!(s.retries, 0, "{s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_replayed() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           http2_max_concurrent_streams 2; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    for _round in 0..3 {
        let (c, counters) = client(pki.client_config());
        let results = many(&c, Arc::new(multipart(front, "/upload")), 8, 8, 100_000).await;
        for r in &results {
            assert!(r.is_ok(), "{r:?}");
        }
        let s = counters.snapshot();
        assert_eq!(s.uploads_ok, 8);
        assert_eq!(
            s.failed_attempts, s.transparent_retries,
            "only refusals may fail: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_444_fails_post_once_and_retries_put() {
    let pki = Pki::new();
    let front = free_port();
    let servers = format!(
        "server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           location / {{ return 444; }} }}\n"
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front]) else {
        return;
    };
    let (c, _) = client(pki.client_config());
    let e = c
        .upload(&multipart(front, "/drop"), &image(10_000))
        .await
        .unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, Some("PROTOCOL_ERROR"))
    );
    assert_eq!(
        e.attempts().len(),
        1,
        "a POST that may have been processed is not replayed"
    );
    assert_eq!(e.stop_reason(), Some(kiln_retry::StopReason::NotRetryable));

    let put = PresignedPut::new(format!("https://127.0.0.1:{front}/drop").parse().unwrap());
    let e = c.upload(&put, &image(10_000)).await.unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, Some("PROTOCOL_ERROR"))
    );
    assert_eq!(
        e.attempts().len(),
        4,
        "PUT is idempotent: 1 + max_retries attempts"
    );
    assert_eq!(
        e.stop_reason(),
        Some(kiln_retry::StopReason::AttemptsExhausted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_hits_client_body_timeout() {
    let pki = Pki::new();
    let front = free_port();
    let back = free_port();
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           client_body_timeout 1s; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    // A FIFO stands in for a stalled body source: 1 KB arrives, then nothing for 4 s.
    let fifo = nginx.dir.path().join("slow.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&writer_path)
            .unwrap();
        w.write_all(&[7u8; 1024]).unwrap();
        std::thread::sleep(Duration::from_secs(4));
    });
    let file = UploadFile::new(
        Payload::File {
            path: fifo,
            offset: 0,
            len: 60_000,
        },
        "slow.png",
        "image/png",
    );
    let (c, _) = client(pki.client_config());
    let e = c
        .upload(&multipart(front, "/upload"), &file)
        .await
        .unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, Some("PROTOCOL_ERROR"))
    );
    assert_eq!(e.attempts().len(), 1);
    writer.join().unwrap();
    assert!(
        nginx.error_log().contains("client timed out"),
        "{}",
        nginx.error_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_is_a_typed_413() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           client_max_body_size 1k; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front, back]) else {
        return;
    };
    let (c, _) = client(pki.client_config());
    let e = c
        .upload(&multipart(front, "/upload"), &image(200_000))
        .await
        .unwrap_err();
    match e.last_attempt_error() {
        Some(AttemptError::Status {
            status,
            content_type,
            excerpt,
            ..
        }) => {
            assert_eq!(*status, 413);
            assert_eq!(content_type, "text/html");
            assert!(
                excerpt.contains("413 Request Entity Too Large"),
                "{excerpt}"
            );
        }
        other => panic!("expected a 413, got {other:?}"),
    }
    assert_eq!(e.attempts().len(), 1);
    // The connection survives a 413: the next small upload reuses it.
    let r = c
        .upload(&multipart(front, "/upload"), &image(500))
        .await
        .unwrap();
    assert!(r.reused_connection);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_429_waits_for_retry_after() {
    let pki = Pki::new();
    let (front, back) = (free_port(), free_port());
    let http_extra = "limit_req_zone $binary_remote_addr zone=rl:1m rate=2r/s;";
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           location / {{ limit_req zone=rl burst=1 nodelay; limit_req_status 429; error_page 429 = @rl;\n\
                        proxy_pass http://127.0.0.1:{back}; }}\n\
           location @rl {{ add_header Retry-After 1 always; return 429; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, http_extra, &servers, &[front, back]) else {
        return;
    };
    let (c, counters) = client(pki.client_config());
    let started = tokio::time::Instant::now();
    let results = many(&c, Arc::new(multipart(front, "/upload")), 4, 4, 1_000).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let s = counters.snapshot();
    assert!(
        s.retries >= 2,
        "two of four rapid requests exceed rate + burst: {s:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retries must wait for Retry-After: 1"
    );
    // With no retries allowed the 429 is reported with its status.
    let mut cfg = pki.client_config();
    cfg.retry.max_retries = 0;
    let (c, _) = client(cfg);
    let results = many(&c, Arc::new(multipart(front, "/upload")), 4, 4, 1_000).await;
    let limited: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!limited.is_empty());
    for e in limited {
        assert_eq!(e.status(), Some(429), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_is_permanent() {
    let pki = Pki::new();
    let other = Pki::new();
    let front = free_port();
    let servers = format!(
        "server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           location / {{ return 200; }} }}\n"
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[front]) else {
        return;
    };
    let (c, _) = client(other.client_config());
    let e = c
        .upload(
            &multipart(front, "/upload"),
            &UploadFile::new(Bytes::from_static(b"x"), "a", "image/png"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e.last_attempt_error(), Some(AttemptError::Tls { .. })),
        "{e}"
    );
    assert_eq!(e.attempts().len(), 1, "TLS failures are never retried");
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_fallback_and_http1_only_rotate_with_keepalive_requests() {
    let pki = Pki::new();
    let (h1, h2, back) = (free_port(), free_port(), free_port());
    let servers = format!(
        "{}server {{ listen 127.0.0.1:{h1} ssl; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           keepalive_requests 5; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n\
         server {{ listen 127.0.0.1:{h2} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           keepalive_requests 5; location / {{ proxy_pass http://127.0.0.1:{back}; }} }}\n",
        backend_block(back)
    );
    let Some(_nginx) = Nginx::start(&pki, "", &servers, &[h1, h2, back]) else {
        return;
    };
    // A server without h2 in ALPN: the client falls back to HTTP/1.1. With http1_only the
    // client offers only HTTP/1.1 to an h2-capable server.
    for (port, http1_only) in [(h1, false), (h2, true)] {
        let mut cfg = pki.client_config();
        cfg.http1_only = http1_only;
        let (c, counters) = client(cfg);
        let results = many(&c, Arc::new(multipart(port, "/upload")), 30, 3, 100_000).await;
        for r in &results {
            assert!(r.is_ok(), "port {port}: {r:?}");
        }
        let s = counters.snapshot();
        assert_eq!(s.uploads_ok, 30);
        assert!(s.reused >= 15, "HTTP/1.1 connections are pooled: {s:?}");
        assert!(
            s.connections >= 6,
            "nginx closes after 5 requests each: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_response_under_stream_and_request_limits_loses_no_upload() {
    let pki = Pki::new();
    let front = free_port();
    // nginx answers before reading the body (then resets the stream with NO_ERROR), allows
    // two streams at a time, five requests per connection and 300 ms of idleness.
    let servers = format!(
        "server {{ listen 127.0.0.1:{front} ssl http2; ssl_certificate {{CERT}}; ssl_certificate_key {{KEY}};\n\
           http2_max_concurrent_streams 2; keepalive_requests 5; keepalive_timeout 300ms;\n\
           location / {{ default_type application/json; return 200 '{{\"data\":{{\"url\":\"https://img.example/early\"}}}}'; }} }}\n"
    );
    let Some(nginx) = Nginx::start(&pki, "", &servers, &[front]) else {
        return;
    };
    let ev = Arc::new(Events::default());
    let c = UploadClient::with_metrics(pki.client_config(), ev.clone()).unwrap();
    let results = many(&c, Arc::new(multipart(front, "/upload")), 1500, 16, 100_000).await;
    for r in &results {
        let r = r.as_ref().unwrap_or_else(|e| panic!("upload failed: {e}"));
        assert_eq!(r.url.as_deref(), Some("https://img.example/early"));
    }
    let s = ev.counters.snapshot();
    assert_eq!(s.uploads_ok, 1500, "{s:?}");
    assert!(
        s.connections >= 1500 / 5,
        "five requests per connection: {s:?}"
    );
    assert_eq!(
        s.failed_attempts, s.transparent_retries,
        "only refusals may fail an attempt: {s:?}"
    );
    let resent = ev.resent.lock().unwrap().clone();
    eprintln!("counters {s:?}; resent kinds {resent:?}");
    assert!(
        !nginx.error_log().contains("[crit]") && !nginx.error_log().contains("[alert]"),
        "{}",
        nginx.error_log()
    );
}

/// Counters plus the kinds of requests resent on a new connection.
#[derive(Default)]
struct Events {
    resent: std::sync::Mutex<Vec<&'static str>>,
    counters: kiln_upload::UploadCounters,
}

impl kiln_upload::MetricsHook for Events {
    fn record(&self, event: kiln_upload::MetricEvent) {
        if let kiln_upload::MetricEvent::Resent { kind } = event {
            self.resent.lock().unwrap().push(kind);
        }
        self.counters.record(event);
    }
}
