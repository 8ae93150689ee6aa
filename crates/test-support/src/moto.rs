//! A moto S3 server on a free 127.0.0.1 port, stopped by pid on drop. The binary comes from
//! the venv `scripts/prepare.sh` creates (`target/.venv-s3`), or `KILN_MOTO_SERVER`.
//! Without it, tests print a notice and skip — except under `CI=true`, where they fail.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto S3 server.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Moto {
    /// Starts moto, or returns `None` (after a notice) when it is not installed; under
    /// `CI=true` a missing moto panics.
    pub fn start() -> Option<Self> {
        let bin = std::env::var_os("KILN_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/.venv-s3/bin/moto_server")
            });
        if !bin.exists() {
            assert!(
                !crate::in_ci(),
                "{} not found: CI must run the S3 tests (scripts/prepare.sh installs moto)",
                bin.display()
            );
            eprintln!(
                "notice: {} not found; skipping the S3 tests (run scripts/prepare.sh)",
                bin.display()
            );
            return None;
        }
        let port = crate::free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "moto did not start on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(moto)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
