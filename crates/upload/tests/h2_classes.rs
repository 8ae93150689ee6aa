//! Every hyper/h2 error kind the client can meet, produced for real by in-process servers
//! on 127.0.0.1 (h2 over TLS, raw HTTP/1.1 over TCP), with its class and the client's
//! reaction. The table of kinds is in `src/classify.rs`.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use kiln_retry::StopReason;
use kiln_upload::{
    AttemptError, Class, MetricEvent, MetricsHook, Multipart, Payload, PresignedPut, UploadClient,
    UploadConfig, UploadError, UploadFile,
};
use support::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests seen per path.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Records the kinds of requests resent on a new connection.
#[derive(Default)]
struct Events {
    resent: Mutex<Vec<&'static str>>,
    counters: kiln_upload::UploadCounters,
}

impl MetricsHook for Events {
    fn record(&self, event: MetricEvent) {
        if let MetricEvent::Resent { kind } = event {
            self.resent.lock().unwrap().push(kind);
        }
        self.counters.record(event);
    }
}

fn client_with_events(cfg: UploadConfig) -> (UploadClient, Arc<Events>) {
    let ev = Arc::new(Events::default());
    (UploadClient::with_metrics(cfg, ev.clone()).unwrap(), ev)
}

struct Server {
    port: u16,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An h2 server over TLS. `max_streams` sets SETTINGS_MAX_CONCURRENT_STREAMS.
async fn start_h2(pki: &Pki, max_streams: Option<u32>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut b = h2::server::Builder::new();
                if let Some(n) = max_streams {
                    b.max_concurrent_streams(n);
                }
                let Ok(mut conn) = b.handshake::<_, Bytes>(tls).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let path = req.uri().path().to_owned();
                    *seen.lock().unwrap().entry(path.clone()).or_default() += 1;
                    match path.as_str() {
                        // GOAWAY while requests wait for a stream slot on this connection.
                        "/goaway-queued" => {
                            tokio::spawn(handle(req, respond, Duration::from_millis(300)));
                            // Let the other two requests queue up at the client first.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            conn.graceful_shutdown();
                        }
                        // The connection closes under an open stream.
                        "/drop-connection" => return,
                        // The server stops reading the connection: no PING is answered.
                        "/hang" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            return;
                        }
                        _ => {
                            tokio::spawn(handle(req, respond, Duration::ZERO));
                        }
                    }
                }
            });
        }
    });
    Server { port, seen, task }
}

