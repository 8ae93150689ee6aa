//! The test gateway shared by the worker SDK's integration tests.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
#![allow(clippy::result_large_err)] // the callback signature is tungstenite's

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use kiln_broker::Broker;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::{self, handshake::server};

/// A minimal gateway: accepts kiln.v1 WebSockets on `listener` and hands them to the broker.
pub(crate) fn serve(broker: Arc<Broker>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let broker = broker.clone();
            conns.spawn(async move {
                let cb = |_req: &server::Request, mut resp: server::Response| {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", "kiln.v1".parse().unwrap());
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                let (mut tx, rx) = ws.split();
                let frames = Box::pin(rx.filter_map(|m| async move {
                    match m {
                        Ok(tungstenite::Message::Text(t)) => {
                            Some(Ok::<_, tungstenite::Error>(t.to_string()))
                        }
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    }
                }));
                let end = {
                    let mut sink = Box::pin((&mut tx).with(|s: String| async move {
                        Ok::<_, tungstenite::Error>(tungstenite::Message::Text(s.into()))
                    }));
                    broker.serve_session(frames, &mut sink).await
                };
                // The close code and reason, as the gateway sends them.
                let frame = tungstenite::protocol::CloseFrame {
                    code: end.code.into(),
                    reason: end.reason.into(),
                };
                let _ = tx.send(tungstenite::Message::Close(Some(frame))).await;
                let _ = tx.close().await;
            });
        }
    })
}
