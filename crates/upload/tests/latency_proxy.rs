//! The latency proxy used by the upload benchmark (`examples/latency_proxy.rs`): a ping-pong
//! through it measures the configured round-trip time, a new connection costs one more,
//! and bytes arrive complete and in order.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::latency_proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An echo server on 127.0.0.1.
async fn echo() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

fn within(measured: Duration, want: Duration, tolerance: f64) -> bool {
    let (m, w) = (measured.as_secs_f64(), want.as_secs_f64());
    (m - w).abs() <= w * tolerance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_measures_the_round_trip_time() {
    let (up, task) = echo().await;
    let rtt = Duration::from_millis(100);
    let proxy = latency_proxy::start("127.0.0.1:0".parse().unwrap(), up, rtt)
        .await
        .unwrap();
    // Three connections, each: the first exchange (which pays for the TCP handshake),
    // then ten ping-pongs. Scheduling delays on a loaded machine only ever add time, so the
    // fastest of each kind shows what the proxy itself adds; the median is printed.
    let (mut firsts, mut rounds) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let started = Instant::now();
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        s.write_all(b"p").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        firsts.push(started.elapsed());
        for i in 0..10u8 {
            let t = Instant::now();
            s.write_all(&[i]).await.unwrap();
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            rounds.push(t.elapsed());
        }
    }
    rounds.sort();
    firsts.sort();
    let (best, median) = (rounds[0], rounds[rounds.len() / 2]);
    eprintln!(
        "ping-pong through a {rtt:?} proxy: best {best:?}, median {median:?}; first exchanges \
         {firsts:?}; proxy {}",
        proxy.counters.json()
    );
    assert!(best >= rtt, "never faster than the RTT: {best:?}");
    assert!(
        within(best, rtt, 0.10),
        "ping-pong {best:?} is not within 10% of {rtt:?} ({rounds:?})"
    );
    assert!(firsts[0] >= rtt * 2, "a new connection costs one more RTT");
    assert!(
        within(firsts[0], rtt * 2, 0.10),
        "first exchange {:?} is not within 10% of two RTTs",
        firsts[0]
    );
    let c = &proxy.counters;
    assert_eq!(c.connections.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(c.bytes_up.load(std::sync::atomic::Ordering::Relaxed), 33);
    assert!(proxy.counters.json().contains("\"bytes_down\":33"));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_data_arrives_complete_and_in_order() {
    let (up, task) = echo().await;
    let rtt = Duration::from_millis(20);
    let proxy = latency_proxy::start("127.0.0.1:0".parse().unwrap(), up, rtt)
        .await
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let t = Instant::now();
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(10_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes reordered or changed");
    // The handshake RTT plus one RTT for the echo; no bandwidth limit, so 3 MB each way
    // adds only the copying.
    assert!(t.elapsed() >= rtt * 2, "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    task.abort();
}
