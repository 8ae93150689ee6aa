//! Still WebP decoding through libwebp, shrunk by an integer factor while decoding.
//!
//! libwebp's rescaler runs on the decoded rows, so a 4096 px image shrunk by 2 never exists
//! at full size as RGB; the rest of the way to the target is the usual Lanczos3 resize.
// FFI to libwebp: the three calls below are the whole unsafe surface; each states why it is
// sound. The safe `webp` crate has no scaled decode.
#![allow(unsafe_code)]

use std::ffi::c_int;
use std::mem::MaybeUninit;

use libwebp_sys as ffi;

/// What the bitstream header declares.
pub(crate) struct Features {
    pub width: u32,
    pub height: u32,
    pub has_alpha: bool,
    pub animated: bool,
}

/// Header features, or `None` when the data is not a WebP libwebp can parse.
pub(crate) fn features(data: &[u8]) -> Option<Features> {
    let mut f = MaybeUninit::<ffi::WebPBitstreamFeatures>::zeroed();
    // SAFETY: `data` is valid for `data.len()` bytes and only read; `f` is writable memory of
    // the right type, which libwebp fills on success.
    let status = unsafe { ffi::WebPGetFeatures(data.as_ptr(), data.len(), f.as_mut_ptr()) };
    if status != ffi::VP8StatusCode::VP8_STATUS_OK {
        return None;
    }
    // SAFETY: the struct is plain integers, so the zeroed value is already valid, and libwebp
    // has written it.
    let f = unsafe { f.assume_init() };
    Some(Features {
        width: u32::try_from(f.width).ok()?,
        height: u32::try_from(f.height).ok()?,
        has_alpha: f.has_alpha != 0,
        animated: f.has_animation != 0,
    })
}

/// Decode a still WebP of `full` dimensions to `out` dimensions (equal, or smaller through
/// libwebp's rescaler) as RGB, or RGBA when `alpha`. The buffer is allocated here, so the
/// caller checks the dimensions against its limits first.
pub(crate) fn decode(
    data: &[u8],
    full: (u32, u32),
    out: (u32, u32),
    alpha: bool,
) -> Result<Vec<u8>, String> {
    let channels = if alpha { 4 } else { 3 };
    let (w, h) = (out.0 as usize, out.1 as usize);
    let stride = w * channels;
    let too_big = || format!("{}x{} output", out.0, out.1);
    let stride_c = c_int::try_from(stride).map_err(|_| too_big())?;
    let mut buf = vec![0u8; stride.checked_mul(h).ok_or_else(too_big)?];
    let mut config =
        ffi::WebPDecoderConfig::new().map_err(|()| "libwebp ABI mismatch".to_string())?;
    if out != full {
        config.options.use_scaling = 1;
        config.options.scaled_width = c_int::try_from(out.0).map_err(|_| too_big())?;
        config.options.scaled_height = c_int::try_from(out.1).map_err(|_| too_big())?;
    }
    config.output.colorspace = if alpha {
        ffi::WEBP_CSP_MODE::MODE_RGBA
    } else {
        ffi::WEBP_CSP_MODE::MODE_RGB
    };
    config.output.is_external_memory = 1;
    config.output.u.RGBA = ffi::WebPRGBABuffer {
        rgba: buf.as_mut_ptr(),
        stride: stride_c,
        size: buf.len(),
    };
    // SAFETY: `config` was initialised by WebPInitDecoderConfig; its output points into `buf`,
    // which lives across the call and holds `stride * h` bytes, and libwebp refuses to write
    // past `size`. `data` is only read.
    let status = unsafe { ffi::WebPDecode(data.as_ptr(), data.len(), &mut config) };
    // SAFETY: with external memory this frees only libwebp's own (here absent) allocations,
    // never `buf`.
    unsafe { ffi::WebPFreeDecBuffer(&mut config.output) };
    if status != ffi::VP8StatusCode::VP8_STATUS_OK {
        return Err(format!("libwebp: {status:?}"));
    }
    Ok(buf)
}
