//! kiln-test-support-gateway: the real gateway in process. [`serve`] runs `kiln_gateway::router` for a broker on a
//! loopback listener, so worker tests talk to the same WebSocket endpoint (`kiln.v1`
//! subprotocol check, frame limits, close codes) that `kiln serve` runs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
//!
//! let queue = Arc::new(SqliteQueue::in_memory(3).unwrap());
//! let broker = Broker::with_queue(queue, BrokerConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
//! let server = kiln_test_support_gateway::serve(broker, listener);
//! // ... point a kiln_worker::Worker at `url` ...
//! server.abort(); // as if the gateway process died: every connection drops
//! # let _ = url;
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_broker::Broker;
use kiln_gateway::{AppState, GatewayConfig};
use tokio::io::DuplexStream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Serves the whole gateway API for `broker` on `listener` (default [`GatewayConfig`],
/// files under a temp dir that lives as long as the server). Aborting the returned task
/// closes the listener and cuts every connection it accepted, worker sockets included, as
/// a killed gateway process would.
pub fn serve(broker: Arc<Broker>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let dir = tempfile::tempdir().expect("gateway files dir");
        let config = GatewayConfig {
            files_dir: dir.path().join("files"),
            ..GatewayConfig::default()
        };
        let state = AppState::new(config, broker).await.expect("gateway state");
        let (tx, rx) = mpsc::channel(16);
        let app = axum::serve(Conns(rx), kiln_gateway::router(state));
        // Each TCP connection reaches the router through a pipe whose pump this task owns,
        // so that aborting it drops the connection even after a WebSocket upgrade (axum runs
        // upgraded sockets on tasks of their own).
        let mut pumps = JoinSet::new();
        let accept = async {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (mut near, far) = tokio::io::duplex(256 * 1024);
                if tx.send((far, peer)).await.is_err() {
                    break;
                }
                pumps.spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut near).await;
                });
            }
        };
        tokio::select! {
            _ = app.into_future() => {}
            () = accept => {}
        }
        drop(dir);
    })
}

/// The router's side of the accepted connections.
struct Conns(mpsc::Receiver<(DuplexStream, SocketAddr)>);

impl axum::serve::Listener for Conns {
    type Io = DuplexStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}
