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
