//! kiln-test-support: what kiln's test suites and examples share, so that no suite copies
//! another's. Only ever a dev-dependency (`publish = false`); no library or binary depends
//! on it. Everything binds 127.0.0.1 and every process it starts is stopped by pid on drop.
//!
//! - [`free_port`], [`wait_port`]: loopback ports.
//! - [`trace_init`]: a tracing subscriber on stderr, for child processes and examples.
//! - [`Moto`]: a moto S3 server; [`Nginx`]: nginx in the foreground with its own prefix;
//!   `Pki` (feature `tls`): a throwaway CA and a leaf certificate.
//! - The real gateway serving a broker in process is `kiln_test_support_gateway::serve`, a
//!   package apart so that only the suites that need it link the gateway.
//! - [`child`]: runs one test of the current test binary in a child process.
//! - [`png`]: raw PNG chunks and zlib bombs for hostile-input tests.
//!
//! ```
//! let port = kiln_test_support::free_port();
//! assert_ne!(port, kiln_test_support::free_port());
//! ```
// A failed setup step panics with its reason (`expect`): that is the test's report.

pub mod child;
mod moto;
mod nginx;
#[cfg(feature = "tls")]
mod pki;
pub mod png;

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use moto::Moto;
pub use nginx::{Nginx, nginx_bin};
#[cfg(feature = "tls")]
pub use pki::Pki;

/// A free 127.0.0.1 port, never the same one twice in this process (tests run in parallel
/// and each starts its own servers).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether something accepts connections on 127.0.0.1:`port` within `limit`.
pub fn wait_port(port: u16, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Installs a plain-text tracing subscriber writing to stderr with `filter` (an
/// `EnvFilter` directive such as `kiln_worker=info`). A second call in the same process
/// does nothing.
pub fn trace_init(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether this runs under CI (`CI=true`), where a missing service fails a test instead of
/// skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}
