//! PNG metadata read before any decoder sees the file: the chunks are walked, the ICC
//! profile (`iCCP`) is inflated only up to a bound, and the chunks a decoder would inflate
//! or keep without one (`iCCP`, `zTXt`, `iTXt`, `tEXt`, and an `eXIf` over the bound) are
//! removed from the copy handed to it. A 1 MB file whose `iCCP` inflates to gigabytes
//! therefore costs at most the bound, not what the decoder's allocation limit allows.

use std::borrow::Cow;

use crate::{CompressError, DecodeLimits, decode};

const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// A PNG ready for a decoder, and the ICC profile it carried (when within the bound).
pub(crate) struct Prepared<'a> {
    /// The file without its metadata chunks (borrowed when it had none).
    pub data: Cow<'a, [u8]>,
    /// The inflated ICC profile, `None` when absent, corrupt or over the bound.
    pub icc: Option<Vec<u8>>,
}

pub(crate) fn is_png(data: &[u8]) -> bool {
    data.starts_with(SIGNATURE)
}

/// The chunks of `data` up to and including `IEND`: (start, end, type), where
/// `data[start..end]` is the whole chunk (length, type, payload, CRC). The dimensions in
/// `IHDR` are checked against `limits` as soon as it is read.
fn chunks(
    data: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<(usize, usize, [u8; 4])>, CompressError> {
    let corrupt = |why: &str| CompressError::Corrupt(format!("PNG: {why}"));
    let mut out = Vec::new();
    let mut pos = SIGNATURE.len();
    loop {
        let head = data
            .get(pos..pos + 8)
            .ok_or_else(|| corrupt("truncated (no IEND chunk)"))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = [head[4], head[5], head[6], head[7]];
        if len > i32::MAX as usize {
            return Err(corrupt("chunk length out of range"));
        }
        let end = pos + 12 + len;
        if end > data.len() {
            return Err(corrupt(&format!(
                "truncated inside a {} chunk",
                String::from_utf8_lossy(&kind)
            )));
        }
        if &kind == b"IHDR" && len >= 8 {
            let p = &data[pos + 8..];
            let w = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            let h = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
            decode::check_dims(w.into(), h.into(), limits)?;
        }
        out.push((pos, end, kind));
        pos = end;
        if &kind == b"IEND" {
            return Ok(out);
        }
    }
}

/// Walks `data`'s chunks (a truncated file is an error, and so are dimensions over
/// `limits`), inflates the ICC profile up to `limits.max_metadata_bytes`, and drops the
/// metadata chunks from what the decoder gets.
pub(crate) fn prepare<'a>(
    data: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Prepared<'a>, CompressError> {
    let max_meta = limits.max_metadata_bytes;
    let all = chunks(data, limits)?;
    let mut icc = None;
    let mut dropped = false;
    let mut keep: Vec<(usize, usize)> = Vec::with_capacity(all.len());
    for &(start, end, kind) in &all {
        let payload = &data[start + 8..end - 4];
        let drop = match &kind {
            b"iCCP" => {
                if icc.is_none() {
                    icc = inflate_iccp(payload, max_meta);
                }
                true
            }
            b"zTXt" | b"iTXt" | b"tEXt" => true,
            b"eXIf" => payload.len() > max_meta,
            _ => false,
        };
        if drop {
            dropped = true;
        } else {
            keep.push((start, end));
        }
    }
    let data = if dropped {
        let mut out = Vec::with_capacity(data.len());
        out.extend_from_slice(SIGNATURE);
        for (s, e) in keep {
            out.extend_from_slice(&data[s..e]);
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(&data[..all.last().map_or(data.len(), |c| c.1)])
    };
    Ok(Prepared { data, icc })
}

/// The profile of an `iCCP` payload (name, NUL, method 0, zlib stream), inflated to at
/// most `max` bytes; `None` when malformed or larger.
fn inflate_iccp(payload: &[u8], max: usize) -> Option<Vec<u8>> {
    let nul = payload.iter().take(80).position(|&b| b == 0)?;
    if nul == 0 || payload.get(nul + 1) != Some(&0) {
        return None;
    }
    match fdeflate::decompress_to_vec_bounded(&payload[nul + 2..], max) {
        Ok(p) => Some(p),
        Err(e) => {
            let why = match e {
                fdeflate::BoundedDecompressionError::OutputTooLarge { .. } => "over the limit",
                _ => "corrupt",
            };
            tracing::debug!(message = "PNG ICC profile dropped", why, max);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_without_chunks_is_truncated() {
        assert!(matches!(
            prepare(SIGNATURE, &DecodeLimits::default()),
            Err(CompressError::Corrupt(_))
        ));
    }
}
