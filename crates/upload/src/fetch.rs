//! Downloads of images from URLs that clients or upstreams name, with SSRF protection: the host is resolved once, every
//! address is checked (loopback, private, link-local and other non-public ranges refused
//! unless allowed), and the connection goes to a checked address, so a DNS answer that
//! changes between check and connect cannot redirect it. One HTTP/1.1 request, no
//! redirects, a time limit, a size limit and an image content type. [`post`] sends one POST
//! through the same checked connection and returns any status (webhook deliveries).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

mod ip_ranges;

use ip_ranges::{Kind, classify};

/// What downloads may reach and how much they may take.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// URLs may point at loopback addresses (127.0.0.0/8, ::1).
    pub allow_loopback: bool,
    /// URLs may point at private, link-local, CGNAT and other addresses that are not
    /// globally reachable.
    pub allow_private: bool,
    /// Time limit of the whole download.
    pub timeout: Duration,
    /// Largest body taken, bytes.
    pub max_bytes: usize,
    /// `(origin, Authorization value)`: sent only to URLs of that origin (an upstream's
    /// own file URLs), never elsewhere.
    pub auth: Option<(String, String)>,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL points at an address the policy refuses (SSRF protection).
    #[error("refused to fetch {url}: {why}")]
    Refused {
        /// The URL.
        url: String,
        /// Which address and why.
        why: String,
    },
    /// The URL is not an absolute http(s) URL.
    #[error("bad result URL {0:?}")]
    BadUrl(String),
    /// Connecting, TLS, or the HTTP exchange failed.
    #[error("fetching {url} failed: {why}")]
    Failed {
        /// The URL.
        url: String,
        /// What happened.
        why: String,
    },
    /// The answer is not a 200 image within the size limit.
    #[error("fetching {url}: {why}")]
    BadResponse {
        /// The URL.
        url: String,
        /// What was wrong.
        why: String,
    },
    /// The download took longer than the time limit.
    #[error("fetching {0} timed out")]
    Timeout(String),
}

/// Why `ip` may not be fetched under `p`, or `None` when it may: every range that is not
/// globally reachable (`ip_ranges`), loopback only with `allow_loopback`, the others only
/// with `allow_private`, unspecified, broadcast and multicast never.
fn refusal(ip: IpAddr, p: &FetchPolicy) -> Option<&'static str> {
    let (kind, name) = classify(ip)?;
    let allowed = match kind {
        Kind::Loopback => p.allow_loopback,
        Kind::Private => p.allow_private,
        Kind::Never => false,
    };
    (!allowed).then_some(name)
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Resolves `host` and checks every address; all must be allowed.
async fn resolve(
    url: &str,
    host: &str,
    port: u16,
    p: &FetchPolicy,
) -> Result<Vec<SocketAddr>, FetchError> {
    let refused = |ip: IpAddr, why: &str| FetchError::Refused {
        url: url.to_owned(),
        why: format!("{host} is {ip}, in {why}, which is not globally reachable"),
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| FetchError::Failed {
                url: url.to_owned(),
                why: format!("cannot resolve {host}: {e}"),
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(FetchError::Failed {
            url: url.to_owned(),
            why: format!("{host} has no address"),
        });
    }
    for a in &addrs {
        if let Some(why) = refusal(a.ip(), p) {
            return Err(refused(a.ip(), why));
        }
    }
    Ok(addrs)
}

/// Downloads one image under policy `p`: one HTTP/1.1 GET, no redirects, a 200 answer
/// with an `image/*` content type within `p.max_bytes`. Returns its bytes and content type.
pub async fn fetch_image(url: &str, p: &FetchPolicy) -> Result<(Bytes, String), FetchError> {
    match tokio::time::timeout(p.timeout, fetch_inner(url, p)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(url.to_owned())),
    }
}

/// The answer to a [`post`].
#[derive(Debug)]
pub struct PostResponse {
    /// The status, whatever it is (redirects are not followed: a 3xx is returned as is).
    pub status: http::StatusCode,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The start of the body: at most the policy's `max_bytes`; the rest is not read.
    pub body: Bytes,
}

/// POSTs `body` with `headers` to `url` under policy `p`, with the same protection as
/// [`fetch_image`]: http(s) only, the host resolved once and every address checked, the
/// connection made to a checked address, one HTTP/1.1 request, no redirects, `p.timeout`
/// for the whole exchange. `Host` and (unless given) `User-Agent: kiln` are set; `p.auth`
/// is sent only to its origin. Any status is returned, with at most `p.max_bytes` of the body.
pub async fn post(
    url: &str,
    headers: http::HeaderMap,
    body: Bytes,
    p: &FetchPolicy,
) -> Result<PostResponse, FetchError> {
    match tokio::time::timeout(p.timeout, post_inner(url, headers, body, p)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(url.to_owned())),
    }
}

