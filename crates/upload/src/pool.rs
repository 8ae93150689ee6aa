//! Connections: TCP + TLS (ALPN h2, HTTP/1.1 fallback), handshake, and a small pool that
//! counts requests per connection so it can rotate connections before the server's
//! `keepalive_requests`, drop idle ones before the server's keep-alive timeout, and report
//! whether a request reused a connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{BodyTracker, SendBody};
use crate::classify::{SendState, classify_hyper};
use crate::error::AttemptError;
use crate::metrics::{MetricEvent, MetricsHook};
use crate::settled::{FirstRead, Settled};

/// Where connections go: scheme, host, port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Key {
    pub(crate) fn from_uri(uri: &http::Uri) -> Result<Self, AttemptError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => {
                return Err(AttemptError::Invalid(format!(
                    "unsupported URL scheme {other:?} in {uri}"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| AttemptError::Invalid(format!("no host in {uri}")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { https, host, port })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle_per_host: usize,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) max_requests: u64,
    pub(crate) pooled: bool,
}

/// One connection's bookkeeping.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) h2: bool,
    pub(crate) requests: AtomicU64,
    pub(crate) inflight: AtomicU64,
    /// Responses read to their end on this connection.
    served: AtomicU64,
    /// The server refused a stream with GOAWAY NO_ERROR while the connection was busy: it
    /// limits requests per connection (nginx `keepalive_requests`).
    limit_goaway: AtomicBool,
    broken: AtomicBool,
    last_used: Mutex<Instant>,
    pub(crate) connect_time: Duration,
    pub(crate) tls_time: Option<Duration>,
    /// When the server's first bytes arrived (`settled.rs`).
    pub(crate) settled: Arc<Settled>,
}

impl Conn {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    pub(crate) fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    /// Marks the connection unusable for new requests.
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    pub(crate) fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }
}

pub(crate) enum Sender {
    H1(http1::SendRequest<SendBody>),
    H2(http2::SendRequest<SendBody>),
}

pub(crate) struct H2Entry {
    pub(crate) conn: Arc<Conn>,
    pub(crate) tx: http2::SendRequest<SendBody>,
}

struct H1Idle {
    conn: Arc<Conn>,
    tx: http1::SendRequest<SendBody>,
}

pub(crate) struct Inner {
    tls: Arc<rustls::ClientConfig>,
    pub(crate) settings: PoolSettings,
    pub(crate) h2: Mutex<HashMap<Key, Vec<H2Entry>>>,
    h1: Mutex<HashMap<Key, Vec<H1Idle>>>,
    /// Whether a host was last seen speaking HTTP/2 (connects to such hosts are serialised
    /// so that concurrent requests share one connection instead of racing to open many).
    pub(crate) known_h2: Mutex<HashMap<Key, bool>>,
    gates: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Requests per connection a host was seen to allow before its GOAWAY; the pool then
    /// rotates connections at that count instead of meeting the GOAWAY again.
    learned_max: Mutex<HashMap<Key, u64>>,
    /// Requests in flight and background connects per host (`spare.rs`).
    pub(crate) loads: Mutex<HashMap<Key, HostLoad>>,
    /// Woken when a background connect ends (`spare.rs`).
    pub(crate) spare_done: Mutex<HashMap<Key, Arc<tokio::sync::Notify>>>,
    next_id: AtomicU64,
    pub(crate) metrics: Option<Arc<dyn MetricsHook>>,
}

/// What a host asks of the pool right now.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HostLoad {
    /// Requests holding a lease.
    pub(crate) inflight: u64,
    /// Requests waiting for a connection.
    pub(crate) waiting: u64,
    /// Connections being opened in the background.
    pub(crate) opening: u64,
    /// Running average of a background connect, from its start until the server's first
    /// bytes arrived.
    pub(crate) open_time: Option<Duration>,
    /// Running average of how long a request holds its connection.
    pub(crate) request_time: Option<Duration>,
}

/// The connection pool. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    pub(crate) inner: Arc<Inner>,
}

/// A connection lent to one request.
pub(crate) struct Lease {
    pub(crate) conn: Arc<Conn>,
    tx: Option<Sender>,
    /// Whether the connection served an earlier request.
    pub(crate) reused: bool,
    /// How long the connection had been idle when it was lent.
    idle_before: Duration,
    key: Key,
    pool: Arc<Inner>,
    /// What happened to the body, once a request was sent.
    body: Option<Arc<BodyTracker>>,
    body_len: u64,
    /// When the connection was lent.
    leased_at: Instant,
}

