//! Helpers shared by the gateway's integration tests.
#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

/// A PNG of noise (incompressible, about `3 * w * h` bytes); `seed` picks the noise.
pub fn noise_png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for c in &mut px {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *c = x as u8;
        }
        image::Rgb(px)
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// A gateway state over an in-memory queue with files in `dir`, accepting tasks of any
/// type; `tweak` changes the config first.
pub async fn state(
    dir: &tempfile::TempDir,
    tweak: impl FnOnce(&mut kiln_gateway::GatewayConfig),
) -> kiln_gateway::AppState {
    let queue = std::sync::Arc::new(kiln_broker::SqliteQueue::in_memory(3).unwrap());
    let broker = kiln_broker::Broker::with_queue(queue, kiln_broker::BrokerConfig::default());
    let mut config = kiln_gateway::GatewayConfig {
        files_dir: dir.path().join("files"),
        queue_unknown_task_types: true,
        ..kiln_gateway::GatewayConfig::default()
    };
    tweak(&mut config);
    kiln_gateway::AppState::new(config, broker).await.unwrap()
}
