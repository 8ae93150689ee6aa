//! API keys (with scopes) and worker tokens, stored as SHA-256 hashes; who may call which
//! route; per-key rate limits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

/// What an API key may do. Each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Scope {
    /// `GET`/`HEAD` of every route: tasks, events, files, workers, models.
    Read,
    /// Read, and create or cancel tasks, upload and delete files, call the images API.
    Submit,
    /// Everything, including `/v1/admin/*` and worker administration.
    Admin,
}

impl Scope {
    /// The name used in config: `read`, `submit`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Submit => "submit",
            Self::Admin => "admin",
        }
    }

    /// The scope a request needs, by method and path: reads need `read`; `/v1/admin/*` and
    /// changes under `/v1/workers/` need `admin`; every other change needs `submit`.
    pub(crate) fn needed(method: &Method, path: &str) -> Self {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            Self::Read
        } else if path.starts_with("/v1/admin/") || path.starts_with("/v1/workers/") {
            Self::Admin
        } else {
            Self::Submit
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "submit" => Ok(Self::Submit),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown scope {other:?} (expected read, submit or admin)"
            )),
        }
    }
}

/// The config entry of an API key with a scope: `<scope>:sha256:<hex>`.
pub fn hash_key(secret: &str, scope: Scope) -> String {
    format!("{scope}:{}", hash_secret(secret))
}

/// Hashes a secret for storage in config: `sha256:<hex>`.
pub fn hash_secret(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

/// A set of hashed secrets. Comparison is on hashes, so the plain secrets never live in the
/// server's memory past the request that presents them.
#[derive(Debug, Clone, Default)]
pub struct SecretSet {
    hashes: Vec<([u8; 32], Scope)>,
}

/// A configured secret hash that is not `sha256:<64 hex digits>`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a secret hash (expected sha256:<64 hex digits>): {0:?}")]
#[non_exhaustive]
pub struct BadHash(pub String);

impl SecretSet {
    /// Parses `sha256:<hex>` entries (tokens without scopes: worker and metrics tokens).
    pub fn from_hashes<I, S>(hashes: I) -> Result<Self, BadHash>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for h in hashes {
            out.push((parse_hash(h.as_ref())?, Scope::Admin));
        }
        Ok(Self { hashes: out })
    }

    /// Parses API key entries: `sha256:<hex>` (scope admin) or `<scope>:sha256:<hex>`.
    pub fn from_scoped_hashes<I, S>(hashes: I) -> Result<Self, BadHash>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for h in hashes {
            let h = h.as_ref();
            let (scope, rest) = match h.split_once(':') {
                Some((s, rest)) if s != "sha256" => {
                    (s.parse::<Scope>().map_err(|_| BadHash(h.into()))?, rest)
                }
                _ => (Scope::Admin, h),
            };
            out.push((parse_hash(rest).map_err(|_| BadHash(h.into()))?, scope));
        }
        Ok(Self { hashes: out })
    }

    /// The scope of entry `i` (admin for entries without one).
    pub fn scope(&self, i: usize) -> Scope {
        self.hashes.get(i).map_or(Scope::Read, |h| h.1)
    }

    /// Whether no secret is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The index of the matching secret, if any. Constant-time per entry.
    pub fn check(&self, secret: &str) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for (i, (h, _)) in self.hashes.iter().enumerate() {
            let mut diff = 0u8;
            for (a, b) in h.iter().zip(digest.iter()) {
                diff |= a ^ b;
            }
            if diff == 0 && found.is_none() {
                found = Some(i);
            }
        }
        found
    }
}

fn parse_hash(h: &str) -> Result<[u8; 32], BadHash> {
    let hexpart = h.strip_prefix("sha256:").ok_or_else(|| BadHash(h.into()))?;
    let mut buf = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut buf).map_err(|_| BadHash(h.into()))?;
    Ok(buf)
}

/// The bearer token of an `Authorization` header value.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Who made a request.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// An API key: its index in `api_key_hashes` and its scope.
    Client(usize, Scope),
    /// A configured worker token (its index).
    Worker(usize),
    /// A token of the binary's in-process workers (never leaves the process).
    InProcessWorker,
    /// No credentials, on a gateway that needs none for this route.
    Anonymous,
}

/// What a worker token may call: the worker socket, file upload and file download — what
/// the kiln.v1 protocol needs, nothing else.
fn worker_may(method: &Method, path: &str) -> bool {
    match path {
        "/v1/workers/connect" => *method == Method::GET,
        "/v1/files" => *method == Method::POST,
        p => {
            p.strip_prefix("/v1/files/")
                .is_some_and(|id| !id.is_empty() && !id.contains('/'))
                && matches!(*method, Method::GET | Method::HEAD)
        }
    }
}

