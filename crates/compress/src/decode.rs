//! Decoding with limits checked against the header before allocation.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use crate::{CompressError, DecodeLimits, Rgb, exif, png_meta, webp_dec};

/// Pixels ready for resizing: 1 (gray) or 3 (RGB) interleaved channels, orientation not applied.
pub(crate) struct Decoded {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    /// Full (unscaled) dimensions as declared by the header.
    pub full: (u32, u32),
    /// EXIF orientation 1..=8 still to apply.
    pub orientation: u8,
    pub icc: Option<Vec<u8>>,
}

pub(crate) fn is_jpeg(data: &[u8]) -> bool {
    data.starts_with(&[0xFF, 0xD8, 0xFF])
}

pub(crate) fn check_dims(w: u64, h: u64, limits: &DecodeLimits) -> Result<(), CompressError> {
    if w == 0 || h == 0 {
        return Err(CompressError::Corrupt("zero dimension".into()));
    }
    let side = u64::from(limits.max_side);
    if w > side || h > side || w * h > limits.max_pixels {
        return Err(CompressError::LimitExceeded(format!(
            "{w}x{h} (limits: side {side}, {} pixels)",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Decode `data`; JPEGs are DCT-scaled by 1/2, 1/4 or 1/8 when the result still has a long
/// side of at least `target_long`.
pub(crate) fn decode(
    data: &[u8],
    limits: &DecodeLimits,
    target_long: u32,
    background: Rgb,
) -> Result<Decoded, CompressError> {
    if data.len() > limits.max_input_bytes {
        return Err(CompressError::LimitExceeded(format!(
            "input of {} bytes (limit {})",
            data.len(),
            limits.max_input_bytes
        )));
    }
    if is_jpeg(data) {
        return decode_jpeg(data, limits, target_long);
    }
    if let Some(f) = webp_dec::features(data).filter(|f| !f.animated) {
        return decode_webp(data, &f, limits, target_long, background);
    }
    // PNG, GIF, animated WebP (first frame) and anything libwebp cannot parse.
    decode_other(data, limits, background)
}

/// Still WebP through libwebp, shrunk while decoding by the largest integer factor that
/// keeps the long side at least `target_long` (as libvips does).
fn decode_webp(
    data: &[u8],
    f: &webp_dec::Features,
    limits: &DecodeLimits,
    target_long: u32,
    background: Rgb,
) -> Result<Decoded, CompressError> {
    let (w, h) = (f.width, f.height);
    check_dims(w.into(), h.into(), limits)?;
    let shrink = (w.max(h) / target_long.max(1)).max(1);
    let scaled = if shrink > 1 {
        (w.div_ceil(shrink), h.div_ceil(shrink))
    } else {
        (w, h)
    };
    let mut pixels =
        webp_dec::decode(data, (w, h), scaled, f.has_alpha).map_err(CompressError::Corrupt)?;
    if f.has_alpha {
        flatten_rgba_in_place(&mut pixels, background);
    }
    Ok(Decoded {
        pixels,
        width: scaled.0,
        height: scaled.1,
        channels: 3,
        full: (w, h),
        orientation: exif::webp_orientation(data),
        icc: exif::webp_icc(data, limits.max_metadata_bytes),
    })
}

fn tj_err(e: turbojpeg::Error) -> CompressError {
    CompressError::Corrupt(e.to_string())
}

pub(crate) fn jpeg_header(data: &[u8]) -> Result<turbojpeg::DecompressHeader, CompressError> {
    turbojpeg::read_header(data).map_err(tj_err)
}

fn decode_jpeg(
    data: &[u8],
    limits: &DecodeLimits,
    target_long: u32,
) -> Result<Decoded, CompressError> {
    let mut d = Decompressor::new().map_err(tj_err)?;
    let header = d.read_header(data).map_err(tj_err)?;
    let (w, h) = (header.width, header.height);
    check_dims(w as u64, h as u64, limits)?;
    let long = w.max(h);
    // Only 1/2, 1/4 and 1/8 have SIMD paths; other factors are slower than a full decode.
    let mut factor = ScalingFactor::ONE;
    for denom in [8usize, 4, 2] {
        if long.div_ceil(denom) >= target_long as usize {
            factor = ScalingFactor::new(1, denom);
            break;
        }
    }
    d.set_scaling_factor(factor).map_err(tj_err)?;
    let scaled = header.scaled(factor);
    let (sw, sh) = (scaled.width, scaled.height);
    let (format, cmyk) = match header.colorspace {
        Colorspace::Gray => (PixelFormat::GRAY, false),
        Colorspace::CMYK | Colorspace::YCCK => (PixelFormat::CMYK, true),
        _ => (PixelFormat::RGB, false),
    };
    let bpp = format.size();
    let mut buf = vec![0u8; sw * sh * bpp];
    d.decompress(
        data,
        Image {
            pixels: &mut buf[..],
            width: sw,
            pitch: sw * bpp,
            height: sh,
            format,
        },
    )
    .map_err(tj_err)?;
    let (pixels, channels) = if cmyk {
        (cmyk_to_rgb(&buf, exif::has_adobe(data)), 3)
    } else {
        (buf, bpp as u8)
    };
    Ok(Decoded {
        pixels,
        width: sw as u32,
        height: sh as u32,
        channels,
        full: (w as u32, h as u32),
        orientation: exif::jpeg_orientation(data),
        icc: if cmyk {
            None
        } else {
            exif::jpeg_icc(data, limits.max_metadata_bytes)
        },
    })
}

/// Naive CMYK to RGB. Adobe-marked files store the inks inverted (255 = no ink).
fn cmyk_to_rgb(src: &[u8], adobe_inverted: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / 4 * 3);
    for p in src.chunks_exact(4) {
        let (c, m, y, k) = if adobe_inverted {
            (p[0] as u32, p[1] as u32, p[2] as u32, p[3] as u32)
        } else {
            (
                255 - p[0] as u32,
                255 - p[1] as u32,
                255 - p[2] as u32,
                255 - p[3] as u32,
            )
        };
        out.push(((c * k + 127) / 255) as u8);
        out.push(((m * k + 127) / 255) as u8);
        out.push(((y * k + 127) / 255) as u8);
    }
    out
}

pub(crate) fn img_err(e: image::ImageError) -> CompressError {
    match e {
        image::ImageError::Limits(l) => CompressError::LimitExceeded(l.to_string()),
        image::ImageError::Unsupported(u) => CompressError::Corrupt(u.to_string()),
        other => CompressError::Corrupt(other.to_string()),
    }
}

/// The `image` crate's limits for `limits`.
pub(crate) fn image_limits(limits: &DecodeLimits) -> image::Limits {
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_alloc);
    lim
}

fn decode_other(
    data: &[u8],
    limits: &DecodeLimits,
    background: Rgb,
) -> Result<Decoded, CompressError> {
    // A PNG's metadata is read here, bounded, and never reaches the decoder (whose only
    // bound on an inflating iCCP chunk is the whole image's allocation limit).
    let (png_data, png_icc) = if png_meta::is_png(data) {
        let p = png_meta::prepare(data, limits)?;
        (Some(p.data), Some(p.icc))
    } else {
        (None, None)
    };
    let data = png_data.as_deref().unwrap_or(data);
    let mut reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| CompressError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::WebP | image::ImageFormat::Gif) => {}
        _ => return Err(CompressError::UnsupportedFormat),
    }
    reader.limits(image_limits(limits));
    let mut dec = reader.into_decoder().map_err(img_err)?;
    let (w, h) = dec.dimensions();
    check_dims(w.into(), h.into(), limits)?;
    let orientation = dec.orientation().map(|o| o.to_exif()).unwrap_or(1);
    let icc = match png_icc {
        Some(icc) => icc,
        None => dec
            .icc_profile()
            .ok()
            .flatten()
            .filter(|p| p.len() <= limits.max_metadata_bytes),
    };
    let img = DynamicImage::from_decoder(dec).map_err(img_err)?;
    let color = img.color();
    let gray = matches!(
        color,
        image::ColorType::L8
            | image::ColorType::L16
            | image::ColorType::La8
            | image::ColorType::La16
    );
    let (pixels, channels) = match (gray, color.has_alpha()) {
        (true, false) => (img.into_luma8().into_raw(), 1),
        (false, false) => (img.into_rgb8().into_raw(), 3),
        (true, true) => {
            let la = img.into_luma_alpha8().into_raw();
            let bg = ((background.0 as u32 * 299
                + background.1 as u32 * 587
                + background.2 as u32 * 114)
                / 1000) as u8;
            (flatten::<2>(&la, &[bg]), 1)
        }
        (false, true) => {
            let mut rgba = img.into_rgba8().into_raw();
            flatten_rgba_in_place(&mut rgba, background);
            (rgba, 3)
        }
    };
    Ok(Decoded {
        pixels,
        width: w,
        height: h,
        channels,
        full: (w, h),
        orientation,
        icc,
    })
}

/// RGBA to RGB in the same buffer (each pixel moves down, never past one not yet read),
/// blending onto `bg` where alpha is not 255.
fn flatten_rgba_in_place(px: &mut Vec<u8>, bg: Rgb) {
    let n = px.len() / 4;
    let bg = [bg.0 as u32, bg.1 as u32, bg.2 as u32];
    for i in 0..n {
        let s = i * 4;
        let (r, g, b, a) = (px[s], px[s + 1], px[s + 2], px[s + 3]);
        let rgb = if a == 255 {
            [r, g, b]
        } else {
            let a = a as u32;
            let mix = |c: u8, k: u32| ((c as u32 * a + k * (255 - a) + 127) / 255) as u8;
            [mix(r, bg[0]), mix(g, bg[1]), mix(b, bg[2])]
        };
        px[i * 3..i * 3 + 3].copy_from_slice(&rgb);
    }
    px.truncate(n * 3);
}

/// Drop the alpha channel (last of `N`), blending onto `bg` where it is not opaque.
fn flatten<const N: usize>(src: &[u8], bg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / N * (N - 1));
    for p in src.chunks_exact(N) {
        let a = p[N - 1] as u32;
        if a == 255 {
            out.extend_from_slice(&p[..N - 1]);
        } else {
            for (c, b) in p[..N - 1].iter().zip(bg) {
                out.push(((*c as u32 * a + *b as u32 * (255 - a) + 127) / 255) as u8);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_blends_onto_background() {
        let px = [200, 100, 0, 0, 10, 20, 30, 255, 0, 0, 0, 128];
        let out = flatten::<4>(&px, &[255, 255, 255]);
        assert_eq!(&out[..6], &[255, 255, 255, 10, 20, 30]);
        assert_eq!(&out[6..], &[127, 127, 127]);
        let mut inplace = px.to_vec();
        flatten_rgba_in_place(&mut inplace, Rgb(255, 255, 255));
        assert_eq!(inplace, out);
    }
}
