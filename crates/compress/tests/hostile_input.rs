//! Inputs built to hurt: a PNG whose `iCCP` chunk inflates to hundreds of MB (peak RSS is
//! measured in a child process), truncated PNG and WebP, a broken lossless WebP, and a JPEG
//! whose ICC profile alone is larger than the byte target.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::Cursor;

use kiln_compress::{CompressError, CompressOptions, DecodeLimits, InputFormat, compress, verify};
use kiln_test_support::child::{peak_rss_kib, reported, run_test};
use kiln_test_support::png::{chunk, zlib_zeros};

fn png_of(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, (x ^ y) as u8])
    });
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// `png` with an `iCCP` chunk inflating to `icc_bytes` inserted after `IHDR`.
fn with_iccp(png: &[u8], icc_bytes: usize) -> Vec<u8> {
    let mut payload = b"bomb\0\0".to_vec();
    payload.extend_from_slice(&zlib_zeros(icc_bytes));
    let ihdr_end = 8 + 25;
    let mut out = png[..ihdr_end].to_vec();
    out.extend_from_slice(&chunk(b"iCCP", &payload));
    out.extend_from_slice(&png[ihdr_end..]);
    out
}

const BOMB_BYTES: usize = 1 + 258 * 1_040_000; // 256 MiB
const CHILD: &str = "KILN_HOSTILE_INPUT_CHILD";

/// Run in a child process (see `an_iccp_bomb_costs_little_memory`): verifies and compresses
/// the bomb, then prints the peak RSS.
#[test]
fn iccp_bomb_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let bomb = with_iccp(&png_of(64, 48), BOMB_BYTES);
    let before = peak_rss_kib();
    let info = verify(&bomb, &DecodeLimits::default()).unwrap();
    assert_eq!(
        (info.format, info.width, info.height),
        (InputFormat::Png, 64, 48)
    );
    let out = compress(
        &bomb,
        &CompressOptions {
            max_bytes: 50_000,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(out.bytes.len() <= 50_000);
    println!(
        "VmHWM_KIB {} input_bytes {} before_kib {}",
        peak_rss_kib(),
        bomb.len(),
        before
    );
}

#[test]
fn an_iccp_bomb_costs_little_memory() {
    // The stream really inflates to what it says (a smaller one, checked here in process).
    let n = 1 + 258 * 16_000;
    assert_eq!(
        icc_len_read_by_image(&zlib_zeros(n)),
        n,
        "a well-formed zlib stream"
    );
    let text = run_test("iccp_bomb_child", &[(CHILD, "1")]);
    let kib = reported(&text, "VmHWM_KIB");
    // The inflated profile would be 256 MiB; bounded, the whole process stays small.
    assert!(
        kib < 96 * 1024,
        "peak RSS {kib} KiB for one {BOMB_BYTES}-byte iCCP bomb"
    );
}

/// The length of the ICC profile the `image` crate reads from an `iCCP` holding `stream`.
fn icc_len_read_by_image(stream: &[u8]) -> usize {
    // Wrap it in a PNG iCCP and let `png` (through `image`) read it back.
    let mut payload = b"p\0\0".to_vec();
    payload.extend_from_slice(stream);
    let png = png_of(2, 2);
    let mut f = png[..33].to_vec();
    f.extend_from_slice(&chunk(b"iCCP", &payload));
    f.extend_from_slice(&png[33..]);
    use image::ImageDecoder as _;
    let mut d = image::codecs::png::PngDecoder::new(Cursor::new(&f)).unwrap();
    d.icc_profile().unwrap().map_or(0, |p| p.len())
}

#[test]
fn a_small_icc_profile_in_a_png_survives() {
    let png = with_iccp(&png_of(300, 200), 2839);
    let info = verify(&png, &DecodeLimits::default()).unwrap();
    assert_eq!((info.width, info.height), (300, 200));
    let out = compress(
        &png,
        &CompressOptions {
            max_bytes: 200_000,
            ..Default::default()
        },
    )
    .unwrap();
    let icc = jpeg_icc_len(&out.bytes);
    assert_eq!(icc, 2839, "a profile within the bound is carried over");
}

/// Total bytes in the APP2 ICC_PROFILE segments of a JPEG.
fn jpeg_icc_len(jpeg: &[u8]) -> usize {
    let mut pos = 2;
    let mut total = 0;
    while pos + 4 <= jpeg.len() && jpeg[pos] == 0xFF {
        let m = jpeg[pos + 1];
        if m == 0xDA {
            break;
        }
        let len = u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]) as usize;
        let p = &jpeg[pos + 4..pos + 2 + len];
        if m == 0xE2 && p.starts_with(b"ICC_PROFILE\0") {
            total += p.len() - 14;
        }
        pos += 2 + len;
    }
    total
}

