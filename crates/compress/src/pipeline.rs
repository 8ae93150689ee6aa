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

    // The profile is re-inserted into every candidate, so one that leaves no room for the
    // image is dropped at once (colours then read as sRGB), and one that still makes the
    // lowest quality miss is dropped before the image is shrunk.
    let mut icc = match opts.format {
        OutputFormat::Jpeg => dec.icc.filter(|p| p.len() < opts.max_bytes / 2),
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
        if found.best.is_none() && icc.is_some() {
            tracing::debug!(
                icc_bytes = icc.as_ref().map_or(0, Vec::len),
                "ICC profile dropped to fit"
            );
            icc = None;
            prior.clear();
            continue;
        }
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

/// Upper bound on encodes per search; the bracket normally closes after 1 to 4. With
/// [`MODEL_STEPS`] model probes and bisection after them, a bracket of 100 qualities closes
/// within 4 + 7 = 11.
const MAX_ENCODES: u32 = 12;

/// Encodes after which the search stops trusting the model and bisects.
const MODEL_STEPS: u32 = 4;

/// Slope of ln(size) against [`qscale`] used until two sizes are known. The searched corpus
/// files span 0.55 to 0.69; a value below most of them makes the first guess land on the
/// fitting side more often, from where interpolation is more accurate than extrapolation.
const DEFAULT_SLOPE: f64 = 0.6;

/// ln of libjpeg's quantiser scale (percent) for quality `q`: 5000/q below 50, 200-2q above.
/// ln(size) is close to linear in it over q 20..95, far closer than to q itself.
fn qscale(q: f64) -> f64 {
    if q < 50.0 {
        (5000.0 / q).ln()
    } else {
        (200.0 - 2.0 * q).max(1.0).ln()
    }
}

/// Inverse of [`qscale`].
fn qscale_inv(x: f64) -> f64 {
    let s = x.exp();
    if s > 100.0 {
        5000.0 / s
    } else {
        100.0 - s / 2.0
    }
}

/// Quality search ending at the highest integer quality that fits: the result `q` fits and
/// `q + 1` was encoded and did not fit (or `q` is `max_quality`).
///
/// Model: ln(size) linear in [`qscale`]. The first probe is `max_quality` (or a prediction
/// from `prior`); later probes interpolate between the highest fit and the lowest miss, or
/// extrapolate from the two samples nearest the budget, always strictly inside the open
/// bracket, so every encode narrows it; after [`MODEL_STEPS`] encodes it bisects.
fn search(
    encode: &mut dyn FnMut(u8) -> Result<Vec<u8>, CompressError>,
    opts: &CompressOptions,
    prior: &[(u8, f64)],
) -> Result<Found, CompressError> {
    let target = (opts.max_bytes as f64).ln();
    let (qmin, qmax) = (opts.min_quality, opts.max_quality);
    let mut best: Option<(u8, Vec<u8>)> = None;
    let mut miss: Option<(u8, f64)> = None;
    let mut samples: Vec<(u8, f64)> = Vec::new();
    let mut smallest = usize::MAX;
    let mut encodes = 0u32;
    let mut q = if prior.is_empty() {
        qmax
    } else {
        predict(prior, None, target, qmin, qmax)
    };
    loop {
        let out = encode(q)?;
        encodes += 1;
        let size = out.len();
        smallest = smallest.min(size);
        samples.push((q, size as f64));
        if size <= opts.max_bytes {
            if best.as_ref().is_none_or(|b| q > b.0) {
                best = Some((q, out));
            }
        } else if miss.is_none_or(|m| q < m.0) {
            miss = Some((q, size as f64));
        }
        // Qualities not yet known to fit or miss: lower..=upper.
        let lower = best.as_ref().map_or(qmin, |b| b.0 + 1);
        let upper = miss.map_or(qmax, |m| m.0.saturating_sub(1));
        if lower > upper || encodes >= MAX_ENCODES {
            break;
        }
        let bracket = match (&best, miss) {
            (Some((bq, bytes)), Some(m)) => Some(((*bq, bytes.len() as f64), m)),
            _ => None,
        };
        // Three model steps are plenty on real images; after that, bisect so that any
        // monotone size curve closes the bracket within MAX_ENCODES.
        q = if encodes > MODEL_STEPS {
            lower + (upper - lower) / 2
        } else {
            predict(&samples, bracket, target, lower, upper)
        };
    }
    Ok(Found {
        best,
        smallest,
        encodes,
        samples,
    })
}

/// Next q to probe, clamped to `lo..=hi`: the floor of the quality where the model puts
/// ln(size) at `target_ln`. With a bracket (highest fit, lowest miss) it interpolates between
/// the two; otherwise it extrapolates from the two samples nearest the target, or from the
/// nearest one with [`DEFAULT_SLOPE`].
fn predict(
    samples: &[(u8, f64)],
    bracket: Option<((u8, f64), (u8, f64))>,
    target_ln: f64,
    lo: u8,
    hi: u8,
) -> u8 {
    let point = |&(q, z): &(u8, f64)| (qscale(q as f64), z.max(1.0).ln());
    let ((x0, l0), slope) = match bracket {
        Some((fit, miss)) => {
            let (a, b) = (point(&fit), point(&miss));
            (a, (b.1 - a.1) / (b.0 - a.0))
        }
        None => {
            let mut s: Vec<(f64, f64)> = samples.iter().map(point).collect();
            s.sort_by(|a, b| (a.1 - target_ln).abs().total_cmp(&(b.1 - target_ln).abs()));
            let first = s.first().copied().unwrap_or((qscale(hi as f64), target_ln));
            let slope = match s.get(1) {
                Some(&(x1, l1)) if (x1 - first.0).abs() > 1e-3 => (l1 - first.1) / (x1 - first.0),
                _ => -DEFAULT_SLOPE,
            };
            (first, slope)
        }
    };
    // ln(size) falls as the quantiser scale grows; a flat or rising secant is noise (a
    // shallow one is real and makes a long, clamped step).
    let slope = if slope < -1e-6 { slope } else { -DEFAULT_SLOPE };
    let q = qscale_inv(x0 + (target_ln - l0) / slope).floor();
    if q.is_nan() {
        return lo;
    }
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

    /// Run the search on a size table and return (q, encodes).
    fn run(size: &dyn Fn(u8) -> usize, opts: &CompressOptions) -> (Option<u8>, u32) {
        let mut enc = |q: u8| Ok(vec![0u8; size(q)]);
        let f = search(&mut enc, opts, &[]).unwrap();
        if let Some((_, b)) = &f.best {
            assert!(b.len() <= opts.max_bytes);
        }
        (f.best.map(|b| b.0), f.encodes)
    }

    /// Highest q in range whose size fits, by brute force.
    fn highest_fit(size: &dyn Fn(u8) -> usize, opts: &CompressOptions) -> Option<u8> {
        (opts.min_quality..=opts.max_quality)
            .rev()
            .find(|&q| size(q) <= opts.max_bytes)
    }

    #[test]
    fn qscale_round_trips() {
        for q in 1..=99u8 {
            let back = qscale_inv(qscale(q as f64));
            assert!((back - q as f64).abs() < 1e-9, "{q} -> {back}");
        }
    }

    #[test]
    fn search_ends_at_the_highest_fitting_quality() {
        // Size models: exponential in q, power law in the quantiser scale, and a flat curve.
        let models: [&dyn Fn(u8) -> usize; 3] = [
            &|q| (1000.0 * (0.04 * q as f64).exp()) as usize,
            &|q| (9e6 * (-0.65 * qscale(q as f64)).exp()) as usize,
            &|q| 10_000 + q as usize * 10,
        ];
        for (i, size) in models.iter().enumerate() {
            for max_bytes in (2_000..900_000).step_by(7_919) {
                let opts = CompressOptions {
                    max_bytes,
                    ..Default::default()
                };
                let (q, encodes) = run(*size, &opts);
                assert_eq!(q, highest_fit(*size, &opts), "model {i}, max {max_bytes}");
                assert!(
                    encodes <= 6,
                    "model {i}, max {max_bytes}: {encodes} encodes"
                );
            }
        }
    }

    #[test]
    fn a_model_shaped_curve_takes_at_most_four_encodes() {
        // ln(size) linear in the quantiser scale with the corpus's slopes.
        for slope in [0.55, 0.6, 0.65, 0.7, 0.75] {
            let size = |q: u8| (4e6 * (-slope * qscale(q as f64)).exp()) as usize;
            for max_bytes in (20_000..400_000).step_by(3_001) {
                let opts = CompressOptions {
                    max_bytes,
                    ..Default::default()
                };
                let (q, encodes) = run(&size, &opts);
                assert_eq!(q, highest_fit(&size, &opts));
                assert!(encodes <= 4, "slope {slope}, max {max_bytes}: {encodes}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_monotone_curve_closes_the_bracket(
            steps in proptest::collection::vec(0usize..40_000, 100),
            max_bytes in 1usize..2_000_000,
            min_quality in 1u8..60,
            span in 0u8..40,
        ) {
            let table: Vec<usize> = steps
                .iter()
                .scan(500usize, |acc, s| { *acc += s; Some(*acc) })
                .collect();
            let size = |q: u8| table[q as usize - 1];
            let opts = CompressOptions {
                max_bytes,
                min_quality,
                max_quality: min_quality + span,
                ..Default::default()
            };
            let (q, encodes) = run(&size, &opts);
            proptest::prop_assert_eq!(q, highest_fit(&size, &opts));
            proptest::prop_assert!(encodes <= MAX_ENCODES);
        }
    }
}
