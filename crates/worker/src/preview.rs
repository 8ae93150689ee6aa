//! Building `preview` frames: the size and type checks a handler gets back as errors.

use base64::Engine as _;
use kiln_protocol::messages::{MAX_PREVIEW_BYTES, PREVIEW_TYPES, Preview};

/// Why a preview was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreviewError {
    /// Over the inline limit: upload it with the files API and use
    /// [`TaskContext::preview_file`](crate::TaskContext::preview_file).
    #[error(
        "the preview is {size} bytes, over the {limit}-byte inline limit; upload it (POST /v1/files) and send its id with preview_file"
    )]
    TooLarge {
        /// The preview's size.
        size: usize,
        /// [`MAX_PREVIEW_BYTES`].
        limit: usize,
    },
    /// Not an image type previews may have.
    #[error("preview type {0:?} is not one of image/png, image/jpeg, image/webp, image/gif")]
    UnsupportedType(String),
    /// Empty image or file id.
    #[error("the preview is empty")]
    Empty,
}

impl PreviewError {
    /// Whether sending the same preview again may succeed: never (the frame is the
    /// problem, not the connection).
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Width and height from a PNG header, when `data` is one.
fn png_size(data: &[u8]) -> Option<(u32, u32)> {
    if data.len() < 24 || &data[..8] != b"\x89PNG\r\n\x1a\n" || &data[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&data[16..20]), be(&data[20..24])))
}

fn check_type(mime: &str) -> Result<(), PreviewError> {
    if PREVIEW_TYPES.contains(&mime) {
        Ok(())
    } else {
        Err(PreviewError::UnsupportedType(mime.to_owned()))
    }
}

/// A preview carrying `data` inline (index 0: the context numbers it).
pub(crate) fn inline(lease: &str, data: &[u8], mime: &str) -> Result<Preview, PreviewError> {
    check_type(mime)?;
    if data.is_empty() {
        return Err(PreviewError::Empty);
    }
    if data.len() > MAX_PREVIEW_BYTES {
        return Err(PreviewError::TooLarge {
            size: data.len(),
            limit: MAX_PREVIEW_BYTES,
        });
    }
    let size = png_size(data);
    Ok(Preview {
        lease: lease.to_owned(),
        index: 0,
        mime: mime.to_owned(),
        data: Some(base64::engine::general_purpose::STANDARD.encode(data)),
        file: None,
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
    })
}

/// A preview naming an uploaded file (index 0: the context numbers it).
pub(crate) fn by_file(lease: &str, file_id: &str, mime: &str) -> Result<Preview, PreviewError> {
    check_type(mime)?;
    if file_id.is_empty() {
        return Err(PreviewError::Empty);
    }
    Ok(Preview {
        lease: lease.to_owned(),
        index: 0,
        mime: mime.to_owned(),
        data: None,
        file: Some(file_id.to_owned()),
        width: None,
        height: None,
    })
}

impl crate::TaskContext {
    /// Sends a preview image of the task (e.g. a coarse render), at most
    /// [`MAX_PREVIEW_BYTES`](kiln_protocol::messages::MAX_PREVIEW_BYTES), as `mime`
    /// (`image/png`, `image/jpeg`, `image/webp` or `image/gif`). Lossy like progress: the
    /// gateway keeps the latest and rate-limits them per task.
    pub fn preview(&self, data: &[u8], mime: &str) -> Result<(), PreviewError> {
        let mut p = inline(&self.lease, data, mime)?;
        p.index = self.next_preview();
        let _ = self.out.send(kiln_protocol::Message::Preview(p));
        Ok(())
    }

    /// Sends a preview uploaded with the files API (for previews over the inline limit).
    pub fn preview_file(&self, file_id: &str, mime: &str) -> Result<(), PreviewError> {
        let mut p = by_file(&self.lease, file_id, mime)?;
        p.index = self.next_preview();
        let _ = self.out.send(kiln_protocol::Message::Preview(p));
        Ok(())
    }

    fn next_preview(&self) -> u32 {
        self.previews
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inline_previews_are_checked_and_sized() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&640u32.to_be_bytes());
        png.extend_from_slice(&480u32.to_be_bytes());
        let p = inline("l-1", &png, "image/png").unwrap();
        assert_eq!((p.width, p.height), (Some(640), Some(480)));
        assert_eq!(p.check(), Ok(()));
        let big = vec![0u8; MAX_PREVIEW_BYTES + 1];
        assert!(matches!(
            inline("l-1", &big, "image/jpeg"),
            Err(PreviewError::TooLarge { .. })
        ));
        assert_eq!(
            inline("l-1", &png, "image/bmp"),
            Err(PreviewError::UnsupportedType("image/bmp".into()))
        );
        assert_eq!(inline("l-1", b"", "image/png"), Err(PreviewError::Empty));
        let f = by_file("l-1", "file_1", "image/webp").unwrap();
        assert_eq!(f.check(), Ok(()));
    }
}
