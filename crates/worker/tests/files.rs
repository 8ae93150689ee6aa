//! `kiln_worker::Files` against a real gateway's files API on loopback: uploads with the
//! worker token, downloads by id, the errors a handler turns into task errors.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, Scope, hash_key, hash_secret, router};
use kiln_worker::{Deleted, Files, FilesError, TaskError, WorkerConfig};

/// A 1x1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x64, 0x60, 0xf8, 0x5f,
    0x0f, 0x00, 0x02, 0x87, 0x01, 0x80, 0xeb, 0x47, 0xba, 0x92, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// A gateway on loopback with worker token `wt` and admin key `ak`; returns its worker
/// socket URL.
async fn gateway(dir: &std::path::Path) -> String {
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let config = GatewayConfig {
        files_dir: dir.join("files"),
        worker_token_hashes: vec![hash_secret("wt")],
        api_key_hashes: vec![hash_key("ak", Scope::Admin)],
        ..GatewayConfig::default()
    };
    let state = AppState::new(config, broker).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("ws://{addr}/v1/workers/connect")
}

fn files(url: &str, token: &str, state_dir: &std::path::Path) -> Files {
    Files::new(&WorkerConfig {
        url: url.to_owned(),
        token: Some(token.to_owned()),
        state_dir: state_dir.to_path_buf(),
        ..WorkerConfig::default()
    })
}

#[tokio::test]
async fn uploads_and_downloads_with_the_worker_token() {
    let dir = tempfile::tempdir().unwrap();
    let url = gateway(dir.path()).await;
    let state = dir.path().join("w");
    std::fs::create_dir_all(&state).unwrap();
    let f = files(&url, "wt", &state);
    let up = f.upload(PNG.to_vec(), "image/png").await.unwrap();
    assert!(!up.id.is_empty());
    assert_eq!(up.content_type.as_deref(), Some("image/png"));
    assert_eq!((up.width, up.height), (Some(1), Some(1)));
    assert_eq!(up.bytes, Some(PNG.len() as u64));
    assert!(f.created(&up.id).await);
    assert_eq!(&f.download(&up.id).await.unwrap()[..], PNG);

    // Another state directory did not create it; the list survives a new client.
    let other = tempfile::tempdir().unwrap();
    assert!(!files(&url, "wt", other.path()).created(&up.id).await);
    assert!(files(&url, "wt", &state).created(&up.id).await);

    // A missing input file is the client's mistake, not retried.
    let e = f.download("file_nosuchfile").await.unwrap_err();
    assert!(matches!(e, FilesError::NotFound(_)), "{e}");
    let task = TaskError::from(e);
    assert_eq!(
        (task.code.as_str(), task.retryable),
        ("invalid_input", false)
    );
}

#[tokio::test]
async fn refusals_are_final_and_an_unreachable_gateway_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let url = gateway(dir.path()).await;
    let f = files(&url, "not-the-token", dir.path());
    let e = f.upload(PNG.to_vec(), "image/png").await.unwrap_err();
    assert!(
        matches!(e, FilesError::Status { status: 401, .. }) && !e.is_retryable(),
        "{e}"
    );
    // A worker token may not delete files on this gateway.
    let f = files(&url, "wt", dir.path());
    let up = f.upload(PNG.to_vec(), "image/png").await.unwrap();
    let e = f.delete(&up.id).await.unwrap_err();
    assert!(matches!(e, FilesError::Status { status: 403, .. }), "{e}");
    // With an admin key the file is deleted, and a second delete finds it gone.
    let admin = files(&url, "ak", dir.path());
    assert_eq!(admin.delete(&up.id).await.unwrap(), Deleted::Deleted);
    assert_eq!(admin.delete(&up.id).await.unwrap(), Deleted::AlreadyGone);

    // Nothing listens on port 9.
    let down = files("ws://127.0.0.1:9/v1/workers/connect", "wt", dir.path())
        .with_timeout(Duration::from_secs(5));
    let e = down.download("file_x").await.unwrap_err();
    assert!(
        matches!(e, FilesError::Transport(_)) && e.is_retryable(),
        "{e}"
    );
    let task = TaskError::from(e);
    assert_eq!((task.code.as_str(), task.retryable), ("files_api", true));
}
