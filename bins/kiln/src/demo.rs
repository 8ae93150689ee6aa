//! The demo generator behind the reference worker. It is NOT a model: `txt2img` paints a
//! deterministic procedural picture from a hash of the prompt and seed, and `img2img`
//! applies real image transforms chosen by words in the prompt. It exists so the whole
//! pipeline (queue, dispatch, progress, files) runs with nothing installed. The worker's
//! handlers (`txt2img`, `img2img`, `delete_asset`) read and store files with
//! [`kiln_worker::Files`].

use std::time::Instant;

use image::{DynamicImage, GenericImageView, ImageBuffer, Rgb, RgbImage, imageops};
use kiln_worker::{Deleted, Files, TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};

/// Largest side the demo generator paints.
pub(crate) const MAX_SIDE: u32 = 2048;

/// FNV-1a, so pictures are the same on every platform and release.
fn fnv(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Paints a `width` x `height` picture determined by `prompt` and `seed`, calling
/// `progress(step, total)` after each band of rows.
pub(crate) fn txt2img(
    prompt: &str,
    seed: u64,
    width: u32,
    height: u32,
    mut progress: impl FnMut(u32, u32),
) -> RgbImage {
    let (w, h) = (width.clamp(1, MAX_SIDE), height.clamp(1, MAX_SIDE));
    let k = fnv(prompt.as_bytes(), seed);
    let byte = |i: u32| ((k >> ((i % 8) * 8)) & 0xff) as f32 / 255.0;
    let (fx, fy) = (2.0 + byte(0) * 10.0, 2.0 + byte(1) * 10.0);
    let phase = byte(2) * std::f32::consts::TAU;
    let base = [byte(3), byte(4), byte(5)];
    let accent = [1.0 - byte(6), byte(7), 1.0 - byte(3)];
    let (cx, cy, r) = (
        byte(1) * w as f32,
        byte(6) * h as f32,
        (0.15 + byte(4) * 0.3) * w.min(h) as f32,
    );
    let mut img: RgbImage = ImageBuffer::new(w, h);
    let bands = 8u32;
    let band_rows = h.div_ceil(bands);
    for band in 0..bands {
        let y0 = band * band_rows;
        for y in y0..(y0 + band_rows).min(h) {
            for x in 0..w {
                let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
                let wave =
                    ((u * fx + phase).sin() + (v * fy - phase).cos() + ((u + v) * fx * 0.5).sin())
                        / 3.0;
                let t = 0.5 + 0.5 * wave;
                let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                let ring = if (d - r).abs() < r * 0.08 { 1.0 } else { 0.0 };
                let mut px = [0u8; 3];
                for c in 0..3 {
                    let val = base[c] * (1.0 - t) + accent[c] * t;
                    let val = val * (1.0 - ring) + (1.0 - base[c]) * ring;
                    px[c] = (val.clamp(0.0, 1.0) * 255.0) as u8;
                }
                img.put_pixel(x, y, Rgb(px));
            }
        }
        progress(band + 1, bands);
    }
    img
}

/// The transforms `img2img` knows, in the order it applies them.
pub(crate) const TRANSFORMS: &[&str] = &[
    "resize",
    "grayscale",
    "sepia",
    "invert",
    "blur",
    "sharpen",
    "posterize",
    "edges",
    "flip",
    "mirror",
];

/// Applies every transform named in `prompt` (see [`TRANSFORMS`]); with none named, a
/// sepia tone. `resize` shrinks to `max_side`.
pub(crate) fn img2img(
    input: DynamicImage,
    prompt: &str,
    max_side: u32,
) -> (DynamicImage, Vec<&'static str>) {
    let p = prompt.to_ascii_lowercase();
    let mut applied: Vec<&'static str> = TRANSFORMS
        .iter()
        .copied()
        .filter(|t| p.contains(t))
        .collect();
    if applied.is_empty() {
        applied.push("sepia");
    }
    let mut img = input;
    for t in &applied {
        img = match *t {
            "resize" => img.resize(max_side, max_side, imageops::FilterType::Lanczos3),
            "grayscale" => DynamicImage::ImageLuma8(img.to_luma8()),
            "sepia" => DynamicImage::ImageRgb8(sepia(&img.to_rgb8())),
            "invert" => {
                let mut i = img;
                i.invert();
                i
            }
            "blur" => img.blur(3.0),
            "sharpen" => img.unsharpen(2.0, 4),
            "posterize" => DynamicImage::ImageRgb8(posterize(&img.to_rgb8(), 4)),
            "edges" => img.filter3x3(&[-1.0, -1.0, -1.0, -1.0, 8.0, -1.0, -1.0, -1.0, -1.0]),
            "flip" => img.flipv(),
            "mirror" => img.fliph(),
            _ => img,
        };
    }
    let (w, h) = img.dimensions();
    if w.max(h) > MAX_SIDE {
        img = img.resize(MAX_SIDE, MAX_SIDE, imageops::FilterType::Lanczos3);
    }
    (img, applied)
}

/// An edit of one or more reference images: several references are placed side by side
/// (scaled to the height of the first), then [`img2img`] applies the prompt's transforms;
/// `size` resizes the result to exactly that size, and `n` variants are made (variant `i`
/// has its hue turned by `i * 37` degrees).
pub(crate) fn edit(
    refs: Vec<DynamicImage>,
    prompt: &str,
    max_side: u32,
    size: Option<(u32, u32)>,
    n: u32,
) -> (Vec<DynamicImage>, Vec<&'static str>) {
    let mut refs = refs.into_iter();
    let Some(first) = refs.next() else {
        return (Vec::new(), Vec::new());
    };
    let rest: Vec<DynamicImage> = refs.collect();
    let base = if rest.is_empty() {
        first
    } else {
        let h = first.height().clamp(1, MAX_SIDE);
        let scaled: Vec<RgbImage> = std::iter::once(first)
            .chain(rest)
            .map(|img| {
                let w = (u64::from(img.width()) * u64::from(h) / u64::from(img.height().max(1)))
                    .clamp(1, u64::from(MAX_SIDE)) as u32;
                img.resize_exact(w, h, imageops::FilterType::Triangle)
                    .to_rgb8()
            })
            .collect();
        let total_w: u32 = scaled.iter().map(|i| i.width()).sum();
        let mut canvas: RgbImage = ImageBuffer::new(total_w.max(1), h);
        let mut x = 0i64;
        for img in &scaled {
            imageops::overlay(&mut canvas, img, x, 0);
            x += i64::from(img.width());
        }
        DynamicImage::ImageRgb8(canvas)
    };
    let (mut out, applied) = img2img(base, prompt, max_side);
    if let Some((w, h)) = size {
        out = out.resize_exact(
            w.clamp(1, MAX_SIDE),
            h.clamp(1, MAX_SIDE),
            imageops::FilterType::Lanczos3,
        );
    }
    let variants = (0..n.max(1))
        .map(|i| {
            if i == 0 {
                out.clone()
            } else {
                out.huerotate(i as i32 * 37)
            }
        })
        .collect();
    (variants, applied)
}

fn sepia(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0.map(f32::from);
        let tr = 0.393 * r + 0.769 * g + 0.189 * b;
        let tg = 0.349 * r + 0.686 * g + 0.168 * b;
        let tb = 0.272 * r + 0.534 * g + 0.131 * b;
        p.0 = [
            tr.min(255.0) as u8,
            tg.min(255.0) as u8,
            tb.min(255.0) as u8,
        ];
    }
    out
}

