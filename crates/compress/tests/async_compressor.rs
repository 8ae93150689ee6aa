//! The async helper keeps the runtime responsive and caches results.
#![cfg(feature = "tokio")]

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln_compress::{CompressOptions, Compressor, CompressorConfig};

fn big_png() -> Arc<[u8]> {
    let img = image::RgbImage::from_fn(3000, 2000, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
    });
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    png.into()
}

#[tokio::test(flavor = "current_thread")]
async fn ticking_task_keeps_ticking_while_eight_images_compress() {
    let compressor = Compressor::new(CompressorConfig::default());
    let png = big_png();
    let ticks = Arc::new(AtomicU32::new(0));
    let t = ticks.clone();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            t.fetch_add(1, Ordering::Relaxed);
        }
    });
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            let c = compressor.clone();
            let png = png.clone();
            // Distinct options so the cache does not collapse the jobs.
            let opts = CompressOptions {
                max_bytes: 200_000 + i,
                ..Default::default()
            };
            tokio::spawn(async move { c.compress(png, opts).await })
        })
        .collect();
    let before = ticks.load(Ordering::Relaxed);
    for j in jobs {
        let out = j.await.expect("joined").expect("compressed");
        assert!(out.bytes.len() <= 200_007);
    }
    let after = ticks.load(Ordering::Relaxed);
    ticker.abort();
    // On a single-threaded runtime, a blocking compress would starve the ticker completely.
    assert!(after - before >= 3, "ticker starved: {before} -> {after}");
}

#[tokio::test]
async fn identical_requests_hit_the_cache() {
    let compressor = Compressor::new(CompressorConfig {
        max_concurrent: 1,
        cache_bytes: 1 << 20,
    });
    let png = big_png();
    let a = compressor
        .compress(png.clone(), CompressOptions::default())
        .await
        .expect("ok");
    let b = compressor
        .compress(png, CompressOptions::default())
        .await
        .expect("ok");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(compressor.cached_bytes(), a.bytes.len());
}

#[tokio::test]
async fn concurrent_identical_requests_share_one_compression() {
    // No cache: only single flight can make the two results the same allocation.
    let compressor = Compressor::new(CompressorConfig {
        max_concurrent: 2,
        cache_bytes: 0,
    });
    let png = big_png();
    let opts = CompressOptions::default();
    let (a, b) = tokio::join!(
        compressor.compress(png.clone(), opts.clone()),
        compressor.compress(png.clone(), opts.clone())
    );
    let (a, b) = (a.expect("ok"), b.expect("ok"));
    assert!(Arc::ptr_eq(&a, &b), "the second request compressed again");
    // Control: one after the other, with no cache, they are compressed twice.
    let c = compressor.compress(png, opts).await.expect("ok");
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(a.bytes, c.bytes);
    assert_eq!(compressor.cached_bytes(), 0);
}

#[tokio::test]
async fn concurrent_identical_bad_requests_share_the_error() {
    let compressor = Compressor::new(CompressorConfig::default());
    let junk: Arc<[u8]> = Arc::from(&b"not an image"[..]);
    let (a, b) = tokio::join!(
        compressor.compress(junk.clone(), CompressOptions::default()),
        compressor.compress(junk, CompressOptions::default())
    );
    assert!(a.expect_err("junk").is_bad_input());
    assert!(b.expect_err("junk").is_bad_input());
}

#[tokio::test]
async fn a_follower_survives_its_leader_being_dropped_before_it_starts() {
    let compressor = Compressor::new(CompressorConfig {
        max_concurrent: 1,
        cache_bytes: 1 << 20,
    });
    let png = big_png();
    // Hold the only permit with a different job (a 6 MP PNG: far longer than the 15 ms of
    // sleeps below, so the leader is still waiting for the permit when it is dropped).
    let busy = {
        let (c, png) = (compressor.clone(), png.clone());
        let opts = CompressOptions {
            max_bytes: 123_456,
            ..Default::default()
        };
        tokio::spawn(async move { c.compress(png, opts).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let leader = {
        let (c, png) = (compressor.clone(), png.clone());
        tokio::spawn(async move { c.compress(png, CompressOptions::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let follower = {
        let (c, png) = (compressor.clone(), png.clone());
        tokio::spawn(async move { c.compress(png, CompressOptions::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    leader.abort();
    assert!(leader.await.expect_err("aborted").is_cancelled());
    let out = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("follower finished")
        .expect("joined")
        .expect("compressed");
    assert!(out.bytes.len() <= CompressOptions::default().max_bytes);
    busy.await.expect("joined").expect("compressed");
}