async fn post_inner(
    url: &str,
    headers: http::HeaderMap,
    body: Bytes,
    p: &FetchPolicy,
) -> Result<PostResponse, FetchError> {
    let t = Target::parse(url)?;
    let mut req = t.request(http::Method::POST, p);
    if let Some(h) = req.headers_mut() {
        h.extend(headers);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| t.failed(e.to_string()))?;
    let resp = exchange(&t, req, p).await?;
    let (parts, mut incoming) = resp.into_parts();
    let mut buf = Vec::new();
    while buf.len() < p.max_bytes {
        let Some(frame) = incoming.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| t.failed(format!("body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            let room = p.max_bytes - buf.len();
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(PostResponse {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(buf),
    })
}

/// A parsed http(s) URL.
struct Target {
    url: String,
    https: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, FetchError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| FetchError::BadUrl(url.to_owned()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::BadUrl(url.to_owned())),
        };
        let host = uri
            .host()
            .ok_or_else(|| FetchError::BadUrl(url.to_owned()))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|x| x.as_str())
            .unwrap_or("/")
            .to_owned();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or(host.clone());
        Ok(Self {
            url: url.to_owned(),
            https,
            host,
            port,
            authority,
            path,
        })
    }

    fn failed(&self, why: String) -> FetchError {
        FetchError::Failed {
            url: self.url.clone(),
            why,
        }
    }

    /// A request to this target with `Host`, `User-Agent` and, for its own origin only,
    /// the policy's `Authorization`.
    fn request(&self, method: http::Method, p: &FetchPolicy) -> http::request::Builder {
        let origin = format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.authority
        );
        let mut req = Request::builder()
            .method(method)
            .uri(self.path.clone())
            .header(header::HOST, self.authority.clone())
            .header(header::USER_AGENT, "kiln");
        if let Some((o, value)) = &p.auth
            && *o == origin
        {
            req = req.header(header::AUTHORIZATION, value);
        }
        req
    }
}