fn posterize(img: &RgbImage, levels: u8) -> RgbImage {
    let step = 255 / (levels.max(2) - 1);
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in &mut p.0 {
            *c = ((u16::from(*c) + u16::from(step) / 2) / u16::from(step) * u16::from(step))
                .min(255) as u8;
        }
    }
    out
}

/// Longest side of a preview.
const PREVIEW_SIDE: u32 = 256;
/// Largest preview sent inline (the protocol's limit).
const PREVIEW_BYTES: usize = kiln_protocol::messages::MAX_PREVIEW_BYTES;

/// `count` (at most 3) previews of `img`, coarse to fine: mosaics of ever smaller blocks,
/// at most 256 pixels on the long side, each a PNG (or a JPEG, when the PNG would be over
/// the protocol's inline limit) with its MIME type.
pub(crate) fn previews(img: &DynamicImage, count: u32) -> Vec<(Vec<u8>, &'static str)> {
    let blocks: &[u32] = match count {
        0 => &[],
        1 => &[8],
        2 => &[32, 4],
        _ => &[32, 8, 2],
    };
    let small = img.resize(PREVIEW_SIDE, PREVIEW_SIDE, imageops::FilterType::Triangle);
    let (w, h) = small.dimensions();
    blocks
        .iter()
        .filter_map(|b| {
            let coarse = small
                .resize_exact(
                    (w / b).max(1),
                    (h / b).max(1),
                    imageops::FilterType::Triangle,
                )
                .resize_exact(w, h, imageops::FilterType::Nearest);
            let rgb = DynamicImage::ImageRgb8(coarse.to_rgb8());
            let mut png = std::io::Cursor::new(Vec::new());
            rgb.write_to(&mut png, image::ImageFormat::Png).ok()?;
            let png = png.into_inner();
            if png.len() <= PREVIEW_BYTES {
                return Some((png, "image/png"));
            }
            let mut jpeg = std::io::Cursor::new(Vec::new());
            rgb.write_to(&mut jpeg, image::ImageFormat::Jpeg).ok()?;
            let jpeg = jpeg.into_inner();
            (jpeg.len() <= PREVIEW_BYTES).then_some((jpeg, "image/jpeg"))
        })
        .collect()
}

