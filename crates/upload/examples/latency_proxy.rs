//! A TCP proxy that adds round-trip time: every byte is delayed by RTT/2 in each direction
//! (in order, by chunk timestamps) and a new connection costs one extra RTT before its first
//! byte is forwarded, as a TCP handshake would. Loopback has no RTT and this kernel has no
//! netem; the upload benchmark puts this in front of nginx.
//!
//! ```text
//! cargo run --release --example latency_proxy -- --listen 127.0.0.1:PORT \
//!     --upstream 127.0.0.1:PORT --rtt-ms R
//! ```
//!
//! Runs until SIGINT, SIGTERM or the end of its standard input, then prints its counters as
//! one JSON line on stdout:
//! `{"connections":N,"upstream_failures":N,"bytes_up":N,"bytes_down":N,"chunks":N,"max_late_ms":F}`
//! (`max_late_ms`: the latest a chunk left after its due time, i.e. how well the machine kept
//! the model). The model and its limits are in docs/BENCHMARKS.md; the code is shared with
//! kiln-upload's tests.

// Shared with the tests, which use all of it; this binary uses part.
#[allow(unreachable_pub, dead_code)]
#[path = "../tests/support/latency_proxy.rs"]
mod latency_proxy;

use std::net::SocketAddr;
use std::time::Duration;

fn parse() -> Result<(SocketAddr, SocketAddr, Duration), String> {
    let (mut listen, mut upstream, mut rtt) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(val()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--upstream" => {
                upstream = Some(val()?.parse().map_err(|e| format!("--upstream: {e}"))?)
            }
            "--rtt-ms" => {
                let ms: f64 = val()?.parse().map_err(|e| format!("--rtt-ms: {e}"))?;
                if !(0.0..=60_000.0).contains(&ms) {
                    return Err("--rtt-ms must be between 0 and 60000".into());
                }
                rtt = Some(Duration::from_secs_f64(ms / 1000.0));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((
        listen.ok_or("--listen is required")?,
        upstream.ok_or("--upstream is required")?,
        rtt.ok_or("--rtt-ms is required")?,
    ))
}

#[tokio::main]
async fn main() {
    let (listen, upstream, rtt) = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("latency_proxy: {e}");
            std::process::exit(64);
        }
    };
    let proxy = match latency_proxy::start(listen, upstream, rtt).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("latency_proxy: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("latency_proxy: {} -> {upstream}, rtt {rtt:?}", proxy.addr);
    // Standard input is read on a plain thread; its end stops the proxy.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let stdin_closed = async {
        let _ = closed_rx.await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
        () = stdin_closed => {}
    }
    println!("{}", proxy.counters.json());
}
