//! Checking that an upload is a whole, decodable image before it is stored as sent: the
//! entire stream is decoded, with memory bounded by small buffers rather than the picture.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};
use turbojpeg::{Decompressor, Image, PixelFormat, ScalingFactor};

use crate::{CompressError, DecodeLimits, decode, png_meta, webp_dec};

/// An input format kiln reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InputFormat {
    /// JPEG.
    Jpeg,
    /// PNG.
    Png,
    /// WebP (still or animated).
    Webp,
    /// GIF.
    Gif,
}

impl InputFormat {
    /// The MIME type, e.g. `image/png`.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
            Self::Gif => "image/gif",
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format the bytes are in (whatever a client called it).
    pub format: InputFormat,
    /// Width in pixels, as stored.
    pub width: u32,
    /// Height in pixels, as stored.
    pub height: u32,
}

/// Decodes all of `data` under `limits` and says what it is; a truncated or corrupt stream
/// (a PNG cut before `IEND` or inside `IDAT`, a WebP cut short, a broken VP8L, a JPEG whose
/// entropy data does not decode) is an error. Memory stays small: PNG is decoded row by row,
/// JPEG at 1/8 scale, still WebP through libwebp's rescaler to a thumbnail; only GIF and
/// animated WebP (first frame) hold a full frame, within `limits`. Metadata chunks are
/// bounded as in [`compress`](crate::compress).
pub fn verify(data: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, CompressError> {
    if data.len() > limits.max_input_bytes {
        return Err(CompressError::LimitExceeded(format!(
            "input of {} bytes (limit {})",
            data.len(),
            limits.max_input_bytes
        )));
    }
    if decode::is_jpeg(data) {
        return verify_jpeg(data, limits);
    }
    if png_meta::is_png(data) {
        return verify_png(data, limits);
    }
    if let Some(f) = webp_dec::features(data).filter(|f| !f.animated) {
        decode::check_dims(f.width.into(), f.height.into(), limits)?;
        let long = f.width.max(f.height);
        let shrink = (long / 64).max(1);
        let small = (f.width.div_ceil(shrink), f.height.div_ceil(shrink));
        webp_dec::decode(data, (f.width, f.height), small, f.has_alpha)
            .map_err(|e| CompressError::Corrupt(format!("WebP: {e}")))?;
        return Ok(ImageInfo {
            format: InputFormat::Webp,
            width: f.width,
            height: f.height,
        });
    }
    verify_with_image(data, limits)
}

fn verify_jpeg(data: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, CompressError> {
    let tj = |e: turbojpeg::Error| CompressError::Corrupt(format!("JPEG: {e}"));
    let mut d = Decompressor::new().map_err(tj)?;
    let header = d.read_header(data).map_err(tj)?;
    decode::check_dims(header.width as u64, header.height as u64, limits)?;
    let factor = ScalingFactor::new(1, 8);
    d.set_scaling_factor(factor).map_err(tj)?;
    let s = header.scaled(factor);
    let mut buf = vec![0u8; s.width * s.height];
    d.decompress(
        data,
        Image {
            pixels: &mut buf[..],
            width: s.width,
            pitch: s.width,
            height: s.height,
            format: PixelFormat::GRAY,
        },
    )
    .map_err(tj)?;
    Ok(ImageInfo {
        format: InputFormat::Jpeg,
        width: header.width as u32,
        height: header.height as u32,
    })
}

fn verify_png(data: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, CompressError> {
    let p = png_meta::prepare(data, limits)?;
    let corrupt = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => CompressError::LimitExceeded("PNG buffers".into()),
        e => CompressError::Corrupt(format!("PNG: {e}")),
    };
    let mut dec = png::Decoder::new_with_limits(
        Cursor::new(&p.data[..]),
        png::Limits {
            bytes: usize::try_from(limits.max_alloc).unwrap_or(usize::MAX),
        },
    );
    dec.set_ignore_text_chunk(true);
    dec.set_ignore_iccp_chunk(true);
    let info = dec.read_header_info().map_err(corrupt)?;
    let (w, h) = (info.width, info.height);
    decode::check_dims(w.into(), h.into(), limits)?;
    let mut reader = dec.read_info().map_err(corrupt)?;
    let mut rows = 0u64;
    while reader.next_row().map_err(corrupt)?.is_some() {
        rows += 1;
        if rows > u64::from(h) * 8 {
            return Err(CompressError::Corrupt(
                "PNG: more rows than declared".into(),
            ));
        }
    }
    reader.finish().map_err(corrupt)?;
    Ok(ImageInfo {
        format: InputFormat::Png,
        width: w,
        height: h,
    })
}

fn verify_with_image(data: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, CompressError> {
    let reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| CompressError::Corrupt(e.to_string()))?;
    let format = match reader.format() {
        Some(image::ImageFormat::WebP) => InputFormat::Webp,
        Some(image::ImageFormat::Gif) => InputFormat::Gif,
        _ => return Err(CompressError::UnsupportedFormat),
    };
    let mut reader = reader;
    reader.limits(decode::image_limits(limits));
    let dec = reader.into_decoder().map_err(decode::img_err)?;
    let (w, h) = dec.dimensions();
    decode::check_dims(w.into(), h.into(), limits)?;
    DynamicImage::from_decoder(dec).map_err(decode::img_err)?;
    Ok(ImageInfo {
        format,
        width: w,
        height: h,
    })
}
