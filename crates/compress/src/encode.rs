//! JPEG (libjpeg-turbo) and lossy WebP (libwebp) encoders.

use turbojpeg::{Image, PixelFormat, Subsamp};

use crate::{CompressError, OutputFormat};

/// A reusable encoder for one output format.
pub(crate) struct Encoder {
    format: OutputFormat,
    tj: Option<turbojpeg::Compressor>,
}

impl Encoder {
    pub(crate) fn new(format: OutputFormat) -> Result<Self, CompressError> {
        let tj = match format {
            OutputFormat::Jpeg => {
                let mut c = turbojpeg::Compressor::new()
                    .map_err(|e| CompressError::Encode(e.to_string()))?;
                c.set_optimize(true)
                    .map_err(|e| CompressError::Encode(e.to_string()))?;
                Some(c)
            }
            OutputFormat::Webp => None,
        };
        Ok(Self { format, tj })
    }

    pub(crate) fn encode(
        &mut self,
        px: &[u8],
        w: u32,
        h: u32,
        channels: u8,
        q: u8,
    ) -> Result<Vec<u8>, CompressError> {
        let e = |e: &dyn std::fmt::Display| CompressError::Encode(e.to_string());
        match (self.format, self.tj.as_mut()) {
            (OutputFormat::Jpeg, Some(c)) => {
                let (fmt, sub) = if channels == 1 {
                    (PixelFormat::GRAY, Subsamp::Gray)
                } else {
                    (PixelFormat::RGB, Subsamp::Sub2x2)
                };
                c.set_subsamp(sub).map_err(|x| e(&x))?;
                c.set_quality(q.into()).map_err(|x| e(&x))?;
                let image = Image {
                    pixels: px,
                    width: w as usize,
                    pitch: w as usize * channels as usize,
                    height: h as usize,
                    format: fmt,
                };
                c.compress_to_vec(image).map_err(|x| e(&x))
            }
            _ => {
                let rgb;
                let px = if channels == 1 {
                    rgb = px.iter().flat_map(|&v| [v, v, v]).collect::<Vec<u8>>();
                    &rgb[..]
                } else {
                    px
                };
                let mem = webp::Encoder::from_rgb(px, w, h).encode(f32::from(q));
                Ok(mem.to_vec())
            }
        }
    }
}
