//! Reference-image compression to a byte target.
//!
//! [`compress`] turns one uploaded image (JPEG, PNG, WebP or GIF) into a JPEG or lossy WebP
//! of at most [`CompressOptions::max_bytes`] whose long side is at most
//! [`CompressOptions::max_dimension`]. EXIF orientation is applied, CMYK and YCCK JPEGs are
//! converted to RGB, alpha is flattened onto a background colour, grayscale stays grayscale,
//! and the output never exceeds the byte budget: when the lowest quality does not fit, the
//! image is shrunk in steps, and when even that fails a typed error is returned.
//!
//! JPEG is decoded and encoded with libjpeg-turbo; large JPEGs are shrunk while decoding
//! (DCT scaling by 1/2, 1/4 or 1/8), still WebPs by libwebp's rescaler (an integer factor),
//! then everything is resized with a SIMD Lanczos filter. The quality is the highest integer
//! quality that fits, found by a predictive search on the sizes seen so far: one encode when
//! `max_quality` fits, usually three when it does not (a miss, a fit at q, a miss at q + 1).
//!
//! The core is synchronous. With the `tokio` feature, [`Compressor`] runs work on a bounded
//! blocking pool and caches results by a hash of input and options.
//!
//! ```
//! use kiln_compress::{compress, CompressOptions, OutputFormat};
//!
//! // A 64x48 grey PNG built in memory.
//! let img = image::RgbImage::from_pixel(64, 48, image::Rgb([120, 130, 140]));
//! let mut png = Vec::new();
//! img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
//!
//! let opts = CompressOptions { max_bytes: 10_000, max_dimension: 32, ..Default::default() };
//! let out = compress(&png, &opts)?;
//! assert_eq!(out.format, OutputFormat::Jpeg);
//! assert_eq!((out.width, out.height), (32, 24));
//! assert!(out.bytes.len() <= 10_000);
//! assert!(out.to_data_url().starts_with("data:image/jpeg;base64,"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod decode;
mod encode;
mod error;
mod exif;
mod options;
mod pipeline;
mod png_meta;
mod resize;
mod verify;
mod webp_dec;

#[cfg(feature = "tokio")]
mod compressor;

#[cfg(feature = "tokio")]
pub use compressor::{Compressor, CompressorConfig};
pub use error::CompressError;
pub use options::{CompressOptions, DecodeLimits, OutputFormat, Rgb};
pub use pipeline::{Compressed, Timings, compress};
pub use verify::{ImageInfo, InputFormat, verify};

// Re-exported so callers (and the doc example) can build test images with the same version.
#[doc(hidden)]
pub use image;
