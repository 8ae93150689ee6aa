//! Limits, corrupt input and the size bound on synthetic images.

use std::io::Cursor;

use kiln_compress::{CompressError, CompressOptions, compress};
use kiln_test_support::png::crc32;
use proptest::prelude::*;

fn png_header(w: u32, h: u32) -> Vec<u8> {
    // Signature + IHDR declaring w x h RGB 8-bit, with a valid CRC, and no pixel data.
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn jpeg_of(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    let out = compress(
        &{
            let mut png = Vec::new();
            img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
                .expect("png");
            png
        },
        &CompressOptions {
            max_bytes: 10_000_000,
            ..Default::default()
        },
    )
    .expect("compresses");
    out.bytes
}

#[test]
fn huge_declared_png_is_refused_before_allocating() {
    let err = compress(&png_header(100_000, 100_000), &CompressOptions::default()).unwrap_err();
    assert!(matches!(err, CompressError::LimitExceeded(_)), "{err:?}");
    assert!(err.is_bad_input());
}

#[test]
fn huge_declared_jpeg_is_refused_before_allocating() {
    let mut jpeg = jpeg_of(16, 16);
    // Patch the SOF0 frame header: FF C0, len(2), precision(1), height(2), width(2).
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&50_000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&50_000u16.to_be_bytes());
    let err = compress(
        &jpeg,
        &CompressOptions {
            passthrough: false,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, CompressError::LimitExceeded(_)), "{err:?}");
}

#[test]
fn truncated_and_garbage_inputs_give_typed_errors() {
    let jpeg = jpeg_of(200, 150);
    for passthrough in [true, false] {
        let opts = CompressOptions {
            passthrough,
            ..Default::default()
        };
        let err = compress(&jpeg[..jpeg.len() / 2], &opts).unwrap_err();
        assert!(err.is_bad_input(), "{err:?}");
    }
    let err = compress(b"not an image at all", &CompressOptions::default()).unwrap_err();
    assert!(matches!(err, CompressError::UnsupportedFormat), "{err:?}");
    let mut png = png_header(10, 10);
    png.extend_from_slice(b"\0\0\0\x05IDATxxxxx\0\0\0\0");
    assert!(
        compress(&png, &CompressOptions::default())
            .unwrap_err()
            .is_bad_input()
    );
}

#[test]
fn unreachable_target_is_a_typed_error_not_an_oversized_output() {
    let jpeg = jpeg_of(300, 300);
    let opts = CompressOptions {
        max_bytes: 200,
        passthrough: false,
        ..Default::default()
    };
    let err = compress(&jpeg, &opts).unwrap_err();
    assert!(
        matches!(err, CompressError::TargetUnreachable { .. }),
        "{err:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn output_never_exceeds_the_budget(
        w in 8u32..400, h in 8u32..400, seed in any::<u32>(), max_bytes in 2_000usize..60_000,
        noise in 0u32..255,
    ) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed) % (noise + 1);
            image::Rgb([(x * 3 + v) as u8, (y * 5 + v) as u8, v as u8])
        });
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).expect("png");
        let opts = CompressOptions { max_bytes, max_dimension: 256, ..Default::default() };
        match compress(&png, &opts) {
            Ok(out) => {
                prop_assert!(out.bytes.len() <= max_bytes);
                prop_assert!(out.width.max(out.height) <= 256);
            }
            Err(e) => prop_assert!(matches!(e, CompressError::TargetUnreachable { .. }), "{e:?}"),
        }
    }
}
