//! The synchronous pipeline: limits, decode (scaled), resize, orient, quality search.

use std::time::{Duration, Instant};

use base64::Engine as _;
use turbojpeg::Colorspace;

use crate::{CompressError, CompressOptions, OutputFormat, decode, encode::Encoder, exif, resize};

/// Time spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Header parsing and decoding (including DCT scaling and colour conversion).
    pub decode: Duration,
    /// Resizing, alpha flattening and orientation.
    pub resize: Duration,
    /// All encodes of the quality search.
    pub encode: Duration,
}

/// A compressed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compressed {
    /// The encoded image; never longer than `max_bytes`.
    pub bytes: Vec<u8>,
    /// Its format.
    pub format: OutputFormat,
    /// Width in pixels (after orientation).
    pub width: u32,
    /// Height in pixels (after orientation).
    pub height: u32,
    /// Quality used, or `None` when the input was passed through untouched.
    pub quality: Option<u8>,
    /// Number of encodes the quality search made (0 on pass-through).
    pub encodes: u32,
    /// Time per stage.
    pub timings: Timings,
}

impl Compressed {
    /// The bytes as standard base64 (with padding).
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    /// A `data:` URL, e.g. `data:image/jpeg;base64,...`.
    pub fn to_data_url(&self) -> String {
        format!("data:{};base64,{}", self.format.mime(), self.to_base64())
    }
}

/// Compress `input` according to `opts`. See the crate documentation.
pub fn compress(input: &[u8], opts: &CompressOptions) -> Result<Compressed, CompressError> {
    if opts.min_quality == 0 || opts.min_quality > opts.max_quality || opts.max_quality > 100 {
        return Err(CompressError::InvalidOptions(format!(
            "quality range {}..={}",
            opts.min_quality, opts.max_quality
        )));
    }
    if opts.max_dimension == 0 || opts.max_bytes == 0 {
        return Err(CompressError::InvalidOptions(
            "zero max_bytes or max_dimension".into(),
        ));
    }
    let t0 = Instant::now();
    if let Some(out) = passthrough(input, opts)? {
        return Ok(Compressed {
            timings: Timings {
                decode: t0.elapsed(),
                ..Timings::default()
            },
            ..out
        });
    }
    let dec = decode::decode(input, &opts.limits, opts.max_dimension, opts.background)?;
    let decode_time = t0.elapsed();

    let t1 = Instant::now();
    let (fw, fh) = dec.full;
    let (tw, th) = fit(fw, fh, opts.max_dimension);
    let channels = dec.channels;
    let px = resize::resize(dec.pixels, (dec.width, dec.height), (tw, th), channels)?;
    let (base, bw, bh) = resize::orient(px, tw, th, channels, dec.orientation);
    let mut resize_time = t1.elapsed();

    let icc = match opts.format {
        OutputFormat::Jpeg => dec.icc,
        OutputFormat::Webp => None,
    };
    let mut enc = Encoder::new(opts.format)?;
    let mut encode_time = Duration::ZERO;
    let mut encodes = 0u32;
    let mut smallest = usize::MAX;
    let mut prior: Vec<(u8, f64)> = Vec::new();
    let mut scale = 1.0f64;
    loop {
        let (w, h) = if scale == 1.0 {
            (bw, bh)
        } else {
            (
                (bw as f64 * scale).round().max(1.0) as u32,
                (bh as f64 * scale).round().max(1.0) as u32,
            )
        };
        let t = Instant::now();
        let px = if scale == 1.0 {
            std::borrow::Cow::Borrowed(&base[..])
        } else {
            std::borrow::Cow::Owned(resize::resize(base.clone(), (bw, bh), (w, h), channels)?)
        };
        resize_time += t.elapsed();
        let t = Instant::now();
        let mut encode_at = |q: u8| -> Result<Vec<u8>, CompressError> {
            let out = enc.encode(&px, w, h, channels, q)?;
            Ok(match &icc {
                Some(p) => exif::insert_icc(&out, p),
                None => out,
            })
        };
        let found = search(&mut encode_at, opts, &prior)?;
        encode_time += t.elapsed();
        encodes += found.encodes;
        smallest = smallest.min(found.smallest);
        if let Some((q, bytes)) = found.best {
            tracing::debug!(
                width = w,
                height = h,
                quality = q,
                encodes,
                size = bytes.len(),
                "compressed"
            );
            return Ok(Compressed {
                bytes,
                format: opts.format,
                width: w,
                height: h,
                quality: Some(q),
                encodes,
                timings: Timings {
                    decode: decode_time,
                    resize: resize_time,
                    encode: encode_time,
                },
            });
        }
        // Nothing fits at the lowest quality: shrink by 0.75 per side and search again,
        // predicting from the sizes seen scaled by the area ratio.
        let next = scale * 0.75;
        if (bw.max(bh) as f64 * next) < opts.min_dimension as f64 {
            return Err(CompressError::TargetUnreachable {
                max_bytes: opts.max_bytes,
                smallest,
            });
        }
        prior = found
            .samples
            .iter()
            .map(|&(q, s)| (q, s * 0.5625))
            .collect();
        scale = next;
    }
}

/// Dimensions with the long side at most `max` (never enlarged).
fn fit(w: u32, h: u32, max: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= max {
        return (w, h);
    }
    let s = max as f64 / long as f64;
    if w >= h {
        (max, ((h as f64 * s).round() as u32).max(1))
    } else {
        (((w as f64 * s).round() as u32).max(1), max)
    }
}

