//! Throughput of kiln-compress over a set of files, one image per thread.
//!
//! `cargo run --release --example compress_bench -- --max-bytes 300000 --max-dim 2048 --threads 2 FILE...`
//!
//! Prints one line per file (name, in/out bytes, out WxH, quality, encodes, ms), then a
//! summary JSON object as the last line. Options that add fields to the per-file lines (the
//! summary line never changes):
//!
//! - `--stages`: time per stage (decode, resize, encode) as measured inside `compress`.
//! - `--score`: SSIMULACRA2 of the output against the resized original, computed after the
//!   timed pass. The reference is an independent path: `image` (zune-jpeg for JPEG) decodes
//!   the full-size original, applies its EXIF orientation and flattens alpha onto white, and
//!   fast_image_resize (Lanczos3) brings it to the output size. 100 is identical, about 90
//!   visually lossless, 70 high, 50 medium quality.

use std::io::Cursor;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
use image::{DynamicImage, ImageDecoder, ImageReader};
use kiln_compress::{CompressOptions, Compressed, OutputFormat, compress};
use ssimulacra2::{ColorPrimaries, Rgb, TransferCharacteristic, compute_frame_ssimulacra2};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut opts = CompressOptions::default();
    let mut threads = 1usize;
    let (mut score, mut stages) = (false, false);
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-bytes" => opts.max_bytes = args.next().ok_or("--max-bytes N")?.parse()?,
            "--max-dim" => opts.max_dimension = args.next().ok_or("--max-dim N")?.parse()?,
            "--threads" => threads = args.next().ok_or("--threads N")?.parse()?,
            "--score" => score = true,
            "--stages" => stages = true,
            _ => files.push(a),
        }
    }
    let inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| Ok((f.clone(), std::fs::read(f)?)))
        .collect::<Result<_, std::io::Error>>()?;
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, data)) = inputs.get(i) else {
                        break;
                    };
                    let t = Instant::now();
                    let r = compress(data, &opts);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if let Ok(mut v) = results.lock() {
                        v.push((i, name.clone(), data.len(), r, ms));
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut results = results.into_inner().map_err(|_| "poisoned")?;
    results.sort_by_key(|r| r.0);
    let (mut fit, mut total_in, mut total_out) = (0usize, 0usize, 0usize);
    for (i, name, len, r, ms) in &results {
        total_in += len;
        let base = std::path::Path::new(name)
            .file_name()
            .map_or(name.clone(), |n| n.to_string_lossy().into());
        match r {
            Ok(c) => {
                if c.bytes.len() <= opts.max_bytes && c.width.max(c.height) <= opts.max_dimension {
                    fit += 1;
                }
                total_out += c.bytes.len();
                let q = c.quality.map_or("pass".to_string(), |q| q.to_string());
                let mut line = format!(
                    "{base}\t{len}\t{}\t{}x{}\tq={q}\tencodes={}\t{ms:.1}ms",
                    c.bytes.len(),
                    c.width,
                    c.height,
                    c.encodes
                );
                if stages {
                    let t = c.timings;
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                    line += &format!(
                        "\tdecode={:.1}ms\tresize={:.1}ms\tencode={:.1}ms",
                        ms(t.decode),
                        ms(t.resize),
                        ms(t.encode)
                    );
                }
                if score {
                    match ssimulacra2_of(&inputs[*i].1, c) {
                        Ok(s) => line += &format!("\tssimulacra2={s:.2}"),
                        Err(e) => line += &format!("\tssimulacra2=ERROR {e}"),
                    }
                }
                println!("{line}");
            }
            Err(e) => println!("{base}\t{len}\tERROR {e}\t{ms:.1}ms"),
        }
    }
    println!(
        "{{\"images\":{},\"fit\":{fit},\"images_per_s\":{:.3},\"total_in_bytes\":{total_in},\"total_out_bytes\":{total_out}}}",
        results.len(),
        results.len() as f64 / elapsed
    );
    Ok(())
}

/// SSIMULACRA2 of `out` against `input` decoded, oriented, flattened and resized to its size.
fn ssimulacra2_of(input: &[u8], out: &Compressed) -> Result<f64, Error> {
    let reference = reference(input, out.width, out.height)?;
    let got = match out.format {
        OutputFormat::Jpeg => {
            image::load_from_memory_with_format(&out.bytes, image::ImageFormat::Jpeg)?
        }
        OutputFormat::Webp => {
            image::load_from_memory_with_format(&out.bytes, image::ImageFormat::WebP)?
        }
    }
    .into_rgb8();
    if got.dimensions() != (out.width, out.height) {
        return Err("decoded output has other dimensions".into());
    }
    let (w, h) = (out.width as usize, out.height as usize);
    let linear = |px: &[u8]| -> Result<Rgb, Error> {
        let data = px
            .chunks_exact(3)
            .map(|p| {
                [
                    p[0] as f32 / 255.0,
                    p[1] as f32 / 255.0,
                    p[2] as f32 / 255.0,
                ]
            })
            .collect();
        Ok(Rgb::new(
            data,
            w,
            h,
            TransferCharacteristic::SRGB,
            ColorPrimaries::BT709,
        )?)
    };
    Ok(compute_frame_ssimulacra2(
        linear(&reference)?,
        linear(got.as_raw())?,
    )?)
}

/// The original at full size, upright, on white, resized with Lanczos3 to `w`x`h`, as RGB.
fn reference(input: &[u8], w: u32, h: u32) -> Result<Vec<u8>, Error> {
    let mut dec = ImageReader::new(Cursor::new(input))
        .with_guessed_format()?
        .into_decoder()?;
    let orientation = dec.orientation()?;
    let mut img = DynamicImage::from_decoder(dec)?;
    img.apply_orientation(orientation);
    let rgba = img.into_rgba8();
    let (fw, fh) = rgba.dimensions();
    let rgb: Vec<u8> = rgba
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| {
            let a = p[3] as f32 / 255.0;
            let mix = |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round() as u8;
            [mix(p[0]), mix(p[1]), mix(p[2])]
        })
        .collect();
    if (fw, fh) == (w, h) {
        return Ok(rgb);
    }
    let src = Image::from_vec_u8(fw, fh, rgb, PixelType::U8x3)?;
    let mut dst = Image::new(w, h, PixelType::U8x3);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new().resize(&src, &mut dst, &opts)?;
    Ok(dst.into_vec())
}
