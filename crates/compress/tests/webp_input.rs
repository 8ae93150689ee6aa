//! WebP input: still files go through libwebp (shrunk while decoding), animated ones through
//! `image` (first frame).

use kiln_compress::{CompressOptions, compress};
use turbojpeg::PixelFormat;

/// 600 x 400 RGBA: left half opaque `left`, right half fully transparent.
fn half_transparent(left: [u8; 3]) -> Vec<u8> {
    (0..400)
        .flat_map(|_| {
            (0..600).flat_map(move |x| {
                if x < 300 {
                    [left[0], left[1], left[2], 255]
                } else {
                    [0, 0, 0, 0]
                }
            })
        })
        .collect()
}

fn pixel(jpeg: &[u8], x: usize, y: usize) -> [u8; 3] {
    let img = turbojpeg::decompress(jpeg, PixelFormat::RGB).expect("decodes");
    let i = (y * img.width + x) * 3;
    [img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]]
}

fn near(got: [u8; 3], want: [u8; 3]) -> bool {
    got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 24)
}

#[test]
fn still_webp_with_alpha_is_shrunk_and_flattened() {
    let rgba = half_transparent([200, 30, 40]);
    let webp = webp::Encoder::from_rgba(&rgba, 600, 400).encode_lossless();
    let opts = CompressOptions {
        max_dimension: 256,
        ..Default::default()
    };
    let out = compress(&webp, &opts).expect("compresses");
    // 600 / 256 gives a shrink of 2 in libwebp (300 x 200), then Lanczos3 to 256 x 171.
    assert_eq!((out.width, out.height), (256, 171));
    assert!(near(pixel(&out.bytes, 40, 85), [200, 30, 40]), "left half");
    assert!(
        near(pixel(&out.bytes, 220, 85), [255, 255, 255]),
        "right half not white"
    );
}

#[test]
fn animated_webp_uses_its_first_frame() {
    // Opaque frames: libwebp's animation encoder, as driven here, writes no alpha flag.
    let frame = |rgb: [u8; 3]| -> Vec<u8> {
        (0..600 * 400)
            .flat_map(|i| {
                if i % 600 < 300 {
                    [rgb[0], rgb[1], rgb[2], 255]
                } else {
                    [250, 250, 250, 255]
                }
            })
            .collect()
    };
    let (first, second) = (frame([20, 40, 220]), frame([20, 220, 40]));
    let config = webp::WebPConfig::new().expect("config");
    let mut enc = webp::AnimEncoder::new(600, 400, &config);
    enc.add_frame(webp::AnimFrame::from_rgba(&first, 600, 400, 0));
    enc.add_frame(webp::AnimFrame::from_rgba(&second, 600, 400, 100));
    let anim = enc.try_encode().expect("animation");
    let out = compress(&anim, &CompressOptions::default()).expect("compresses");
    assert_eq!((out.width, out.height), (600, 400));
    let p = pixel(&out.bytes, 100, 200);
    assert!(near(p, [20, 40, 220]), "not the first frame: {p:?}");
}