impl Lease {
    pub(crate) fn is_h2(&self) -> bool {
        self.conn.h2
    }

    /// Sends the request on the leased connection.
    pub(crate) async fn send(
        &mut self,
        req: http::Request<SendBody>,
    ) -> Result<http::Response<Incoming>, AttemptError> {
        self.body = Some(req.body().tracker());
        self.body_len = req.body().len();
        // `try_send_request` hands the request back when it was never written: such a
        // failure is `NotSent` whatever the error says.
        let result = match &mut self.tx {
            Some(Sender::H1(tx)) => match tx.ready().await {
                Ok(()) => tx.try_send_request(req).await.map_err(unsent),
                Err(e) => Err((e, true)),
            },
            Some(Sender::H2(tx)) => match tx.ready().await {
                Ok(()) => tx.try_send_request(req).await.map_err(unsent),
                Err(e) => Err((e, true)),
            },
            None => return Err(AttemptError::Invalid("lease already released".into())),
        };
        result.map_err(|(e, handed_back)| self.classified_error(e, "send", handed_back))
    }

    /// Turns a hyper error met while reading the response body into an attempt error.
    pub(crate) fn transport_error(&self, e: hyper::Error, what: &'static str) -> AttemptError {
        self.classified_error(e, what, false)
    }

    /// Classifies a hyper error on this connection, and stops reuse of the connection when
    /// the error was connection-wide.
    fn classified_error(
        &self,
        e: hyper::Error,
        what: &'static str,
        handed_back: bool,
    ) -> AttemptError {
        let state = SendState {
            before_response: what == "send",
            handed_back,
            body_polled: self
                .body
                .as_ref()
                .map_or(0, |b| b.polled.load(Ordering::Relaxed)),
            body_len: self.body_len,
            body_failed: self
                .body
                .as_ref()
                .is_some_and(|b| b.failed.load(Ordering::Relaxed)),
        };
        let c = classify_hyper(&e, state);
        if c.connection_broken {
            self.conn.mark_broken();
        }
        // A GOAWAY on a busy connection is a per-connection request limit; on an idle one it
        // is an idle close, which says nothing about the limit.
        if c.class == kiln_retry::Class::Refused
            && c.h2_reason == Some("NO_ERROR")
            && self.idle_before < Duration::from_millis(50)
        {
            self.conn.limit_goaway.store(true, Ordering::Relaxed);
        }
        AttemptError::Transport {
            class: c.class,
            kind: c.kind,
            h2_reason: c.h2_reason,
            what,
            source: e,
        }
    }

