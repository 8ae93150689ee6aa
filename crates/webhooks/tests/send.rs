//! The sender against a small hyper server on 127.0.0.1: what each kind of answer means, a
//! receiver that never answers, and addresses refused by policy.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln_webhooks::{Attempt, Outcome, Secret, SendConfig, Signer, Verifier, send};
use tokio::sync::mpsc;

/// What the server saw of one request: its headers and body.
type Seen = (http::HeaderMap, Bytes);

struct Server {
    port: u16,
    connections: Arc<AtomicUsize>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

/// Answers by path: `/ok` 200, `/accepted` 202, `/redirect` 302, `/gone` 410,
/// `/busy` 429 `Retry-After: 7`, `/down` 503 with an HTTP-date 30 s ahead, `/down-long` 503
/// `Retry-After: 999999`, `/error` 500 with a long body, `/bad` 400, `/never` no answer.
async fn server() -> Server {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let (tx, seen) = mpsc::unbounded_channel();
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(req, tx.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Server {
        port,
        connections,
        seen,
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    tx: mpsc::UnboundedSender<Seen>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let _ = tx.send((headers, body.unwrap_or_default()));
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let (status, extra, text): (u16, Option<(&str, String)>, String) = match path.as_str() {
        "/ok" => (200, None, "thanks".into()),
        "/accepted" => (202, None, String::new()),
        "/redirect" => (
            302,
            Some(("location", "http://169.254.169.254/".into())),
            String::new(),
        ),
        "/gone" => (410, None, "endpoint removed".into()),
        "/busy" => (429, Some(("retry-after", "7".into())), "slow down".into()),
        "/down" => (503, Some(("retry-after", date)), String::new()),
        "/down-long" => (503, Some(("retry-after", "999999".into())), String::new()),
        "/error" => (500, None, "é".repeat(2000)),
        "/never" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, None, String::new())
        }
        _ => (400, None, "bad".into()),
    };
    let mut resp = Response::builder().status(status);
    if let Some((k, v)) = extra {
        resp = resp.header(k, v);
    }
    Ok(resp.body(Full::new(Bytes::from(text))).unwrap())
}

fn loopback() -> SendConfig {
    let mut c = SendConfig::default();
    c.allow_loopback = true;
    c.timeout = Duration::from_secs(5);
    c
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn post(url: &str, cfg: &SendConfig) -> Attempt {
    let signer = Signer::new(vec![Secret::generate().unwrap()], None).unwrap();
    let body = br#"{"type":"task.completed"}"#;
    let h = signer.headers("msg_t", now(), body).unwrap();
    send(url, &h, Bytes::from_static(body), cfg).await
}

#[tokio::test]
async fn a_2xx_is_delivered_with_headers_that_verify() {
    let mut srv = server().await;
    let secret = Secret::generate().unwrap();
    let signer = Signer::new(vec![secret.clone()], None).unwrap();
    let body = br#"{"type":"task.completed","data":{"id":"t1"}}"#;
    let h = signer.headers("msg_ok", now(), body).unwrap();
    for path in ["/ok", "/accepted"] {
        let url = format!("http://127.0.0.1:{}{path}", srv.port);
        let a = send(&url, &h, Bytes::from_static(body), &loopback()).await;
        assert_eq!(a.outcome, Outcome::Delivered, "{a:?}");
        assert!(a.status.is_some_and(|s| (200..300).contains(&s)));
        assert_eq!(a.excerpt, "");
        let (headers, got) = srv.seen.recv().await.unwrap();
        assert_eq!(&got[..], body);
        assert_eq!(headers["content-type"], "application/json");
        assert!(
            headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("kiln-webhooks/")
        );
        assert_eq!(headers["webhook-id"], "msg_ok");
        Verifier::new(vec![secret.clone()], vec![])
            .verify_headers(&headers, &got, now())
            .unwrap();
    }
}

#[tokio::test]
async fn answers_map_onto_outcomes() {
    let srv = server().await;
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", srv.port);
    let cfg = loopback();

    let a = post(&url("/redirect"), &cfg).await;
    assert_eq!(a.outcome, Outcome::Failed { retry_after: None });
    assert_eq!(a.status, Some(302));
    assert!(
        a.excerpt.contains("redirects are not followed"),
        "{}",
        a.excerpt
    );

    let a = post(&url("/gone"), &cfg).await;
    assert_eq!((a.outcome, a.status), (Outcome::Gone, Some(410)));
    assert_eq!(a.excerpt, "endpoint removed");

    let a = post(&url("/busy"), &cfg).await;
    assert_eq!(
        a.outcome,
        Outcome::Failed {
            retry_after: Some(Duration::from_secs(7))
        }
    );

    let a = post(&url("/down"), &cfg).await;
    let Outcome::Failed {
        retry_after: Some(wait),
    } = a.outcome
    else {
        panic!("{a:?}")
    };
    // An HTTP date 30 s ahead, at one-second resolution.
    assert!((28..=31).contains(&wait.as_secs()), "{wait:?}");

    let a = post(&url("/down-long"), &cfg).await;
    assert_eq!(
        a.outcome,
        Outcome::Failed {
            retry_after: Some(cfg.max_retry_after)
        }
    );

    let a = post(&url("/error"), &cfg).await;
    assert_eq!(a.status, Some(500));
    assert!(a.outcome.is_retryable());
    assert_eq!(a.excerpt.chars().count(), kiln_webhooks::EXCERPT_CHARS);
    assert!(a.excerpt.chars().all(|c| c == 'é'));

    // Retry-After counts only on 429 and 503.
    let a = post(&url("/bad"), &cfg).await;
    assert_eq!(
        (a.outcome, a.status),
        (Outcome::Failed { retry_after: None }, Some(400))
    );
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out_without_holding_up_others() {
    let srv = server().await;
    let mut cfg = loopback();
    cfg.timeout = Duration::from_secs(2);
    let never_url = format!("http://127.0.0.1:{}/never", srv.port);
    let never = post(&never_url, &cfg);
    let ok = async {
        // Starts after the stuck one is already waiting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&format!("http://127.0.0.1:{}/ok", srv.port), &cfg).await
    };
    let started = std::time::Instant::now();
    let (never, ok) = tokio::join!(never, ok);
    assert_eq!(ok.outcome, Outcome::Delivered);
    assert!(ok.latency < cfg.timeout, "{ok:?}");
    assert_eq!(never.outcome, Outcome::Failed { retry_after: None });
    assert_eq!(never.status, None);
    assert!(never.latency >= cfg.timeout, "{never:?}");
    assert!(
        never.excerpt.contains("did not answer"),
        "{}",
        never.excerpt
    );
    assert!(started.elapsed() < cfg.timeout * 3);
}

#[tokio::test]
async fn addresses_refused_by_policy_are_never_connected() {
    let srv = server().await;
    let p = srv.port;
    let strict = SendConfig::default();
    let mut private_only = SendConfig::default();
    private_only.allow_private = true;
    let loopback_urls = [
        format!("http://127.0.0.1:{p}/ok"),
        format!("http://localhost:{p}/ok"),
        format!("http://[::1]:{p}/ok"),
        format!("http://[::ffff:127.0.0.1]:{p}/ok"),
        // Decimal, hexadecimal and octal spellings of 127.0.0.1.
        format!("http://2130706433:{p}/ok"),
        format!("http://0x7f000001:{p}/ok"),
        format!("http://0177.0.0.1:{p}/ok"),
    ];
    for url in &loopback_urls {
        for cfg in [&strict, &private_only] {
            let a = post(url, cfg).await;
            assert_eq!(
                (a.outcome, a.status),
                (Outcome::Refused, None),
                "{url}: {a:?}"
            );
            assert!(!a.outcome.is_retryable());
        }
    }
    for url in [
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/hook",
        "http://0.0.0.0/hook",
        "ftp://example.com/hook",
        "not a url",
    ] {
        let a = post(url, &strict).await;
        assert_eq!(a.outcome, Outcome::Refused, "{url}: {a:?}");
        assert!(!a.excerpt.is_empty());
    }
    assert_eq!(srv.connections.load(Ordering::SeqCst), 0);
    // Loopback allowed: the same server is reached.
    assert_eq!(
        post(&loopback_urls[0], &loopback()).await.outcome,
        Outcome::Delivered
    );
    assert_eq!(srv.connections.load(Ordering::SeqCst), 1);
}
