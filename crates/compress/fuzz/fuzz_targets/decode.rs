//! Fuzz the decode path: any bytes must give an image within limits or a typed error, from
//! `compress` and from `verify` (which must agree that the input is readable at all).
//!
//! `cd crates/compress/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time=60`
#![no_main]

use kiln_compress::{CompressOptions, DecodeLimits, compress, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = CompressOptions {
        max_bytes: 50_000,
        max_dimension: 256,
        limits: DecodeLimits { max_side: 4096, max_pixels: 4_000_000, ..Default::default() },
        ..Default::default()
    };
    if let Ok(info) = verify(data, &opts.limits) {
        assert!(info.width > 0 && info.height > 0);
        assert!(info.width <= opts.limits.max_side && info.height <= opts.limits.max_side);
    }
    if let Ok(out) = compress(data, &opts) {
        assert!(out.bytes.len() <= opts.max_bytes);
    }
});
