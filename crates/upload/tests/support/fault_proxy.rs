//! An in-process HTTP/1.1 proxy on 127.0.0.1 between an S3 client and moto that injects
//! scripted faults. A rule matches a request by method and query items (`partNumber=2`
//! matches that item exactly, a bare `uploadId` any value) and fires a given number of times:
//! answer a status with an S3 XML error body (after reading the whole request), reset the
//! connection right after reading the request head (the request is not forwarded), or
//! forward the request and hold moto's answer for a while. Everything else is forwarded
//! unchanged, `Host` included. Every request's SigV4 signature is recomputed from what
//! arrived on the wire (host, path, query, signed headers, `x-amz-date`); a mismatch is
//! answered 403 `SignatureDoesNotMatch` and counted.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What a matching request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read the whole request, then answer this status with an S3 `<Error>` document.
    Status(u16),
    /// Read the request head, then reset the TCP connection (RST); nothing is forwarded.
    Reset,
    /// Forward to moto, then hold its answer this long before sending it.
    Hold(Duration),
}

struct Rule {
    method: Method,
    query: Vec<String>,
    fault: Fault,
    left: u32,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub query: String,
    /// The fault it got, `None` when forwarded unchanged.
    pub fault: Option<Fault>,
    /// Whether its SigV4 signature matched what arrived.
    pub signature_ok: bool,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
}