/// Sends coarse-to-fine previews of `img`: `input.partial_images` of them (0 to 3),
/// default 2.
fn send_previews(ctx: &TaskContext, img: &DynamicImage) {
    let count = ctx.input["partial_images"].as_u64().unwrap_or(2).min(3) as u32;
    for (bytes, mime) in previews(img, count) {
        if let Err(e) = ctx.preview(&bytes, mime) {
            tracing::warn!(message = "preview not sent", error = %e);
        }
    }
}

/// Task types of the demo worker.
pub(crate) const TASK_TYPES: &[&str] = &["txt2img", "img2img", "delete_asset"];

/// The demo worker for `cfg`: `txt2img`, `img2img` and `delete_asset`, its files read and
/// written through the gateway's files API ([`Files`]).
pub(crate) fn worker(cfg: WorkerConfig) -> Worker {
    let files = Files::new(&cfg);
    let (f1, f2, f3) = (files.clone(), files.clone(), files);
    Worker::new(cfg)
        .handler("txt2img", move |ctx| run_txt2img(f1.clone(), ctx))
        .handler("img2img", move |ctx| run_img2img(f2.clone(), ctx))
        .handler("delete_asset", move |ctx| run_delete_asset(f3.clone(), ctx))
}

fn bad_input(msg: impl Into<String>) -> TaskError {
    TaskError::fatal("invalid_input", msg)
}

/// A blocking step that did not finish (it panicked): retried, another attempt may pass.
fn crashed(e: tokio::task::JoinError) -> TaskError {
    TaskError::retryable("worker_crashed", e.to_string())
}

fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, TaskError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| TaskError::fatal("encode", e.to_string()))?;
    Ok(out.into_inner())
}

fn dim(v: &Value, key: &str, default: u32) -> Result<u32, TaskError> {
    match &v[key] {
        Value::Null => Ok(default),
        x => x
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_SIDE)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| bad_input(format!("{key} must be an integer from 1 to {MAX_SIDE}"))),
    }
}

/// `n` of an input: how many images to make (1 to 10).
fn count(v: &Value) -> Result<u32, TaskError> {
    match &v["n"] {
        Value::Null => Ok(1),
        x => x
            .as_u64()
            .filter(|n| (1..=10).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| bad_input("n must be an integer from 1 to 10")),
    }
}

