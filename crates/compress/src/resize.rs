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
    let (ow, oh) = if o >= 5 { (h, w) } else { (w, h) };
    let out = if channels == 1 {
        remap::<1>(&src, w as usize, h as usize, o)
    } else {
        remap::<3>(&src, w as usize, h as usize, o)
    };
    (out, ow, oh)
}

/// Output pixel (x, y) of orientation `o` comes from source pixel `base + x * dx + y * dy`
/// (in pixels). Walks the output in 64 x 64 tiles so that the column walks of the transposing
/// orientations (5 to 8) stay in cache.
fn remap<const C: usize>(src: &[u8], w: usize, h: usize, o: u8) -> Vec<u8> {
    let (wi, hi) = (w as isize, h as isize);
    // Source (sx, sy) for output (x, y), as sx = ax x + bx y + cx and sy = ay x + by y + cy.
    let ((ax, bx, cx), (ay, by, cy)) = match o {
        2 => ((-1, 0, wi - 1), (0, 1, 0)),
        3 => ((-1, 0, wi - 1), (0, -1, hi - 1)),
        4 => ((1, 0, 0), (0, -1, hi - 1)),
        5 => ((0, 1, 0), (1, 0, 0)),
        6 => ((0, 1, 0), (-1, 0, hi - 1)),
        7 => ((0, -1, wi - 1), (-1, 0, hi - 1)),
        _ => ((0, -1, wi - 1), (1, 0, 0)),
    };
    let (dx, dy, base) = (ay * wi + ax, by * wi + bx, cy * wi + cx);
    let (ow, oh) = if o >= 5 { (h, w) } else { (w, h) };
    let mut out = vec![0u8; src.len()];
    const TILE: usize = 64;
    for ty in (0..oh).step_by(TILE) {
        for tx in (0..ow).step_by(TILE) {
            for y in ty..(ty + TILE).min(oh) {
                let mut s = base + tx as isize * dx + y as isize * dy;
                let row = &mut out[(y * ow + tx) * C..(y * ow + (tx + TILE).min(ow)) * C];
                for d in row.chunks_exact_mut(C) {
                    let i = s as usize * C;
                    d.copy_from_slice(&src[i..i + C]);
                    s += dx;
                }
            }
        }
    }
    out
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

    #[test]
    fn orientations_agree_across_channels_and_tiles() {
        // 150 x 70 spans several tiles; RGB pixel i is (i, i >> 8, 7) for gray pixel i mod 256.
        let (w, h) = (150u32, 70u32);
        let gray: Vec<u32> = (0..w * h).collect();
        let rgb: Vec<u8> = gray
            .iter()
            .flat_map(|&i| [i as u8, (i >> 8) as u8, 7])
            .collect();
        for o in 1..=8u8 {
            let (out, ow, oh) = orient(rgb.clone(), w, h, 3, o);
            assert_eq!(ow * oh, w * h);
            // Decode the source index of every output pixel and check the mapping is the
            // orientation's: a corner of the output comes from the matching source corner.
            let idx: Vec<u32> = out
                .chunks_exact(3)
                .map(|p| p[0] as u32 | (p[1] as u32) << 8)
                .collect();
            let (sx, sy) = (idx[0] % w, idx[0] / w);
            // Orientation 6 turns clockwise: output (0, 0) is the source's bottom-left.
            let want = match o {
                1 | 5 => (0, 0),
                2 | 8 => (w - 1, 0),
                3 | 7 => (w - 1, h - 1),
                _ => (0, h - 1),
            };
            assert_eq!((sx, sy), want, "orientation {o}");
            let mut sorted = idx.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, gray, "orientation {o} is not a permutation");
            // The same as the one-channel path on the low byte.
            let low: Vec<u8> = gray.iter().map(|&i| i as u8).collect();
            let (g, _, _) = orient(low, w, h, 1, o);
            let want_low: Vec<u8> = idx.iter().map(|&i| i as u8).collect();
            assert_eq!(g, want_low, "orientation {o}, one channel");
        }
    }
}
