//! Image checks and optional compression for uploads, run on the blocking pool behind a
//! semaphore so the async runtime never decodes or encodes.
//!
//! The compression here is a plain quality search with the `image` crate's encoder; the
//! faster `kiln-compress` crate is meant to take its place.

use std::io::Cursor;
use std::sync::Arc;

use axum::body::Bytes;
use image::{ImageFormat, ImageReader, Limits};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Largest side accepted on upload.
const MAX_SIDE: u32 = 16_384;
/// Largest decoded buffer.
const MAX_ALLOC: u64 = 512 << 20;

/// An image ready to store: bytes, content type, dimensions.
pub(crate) type Prepared = (Bytes, String, Option<(u32, u32)>);

/// Runs image work off the runtime.
#[derive(Debug, Clone)]
pub(crate) struct ImagePrep {
    permits: Arc<Semaphore>,
}

impl Default for ImagePrep {
    fn default() -> Self {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Self {
            permits: Arc::new(Semaphore::new(n)),
        }
    }
}

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l.max_alloc = Some(MAX_ALLOC);
    l
}

fn format_of(ct: &str) -> Option<ImageFormat> {
    Some(match ct {
        "image/jpeg" => ImageFormat::Jpeg,
        "image/png" => ImageFormat::Png,
        "image/webp" => ImageFormat::WebP,
        "image/gif" => ImageFormat::Gif,
        _ => return None,
    })
}

impl ImagePrep {
    /// Checks that `data` is an image of type `ct` within the limits, and when `max_bytes`
    /// or `max_dim` is given, re-encodes it as JPEG to fit. Returns bytes, content type
    /// and dimensions.
    pub(crate) async fn prepare(
        &self,
        data: Bytes,
        ct: &str,
        max_bytes: Option<usize>,
        max_dim: Option<u32>,
    ) -> Result<Prepared, ApiError> {
        let fmt = format_of(ct).ok_or_else(|| {
            ApiError::unsupported_type(format!("{ct} is not an image type kiln accepts"))
        })?;
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        let ct = ct.to_owned();
        tokio::task::spawn_blocking(move || prepare_sync(data, fmt, ct, max_bytes, max_dim))
            .await
            .map_err(ApiError::internal)?
    }
}

fn prepare_sync(
    data: Bytes,
    fmt: ImageFormat,
    ct: String,
    max_bytes: Option<usize>,
    max_dim: Option<u32>,
) -> Result<Prepared, ApiError> {
    let mut reader = ImageReader::with_format(Cursor::new(&data[..]), fmt);
    reader.limits(limits());
    let dims = reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(format!("not a valid {ct} image: {e}")))?;
    let fits = max_bytes.is_none_or(|m| data.len() <= m)
        && max_dim.is_none_or(|m| dims.0.max(dims.1) <= m);
    if fits {
        return Ok((data, ct, Some(dims)));
    }
    let mut reader = ImageReader::with_format(Cursor::new(&data[..]), fmt);
    reader.limits(limits());
    let mut img = reader
        .decode()
        .map_err(|e| ApiError::invalid(format!("cannot decode the {ct} image: {e}")))?;
    if let Some(m) = max_dim
        && img.width().max(img.height()) > m
    {
        img = img.resize(m, m, image::imageops::FilterType::Lanczos3);
    }
    let rgb = image::DynamicImage::ImageRgb8(img.to_rgb8());
    let target = max_bytes.unwrap_or(usize::MAX);
    let mut current = rgb;
    loop {
        for q in [85u8, 75, 65, 55, 45, 35] {
            let mut out = Vec::new();
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q);
            current
                .write_with_encoder(enc)
                .map_err(|e| ApiError::internal(format!("jpeg encode: {e}")))?;
            if out.len() <= target {
                let d = (current.width(), current.height());
                return Ok((Bytes::from(out), "image/jpeg".into(), Some(d)));
            }
        }
        let (w, h) = (current.width() * 3 / 4, current.height() * 3 / 4);
        if w < 16 || h < 16 {
            return Err(ApiError::invalid(format!(
                "the image cannot be compressed to {target} bytes"
            )));
        }
        current = current.resize_exact(w, h, image::imageops::FilterType::Triangle);
    }
}
