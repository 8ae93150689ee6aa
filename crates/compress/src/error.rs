use thiserror::Error;

/// Why an image could not be compressed.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum CompressError {
    /// The input is not a format this crate reads (JPEG, PNG, WebP, GIF).
    #[error("unsupported or unrecognised image format")]
    UnsupportedFormat,
    /// The input declares dimensions or a size above the configured limits.
    /// Refused before any pixel buffer is allocated.
    #[error("image exceeds limits: {0}")]
    LimitExceeded(String),
    /// The input is truncated or corrupt.
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    /// Even the lowest quality at the smallest allowed size does not fit `max_bytes`.
    #[error("cannot fit within {max_bytes} bytes (smallest attempt: {smallest} bytes)")]
    TargetUnreachable {
        /// The byte budget asked for.
        max_bytes: usize,
        /// The smallest output produced.
        smallest: usize,
    },
    /// The options are inconsistent (for example `min_quality > max_quality`).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// An encoder failed unexpectedly.
    #[error("encoder failed: {0}")]
    Encode(String),
    /// The async worker was cancelled or panicked.
    #[error("worker failed: {0}")]
    Worker(String),
}

impl CompressError {
    /// True when the input itself is at fault (bad format, too large, corrupt) and a retry with
    /// the same bytes cannot succeed.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedFormat | Self::LimitExceeded(_) | Self::Corrupt(_)
        )
    }

    /// True when a retry with the same input and options might succeed (internal failures only).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Worker(_))
    }
}