    /// Ends the request. `clean` says the response was read to its end, so an HTTP/1.1
    /// connection may be reused.
    pub(crate) fn release(mut self, clean: bool) {
        if clean {
            self.conn.served.fetch_add(1, Ordering::Relaxed);
        }
        let tx = self.tx.take();
        if let Some(Sender::H1(tx)) = tx {
            let s = &self.pool.settings;
            if clean
                && s.pooled
                && self.conn.usable()
                && !tx.is_closed()
                && self.conn.requests.load(Ordering::Relaxed) < self.pool.max_requests(&self.key)
                && let Ok(mut map) = self.pool.h1.lock()
            {
                let list = map.entry(self.key.clone()).or_default();
                if list.len() < s.max_idle_per_host {
                    self.conn.touch();
                    list.push(H1Idle {
                        conn: self.conn.clone(),
                        tx,
                    });
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut loads) = self.pool.loads.lock()
            && let Some(l) = loads.get_mut(&self.key)
        {
            l.inflight = l.inflight.saturating_sub(1);
            crate::spare::ewma(&mut l.request_time, self.leased_at.elapsed());
        }
        let left = self.conn.inflight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.conn.touch();
        if left == 0 && self.conn.limit_goaway.load(Ordering::Relaxed) {
            let served = self.conn.served.load(Ordering::Relaxed);
            if served >= 1
                && let Ok(mut m) = self.pool.learned_max.lock()
            {
                let e = m.entry(self.key.clone()).or_insert(u64::MAX);
                if served < *e {
                    tracing::info!(
                        host = %self.key.host,
                        requests = served,
                        "server closes connections after this many requests; rotating at it"
                    );
                    *e = served;
                }
            }
        }
    }
}

impl Inner {
    /// Requests per connection: the configured maximum, or less if the host was seen to
    /// allow fewer.
    pub(crate) fn max_requests(&self, key: &Key) -> u64 {
        let learned = self
            .learned_max
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(u64::MAX);
        self.settings.max_requests.min(learned)
    }
}

impl Pool {
    pub(crate) fn new(
        tls: Arc<rustls::ClientConfig>,
        settings: PoolSettings,
        metrics: Option<Arc<dyn MetricsHook>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                tls,
                settings,
                h2: Mutex::new(HashMap::new()),
                h1: Mutex::new(HashMap::new()),
                known_h2: Mutex::new(HashMap::new()),
                gates: Mutex::new(HashMap::new()),
                learned_max: Mutex::new(HashMap::new()),
                loads: Mutex::new(HashMap::new()),
                spare_done: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// Connections opened so far.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.inner.next_id.load(Ordering::Relaxed)
    }

    /// Lends a connection to `key`: a pooled one when allowed and available, else a new one.
    /// `fresh` forces a new connection (transparent retries, the fresh-per-request policy).
    pub(crate) async fn checkout(&self, key: &Key, fresh: bool) -> Result<Lease, AttemptError> {
        let pooled = self.inner.settings.pooled;
        if pooled {
            let taken = if fresh {
                // A warm spare is a fresh connection: a replay need not wait for a handshake.
                self.take_spare(key)
            } else {
                self.take_pooled(key)
            };
            if let Some(l) = taken {
                self.prewarm(key);
                return Ok(l);
            }
        }
        // From here on the request waits for a TCP + TLS + HTTP handshake.
        if let Some(m) = &self.inner.metrics {
            m.record(MetricEvent::HandshakeWait);
        }
        let waiting = self.waiting(key);
        if !fresh && pooled {
            let maybe_h2 = self
                .inner
                .known_h2
                .lock()
                .ok()
                .and_then(|m| m.get(key).copied())
                .unwrap_or(key.https);
            if maybe_h2 {
                let gate = self
                    .inner
                    .gates
                    .lock()
                    .map(|mut g| g.entry(key.clone()).or_default().clone())
                    .ok();
                if let Some(gate) = gate {
                    let _held = gate.lock().await;
                    let deadline = Instant::now() + self.inner.settings.connect_timeout;
                    let lease = loop {
                        if let Some(l) = self.take_pooled(key) {
                            break l;
                        }
                        // Connections already being opened for this host's demand are
                        // awaited rather than raced with one more.
                        let done = self.spare_done(key);
                        let notified = done.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        if self.opening(key) == 0
                            || tokio::time::timeout_at(deadline, notified).await.is_err()
                        {
                            break self.connect(key, true).await?;
                        }
                    };
                    // The request now holds a lease: it counts as in flight, not waiting.
                    drop(waiting);
                    self.prewarm(key);
                    return Ok(lease);
                }
            }
        }
        // A fresh connection (transparent retry) may serve later requests too, unless every
        // request must have its own.
        self.connect(key, pooled).await
    }

    pub(crate) fn lease(&self, key: &Key, conn: Arc<Conn>, tx: Sender, reused: bool) -> Lease {
        let idle_before = if conn.inflight.fetch_add(1, Ordering::Relaxed) == 0 {
            conn.idle_for()
        } else {
            Duration::ZERO
        };
        conn.touch();
        if let Ok(mut loads) = self.inner.loads.lock() {
            loads.entry(key.clone()).or_default().inflight += 1;
        }
        Lease {
            conn,
            tx: Some(tx),
            reused,
            idle_before,
            key: key.clone(),
            pool: self.inner.clone(),
            body: None,
            body_len: 0,
            leased_at: Instant::now(),
        }
    }

    fn take_pooled(&self, key: &Key) -> Option<Lease> {
        let s = &self.inner.settings;
        let max_requests = self.inner.max_requests(key);
        if let Ok(mut map) = self.inner.h2.lock()
            && let Some(list) = map.get_mut(key)
        {
            list.retain(|e| {
                let idle = e.conn.inflight.load(Ordering::Relaxed) == 0
                    && e.conn.idle_for() >= s.idle_timeout;
                e.conn.usable()
                    && !e.tx.is_closed()
                    && !idle
                    && e.conn.requests.load(Ordering::Relaxed) < max_requests
            });
            if let Some(e) = list.first() {
                let n = e.conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
                // A warm spare taking its first request has served none before.
                let lease = self.lease(key, e.conn.clone(), Sender::H2(e.tx.clone()), n > 1);
                if n >= max_requests {
                    let id = e.conn.id;
                    list.retain(|e| e.conn.id != id);
                    tracing::debug!(conn = id, requests = n, "connection rotated");
                }
                return Some(lease);
            }
        }
        if let Ok(mut map) = self.inner.h1.lock()
            && let Some(list) = map.get_mut(key)
        {
            while let Some(idle) = list.pop() {
                if idle.conn.idle_for() >= s.idle_timeout
                    || idle.tx.is_closed()
                    || !idle.conn.usable()
                {
                    continue;
                }
                idle.conn.requests.fetch_add(1, Ordering::Relaxed);
                return Some(self.lease(key, idle.conn, Sender::H1(idle.tx), true));
            }
        }
        None
    }

    async fn connect(&self, key: &Key, share: bool) -> Result<Lease, AttemptError> {
        let (conn, tx) = self.establish(key).await?;
        conn.requests.store(1, Ordering::Relaxed);
        if let (Sender::H2(h2tx), true) = (&tx, share)
            && self.inner.settings.max_requests > 1
            && let Ok(mut map) = self.inner.h2.lock()
        {
            map.entry(key.clone()).or_default().push(H2Entry {
                conn: conn.clone(),
                tx: h2tx.clone(),
            });
        }
        Ok(self.lease(key, conn, tx, false))
    }

    /// Opens a connection: TCP, TLS, HTTP handshake. It has served no request yet.
    pub(crate) async fn establish(&self, key: &Key) -> Result<(Arc<Conn>, Sender), AttemptError> {
        let s = &self.inner.settings;
        let addr = key.addr();
        let started = Instant::now();
        let tcp = match tokio::time::timeout(s.connect_timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(AttemptError::Connect { addr, source }),
            Err(_) => {
                return Err(AttemptError::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        let connect_time = started.elapsed();
        let settled = Arc::new(Settled::default());
        let (tx, h2, tls_time) = if key.https {
            let name = rustls::pki_types::ServerName::try_from(key.host.clone())
                .map_err(|e| AttemptError::Invalid(format!("bad TLS server name: {e}")))?;
            let tls_start = Instant::now();
            let left = s.connect_timeout.saturating_sub(connect_time);
            let connector = tokio_rustls::TlsConnector::from(self.inner.tls.clone());
            let stream = match tokio::time::timeout(left, connector.connect(name, tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => return Err(tls_or_connect(addr, source)),
                Err(_) => {
                    return Err(AttemptError::Connect {
                        addr,
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ),
                    });
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let tls_time = tls_start.elapsed();
            let io = TokioIo::new(FirstRead::new(stream, settled.clone()));
            (self.handshake(io, h2).await?, h2, Some(tls_time))
        } else {
            let io = TokioIo::new(FirstRead::new(tcp, settled.clone()));
            (self.handshake(io, false).await?, false, None)
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(m) = &self.inner.metrics {
            m.record(MetricEvent::ConnectionOpened { h2 });
        }
        tracing::debug!(
            conn = id,
            h2,
            connect_ms = connect_time.as_millis() as u64,
            "connected"
        );
        if let Ok(mut k) = self.inner.known_h2.lock() {
            k.insert(key.clone(), h2);
        }
        let conn = Arc::new(Conn {
            id,
            h2,
            requests: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            limit_goaway: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
            connect_time,
            tls_time,
            settled,
        });
        Ok((conn, tx))
    }

    async fn handshake<I>(&self, io: I, h2: bool) -> Result<Sender, AttemptError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let s = &self.inner.settings;
        let handshake_error = |source: hyper::Error| AttemptError::Transport {
            class: kiln_retry::Class::NotSent,
            kind: "handshake",
            h2_reason: None,
            what: "handshake",
            source,
        };
        if h2 {
            let mut b = http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            if let Some(iv) = s.keep_alive_interval {
                b.keep_alive_interval(iv)
                    .keep_alive_timeout(s.keep_alive_timeout)
                    .keep_alive_while_idle(true);
            }
            let (tx, conn) = b.handshake(io).await.map_err(handshake_error)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "h2 connection ended");
                }
            });
            Ok(Sender::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake_error)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http1 connection ended");
                }
            });
            Ok(Sender::H1(tx))
        }
    }
}

/// Splits a `TrySendError` into the error and whether the request was never written.
fn unsent(
    mut e: hyper::client::conn::TrySendError<http::Request<SendBody>>,
) -> (hyper::Error, bool) {
    let not_written = e.take_message().is_some();
    (e.into_error(), not_written)
}

/// A TLS failure is permanent; an I/O failure during the handshake (reset, EOF) is not.
fn tls_or_connect(addr: String, source: std::io::Error) -> AttemptError {
    let is_tls = source
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    if is_tls || source.kind() == std::io::ErrorKind::InvalidData {
        AttemptError::Tls { addr, source }
    } else {
        AttemptError::Connect { addr, source }
    }
}
