//! Golden tests over the shared corpus (skipped with a notice when absent).

use std::path::PathBuf;

use image::imageops;
use kiln_compress::{CompressOptions, compress};
use turbojpeg::PixelFormat;

/// `shared/corpus` beside the checkout, or `KILN_CORPUS_DIR` when set (for checkouts that
/// live elsewhere, such as a git worktree).
fn corpus() -> Option<PathBuf> {
    let p = std::env::var_os("KILN_CORPUS_DIR").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/corpus"
            ))
        },
        PathBuf::from,
    );
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("corpus not found at {}; skipping", p.display());
        None
    }
}

fn rgb_of_jpeg(bytes: &[u8]) -> image::RgbImage {
    let img = turbojpeg::decompress(bytes, PixelFormat::RGB).expect("decodes");
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels).expect("buffer")
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

#[test]
fn every_corpus_file_fits_with_right_dimensions() {
    let Some(dir) = corpus() else { return };
    let opts = CompressOptions::default();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("readable") {
        let path = entry.expect("entry").path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "jpg" | "png" | "webp") {
            continue;
        }
        let data = std::fs::read(&path).expect("read");
        let out = compress(&data, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            out.bytes.len() <= opts.max_bytes,
            "{} too large",
            path.display()
        );
        assert!(out.width.max(out.height) <= opts.max_dimension);
        let decoded = turbojpeg::read_header(&out.bytes).expect("valid JPEG");
        assert_eq!(
            (decoded.width as u32, decoded.height as u32),
            (out.width, out.height)
        );
        n += 1;
    }
    assert_eq!(n, 29);
}

/// The two EXIF-rotated files come out portrait and match an independent rotate + resize.
#[test]
fn exif_rotated_files_come_out_upright() {
    let Some(dir) = corpus() else { return };
    for (file, orientation) in [
        ("wine-portrait-orient6-3837x2560.jpg", 6),
        ("friends-dogs-orient8-3088x2056.jpg", 8),
    ] {
        let data = std::fs::read(dir.join(file)).expect("read");
        let out = compress(&data, &CompressOptions::default()).expect("compresses");
        assert!(out.height > out.width, "{file} is not portrait");
        let raw = rgb_of_jpeg(&data);
        let rotated = if orientation == 6 {
            imageops::rotate90(&raw)
        } else {
            imageops::rotate270(&raw)
        };
        let expected = imageops::resize(
            &rotated,
            out.width,
            out.height,
            imageops::FilterType::Triangle,
        );
        let got = rgb_of_jpeg(&out.bytes);
        let d = mean_abs_diff(&got, &expected);
        assert!(d < 8.0, "{file}: mean abs diff {d}");
        // The wrong turn must be clearly worse: the test can fail.
        let wrong = if orientation == 6 {
            imageops::rotate270(&raw)
        } else {
            imageops::rotate90(&raw)
        };
        let wrong = imageops::resize(
            &wrong,
            out.width,
            out.height,
            imageops::FilterType::Triangle,
        );
        assert!(
            mean_abs_diff(&got, &wrong) > d * 2.0,
            "{file}: rotation not distinguishable"
        );
    }
}

#[test]
fn cmyk_file_matches_its_rgb_twin() {
    let Some(dir) = corpus() else { return };
    let opts = CompressOptions {
        passthrough: false,
        ..Default::default()
    };
    let rgb = compress(
        &std::fs::read(dir.join("storm-1920x1280-exif.jpg")).expect("read"),
        &opts,
    )
    .expect("compresses");
    let cmyk = compress(
        &std::fs::read(dir.join("storm-cmyk-1920x1280.jpg")).expect("read"),
        &opts,
    )
    .expect("compresses");
    let d = mean_abs_diff(&rgb_of_jpeg(&rgb.bytes), &rgb_of_jpeg(&cmyk.bytes));
    assert!(d < 12.0, "mean abs diff {d}");
}

#[test]
fn grayscale_stays_grayscale() {
    let Some(dir) = corpus() else { return };
    for file in [
        "grey-architecture-2560x1600-gray.jpg",
        "camera-512x512-gray.png",
    ] {
        let data = std::fs::read(dir.join(file)).expect("read");
        let out = compress(&data, &CompressOptions::default()).expect("compresses");
        let h = turbojpeg::read_header(&out.bytes).expect("JPEG");
        assert_eq!(h.colorspace, turbojpeg::Colorspace::Gray, "{file}");
    }
}

/// Every searched file ends at the highest quality that fits: the same pipeline pinned to
/// q + 1 no longer fits at those dimensions (it has to shrink or give up), and pinned to q it
/// reproduces the output.
#[test]
fn search_ends_at_the_highest_fitting_quality_on_the_corpus() {
    let Some(dir) = corpus() else { return };
    let opts = CompressOptions {
        passthrough: false,
        ..Default::default()
    };
    let mut searched = 0;
    for file in [
        "dragonfly-tree-4224x3168.jpg",
        "evening-glow-boats-2560x1600-q70.jpg",
        "fig-bowl-2572x1740.jpg",
        "picos-mountains-3264x2448.jpg",
        "life-stream-3088x2056.jpg",
    ] {
        let data = std::fs::read(dir.join(file)).expect("read");
        let out = compress(&data, &opts).expect("compresses");
        let q = out.quality.expect("re-encoded");
        assert!(out.bytes.len() <= opts.max_bytes);
        if q == opts.max_quality {
            continue;
        }
        searched += 1;
        let pinned = |q: u8| CompressOptions {
            min_quality: q,
            max_quality: q,
            ..opts.clone()
        };
        let same = compress(&data, &pinned(q)).expect("q fits");
        assert_eq!(same.bytes, out.bytes, "{file}: q {q} not reproduced");
        match compress(&data, &pinned(q + 1)) {
            Ok(up) => assert!(
                up.width < out.width,
                "{file}: q {} fits at {}x{} too ({} bytes)",
                q + 1,
                up.width,
                up.height,
                up.bytes.len()
            ),
            Err(e) => assert!(
                matches!(e, kiln_compress::CompressError::TargetUnreachable { .. }),
                "{e:?}"
            ),
        }
    }
    assert!(searched >= 4, "only {searched} files needed a search");
}