/// The auth layer: identifies the caller, checks that it may call this route, and applies
/// the rate limit (per API key; per worker token and client address).
pub(crate) async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_owned);
    let inner = &state.inner;
    let worker_route = path == "/v1/workers/connect";
    let t = token.as_deref();
    let caller = if let Some(i) = t
        .filter(|_| !worker_route)
        .and_then(|t| inner.api_keys.check(t))
    {
        Caller::Client(i, inner.api_keys.scope(i))
    } else if let Some(i) = t.and_then(|t| inner.worker_tokens.check(t)) {
        Caller::Worker(i)
    } else if t.is_some_and(|t| inner.in_process_tokens.check(t).is_some()) {
        Caller::InProcessWorker
    } else {
        let open = if worker_route {
            inner.worker_tokens.is_empty() && inner.in_process_tokens.is_empty()
        } else {
            inner.api_keys.is_empty()
        };
        if !open {
            let what = if worker_route {
                "a worker token"
            } else {
                "an API key"
            };
            return ApiError::unauthorized(format!(
                "this route needs {what} in `Authorization: Bearer`"
            ))
            .into_response();
        }
        Caller::Anonymous
    };
    match &caller {
        Caller::Client(i, scope) => {
            let needed = Scope::needed(&method, &path);
            if *scope < needed {
                return ApiError::forbidden(format!(
                    "this API key has scope {scope}; {method} {path} needs scope {needed}"
                ))
                .into_response();
            }
            if let Err(wait) = inner.limiter.check(&format!("key:{i}")) {
                return ApiError::rate_limited(wait).into_response();
            }
        }
        Caller::Worker(i) => {
            if !worker_may(&method, &path) {
                return ApiError::forbidden(format!(
                    "a worker token may open the worker socket, upload files and download \
                     them; not {method} {path}"
                ))
                .into_response();
            }
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            if let Err(wait) = inner.worker_limiter.check(&format!("worker:{i}:{peer}")) {
                return ApiError::rate_limited(wait).into_response();
            }
        }
        // The binary's own workers also delete the files they made (the demo's
        // `delete_asset`), and are not rate limited.
        Caller::InProcessWorker => {
            let delete = method == Method::DELETE
                && path
                    .strip_prefix("/v1/files/")
                    .is_some_and(|id| !id.contains('/'));
            if !worker_may(&method, &path) && !delete {
                return ApiError::forbidden(format!("a worker token may not call {method} {path}"))
                    .into_response();
            }
        }
        Caller::Anonymous => {}
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A token bucket per key: `per_minute` requests a minute, bursts up to `burst`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub(crate) fn check(&self, key: &str) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        let (tokens, at) = map
            .entry(key.to_owned())
            .or_insert((f64::from(self.burst), now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(f64::from(self.burst));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip() {
        let set = SecretSet::from_hashes([hash_secret("a"), hash_secret("b")]).unwrap();
        assert_eq!(set.check("b"), Some(1));
        assert_eq!(set.check("c"), None);
        assert!(SecretSet::from_hashes(["plain"]).is_err());
        assert!(SecretSet::from_hashes(["sha256:zz"]).is_err());
    }

    #[test]
    fn scoped_hashes_parse() {
        let set = SecretSet::from_scoped_hashes([
            hash_secret("a"),
            hash_key("r", Scope::Read),
            hash_key("s", Scope::Submit),
        ])
        .unwrap();
        assert_eq!(set.check("a").map(|i| set.scope(i)), Some(Scope::Admin));
        assert_eq!(set.check("r").map(|i| set.scope(i)), Some(Scope::Read));
        assert_eq!(set.check("s").map(|i| set.scope(i)), Some(Scope::Submit));
        assert!(SecretSet::from_scoped_hashes([format!("root:{}", hash_secret("x"))]).is_err());
        // Worker and metrics tokens take no scope.
        assert!(SecretSet::from_hashes([hash_key("r", Scope::Read)]).is_err());
    }

    #[test]
    fn scopes_by_method_and_path() {
        assert_eq!(Scope::needed(&Method::GET, "/v1/tasks"), Scope::Read);
        assert_eq!(Scope::needed(&Method::GET, "/v1/workers"), Scope::Read);
        assert_eq!(Scope::needed(&Method::POST, "/v1/tasks"), Scope::Submit);
        assert_eq!(Scope::needed(&Method::DELETE, "/v1/files/f"), Scope::Submit);
        assert_eq!(
            Scope::needed(&Method::POST, "/v1/admin/queue/pause"),
            Scope::Admin
        );
        assert_eq!(
            Scope::needed(&Method::POST, "/v1/workers/w1/drain"),
            Scope::Admin
        );
    }

    #[test]
    fn worker_tokens_reach_only_the_protocol_routes() {
        assert!(worker_may(&Method::GET, "/v1/workers/connect"));
        assert!(worker_may(&Method::POST, "/v1/files"));
        assert!(worker_may(&Method::GET, "/v1/files/file_1"));
        assert!(!worker_may(&Method::DELETE, "/v1/files/file_1"));
        assert!(!worker_may(&Method::GET, "/v1/files"));
        assert!(!worker_may(&Method::GET, "/v1/tasks"));
        assert!(!worker_may(&Method::POST, "/v1/admin/queue/pause"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn limiter_refuses_past_the_burst() {
        let l = RateLimiter::new(60, 2);
        assert!(l.check("k").is_ok());
        assert!(l.check("k").is_ok());
        let wait = l.check("k").unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(l.check("other").is_ok());
    }
}