fn passthrough(input: &[u8], opts: &CompressOptions) -> Result<Option<Compressed>, CompressError> {
    if !opts.passthrough || opts.format != OutputFormat::Jpeg || !decode::is_jpeg(input) {
        return Ok(None);
    }
    if input.len() > opts.limits.max_input_bytes {
        return Ok(None);
    }
    let header = decode::jpeg_header(input)?;
    let upright = exif::jpeg_orientation(input) == 1;
    let plain = !matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let dims = header.width.max(header.height) <= opts.max_dimension as usize;
    // A truncated stream must not slip through untouched.
    let complete = input.ends_with(&[0xFF, 0xD9]);
    if !(upright && plain && dims && complete) {
        return Ok(None);
    }
    let bytes = if opts.strip_metadata {
        match exif::strip_jpeg_metadata(input) {
            Some(b) => b,
            None => return Ok(None),
        }
    } else {
        input.to_vec()
    };
    if bytes.len() > opts.max_bytes {
        return Ok(None);
    }
    Ok(Some(Compressed {
        bytes,
        format: OutputFormat::Jpeg,
        width: header.width as u32,
        height: header.height as u32,
        quality: None,
        encodes: 0,
        timings: Timings::default(),
    }))
}

struct Found {
    best: Option<(u8, Vec<u8>)>,
    smallest: usize,
    encodes: u32,
    samples: Vec<(u8, f64)>,
}

/// Predictive quality search: model ln(size) as linear in q, take secant steps from the sizes
/// seen, and stop at the first fit within 6% below the budget (or when the bracket closes).
fn search(
    encode: &mut dyn FnMut(u8) -> Result<Vec<u8>, CompressError>,
    opts: &CompressOptions,
    prior: &[(u8, f64)],
) -> Result<Found, CompressError> {
    const DEFAULT_SLOPE: f64 = 0.035;
    const MAX_ENCODES: u32 = 8;
    let max = opts.max_bytes as f64;
    let target = (max * 0.985).ln();
    let (qmin, qmax) = (opts.min_quality, opts.max_quality);
    let mut best: Option<(u8, Vec<u8>)> = None;
    let mut hi_fail: Option<u8> = None;
    let mut samples: Vec<(u8, f64)> = Vec::new();
    let mut smallest = usize::MAX;
    let mut encodes = 0u32;
    let mut q = if prior.is_empty() {
        qmax
    } else {
        predict(prior, target, DEFAULT_SLOPE, qmin, qmax)
    };
    loop {
        let out = encode(q)?;
        encodes += 1;
        let size = out.len();
        smallest = smallest.min(size);
        samples.push((q, size as f64));
        if size <= opts.max_bytes {
            let close = size as f64 >= max * 0.96 || q == qmax;
            if best.as_ref().is_none_or(|b| q > b.0) {
                best = Some((q, out));
            }
            if close {
                break;
            }
        } else {
            hi_fail = Some(hi_fail.map_or(q, |h| h.min(q)));
            if q == qmin {
                break;
            }
        }
        let lo = best.as_ref().map(|b| b.0);
        let lower = lo.map_or(qmin, |l| l + 1);
        let upper = hi_fail.map_or(qmax, |h| h - 1);
        if lower > upper || encodes >= MAX_ENCODES {
            break;
        }
        let mut next = predict(&samples, target, DEFAULT_SLOPE, lower, upper);
        if samples.iter().any(|s| s.0 == next) {
            next = lower + (upper - lower) / 2;
        }
        q = next;
    }
    Ok(Found {
        best,
        smallest,
        encodes,
        samples,
    })
}

/// Next q from the samples (q, size): secant on ln(size) between the two samples nearest the
/// target, else one sample with a default slope; clamped to `lo..=hi`.
fn predict(samples: &[(u8, f64)], target_ln: f64, default_slope: f64, lo: u8, hi: u8) -> u8 {
    let mut s: Vec<(f64, f64)> = samples
        .iter()
        .map(|&(q, z)| (q as f64, z.max(1.0).ln()))
        .collect();
    s.sort_by(|a, b| (a.1 - target_ln).abs().total_cmp(&(b.1 - target_ln).abs()));
    let (q0, l0) = s.first().copied().unwrap_or((hi as f64, target_ln));
    let slope = match s.get(1) {
        Some(&(q1, l1)) if (q1 - q0).abs() > 0.5 => {
            let k = (l1 - l0) / (q1 - q0);
            if k > 0.002 { k } else { default_slope }
        }
        _ => default_slope,
    };
    let q = (q0 + (target_ln - l0) / slope).floor();
    q.clamp(lo as f64, hi as f64) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_never_enlarges() {
        assert_eq!(fit(4000, 3000, 2048), (2048, 1536));
        assert_eq!(fit(3000, 4000, 2048), (1536, 2048));
        assert_eq!(fit(100, 50, 2048), (100, 50));
    }

    #[test]
    fn search_stops_on_the_first_close_fit() {
        // Synthetic size model: size = 1000 * exp(0.04 q).
        let opts = CompressOptions {
            max_bytes: 20_000,
            ..Default::default()
        };
        let mut enc = |q: u8| Ok(vec![0u8; (1000.0 * (0.04 * q as f64).exp()) as usize]);
        let f = search(&mut enc, &opts, &[]).unwrap();
        let (q, b) = f.best.unwrap();
        assert!(b.len() <= 20_000);
        // Highest fitting q is 74 (1000*e^2.96 = 19298); 75 gives 20085.
        assert!(q >= 72, "q {q}");
        assert!(f.encodes <= 4, "encodes {}", f.encodes);
    }
}
