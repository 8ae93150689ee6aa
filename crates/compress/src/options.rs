use serde::{Deserialize, Serialize};

/// Output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Baseline JPEG, 4:2:0, optimised Huffman tables (libjpeg-turbo).
    Jpeg,
    /// Lossy WebP (libwebp).
    Webp,
}

impl OutputFormat {
    /// The MIME type, e.g. `image/jpeg`.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// An 8-bit sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rgb(pub u8, pub u8, pub u8);

/// Limits checked against the declared header before any pixel buffer is allocated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct DecodeLimits {
    /// Largest accepted input, in bytes. Default: 64 MiB.
    pub max_input_bytes: usize,
    /// Largest accepted width or height. Default: 16384.
    pub max_side: u32,
    /// Largest accepted width x height. Default: 64,000,000 (64 MP).
    pub max_pixels: u64,
    /// Largest single allocation the PNG/WebP/GIF decoders may make. Default: 512 MiB.
    pub max_alloc: u64,
    /// Largest metadata block kept, after decompression: the ICC profile of a JPEG, PNG or
    /// WebP, a PNG's `eXIf`. A larger one is dropped (a PNG's `iCCP` is inflated no further
    /// than this); PNG text chunks (`tEXt`, `zTXt`, `iTXt`) are never inflated.
    /// Default: 1 MiB.
    pub max_metadata_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_input_bytes: 64 << 20,
            max_side: 16_384,
            max_pixels: 64_000_000,
            max_alloc: 512 << 20,
            max_metadata_bytes: 1 << 20,
        }
    }
}

/// What to produce.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct CompressOptions {
    /// Upper bound on the output size in bytes; never exceeded. Default: 300,000.
    pub max_bytes: usize,
    /// Upper bound on the long side in pixels; smaller images are not enlarged. Default: 2048.
    pub max_dimension: u32,
    /// Output encoding. Default: `jpeg`.
    pub format: OutputFormat,
    /// Colour that transparent pixels are flattened onto. Default: white.
    pub background: Rgb,
    /// Return an input that already fits (same format, within both limits, upright, RGB or
    /// gray) without re-encoding it. Default: true.
    pub passthrough: bool,
    /// Drop EXIF, XMP and comments (the ICC profile is kept so colours stay right).
    /// On pass-through this strips segments losslessly. Default: true.
    pub strip_metadata: bool,
    /// First (and highest) quality tried. Default: 85.
    pub max_quality: u8,
    /// Lowest acceptable quality before the image is shrunk further. Default: 30.
    pub min_quality: u8,
    /// Smallest long side the shrink steps may reach before giving up. Default: 64.
    pub min_dimension: u32,
    /// Decoder limits. Default: see [`DecodeLimits`].
    pub limits: DecodeLimits,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            max_bytes: 300_000,
            max_dimension: 2048,
            format: OutputFormat::Jpeg,
            background: Rgb(255, 255, 255),
            passthrough: true,
            strip_metadata: true,
            max_quality: 85,
            min_quality: 30,
            min_dimension: 64,
            limits: DecodeLimits::default(),
        }
    }
}
