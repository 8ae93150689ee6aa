//! Image checks and optional compression for uploads. Header checks run on the blocking
//! pool behind a semaphore; compression goes through `kiln_compress::Compressor`, which also
//! runs off the runtime and caches results by content and options.

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

/// An image ready to store: bytes, content type, dimensions, and the time spent
/// re-encoding it (ms; `None` when stored as sent).
pub(crate) type Prepared = (Bytes, String, Option<(u32, u32)>, Option<u64>);

/// Runs image work off the runtime.
#[derive(Clone)]
pub(crate) struct ImagePrep {
    permits: Arc<Semaphore>,
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
            compressor: kiln_compress::Compressor::new(kiln_compress::CompressorConfig::default()),
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
}

fn probe(data: &[u8], fmt: ImageFormat, ct: &str) -> Result<(u32, u32), ApiError> {
    let mut reader = ImageReader::with_format(Cursor::new(data), fmt);
    reader.limits(limits());
    reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(format!("not a valid {ct} image: {e}")))
}