pub struct FaultProxy {
    pub port: u16,
    upstream: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

/// Query items of a query string, split at `&`.
fn items(query: &str) -> Vec<&str> {
    query.split('&').filter(|s| !s.is_empty()).collect()
}

fn matches(rule: &Rule, method: &Method, query: &str) -> bool {
    let have = items(query);
    rule.method == method
        && rule.query.iter().all(|want| {
            have.iter().any(|h| {
                if want.contains('=') {
                    h == want
                } else {
                    h.split('=').next() == Some(want.as_str())
                }
            })
        })
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port, forwarding to `127.0.0.1:upstream`. Signatures are
    /// checked with the secret key `secret` in `region`.
    pub async fn start(upstream: u16, secret: &str, region: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let secret: Arc<str> = secret.into();
        let region: Arc<str> = region.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let secret = secret.clone();
                let region = region.clone();
                tokio::spawn(async move {
                    // A second handle on the socket, to set SO_LINGER 0 for a reset.
                    let std = tcp.into_std().unwrap();
                    let dup = std.try_clone().unwrap();
                    let tcp = TcpStream::from_std(std).unwrap();
                    let reset = Arc::new(Notify::new());
                    let r2 = reset.clone();
                    let svc = service_fn(move |req| {
                        handle(
                            st.clone(),
                            secret.clone(),
                            region.clone(),
                            upstream,
                            r2.clone(),
                            req,
                        )
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = reset.notified() => {
                            let s = TcpStream::from_std(dup).unwrap();
                            s.set_zero_linger().unwrap();
                            // Dropping both handles closes the socket with RST.
                        }
                    }
                });
            }
        });
        Self {
            port,
            upstream,
            state,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Gives the next `times` requests matching `method` and every item of `query` `fault`.
    pub fn fault(&self, method: Method, query: &[&str], fault: Fault, times: u32) {
        self.state.lock().unwrap().rules.push(Rule {
            method,
            query: query.iter().map(|s| (*s).to_owned()).collect(),
            fault,
            left: times,
        });
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// How many requests matching `method` and every item of `query` were seen.
    pub fn count(&self, method: Method, query: &[&str]) -> usize {
        let probe = Rule {
            method,
            query: query.iter().map(|s| (*s).to_owned()).collect(),
            fault: Fault::Status(0),
            left: 0,
        };
        self.seen()
            .iter()
            .filter(|s| matches(&probe, &s.method, &s.query))
            .count()
    }

    /// Rules that have not fired as often as scripted, as `METHOD query×left`.
    pub fn unfired(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .rules
            .iter()
            .filter(|r| r.left > 0)
            .map(|r| format!("{} {}×{}", r.method, r.query.join("&"), r.left))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Res = Response<Full<Bytes>>;

fn s3_error(status: u16) -> Res {
    let code = match status {
        500 => "InternalError",
        503 => "SlowDown",
        403 => "AccessDenied",
        400 => "InvalidArgument",
        _ => "InjectedFault",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected {status} by the test proxy</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn handle(
    state: Arc<Mutex<State>>,
    secret: Arc<str>,
    region: Arc<str>,
    upstream: u16,
    reset: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Res, Infallible> {
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_owned();
    let signature_ok = signature_matches(&req, &secret, &region);
    let fault = {
        let mut st = state.lock().unwrap();
        let fault = if signature_ok {
            st.rules
                .iter_mut()
                .find(|r| r.left > 0 && matches(r, &method, &query))
                .map(|r| {
                    r.left -= 1;
                    r.fault
                })
        } else {
            None
        };
        st.seen.push(Seen {
            method: method.clone(),
            query: query.clone(),
            fault,
            signature_ok,
        });
        fault
    };
    if !signature_ok {
        let _ = req.into_body().collect().await;
        let mut r = s3_error(403);
        *r.body_mut() = Full::new(Bytes::from_static(
            b"<Error><Code>SignatureDoesNotMatch</Code></Error>",
        ));
        return Ok(r);
    }
    match fault {
        Some(Fault::Reset) => {
            reset.notify_one();
            std::future::pending::<()>().await;
            unreachable!()
        }
        Some(Fault::Status(status)) => {
            let _ = req.into_body().collect().await;
            Ok(s3_error(status))
        }
        Some(Fault::Hold(d)) => {
            let res = forward(upstream, req).await;
            tokio::time::sleep(d).await;
            Ok(res)
        }
        None => Ok(forward(upstream, req).await),
    }
}

async fn forward(upstream: u16, req: Request<Incoming>) -> Res {
    let tcp = TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send.send_request(req).await.unwrap();
    let (head, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(head, Full::new(body))
}

/// Whether the request's `Authorization` signature is what SigV4 gives for the request as it
/// arrived: `Host` header, path, query, the signed headers and `x-amz-date`.
fn signature_matches<B>(req: &Request<B>, secret: &str, region: &str) -> bool {
    verify(req.method(), req.uri(), req.headers(), secret, region).is_ok()
}

/// Recomputes a request's SigV4 signature; `Err` says why it does not match.
pub fn verify(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    secret: &str,
    region: &str,
) -> Result<(), String> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(format!("no {name}"))
    };
    let auth = h("authorization")?;
    let field = |key: &str| {
        auth.split([' ', ','])
            .find_map(|p| p.strip_prefix(key))
            .ok_or(format!("no {key} in {auth}"))
    };
    let credential = field("Credential=")?;
    let signed = field("SignedHeaders=")?;
    let signature = field("Signature=")?;
    let access_key = credential.split('/').next().unwrap_or("");
    let time = parse_amz_date(h("x-amz-date")?)?;
    let host = h("host")?;
    let url = format!(
        "http://{host}{}",
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let added_by_signer = ["x-amz-date", "x-amz-content-sha256", "x-amz-security-token"];
    let mut pairs = Vec::new();
    for name in signed.split(';') {
        if added_by_signer.contains(&name) {
            continue;
        }
        pairs.push((name, h(name)?));
    }
    let identity = Credentials::new(access_key, secret, None, None, "fault-proxy").into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        method.as_str(),
        url.as_str(),
        pairs.into_iter(),
        SignableBody::UnsignedPayload,
    )
    .map_err(|e| e.to_string())?;
    let (_, expected) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    if expected == signature {
        Ok(())
    } else {
        Err(format!(
            "signature {signature}, expected {expected} for {url}"
        ))
    }
}

/// `20261202T021500Z` as a time.
fn parse_amz_date(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("bad x-amz-date {s}");
    if s.len() != 16 || !s.ends_with('Z') || s.as_bytes()[8] != b'T' {
        return Err(bad());
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().map_err(|_| bad());
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).map_err(|_| bad())?))
}

/// An unsigned request straight to moto (which does not check signatures), for listing
/// in-progress multipart uploads and the like. Returns status and body.
pub async fn raw(port: u16, method: Method, path_and_query: &str) -> (u16, String) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
