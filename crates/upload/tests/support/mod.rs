//! Test support: a throwaway PKI, free ports, an nginx harness and an in-process HTTP/2
//! server. Everything binds 127.0.0.1 and is stopped by pid on drop.
// Test-only helpers: a failed setup step should panic loudly.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod latency_proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_upload::{UploadClient, UploadConfig, UploadCounters};

/// A CA plus a leaf for `IP:127.0.0.1` / `localhost`, written as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kiln test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf.distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let leaf_key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&leaf_key, &ca_issuer).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&ca_pem, ca_issuer.pem()).unwrap();
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
        Self {
            cert_der: cert.der().clone(),
            key_der: leaf_key.serialize_der(),
            dir,
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// A rustls server config offering h2 and http/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// A client config trusting only this CA, with fast retries for tests.
    pub fn client_config(&self) -> UploadConfig {
        let mut cfg = UploadConfig {
            extra_ca_pem: Some(self.ca_pem.clone()),
            webpki_roots: false,
            ..UploadConfig::default()
        };
        cfg.retry.initial_backoff = Duration::from_millis(20);
        cfg.retry.max_backoff = Duration::from_secs(3);
        cfg.retry.deadline = Some(Duration::from_secs(30));
        cfg.attempt_timeout = Duration::from_secs(15);
        cfg
    }
}

/// A client with counters.
pub fn client(cfg: UploadConfig) -> (UploadClient, Arc<UploadCounters>) {
    let counters = Arc::new(UploadCounters::default());
    let c = UploadClient::with_metrics(cfg, counters.clone()).unwrap();
    (c, counters)
}

/// A free 127.0.0.1 port, never the same one twice in this process (tests run in parallel
/// and each starts its own servers).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn wait_port(port: u16, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn nginx_bin() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ] {
        if Path::new(p).exists() {
            return Some(p.into());
        }
    }
    None
}

/// nginx in the foreground (`daemon off; master_process off`) with its own prefix, config,
/// pid file and logs under a temp dir. Killed by pid on drop.
pub struct Nginx {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// Starts nginx with `servers` (server blocks, may use `{CERT}` and `{KEY}`) inside
    /// `http {}`, waiting for each of `ports`. Returns `None` (with a notice) when nginx is
    /// not installed.
    pub fn start(pki: &Pki, http_extra: &str, servers: &str, ports: &[u16]) -> Option<Self> {
        let Some(bin) = nginx_bin() else {
            eprintln!("notice: nginx not installed; skipping (apt-get install -y nginx-light)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let servers = servers
            .replace("{CERT}", &pki.cert_pem.display().to_string())
            .replace("{KEY}", &pki.key_pem.display().to_string());
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             client_body_buffer_size 1m;\n  client_max_body_size 64m;\n  {http_extra}\n{servers}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut n = Nginx { dir, child };
        for p in ports {
            assert!(
                wait_port(*p, Duration::from_secs(10)),
                "nginx did not listen on {p}; error log:\n{}",
                n.error_log()
            );
        }
        assert!(
            n.child.try_wait().unwrap().is_none(),
            "nginx exited; error log:\n{}",
            n.error_log()
        );
        Some(n)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON-answering plain-HTTP backend block for nginx to proxy to (nginx reads the whole
/// request body before proxying, so uploads really transfer their bytes).
pub fn backend_block(port: u16) -> String {
    format!(
        "server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n\
           location / {{ default_type application/json; return 200 '{{\"data\":{{\"url\":\"https://img.example/$request_length\",\"id\":\"$request_id\"}}}}'; }} }}\n"
    )
}
