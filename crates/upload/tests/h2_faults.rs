//! Each classified HTTP/2 outcome produced by an in-process HTTP/2 server (h2, the
//! implementation under hyper) over TLS on 127.0.0.1, and the client's exact reaction.
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
    AttemptError, Class, JsonBase64, Multipart, PresignedPut, UploadError, UploadFile,
};
use support::{Pki, client};

/// Requests seen per path.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

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

async fn start(pki: &Pki) -> Server {
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
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(handle(req, respond, seen.clone()));
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

fn respond(
    respond: &mut h2::server::SendResponse<Bytes>,
    status: u16,
    headers: &[(&str, &str)],
    body: &'static str,
) {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut s = respond.send_response(b.body(()).unwrap(), false).unwrap();
    s.send_data(Bytes::from_static(body.as_bytes()), true)
        .unwrap();
}

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut tx: h2::server::SendResponse<Bytes>,
    seen: Seen,
) {
    let path = req.uri().path().to_owned();
    let n = {
        let mut m = seen.lock().unwrap();
        let e = m.entry(path.clone()).or_default();
        *e += 1;
        *e
    };
    let mut body = req.into_body();
    let json: &[(&str, &str)] = &[("content-type", "application/json")];
    let ok =
        r#"{"data":{"url":"https://img.example/a.png","id":"a"},"fileId":"f1","uri":"asset://f1"}"#;
    match path.as_str() {
        "/refuse-once" if n == 1 => tx.send_reset(Reason::REFUSED_STREAM),
        "/protocol-error" => tx.send_reset(Reason::PROTOCOL_ERROR),
        "/internal-after-headers" => {
            read_body(&mut body).await;
            let res = http::Response::builder().status(200).body(()).unwrap();
            let mut s = tx.send_response(res, false).unwrap();
            s.send_data(Bytes::from_static(b"{\"data\":"), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.send_reset(Reason::INTERNAL_ERROR);
        }
        "/busy-once" if n == 1 => {
            read_body(&mut body).await;
            respond(
                &mut tx,
                503,
                &[("retry-after", "1"), ("content-type", "text/plain")],
                "busy",
            );
        }
        "/html" => {
            read_body(&mut body).await;
            respond(
                &mut tx,
                200,
                &[("content-type", "text/html")],
                "<!DOCTYPE html><html><head><title>Just a moment...</title></head></html>",
            );
        }
        "/empty" => {
            read_body(&mut body).await;
            respond(&mut tx, 200, json, "");
        }
        "/bad-json" => {
            read_body(&mut body).await;
            respond(&mut tx, 200, json, "{\"data\": {\"url\": ");
        }
        "/no-url" => {
            read_body(&mut body).await;
            respond(&mut tx, 200, json, "{\"data\":{}}");
        }
        "/524" => {
            read_body(&mut body).await;
            respond(
                &mut tx,
                524,
                &[("content-type", "text/html; charset=UTF-8")],
                "<html><body>Error 524: A timeout occurred</body></html>",
            );
        }
        _ => {
            let got = read_body(&mut body).await;
            assert!(got > 0, "the body arrived");
            respond(&mut tx, 200, json, ok);
        }
    }
}

fn file() -> UploadFile {
    UploadFile::new(vec![9u8; 50_000], "ref.png", "image/png")
}

fn url(port: u16, path: &str) -> http::Uri {
    format!("https://127.0.0.1:{port}{path}").parse().unwrap()
}

fn unexpected(e: &UploadError) -> (u16, String, String, String) {
    match e {
        UploadError::Unexpected {
            error:
                AttemptError::Unexpected {
                    status,
                    content_type,
                    reason,
                    excerpt,
                },
            ..
        } => (
            *status,
            content_type.clone(),
            reason.clone(),
            excerpt.clone(),
        ),
        other => panic!("expected an unexpected-response error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_replayed_transparently_for_post() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, counters) = client(pki.client_config());
    let r = c
        .upload(&Multipart::new(url(srv.port, "/refuse-once")), &file())
        .await
        .unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.url.as_deref(), Some("https://img.example/a.png"));
    let s = counters.snapshot();
    assert_eq!(s.transparent_retries, 1);
    assert_eq!(s.connections, 2, "the replay used a fresh connection");
    assert_eq!(srv.seen.lock().unwrap()["/refuse-once"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_reset_replays_put_but_not_post() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, _) = client(pki.client_config());
    let e = c
        .upload(&Multipart::new(url(srv.port, "/protocol-error")), &file())
        .await
        .unwrap_err();
    assert!(matches!(
        e.last_attempt_error(),
        Some(AttemptError::Transport {
            class: Class::MaybeProcessed,
            h2_reason: Some("PROTOCOL_ERROR"),
            ..
        })
    ));
    assert_eq!(e.attempts().len(), 1);
    let e = c
        .upload(
            &PresignedPut::new(url(srv.port, "/protocol-error")),
            &file(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.attempts().len(), 4);
    assert_eq!(e.stop_reason(), Some(StopReason::AttemptsExhausted));
    assert_eq!(srv.seen.lock().unwrap()["/protocol-error"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_response_headers_is_maybe_processed() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, _) = client(pki.client_config());
    let e = c
        .upload(
            &Multipart::new(url(srv.port, "/internal-after-headers")),
            &file(),
        )
        .await
        .unwrap_err();
    match e.last_attempt_error() {
        Some(AttemptError::Transport {
            class,
            h2_reason,
            what,
            ..
        }) => {
            assert_eq!(*class, Class::MaybeProcessed);
            assert_eq!(*h2_reason, Some("INTERNAL_ERROR"));
            assert_eq!(*what, "response body");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.attempts().len(), 1, "a committed POST is not replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_unavailable_follows_retry_after() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, _) = client(pki.client_config());
    let started = std::time::Instant::now();
    let r = c
        .upload(&Multipart::new(url(srv.port, "/busy-once")), &file())
        .await
        .unwrap();
    assert_eq!(r.attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After: 1"
    );
    assert!(r.reused_connection, "a 503 leaves the connection usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_bodies_are_typed_errors() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, _) = client(pki.client_config());
    let m = |p| Multipart::new(url(srv.port, p));

    let e = c.upload(&m("/html"), &file()).await.unwrap_err();
    let (status, ct, reason, excerpt) = unexpected(&e);
    assert_eq!((status, ct.as_str()), (200, "text/html"));
    assert!(reason.starts_with("expected JSON, got HTML"), "{reason}");
    assert!(excerpt.starts_with("<!DOCTYPE html><html><head><title>Just a moment"));

    let e = c.upload(&m("/empty"), &file()).await.unwrap_err();
    assert_eq!(unexpected(&e).2, "empty body, expected JSON");

    let e = c.upload(&m("/bad-json"), &file()).await.unwrap_err();
    let (_, ct, reason, excerpt) = unexpected(&e);
    assert_eq!(ct, "application/json");
    assert!(reason.starts_with("invalid JSON"), "{reason}");
    assert_eq!(excerpt, "{\"data\": {\"url\":");

    let e = c.upload(&m("/no-url"), &file()).await.unwrap_err();
    assert_eq!(unexpected(&e).2, "no string at JSON path `data.url`");
    assert!(!e.is_retryable());

    let e = c.upload(&m("/524"), &file()).await.unwrap_err();
    match e.last_attempt_error() {
        Some(AttemptError::Status {
            status,
            content_type,
            excerpt,
            ..
        }) => {
            assert_eq!(*status, 524);
            assert_eq!(content_type, "text/html; charset=UTF-8");
            assert!(excerpt.contains("Error 524"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.attempts().len(), 1, "524 is not in the retried statuses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_base64_maps_fields_and_connections_are_reused() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, counters) = client(pki.client_config());
    let t = JsonBase64::new(url(srv.port, "/assets"));
    for i in 0..3 {
        let r = c.upload(&t, &file()).await.unwrap();
        assert_eq!(r.id.as_deref(), Some("f1"));
        assert_eq!(r.url.as_deref(), Some("asset://f1"));
        assert_eq!(r.reused_connection, i > 0);
        assert_eq!(
            r.timings.tls.is_some(),
            i == 0,
            "TLS time only on a new connection"
        );
    }
    assert_eq!(counters.snapshot().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_records_each_failure() {
    let pki = Pki::new();
    let srv = start(&pki).await;
    let (c, _) = client(pki.client_config());
    let chain = kiln_upload::Fallback::new(vec![
        Box::new(PresignedPut::new(url(srv.port, "/524"))),
        Box::new(Multipart::new(url(srv.port, "/upload"))),
    ]);
    let r = c.upload(&chain, &file()).await.unwrap();
    assert_eq!(r.target, "multipart");
    assert_eq!(r.failures.len(), 1);
    assert_eq!(r.failures[0].0, "put");
    assert!(r.failures[0].1.contains("HTTP 524"), "{}", r.failures[0].1);

    let all_bad = kiln_upload::Fallback::new(vec![
        Box::new(PresignedPut::new(url(srv.port, "/524"))),
        Box::new(Multipart::new(url(srv.port, "/html"))),
    ]);
    match c.upload(&all_bad, &file()).await.unwrap_err() {
        UploadError::AllTargetsFailed(v) => {
            assert_eq!(v.len(), 2);
            assert_eq!(v[0].1.status(), Some(524));
            assert_eq!(v[1].1.status(), Some(200));
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn oversized_body_is_refused_before_sending() {
    let pki = Pki::new();
    let mut cfg = pki.client_config();
    cfg.max_body_bytes = 1000;
    let (c, counters) = client(cfg);
    let e = c
        .upload(
            &PresignedPut::new(url(1, "/x")),
            &UploadFile::new(vec![0u8; 1001], "a", "b/c"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::TooLarge {
                size: 1001,
                limit: 1000
            }
        ),
        "{e}"
    );
    assert_eq!(counters.snapshot().attempts, 0);
}

#[tokio::test]
async fn connect_refused_is_not_sent_and_retried_for_post() {
    let pki = Pki::new();
    // A port that was free a moment ago: nothing listens there.
    let port = support::free_port();
    let mut cfg = pki.client_config();
    cfg.retry.max_retries = 2;
    let (c, counters) = client(cfg);
    let e = c
        .upload(&Multipart::new(url(port, "/upload")), &file())
        .await
        .unwrap_err();
    assert!(
        matches!(e.last_attempt_error(), Some(AttemptError::Connect { .. })),
        "{e}"
    );
    assert_eq!(e.attempts().len(), 3, "NotSent is retried even for POST");
    assert!(e.attempts().iter().all(|a| a.class == Some(Class::NotSent)));
    assert_eq!(e.stop_reason(), Some(StopReason::AttemptsExhausted));
    assert_eq!(counters.snapshot().connections, 0);
}