#[test]
fn truncated_pngs_are_refused() {
    let png = png_of(256, 256);
    let limits = DecodeLimits::default();
    assert!(verify(&png, &limits).is_ok());
    for cut in [png.len() / 2, png.len() - 12, png.len() - 1, 40] {
        let err = verify(&png[..cut], &limits).unwrap_err();
        assert!(
            matches!(err, CompressError::Corrupt(_)),
            "cut at {cut}: {err:?}"
        );
        assert!(err.is_bad_input());
    }
    // A flipped byte inside IDAT is caught by the chunk CRC or the zlib stream.
    let mut bad = png.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    assert!(verify(&bad, &limits).is_err());
}

fn webp_of(w: u32, h: u32, lossless: bool) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 11) as u8, ((x * y) % 251) as u8])
    });
    let enc = webp::Encoder::from_rgb(img.as_raw(), w, h);
    if lossless {
        enc.encode_lossless().to_vec()
    } else {
        enc.encode(80.0).to_vec()
    }
}

#[test]
fn truncated_webps_are_refused() {
    let limits = DecodeLimits::default();
    for lossless in [false, true] {
        let webp = webp_of(256, 192, lossless);
        let info = verify(&webp, &limits).unwrap();
        assert_eq!(
            (info.format, info.width, info.height),
            (InputFormat::Webp, 256, 192)
        );
        for cut in [webp.len() / 2, webp.len() - 16, 40] {
            let err = verify(&webp[..cut], &limits).unwrap_err();
            assert!(
                err.is_bad_input(),
                "lossless {lossless}, cut at {cut}: {err:?}"
            );
        }
    }
}

#[test]
fn a_broken_lossless_webp_is_refused() {
    let mut webp = webp_of(128, 128, true);
    // Past the RIFF, VP8L chunk and bitstream headers, scramble the entropy-coded image.
    for b in webp[40..].iter_mut() {
        *b = 0xFF;
    }
    let err = verify(&webp, &DecodeLimits::default()).unwrap_err();
    assert!(err.is_bad_input(), "{err:?}");
}

/// A JPEG with an ICC profile of `icc` bytes (APP2 segments after SOI).
fn jpeg_with_icc(icc: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 3) as u8, ((x + y) * 5) as u8])
    });
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(90).unwrap();
    let plain = c
        .compress_to_vec(turbojpeg::Image {
            pixels: img.as_raw().as_slice(),
            width: 256,
            pitch: 256 * 3,
            height: 256,
            format: turbojpeg::PixelFormat::RGB,
        })
        .unwrap();
    let profile: Vec<u8> = (0..icc).map(|i| (i * 31 % 251) as u8).collect();
    let chunks: Vec<&[u8]> = profile.chunks(65_519).collect();
    let mut out = plain[..2].to_vec();
    for (i, c) in chunks.iter().enumerate() {
        out.extend_from_slice(&[0xFF, 0xE2]);
        out.extend_from_slice(&((c.len() + 16) as u16).to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[(i + 1) as u8, chunks.len() as u8]);
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&plain[2..]);
    out
}

#[test]
fn a_large_icc_profile_is_dropped_to_meet_a_small_byte_target() {
    let jpeg = jpeg_with_icc(200_000);
    assert_eq!(jpeg_icc_len(&jpeg), 200_000);
    let out = compress(
        &jpeg,
        &CompressOptions {
            max_bytes: 20_000,
            max_dimension: 256,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(out.bytes.len() <= 20_000);
    assert_eq!(jpeg_icc_len(&out.bytes), 0, "the profile could never fit");
    // A profile that leaves room for the picture but makes the lowest quality miss is
    // dropped too, rather than the image being shrunk.
    let at_60 = CompressOptions {
        max_bytes: 10_000_000,
        max_dimension: 256,
        min_quality: 60,
        max_quality: 60,
        passthrough: false,
        ..Default::default()
    };
    let plain = compress(&jpeg_with_icc(0), &at_60).unwrap().bytes.len();
    let max_bytes = plain + 1000;
    let jpeg = jpeg_with_icc(max_bytes / 2 - 100);
    let out = compress(
        &jpeg,
        &CompressOptions {
            max_bytes,
            min_quality: 60,
            ..at_60.clone()
        },
    )
    .unwrap();
    assert!(out.bytes.len() <= max_bytes);
    assert_eq!(jpeg_icc_len(&out.bytes), 0);
    assert_eq!((out.width, out.height), (256, 256), "not shrunk");
    // With room to spare, the profile stays.
    let out = compress(
        &jpeg_with_icc(3_000),
        &CompressOptions {
            max_bytes: 200_000,
            max_dimension: 256,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(jpeg_icc_len(&out.bytes), 3_000);
}