async fn run_txt2img(files: Files, ctx: TaskContext) -> Result<Value, TaskError> {
    let input = ctx.input.clone();
    let prompt = input["prompt"]
        .as_str()
        .ok_or_else(|| bad_input("input.prompt (string) is required"))?
        .to_owned();
    let (w, h) = (dim(&input, "width", 512)?, dim(&input, "height", 512)?);
    let seed = input["seed"].as_u64().unwrap_or(0);
    let n = count(&input)?;
    let mut out = Vec::new();
    for i in 0..n {
        let c = ctx.clone();
        let p = prompt.clone();
        let png = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let img = txt2img(&p, seed + u64::from(i), w, h, |step, total| {
                c.progress("render", u64::from(i * total + step), u64::from(n * total))
            });
            c.record_stage("render", started.elapsed());
            let img = DynamicImage::ImageRgb8(img);
            if i == 0 {
                send_previews(&c, &img);
            }
            let started = Instant::now();
            let png = encode_png(&img);
            c.record_stage("encode", started.elapsed());
            png
        })
        .await
        .map_err(crashed)??;
        if ctx.is_cancelled() {
            return Err(TaskError::fatal("canceled", "canceled"));
        }
        out.push(ctx.timed("upload", files.upload(png, "image/png")).await?);
    }
    Ok(json!({"files": out, "seed": seed, "generator": "kiln demo (procedural, not a model)"}))
}

/// The reference file ids of an img2img input: `images` (several) or `image` (one).
fn reference_ids(input: &Value) -> Result<Vec<String>, TaskError> {
    let ids: Vec<String> = match input["images"].as_array() {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        None => input["image"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
    };
    if ids.is_empty() || ids.len() > 16 {
        return Err(bad_input(
            "input.image (a file id) or input.images (1 to 16 file ids) is required",
        ));
    }
    Ok(ids)
}

fn decode(data: &[u8]) -> Result<DynamicImage, TaskError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| bad_input(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| bad_input(format!("cannot decode the input image: {e}")))
}

/// The blocking part of img2img: decode the references, edit, encode. Returns the PNGs
/// and the transforms applied.
fn edit_blocking(
    c: &TaskContext,
    data: &[bytes::Bytes],
    prompt: &str,
    max_side: u32,
    size: Option<(u32, u32)>,
    n: u32,
) -> Result<(Vec<Vec<u8>>, Vec<&'static str>), TaskError> {
    let started = Instant::now();
    let refs = data
        .iter()
        .map(|d| decode(d))
        .collect::<Result<Vec<_>, _>>()?;
    c.record_stage("decode", started.elapsed());
    let started = Instant::now();
    let (outs, applied) = edit(refs, prompt, max_side, size, n);
    c.record_stage("render", started.elapsed());
    if let Some(first) = outs.first() {
        send_previews(c, first);
    }
    let started = Instant::now();
    let pngs = outs.iter().map(encode_png).collect::<Result<Vec<_>, _>>()?;
    c.record_stage("encode", started.elapsed());
    Ok((pngs, applied))
}

async fn run_img2img(files: Files, ctx: TaskContext) -> Result<Value, TaskError> {
    let input = ctx.input.clone();
    let ids = reference_ids(&input)?;
    let prompt = input["prompt"].as_str().unwrap_or("").to_owned();
    let max_side = dim(&input, "max_side", 1024)?;
    let size = match (&input["width"], &input["height"]) {
        (Value::Null, Value::Null) => None,
        _ => Some((dim(&input, "width", 512)?, dim(&input, "height", 512)?)),
    };
    let n = count(&input)?;
    let total = ids.len() as u64 + u64::from(n) + 1;
    let mut data = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        ctx.progress("download", i as u64, total);
        data.push(ctx.timed("download", files.download(id)).await?);
    }
    ctx.progress("transform", ids.len() as u64, total);
    let c = ctx.clone();
    let (pngs, applied) =
        tokio::task::spawn_blocking(move || edit_blocking(&c, &data, &prompt, max_side, size, n))
            .await
            .map_err(crashed)??;
    let mut out = Vec::new();
    for (i, png) in pngs.into_iter().enumerate() {
        ctx.progress("upload", ids.len() as u64 + 1 + i as u64, total);
        out.push(ctx.timed("upload", files.upload(png, "image/png")).await?);
    }
    Ok(json!({"files": out, "transforms": applied, "references": ids.len()}))
}

