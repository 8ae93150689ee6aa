//! [`Files`]: the gateway's files API as a worker uses it: download a task's input files by
//! id, upload outputs (return their ids instead of bytes in the result), delete files the
//! worker created. It authenticates with the worker token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use kiln_protocol::messages::TaskError;
use serde::{Deserialize, Serialize};

use crate::config::WorkerConfig;

/// The time limit of one files API request unless set with [`Files::with_timeout`]: 60 s.
pub const DEFAULT_FILES_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a files API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// The gateway has no file with this id (or it expired).
    #[error("no file {0}")]
    NotFound(String),
    /// The gateway answered with an unexpected status; `body` is an excerpt.
    #[error("the files API answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The request did not reach the gateway, or the answer broke off.
    #[error("the files API could not be reached: {0}")]
    Transport(String),
    /// No answer within the time limit.
    #[error("the files API did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The answer is not what the files API sends.
    #[error("the files API's answer is unusable: {0}")]
    BadAnswer(String),
    /// The client cannot make the request (a URL it cannot serve, a bad id).
    #[error("the files client cannot make this request: {0}")]
    Config(String),
}

impl FilesError {
    /// Whether the same call may succeed later: transport failures, timeouts, and the
    /// statuses that mean "not now" (408, 429, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            FilesError::Transport(_) | FilesError::Timeout(_) => true,
            FilesError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }
}

impl From<FilesError> for TaskError {
    /// A missing input file is the client's mistake (`invalid_input`, not retried); the
    /// other failures are `files_api`, retried when [`FilesError::is_retryable`].
    fn from(e: FilesError) -> Self {
        match &e {
            FilesError::NotFound(_) => TaskError::fatal("invalid_input", e.to_string()),
            _ if e.is_retryable() => TaskError::retryable("files_api", e.to_string()),
            _ => TaskError::fatal("files_api", e.to_string()),
        }
    }
}

/// A file the worker uploaded, as the files API describes it; put it (or its `id`) in the
/// task's output, e.g. `{"files": [<UploadedFile>]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UploadedFile {
    /// The file id (`GET /v1/files/{id}`).
    pub id: String,
    /// The stored content type.
    pub content_type: Option<String>,
    /// Size in bytes.
    pub bytes: Option<u64>,
    /// Width in pixels, for images.
    pub width: Option<u32>,
    /// Height in pixels, for images.
    pub height: Option<u32>,
    /// SHA-256 of the content, hex.
    pub sha256: Option<String>,
}

/// What [`Files::delete`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deleted {
    /// The file was deleted.
    Deleted,
    /// There was no such file (already deleted or expired).
    AlreadyGone,
}

/// A client of the gateway's files API (`/v1/files`) for a worker's handlers. Cheap to
/// clone (one connection pool). Plain HTTP: the gateway is reached over `http://`, as the
/// worker socket over `ws://`.
///
/// ```no_run
/// use kiln_worker::{Files, TaskContext, TaskError, Worker, WorkerConfig};
///
/// let cfg = WorkerConfig::default();
/// let files = Files::new(&cfg);
/// let worker = Worker::new(cfg).handler("thumbnail", move |ctx: TaskContext| {
///     let files = files.clone();
///     async move {
///         let id = ctx.input["image"].as_str().unwrap_or_default().to_owned();
///         let original = files.download(&id).await?;
///         let out = files.upload(original.to_vec(), "image/png").await?;
///         Ok::<_, TaskError>(serde_json::json!({ "files": [out] }))
///     }
/// });
/// # drop(worker);
/// ```
#[derive(Debug, Clone)]
pub struct Files {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Ids of the files this worker uploaded, one a line.
    created: PathBuf,
    timeout: Duration,
}

impl Files {
    /// The files API of the gateway whose worker socket is `cfg.url` (`ws://host/…/v1/…`
    /// becomes `http://host/…`), with the worker token; the ids of the files it uploads
    /// are listed in `<state_dir>/owned-files`.
    pub fn new(cfg: &WorkerConfig) -> Self {
        Self::at(&base_url(&cfg.url), cfg.token.clone(), &cfg.state_dir)
    }

