//! Image checks and optional compression for uploads. Every upload is decoded in full
//! (`kiln_compress::verify`: truncated or corrupt streams are refused, metadata chunks are
//! bounded; without the `compress` feature the `image` crate's decoders, within the same
//! side and pixel limits) on the blocking pool behind a semaphore; compression (feature
//! `compress`) goes through `kiln_compress::Compressor`, which also runs off the runtime
//! and caches results by content and options.

use std::sync::Arc;

use axum::body::Bytes;
#[cfg(feature = "compress")]
use kiln_compress::{DecodeLimits, InputFormat};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Largest side accepted on upload.
const MAX_SIDE: u32 = 16_384;

/// An image ready to store: bytes, content type, dimensions, and the time spent
/// re-encoding it (ms; `None` when stored as sent).
pub(crate) type Prepared = (Bytes, String, Option<(u32, u32)>, Option<u64>);

/// Runs image work off the runtime.
#[derive(Clone)]
pub(crate) struct ImagePrep {
    permits: Arc<Semaphore>,
    #[cfg(feature = "compress")]
    compressor: kiln_compress::Compressor,
}

impl std::fmt::Debug for ImagePrep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagePrep").finish_non_exhaustive()
    }
}

impl Default for ImagePrep {
    fn default() -> Self {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Self {
            permits: Arc::new(Semaphore::new(n)),
            #[cfg(feature = "compress")]
            compressor: kiln_compress::Compressor::new(kiln_compress::CompressorConfig::default()),
        }
    }
}

/// Upload checks: the compressor's default limits (16384 px a side, 64 MP, 1 MiB of
/// metadata per block); the body size is bounded before this.
#[cfg(feature = "compress")]
fn limits() -> DecodeLimits {
    DecodeLimits {
        max_input_bytes: usize::MAX,
        max_side: MAX_SIDE,
        ..DecodeLimits::default()
    }
}

#[cfg(feature = "compress")]
fn format_of(ct: &str) -> Option<InputFormat> {
    Some(match ct {
        "image/jpeg" => InputFormat::Jpeg,
        "image/png" => InputFormat::Png,
        "image/webp" => InputFormat::Webp,
        "image/gif" => InputFormat::Gif,
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
        let dims = {
            let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
            let (data, ct) = (data.clone(), ct.to_owned());
            tokio::task::spawn_blocking(move || probe(&data, fmt, &ct))
                .await
                .map_err(ApiError::internal)??
        };
        let fits = max_bytes.is_none_or(|m| data.len() <= m)
            && max_dim.is_none_or(|m| dims.0.max(dims.1) <= m);
        if fits {
            return Ok((data, ct.to_owned(), Some(dims), None));
        }
        self.compress(data, max_bytes, max_dim).await
    }

    /// Re-encodes `data` to fit `max_bytes` and `max_dim`.
    #[cfg(feature = "compress")]
    async fn compress(
        &self,
        data: Bytes,
        max_bytes: Option<usize>,
        max_dim: Option<u32>,
    ) -> Result<Prepared, ApiError> {
        let opts = kiln_compress::CompressOptions {
            max_bytes: max_bytes.unwrap_or(usize::MAX),
            max_dimension: max_dim.unwrap_or(MAX_SIDE),
            ..kiln_compress::CompressOptions::default()
        };
        let started = std::time::Instant::now();
        let out = self
            .compressor
            .compress(Arc::from(&data[..]), opts)
            .await
            .map_err(|e| {
                if e.is_retryable() {
                    ApiError::internal(e)
                } else {
                    ApiError::invalid(format!("cannot compress the image: {e}"))
                }
            })?;
        let ct = match out.format {
            kiln_compress::OutputFormat::Webp => "image/webp",
            _ => "image/jpeg",
        };
        Ok((
            Bytes::from(out.bytes.clone()),
            ct.to_owned(),
            Some((out.width, out.height)),
            Some(started.elapsed().as_millis() as u64),
        ))
    }

    /// Without the `compress` feature an image over the asked limits is refused.
    #[cfg(not(feature = "compress"))]
    async fn compress(
        &self,
        _data: Bytes,
        _max_bytes: Option<usize>,
        _max_dim: Option<u32>,
    ) -> Result<Prepared, ApiError> {
        Err(ApiError::invalid(
            "the image is over the asked size or dimension limit and this kiln-gateway was \
             built without the `compress` feature, so it cannot compress images",
        ))
    }
}

/// Decodes all of `data` (nothing truncated or corrupt is stored) and checks that it is
/// what `ct` says.
#[cfg(feature = "compress")]
fn probe(data: &[u8], fmt: InputFormat, ct: &str) -> Result<(u32, u32), ApiError> {
    let info = kiln_compress::verify(data, &limits()).map_err(|e| {
        tracing::info!(message = "upload refused", content_type = %ct, error = %e);
        ApiError::invalid(format!("not a valid {ct} image: {e}"))
    })?;
    if info.format != fmt {
        return Err(ApiError::invalid(format!(
            "not a valid {ct} image: the data is {}",
            info.format.mime()
        )));
    }
    Ok((info.width, info.height))
}

#[cfg(not(feature = "compress"))]
fn format_of(ct: &str) -> Option<image::ImageFormat> {
    Some(match ct {
        "image/jpeg" => image::ImageFormat::Jpeg,
        "image/png" => image::ImageFormat::Png,
        "image/webp" => image::ImageFormat::WebP,
        "image/gif" => image::ImageFormat::Gif,
        _ => return None,
    })
}

/// Decodes all of `data` with the `image` crate (nothing truncated or corrupt is stored),
/// within 16384 px a side and 64 MP, and checks that it is what `ct` says.
#[cfg(not(feature = "compress"))]
fn probe(data: &[u8], fmt: image::ImageFormat, ct: &str) -> Result<(u32, u32), ApiError> {
    let refuse = |why: String| {
        tracing::info!(message = "upload refused", content_type = %ct, error = %why);
        ApiError::invalid(format!("not a valid {ct} image: {why}"))
    };
    let found = image::guess_format(data).map_err(|e| refuse(e.to_string()))?;
    if found != fmt {
        return Err(ApiError::invalid(format!(
            "not a valid {ct} image: the data is {}",
            found.to_mime_type()
        )));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(data), fmt);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // 64 MP of RGBA.
    limits.max_alloc = Some(64 << 20 << 2);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| refuse(e.to_string()))?;
    Ok((img.width(), img.height()))
}