async fn run_delete_asset(files: Files, ctx: TaskContext) -> Result<Value, TaskError> {
    let id = ctx.input["file_id"]
        .as_str()
        .ok_or_else(|| bad_input("input.file_id is required"))?
        .to_owned();
    if !files.created(&id).await {
        return Err(TaskError::fatal(
            "not_owner",
            format!("this worker did not create {id}"),
        ));
    }
    match files.delete(&id).await? {
        Deleted::AlreadyGone => Ok(json!({"deleted": id, "already_gone": true})),
        _ => Ok(json!({"deleted": id})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_go_from_coarse_to_fine_within_the_inline_limit() {
        let img = DynamicImage::ImageRgb8(txt2img("a lighthouse", 3, 1024, 768, |_, _| {}));
        let ps = previews(&img, 3);
        assert_eq!(ps.len(), 3);
        let decoded: Vec<_> = ps
            .iter()
            .map(|(b, _)| image::load_from_memory(b).unwrap().to_rgb8())
            .collect();
        assert!(ps.iter().all(|(b, _)| b.len() <= PREVIEW_BYTES));
        assert!(decoded.iter().all(|d| d.dimensions() == (256, 192)));
        // Coarser previews have fewer distinct colours.
        let colours = |i: &RgbImage| {
            i.pixels()
                .map(|p| p.0)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert!(colours(&decoded[0]) < colours(&decoded[1]));
        assert!(colours(&decoded[1]) < colours(&decoded[2]));
        assert!(previews(&img, 0).is_empty());
        assert_eq!(previews(&img, 2).len(), 2);
    }

    #[test]
    fn txt2img_is_deterministic_and_sized() {
        let mut steps = Vec::new();
        let a = txt2img("a red fox", 7, 96, 64, |s, t| steps.push((s, t)));
        let b = txt2img("a red fox", 7, 96, 64, |_, _| {});
        let c = txt2img("a red fox", 8, 96, 64, |_, _| {});
        assert_eq!(a.dimensions(), (96, 64));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(steps.last(), Some(&(8, 8)));
    }

    #[test]
    fn img2img_applies_named_transforms() {
        let src = DynamicImage::ImageRgb8(txt2img("x", 1, 64, 32, |_, _| {}));
        let (g, applied) = img2img(src.clone(), "make it Grayscale and mirror", 2048);
        assert_eq!(applied, ["grayscale", "mirror"]);
        assert!(matches!(g, DynamicImage::ImageLuma8(_)));
        let (r, _) = img2img(src.clone(), "resize", 16);
        assert_eq!(r.dimensions(), (16, 8));
        let (p, applied) = img2img(src, "posterize", 2048);
        assert_eq!(applied, ["posterize"]);
        let levels: std::collections::BTreeSet<u8> =
            p.to_rgb8().pixels().flat_map(|p| p.0).collect();
        assert!(levels.len() <= 4, "{levels:?}");
    }

    #[test]
    fn edit_joins_references_sizes_and_makes_variants() {
        let a = DynamicImage::ImageRgb8(txt2img("a", 1, 40, 20, |_, _| {}));
        let b = DynamicImage::ImageRgb8(txt2img("b", 2, 20, 40, |_, _| {}));
        // b is scaled to height 20 (width 10): side by side 50 x 20.
        let (outs, applied) = edit(vec![a.clone(), b], "mirror", 2048, None, 1);
        assert_eq!(applied, ["mirror"]);
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].dimensions(), (50, 20));
        let (outs, _) = edit(vec![a], "invert", 2048, Some((64, 48)), 3);
        assert_eq!(outs.len(), 3);
        assert!(outs.iter().all(|o| o.dimensions() == (64, 48)));
        assert_ne!(outs[0].to_rgb8(), outs[1].to_rgb8());
    }
}