async fn read_body(body: &mut h2::RecvStream) -> usize {
    let mut n = 0;
    while let Some(Ok(chunk)) = body.data().await {
        n += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    n
}

const OK: &str = r#"{"data":{"url":"https://img.example/a.png","id":"a"}}"#;

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut tx: h2::server::SendResponse<Bytes>,
    delay: Duration,
) {
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    tokio::time::sleep(delay).await;
    let json = |status: u16| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    match path.as_str() {
        // A complete response before the request body was read; dropping the request body
        // afterwards makes h2 send RST_STREAM(NO_ERROR) (RFC 9113 section 8.1).
        "/early" => {
            if let Ok(mut s) = tx.send_response(json(200), false) {
                let _ = s.send_data(Bytes::from_static(OK.as_bytes()), true);
            }
            drop(body);
        }
        "/early-413" => {
            let mut s = tx.send_response(json(413), false).unwrap();
            s.send_data(Bytes::from_static(b"{\"error\":\"too large\"}"), true)
                .unwrap();
            drop(body);
        }
        // RST_STREAM(NO_ERROR) in the middle of an announced body.
        "/truncated" => {
            read_body(&mut body).await;
            let res = http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("content-length", "100")
                .body(())
                .unwrap();
            let mut s = tx.send_response(res, false).unwrap();
            s.send_data(Bytes::from_static(b"{\"data\":"), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.send_reset(Reason::NO_ERROR);
        }
        "/reset-no-error" => tx.send_reset(Reason::NO_ERROR),
        _ => {
            read_body(&mut body).await;
            // The client may have reset the stream (its body failed): nothing to answer.
            if let Ok(mut s) = tx.send_response(json(200), false) {
                let _ = s.send_data(Bytes::from_static(OK.as_bytes()), true);
            }
        }
    }
}

fn url(port: u16, path: &str) -> http::Uri {
    format!("https://127.0.0.1:{port}{path}").parse().unwrap()
}

fn file(n: usize) -> UploadFile {
    UploadFile::new(vec![7u8; n], "ref.png", "image/png")
}

fn transport(e: &UploadError) -> (Class, &'static str, Option<&'static str>) {
    match e.last_attempt_error() {
        Some(AttemptError::Transport {
            class,
            kind,
            h2_reason,
            ..
        }) => (*class, *kind, *h2_reason),
        other => panic!("expected a transport error, got {other:?} ({e})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_stream_slot_at_goaway_are_resent() {
    let pki = Pki::new();
    let srv = start_h2(&pki, Some(1)).await;
    let (c, ev) = client_with_events(pki.client_config());
    // One request first, so the client knows the server allows one stream at a time.
    c.upload(&Multipart::new(url(srv.port, "/warm")), &file(1000))
        .await
        .unwrap();
    // Three POSTs on that connection: the first opens a stream (and makes the server send
    // GOAWAY), the second waits inside h2 for the stream slot, the third waits in hyper's
    // queue. The GOAWAY ends hyper's dispatch task with both still held.
    let t = Arc::new(Multipart::new(url(srv.port, "/goaway-queued")));
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (c, t) = (c.clone(), t.clone());
        handles.push(tokio::spawn(async move {
            c.upload(t.as_ref(), &file(100_000)).await
        }));
    }
    for h in handles {
        let r = h.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.attempts, 1, "a resend is not a retry");
    }
    let resent = ev.resent.lock().unwrap().clone();
    assert!(
        resent.contains(&"dispatch_gone"),
        "the stream waiting for a slot was resent: {resent:?}"
    );
    assert!(
        resent.len() >= 2,
        "both waiting requests were resent: {resent:?}"
    );
    assert_eq!(
        srv.seen.lock().unwrap()["/goaway-queued"],
        3,
        "each POST reached the server exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_response_then_reset_no_error_is_a_success() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let (c, ev) = client_with_events(pki.client_config());
    // 1 MB bodies: far more than the 64 KB stream window the server never opens, so the
    // reset always arrives while the body is still being sent.
    for i in 0..5 {
        let r = c
            .upload(&Multipart::new(url(srv.port, "/early")), &file(1 << 20))
            .await
            .unwrap_or_else(|e| panic!("upload {i}: {e}"));
        assert_eq!(r.url.as_deref(), Some("https://img.example/a.png"));
        assert_eq!(r.attempts, 1);
        assert_eq!(r.reused_connection, i > 0, "the connection stays usable");
    }
    let s = ev.counters.snapshot();
    assert_eq!((s.failed_attempts, s.connections), (0, 1), "{s:?}");
    // An early error status is reported as that status.
    let e = c
        .upload(&Multipart::new(url(srv.port, "/early-413")), &file(1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(413), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_no_error_inside_the_body_is_a_truncated_response() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let (c, _) = client_with_events(pki.client_config());
    let e = c
        .upload(&Multipart::new(url(srv.port, "/truncated")), &file(1000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.last_attempt_error(),
            Some(AttemptError::Truncated {
                expected: 100,
                got: 8
            })
        ),
        "{e}"
    );
    assert_eq!(
        e.attempts().len(),
        1,
        "a POST that got a response is not replayed"
    );
    assert_eq!(e.attempts()[0].class, Some(Class::MaybeProcessed));
    let e = c
        .upload(&PresignedPut::new(url(srv.port, "/truncated")), &file(1000))
        .await
        .unwrap_err();
    assert_eq!(e.attempts().len(), 4, "a PUT is replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_no_error_before_any_response_is_maybe_processed() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let (c, _) = client_with_events(pki.client_config());
    let e = c
        .upload(
            &Multipart::new(url(srv.port, "/reset-no-error")),
            &file(1000),
        )
        .await
        .unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, "h2_reset", Some("NO_ERROR"))
    );
    assert_eq!(e.stop_reason(), Some(StopReason::NotRetryable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_under_an_open_stream_is_maybe_processed() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let (c, _) = client_with_events(pki.client_config());
    let e = c
        .upload(
            &Multipart::new(url(srv.port, "/drop-connection")),
            &file(1000),
        )
        .await
        .unwrap_err();
    assert_eq!(transport(&e).0, Class::MaybeProcessed, "{e}");
    assert_eq!(transport(&e).1, "io", "{e}");
    assert_eq!(e.attempts().len(), 1);
    // The PUT is replayed (and each replay meets the same close).
    let e = c
        .upload(
            &PresignedPut::new(url(srv.port, "/drop-connection")),
            &file(1000),
        )
        .await
        .unwrap_err();
    assert_eq!(e.attempts().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_keepalive_ping_is_maybe_processed() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let mut cfg = pki.client_config();
    cfg.http2_keep_alive_interval = Some(Duration::from_millis(100));
    cfg.http2_keep_alive_timeout = Duration::from_millis(200);
    let (c, _) = client_with_events(cfg);
    let started = std::time::Instant::now();
    let e = c
        .upload(&Multipart::new(url(srv.port, "/hang")), &file(1000))
        .await
        .unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, "keepalive_timeout", None),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the PING timed out first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_body_failure_is_permanent() {
    let pki = Pki::new();
    let srv = start_h2(&pki, None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.bin");
    std::fs::write(&path, vec![1u8; 1000]).unwrap();
    // The payload claims more bytes than the file has: the body fails mid-upload.
    let f = UploadFile::new(
        Payload::File {
            path,
            offset: 0,
            len: 5000,
        },
        "a.png",
        "image/png",
    );
    let (c, _) = client_with_events(pki.client_config());
    let e = c
        .upload(&PresignedPut::new(url(srv.port, "/upload")), &f)
        .await
        .unwrap_err();
    assert_eq!(transport(&e).0, Class::Permanent, "{e}");
    assert_eq!(transport(&e).1, "user_body", "{e}");
    assert_eq!(e.attempts().len(), 1, "never retried, even for PUT");
}

/// A raw HTTP/1.1 server: for each connection, reads the request head and then does `act`.
async fn start_h1(act: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                match act {
                    "close" => {}
                    "garbage" => {
                        let _ = tcp.write_all(b"HTTP/1.1 abc nope\r\n\r\n").await;
                    }
                    "reset" => {
                        // SO_LINGER 0: close with RST while the client is still uploading.
                        #[allow(deprecated)]
                        tcp.set_linger(Some(Duration::ZERO)).unwrap();
                        drop(tcp);
                        return;
                    }
                    _ => unreachable!(),
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    (port, task)
}

fn h1_url(port: u16) -> http::Uri {
    format!("http://127.0.0.1:{port}/upload").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_close_before_response_is_incomplete_message() {
    let (port, task) = start_h1("close").await;
    let (c, _) = client_with_events(Pki::new().client_config());
    let e = c
        .upload(&Multipart::new(h1_url(port)), &file(1000))
        .await
        .unwrap_err();
    assert_eq!(
        transport(&e),
        (Class::MaybeProcessed, "incomplete_message", None),
        "{e}"
    );
    assert_eq!(e.attempts().len(), 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_unparsable_response_is_maybe_processed() {
    let (port, task) = start_h1("garbage").await;
    let (c, _) = client_with_events(Pki::new().client_config());
    let e = c
        .upload(&Multipart::new(h1_url(port)), &file(1000))
        .await
        .unwrap_err();
    assert_eq!(transport(&e), (Class::MaybeProcessed, "parse", None), "{e}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_reset_during_the_upload_is_maybe_processed() {
    let (port, task) = start_h1("reset").await;
    let (c, _) = client_with_events(Pki::new().client_config());
    // 8 MB: far more than the socket buffers, so the reset meets the body being written.
    let e = c
        .upload(&Multipart::new(h1_url(port)), &file(8 << 20))
        .await
        .unwrap_err();
    let (class, kind, _) = transport(&e);
    assert_eq!(class, Class::MaybeProcessed, "{e}");
    assert!(
        ["body_write", "io", "incomplete_message"].contains(&kind),
        "{kind}: {e}"
    );
    assert_eq!(e.attempts().len(), 1);
    task.abort();
}