    /// The files API at `base` (e.g. `http://127.0.0.1:8080`), with `token`; uploads are
    /// listed under `state_dir`.
    pub fn at(base: &str, token: Option<String>, state_dir: &Path) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
            created: state_dir.join("owned-files"),
            timeout: DEFAULT_FILES_TIMEOUT,
        }
    }

    /// The time limit of each request. Default: [`DEFAULT_FILES_TIMEOUT`] (60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The base URL requests go to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The content of file `id`.
    pub async fn download(&self, id: &str) -> Result<Bytes, FilesError> {
        let path = file_path(id)?;
        let (status, body) = self
            .call(hyper::Method::GET, &path, Vec::new(), None)
            .await?;
        match status {
            200 => Ok(body),
            404 => Err(FilesError::NotFound(id.to_owned())),
            s => Err(status_error(s, &body)),
        }
    }

    /// Uploads `bytes` as a new file of `content_type` and records its id as created by
    /// this worker (see [`Files::created`]).
    pub async fn upload(
        &self,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<UploadedFile, FilesError> {
        let (status, body) = self
            .call(hyper::Method::POST, "/v1/files", bytes, Some(content_type))
            .await?;
        if status != 201 {
            return Err(status_error(status, &body));
        }
        let file: UploadedFile = serde_json::from_slice(&body)
            .map_err(|e| FilesError::BadAnswer(format!("the upload's answer: {e}")))?;
        self.remember(&file.id).await;
        Ok(file)
    }

    /// Deletes file `id`.
    pub async fn delete(&self, id: &str) -> Result<Deleted, FilesError> {
        let path = file_path(id)?;
        let (status, body) = self
            .call(hyper::Method::DELETE, &path, Vec::new(), None)
            .await?;
        match status {
            204 | 200 => Ok(Deleted::Deleted),
            404 => Ok(Deleted::AlreadyGone),
            s => Err(status_error(s, &body)),
        }
    }

    /// Whether this worker (this state directory) uploaded file `id`.
    pub async fn created(&self, id: &str) -> bool {
        tokio::fs::read_to_string(&self.created)
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l == id)
    }

    /// Adds `id` to the list of created files; a failure to write only loses the record.
    async fn remember(&self, id: &str) {
        use tokio::io::AsyncWriteExt as _;
        let opened = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.created)
            .await;
        match opened {
            Ok(mut f) => {
                if let Err(e) = f.write_all(format!("{id}\n").as_bytes()).await {
                    tracing::warn!(message = "cannot record an uploaded file", id, error = %e);
                }
            }
            Err(e) => tracing::warn!(message = "cannot record an uploaded file", id, error = %e),
        }
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> Result<(u16, Bytes), FilesError> {
        if !self.base.starts_with("http://") {
            return Err(FilesError::Config(format!(
                "{} is not an http:// URL",
                self.base
            )));
        }
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| FilesError::Config(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| FilesError::Transport(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| FilesError::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FilesError::Timeout(self.timeout))?
    }
}

/// `/v1/files/{id}`; an id that would change the path is refused.
fn file_path(id: &str) -> Result<String, FilesError> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !ok {
        return Err(FilesError::Config(format!("{id:?} is not a file id")));
    }
    Ok(format!("/v1/files/{id}"))
}

fn status_error(status: u16, body: &[u8]) -> FilesError {
    FilesError::Status {
        status,
        body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// The HTTP base of the gateway whose worker socket is `url`: the scheme made HTTP, the
/// path cut before `/v1/`.
fn base_url(url: &str) -> String {
    url.replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1)
        .split("/v1/")
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_is_the_socket_url_before_v1() {
        assert_eq!(
            base_url("ws://127.0.0.1:8080/v1/workers/connect"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("wss://h.example/kiln/v1/workers/connect"),
            "https://h.example/kiln"
        );
        let f = Files::at("http://h:1/", None, Path::new("/tmp"));
        assert_eq!(f.base(), "http://h:1");
    }

    #[test]
    fn ids_that_would_change_the_path_are_refused() {
        assert_eq!(file_path("file_ab-1").unwrap(), "/v1/files/file_ab-1");
        for bad in ["", "../tasks", "a/b", "a?b", "a b"] {
            assert!(
                matches!(file_path(bad), Err(FilesError::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_become_task_errors_by_kind() {
        let e = TaskError::from(FilesError::NotFound("f1".into()));
        assert_eq!((e.code.as_str(), e.retryable), ("invalid_input", false));
        assert!(e.message.contains("f1"));
        let e = TaskError::from(FilesError::Timeout(Duration::from_secs(2)));
        assert_eq!((e.code.as_str(), e.retryable), ("files_api", true));
        assert!(e.message.contains("2000 ms"), "{}", e.message);
        let busy = FilesError::Status {
            status: 503,
            body: String::new(),
        };
        assert!(TaskError::from(busy).retryable);
        let too_big = FilesError::Status {
            status: 413,
            body: "too large".into(),
        };
        let e = TaskError::from(too_big);
        assert_eq!((e.code.as_str(), e.retryable), ("files_api", false));
        assert!(e.message.contains("413") && e.message.contains("too large"));
    }

    #[tokio::test]
    async fn an_https_gateway_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = Files::at("https://h.example", None, dir.path());
        let e = f.download("f1").await.unwrap_err();
        assert!(
            matches!(e, FilesError::Config(_)) && !e.is_retryable(),
            "{e}"
        );
    }
}
