//! JPEG marker-segment helpers: EXIF orientation, ICC profile, lossless metadata strip.

/// One marker segment before the scan data: (marker byte, payload without length).
fn segments(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = 2usize;
    let ok = data.starts_with(&[0xFF, 0xD8]);
    std::iter::from_fn(move || {
        if !ok {
            return None;
        }
        while pos < data.len() && data[pos] == 0xFF && data.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let marker = *data.get(pos + 1)?;
        if data[pos] != 0xFF || marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = u16::from_be_bytes([*data.get(pos + 2)?, *data.get(pos + 3)?]) as usize;
        if len < 2 {
            return None;
        }
        let payload = data.get(pos + 4..pos + 2 + len)?;
        pos += 2 + len;
        Some((marker, payload))
    })
}

/// EXIF orientation (1..=8) of a JPEG, 1 when absent or unreadable.
pub(crate) fn jpeg_orientation(data: &[u8]) -> u8 {
    segments(data)
        .filter(|(m, p)| *m == 0xE1 && p.starts_with(b"Exif\0\0"))
        .find_map(|(_, p)| tiff_orientation(&p[6..]))
        .unwrap_or(1)
}

/// Orientation from a TIFF header (the body of an EXIF block).
pub(crate) fn tiff_orientation(t: &[u8]) -> Option<u8> {
    let le = match t.get(0..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b = [*t.get(o)?, *t.get(o + 1)?];
        Some(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b = [*t.get(o)?, *t.get(o + 1)?, *t.get(o + 2)?, *t.get(o + 3)?];
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    (0..count.min(512)).find_map(|i| {
        let e = ifd + 2 + i * 12;
        if u16_at(e)? == 0x0112 {
            let v = u16_at(e + 8)?;
            (1..=8).contains(&v).then_some(v as u8)
        } else {
            None
        }
    })
}

/// The ICC profile of a JPEG (APP2 `ICC_PROFILE` chunks joined in order), if any and at
/// most `max` bytes.
pub(crate) fn jpeg_icc(data: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut chunks: Vec<(u8, &[u8])> = segments(data)
        .filter(|(m, p)| *m == 0xE2 && p.len() > 14 && p.starts_with(b"ICC_PROFILE\0"))
        .map(|(_, p)| (p[12], &p[14..]))
        .collect();
    if chunks.is_empty() || chunks.iter().map(|c| c.1.len()).sum::<usize>() > max {
        return None;
    }
    chunks.sort_by_key(|c| c.0);
    Some(chunks.iter().flat_map(|c| c.1.iter().copied()).collect())
}

/// The chunks of a WebP (RIFF) file: (fourcc, payload). Stops at the first malformed one.
fn webp_chunks(data: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let ok = data.len() >= 12 && &data[0..4] == b"RIFF" && &data[8..12] == b"WEBP";
    let mut pos = 12usize;
    std::iter::from_fn(move || {
        if !ok {
            return None;
        }
        let fourcc = data.get(pos..pos + 4)?;
        let len = u32::from_le_bytes(data.get(pos + 4..pos + 8)?.try_into().ok()?) as usize;
        let payload = data.get(pos + 8..(pos + 8).checked_add(len)?)?;
        pos += 8 + len + (len & 1);
        Some((fourcc, payload))
    })
}

/// EXIF orientation (1..=8) of a WebP, 1 when absent or unreadable.
pub(crate) fn webp_orientation(data: &[u8]) -> u8 {
    webp_chunks(data)
        .find(|(c, _)| *c == b"EXIF")
        .and_then(|(_, p)| tiff_orientation(p.strip_prefix(b"Exif\0\0").unwrap_or(p)))
        .unwrap_or(1)
}

/// The ICC profile of a WebP (its `ICCP` chunk), if any and at most `max` bytes.
pub(crate) fn webp_icc(data: &[u8], max: usize) -> Option<Vec<u8>> {
    webp_chunks(data)
        .find(|(c, _)| *c == b"ICCP")
        .filter(|(_, p)| p.len() <= max)
        .map(|(_, p)| p.to_vec())
}

/// True when the JPEG carries an Adobe APP14 segment (CMYK stored inverted).
pub(crate) fn has_adobe(data: &[u8]) -> bool {
    segments(data).any(|(m, p)| m == 0xEE && p.starts_with(b"Adobe"))
}

/// Copy of a JPEG without APP1 and APP3..APP15 (except Adobe APP14) and COM segments.
/// JFIF (APP0) and ICC (APP2) are kept. Returns `None` if the stream is not well formed.
pub(crate) fn strip_jpeg_metadata(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&[0xFF, 0xD8]);
    let mut pos = 2usize;
    loop {
        if data.get(pos) != Some(&0xFF) {
            return None;
        }
        let marker = *data.get(pos + 1)?;
        if marker == 0xDA {
            out.extend_from_slice(&data[pos..]);
            return Some(out);
        }
        let len = u16::from_be_bytes([*data.get(pos + 2)?, *data.get(pos + 3)?]) as usize;
        let seg = data.get(pos..pos + 2 + len)?;
        let payload = &seg[4.min(seg.len())..];
        let drop = marker == 0xFE
            || marker == 0xE1
            || ((0xE3..=0xEF).contains(&marker)
                && !(marker == 0xEE && payload.starts_with(b"Adobe")));
        if !drop {
            out.extend_from_slice(seg);
        }
        pos += 2 + len;
    }
}

/// Insert an ICC profile as APP2 segments right after SOI of a freshly encoded JPEG.
pub(crate) fn insert_icc(jpeg: &[u8], icc: &[u8]) -> Vec<u8> {
    const CHUNK: usize = 65_519;
    let n = icc.len().div_ceil(CHUNK).min(255);
    let mut out = Vec::with_capacity(jpeg.len() + icc.len() + n * 18);
    out.extend_from_slice(&jpeg[..2.min(jpeg.len())]);
    for (i, c) in icc.chunks(CHUNK).take(255).enumerate() {
        let len = (c.len() + 16) as u16;
        out.extend_from_slice(&[0xFF, 0xE2]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.push((i + 1) as u8);
        out.push(n as u8);
        out.extend_from_slice(c);
    }
    out.extend_from_slice(jpeg.get(2..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientation_from_big_and_little_endian_tiff() {
        for le in [true, false] {
            let mut t: Vec<u8> = if le { b"II".to_vec() } else { b"MM".to_vec() };
            let w16 = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
            let w32 = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
            t.extend_from_slice(&w16(42));
            t.extend_from_slice(&w32(8));
            t.extend_from_slice(&w16(1));
            t.extend_from_slice(&w16(0x0112));
            t.extend_from_slice(&w16(3));
            t.extend_from_slice(&w32(1));
            t.extend_from_slice(&w16(6));
            t.extend_from_slice(&[0, 0]);
            assert_eq!(tiff_orientation(&t), Some(6));
        }
    }

    #[test]
    fn webp_chunks_give_orientation_and_icc() {
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 8, 0, 0]);
        let mut body = b"WEBP".to_vec();
        for (cc, payload) in [
            (&b"VP8X"[..], &[0u8; 10][..]),
            (b"ICCP", b"abc"),
            (b"VP8 ", &[1, 2, 3, 4]),
            (b"EXIF", &tiff),
        ] {
            body.extend_from_slice(cc);
            body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            body.extend_from_slice(payload);
            if payload.len() % 2 == 1 {
                body.push(0);
            }
        }
        let mut file = b"RIFF".to_vec();
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&body);
        assert_eq!(webp_orientation(&file), 8);
        assert_eq!(webp_icc(&file, 1024).as_deref(), Some(&b"abc"[..]));
        assert_eq!(webp_icc(&file, 2), None);
        assert_eq!(webp_orientation(&file[..file.len() - 3]), 1);
        assert_eq!(webp_orientation(b"RIFF\0\0\0\0WEBP"), 1);
    }

    #[test]
    fn icc_round_trips_through_insert() {
        let jpeg = [0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 0xFF, 0xD9];
        let icc: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let with = insert_icc(&jpeg, &icc);
        assert_eq!(jpeg_icc(&with, 1 << 20).as_deref(), Some(&icc[..]));
        assert_eq!(jpeg_icc(&with, 69_999), None);
    }
}
