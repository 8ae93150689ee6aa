//! SIMD Lanczos3 resize and EXIF orientation on interleaved 8-bit buffers.

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};

use crate::CompressError;

/// Resize `src` (`channels` = 1 or 3) from `w`x`h` to `nw`x`nh`.
pub(crate) fn resize(
    src: Vec<u8>,
    (w, h): (u32, u32),
    (nw, nh): (u32, u32),
    channels: u8,
) -> Result<Vec<u8>, CompressError> {
    if (w, h) == (nw, nh) {
        return Ok(src);
    }
    let pt = if channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let err = |e: &dyn std::fmt::Display| CompressError::Encode(format!("resize: {e}"));
    let src = Image::from_vec_u8(w, h, src, pt).map_err(|e| err(&e))?;
    let mut dst = Image::new(nw, nh, pt);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| err(&e))?;
    Ok(dst.into_vec())
}

/// Apply EXIF orientation `o` (1..=8); returns the new buffer and dimensions.
pub(crate) fn orient(src: Vec<u8>, w: u32, h: u32, channels: u8, o: u8) -> (Vec<u8>, u32, u32) {
    if !(2..=8).contains(&o) {
        return (src, w, h);
    }
    let (w, h, c) = (w as usize, h as usize, channels as usize);
    let swap = o >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = vec![0u8; src.len()];
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = match o {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                _ => (w - 1 - y, x),
            };
            let s = (sy * w + sx) * c;
            let d = (y * ow + x) * c;
            out[d..d + c].copy_from_slice(&src[s..s + c]);
        }
    }
    (out, ow as u32, oh as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientations_match_their_definitions() {
        // 2x3 image, values = index.
        let src: Vec<u8> = (0..6).collect();
        // Row-major: [0 1; 2 3; 4 5]
        assert_eq!(orient(src.clone(), 2, 3, 1, 2).0, vec![1, 0, 3, 2, 5, 4]);
        assert_eq!(orient(src.clone(), 2, 3, 1, 3).0, vec![5, 4, 3, 2, 1, 0]);
        assert_eq!(orient(src.clone(), 2, 3, 1, 4).0, vec![4, 5, 2, 3, 0, 1]);
        assert_eq!(
            orient(src.clone(), 2, 3, 1, 5),
            (vec![0, 2, 4, 1, 3, 5], 3, 2)
        );
        // Rotate 90 clockwise: top row becomes the bottom-left... [4 2 0; 5 3 1]
        assert_eq!(
            orient(src.clone(), 2, 3, 1, 6),
            (vec![4, 2, 0, 5, 3, 1], 3, 2)
        );
        assert_eq!(
            orient(src.clone(), 2, 3, 1, 7),
            (vec![5, 3, 1, 4, 2, 0], 3, 2)
        );
        assert_eq!(orient(src, 2, 3, 1, 8), (vec![1, 3, 5, 0, 2, 4], 3, 2));
    }
}