/// Resolves and checks the target's host, connects to a checked address (TLS for https)
/// and sends `req`.
async fn exchange<B>(
    t: &Target,
    req: Request<B>,
    p: &FetchPolicy,
) -> Result<hyper::Response<hyper::body::Incoming>, FetchError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addrs = resolve(&t.url, &t.host, t.port, p).await?;
    let failed = |why: String| t.failed(why);
    let tcp = tokio::net::TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| failed(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if t.https {
        let name = rustls::pki_types::ServerName::try_from(
            t.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| failed(format!("bad TLS name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config().map_err(failed)?)
            .connect(name, tcp)
            .await
            .map_err(|e| failed(format!("TLS: {e}")))?;
        send(TokioIo::new(tls), req).await.map_err(failed)
    } else {
        send(TokioIo::new(tcp), req).await.map_err(failed)
    }
}

async fn fetch_inner(url: &str, p: &FetchPolicy) -> Result<(Bytes, String), FetchError> {
    let t = Target::parse(url)?;
    let failed = |why: String| t.failed(why);
    let req = t
        .request(http::Method::GET, p)
        .header(header::ACCEPT, "image/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let resp = exchange(&t, req, p).await?;
    let bad = |why: String| FetchError::BadResponse {
        url: url.to_owned(),
        why,
    };
    let status = resp.status();
    if status.is_redirection() {
        return Err(bad(format!(
            "answered {status}; redirects are not followed"
        )));
    }
    if status != http::StatusCode::OK {
        return Err(bad(format!("answered {status}")));
    }
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !ctype.starts_with("image/") {
        return Err(bad(format!("content type {ctype:?} is not an image")));
    }
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > p.max_bytes as u64) {
        return Err(bad(format!(
            "{} bytes exceed the limit of {}",
            declared.unwrap_or(0),
            p.max_bytes
        )));
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| failed(format!("body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > p.max_bytes {
                return Err(bad(format!(
                    "the body exceeds the limit of {} bytes",
                    p.max_bytes
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((Bytes::from(buf), ctype))
}

async fn send<I, B>(
    io: I,
    req: Request<B>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> FetchPolicy {
        FetchPolicy {
            allow_loopback: false,
            allow_private: false,
            timeout: Duration::from_secs(5),
            max_bytes: 1 << 20,
            auth: None,
        }
    }

    #[test]
    fn refuses_non_public_addresses() {
        let p = strict();
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(refusal(ip, &p).is_some(), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refusal(ip, &p), None, "{ip} is public");
        }
    }

    #[test]
    fn allowances_are_separate() {
        let p = FetchPolicy {
            allow_loopback: true,
            ..strict()
        };
        assert_eq!(refusal("127.0.0.1".parse().unwrap(), &p), None);
        assert!(refusal("10.0.0.1".parse().unwrap(), &p).is_some());
        let p = FetchPolicy {
            allow_private: true,
            ..strict()
        };
        assert!(refusal("127.0.0.1".parse().unwrap(), &p).is_some());
        assert_eq!(refusal("169.254.169.254".parse().unwrap(), &p), None);
    }

    #[tokio::test]
    async fn urls_at_refused_addresses_are_not_connected() {
        // Nothing listens there; a refusal must come before any connect attempt.
        for url in [
            "http://127.0.0.1:9/x.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.7/a.png",
            "http://[::1]:9/a.png",
            "http://localhost:9/a.png",
            "http://[::127.0.0.1]:9/a.png",
            "http://[::ffff:7f00:1]:9/a.png",
            "http://[2001::7f00:1]:9/a.png",
            "http://[64:ff9b:1::7f00:1]:9/a.png",
            "http://[64:ff9b::7f00:1]:9/a.png",
            "http://[2002:7f00:1::]:9/a.png",
            "http://[100::1]:9/a.png",
        ] {
            let e = fetch_image(url, &strict()).await.unwrap_err();
            assert!(matches!(e, FetchError::Refused { .. }), "{url}: {e}");
        }
        let e = fetch_image("ftp://example.com/a.png", &strict())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::BadUrl(_)));
    }

    /// A one-shot HTTP server on 127.0.0.1 answering `response`; returns its port and the
    /// request it received.
    async fn serve_once(response: Vec<u8>) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&response).await.unwrap();
            let _ = s.shutdown().await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (port, h)
    }

    fn loopback() -> FetchPolicy {
        FetchPolicy {
            allow_loopback: true,
            max_bytes: 16,
            ..strict()
        }
    }

    #[tokio::test]
    async fn downloads_images_within_limits_and_sends_auth_only_to_its_origin() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 4\r\n\r\nPNG!".to_vec();
        let (port, req) = serve_once(ok.clone()).await;
        let mut p = loopback();
        p.auth = Some((format!("http://127.0.0.1:{port}"), "Bearer k".into()));
        let (data, ct) = fetch_image(&format!("http://127.0.0.1:{port}/a.png"), &p)
            .await
            .unwrap();
        assert_eq!((&data[..], ct.as_str()), (&b"PNG!"[..], "image/png"));
        assert!(
            req.await
                .unwrap()
                .to_ascii_lowercase()
                .contains("authorization: bearer k")
        );
        // Another origin never gets the key.
        let (port, req) = serve_once(ok).await;
        let (data, _) = fetch_image(&format!("http://127.0.0.1:{port}/a.png"), &p)
            .await
            .unwrap();
        assert_eq!(&data[..], b"PNG!");
        assert!(
            !req.await
                .unwrap()
                .to_ascii_lowercase()
                .contains("authorization")
        );
    }

    #[tokio::test]
    async fn refuses_non_images_oversize_and_redirects() {
        let cases: [(&[u8], &str); 4] = [
            (b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 2\r\n\r\nhi", "not an image"),
            (b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 100\r\n\r\n", "exceed the limit"),
            (b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\n\r\n0123456789abcdefXYZ", "exceeds the limit"),
            (b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\n\r\n", "redirects are not followed"),
        ];
        for (resp, want) in cases {
            let (port, _req) = serve_once(resp.to_vec()).await;
            let e = fetch_image(&format!("http://127.0.0.1:{port}/x"), &loopback())
                .await
                .unwrap_err();
            assert!(matches!(e, FetchError::BadResponse { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e} should say {want:?}");
        }
    }

    #[tokio::test]
    async fn post_returns_any_status_with_a_bounded_body_and_refuses_like_fetch() {
        let resp = b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 40\r\n\r\n0123456789012345678901234567890123456789".to_vec();
        let (port, req) = serve_once(resp).await;
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", http::HeaderValue::from_static("msg_1"));
        let r = post(
            &format!("http://127.0.0.1:{port}/hook"),
            headers.clone(),
            Bytes::from_static(b"{\"a\":1}"),
            &loopback(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, http::StatusCode::FOUND);
        assert_eq!(&r.body[..], b"0123456789012345");
        // (The body's bytes are checked against a real server in kiln-webhooks' tests.)
        let req = req.await.unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.to_ascii_lowercase().contains("webhook-id: msg_1"));
        let e = post("http://10.0.0.1/hook", headers, Bytes::new(), &strict())
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Refused { .. }), "{e}");
    }
}
