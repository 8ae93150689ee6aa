//! nginx in the foreground (`daemon off; master_process off`) with its own prefix, config,
//! pid file and logs under a temp dir, killed by pid on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The nginx binary, when installed (`scripts/prepare.sh` installs it).
pub fn nginx_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    /// Its prefix: `nginx.conf`, `error.log`, temp paths, and any log the servers write.
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// Starts nginx with `http_extra` (directives) and `servers` (server blocks) inside
    /// `http {}`, and waits until each of `ports` accepts connections. In both strings
    /// `{DIR}` stands for [`Nginx::dir`]. The access log is off at the `http` level (a server
    /// block may set its own). Returns `None` (with a notice) when nginx is not installed.
    pub fn start_plain(http_extra: &str, servers: &str, ports: &[u16]) -> Option<Self> {
        let Some(bin) = nginx_bin() else {
            eprintln!("notice: nginx not installed; skipping (apt-get install -y nginx-light)");
            return None;
        };
        let dir = tempfile::tempdir().expect("nginx temp dir");
        let d = dir.path().display().to_string();
        let http_extra = http_extra.replace("{DIR}", &d);
        let servers = servers.replace("{DIR}", &d);
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             client_body_buffer_size 1m;\n  client_max_body_size 64m;\n  {http_extra}\n{servers}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
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
            .expect("start nginx");
        let mut n = Nginx { dir, child };
        for p in ports {
            assert!(
                crate::wait_port(*p, Duration::from_secs(10)),
                "nginx did not listen on {p}; error log:\n{}",
                n.error_log()
            );
        }
        assert!(
            n.child.try_wait().expect("nginx status").is_none(),
            "nginx exited; error log:\n{}",
            n.error_log()
        );
        Some(n)
    }

    /// Like [`Nginx::start_plain`], with `{CERT}` and `{KEY}` in `servers` standing for the
    /// leaf certificate and key of `pki`.
    #[cfg(feature = "tls")]
    pub fn start(pki: &crate::Pki, http_extra: &str, servers: &str, ports: &[u16]) -> Option<Self> {
        let servers = servers
            .replace("{CERT}", &pki.cert_pem.display().to_string())
            .replace("{KEY}", &pki.key_pem.display().to_string());
        Self::start_plain(http_extra, &servers, ports)
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        self.read("error.log")
    }

    /// A file under [`Nginx::dir`] (a log a server block writes), or "" when absent.
    pub fn read(&self, name: impl AsRef<Path>) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
