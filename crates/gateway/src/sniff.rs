//! What an upload really is, from its first bytes: the magic numbers of the formats GPU
//! workers produce (images, video, audio, archives, documents) and a text check. No
//! dependency; the head is at most [`SNIFF_BYTES`] long.

/// How many leading bytes the sniffer looks at.
pub(crate) const SNIFF_BYTES: usize = 8192;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A format recognised by its magic number.
    Known(&'static str),
    /// UTF-8 text that looks like JSON (an object or array).
    Json,
    /// UTF-8 text.
    Text,
    /// Bytes of no format the sniffer knows.
    Binary,
}

/// Sniffs `head`, the first bytes of a body; `complete` when `head` is the whole body
/// (then JSON is checked by parsing it).
pub(crate) fn sniff(head: &[u8], complete: bool) -> Sniffed {
    let head = &head[..head.len().min(SNIFF_BYTES)];
    if let Some(t) = magic(head) {
        return Sniffed::Known(t);
    }
    if !is_text(head, complete) {
        return Sniffed::Binary;
    }
    let body = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let json = match first {
        Some(b'{' | b'[') if complete => {
            serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
        }
        Some(b'{' | b'[') => true,
        _ => false,
    };
    if json { Sniffed::Json } else { Sniffed::Text }
}

fn magic(b: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| b.get(off..off + sig.len()) == Some(sig);
    Some(match () {
        _ if at(0, b"\xFF\xD8\xFF") => "image/jpeg",
        _ if at(0, b"\x89PNG\r\n\x1a\n") => "image/png",
        _ if at(0, b"GIF87a") || at(0, b"GIF89a") => "image/gif",
        _ if at(0, b"RIFF") && at(8, b"WEBP") => "image/webp",
        _ if at(0, b"RIFF") && at(8, b"WAVE") => "audio/wav",
        _ if at(0, b"RIFF") && at(8, b"AVI ") => "video/x-msvideo",
        _ if at(4, b"ftyp") => iso_brand(b.get(8..12).unwrap_or_default()),
        _ if at(0, b"\x1A\x45\xDF\xA3") => {
            if contains(b, b"webm") {
                "video/webm"
            } else {
                "video/x-matroska"
            }
        }
        _ if at(0, b"OggS") => {
            if contains(b, b"\x80theora") {
                "video/ogg"
            } else {
                "audio/ogg"
            }
        }
        _ if at(0, b"fLaC") => "audio/flac",
        _ if at(0, b"ID3") => "audio/mpeg",
        _ if b.len() >= 2 && b[0] == 0xFF && b[1] & 0xF6 == 0xF0 => "audio/aac",
        _ if b.len() >= 3 && b[0] == 0xFF && mpeg_audio(b[1], b[2]) => "audio/mpeg",
        _ if at(0, b"PK\x03\x04") || at(0, b"PK\x05\x06") => "application/zip",
        _ if at(0, b"%PDF-") => "application/pdf",
        _ if at(0, b"\x1F\x8B") => "application/gzip",
        _ => return None,
    })
}

/// The type of an ISO base media file (MP4 family) by its major brand.
fn iso_brand(brand: &[u8]) -> &'static str {
    match brand {
        b"qt  " => "video/quicktime",
        b"M4A " | b"M4B " => "audio/mp4",
        b"avif" | b"avis" => "image/avif",
        b"heic" | b"heix" | b"mif1" | b"msf1" => "image/heic",
        _ => "video/mp4",
    }
}

/// Whether `FF b1 b2` starts an MPEG audio frame header: the rest of the sync bits, a
/// version and a layer that are not reserved, a valid bitrate and sample rate.
fn mpeg_audio(b1: u8, b2: u8) -> bool {
    b1 & 0xE0 == 0xE0
        && (b1 >> 3) & 3 != 1
        && (b1 >> 1) & 3 != 0
        && b2 >> 4 != 0xF
        && (b2 >> 2) & 3 != 3
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// UTF-8 without NUL or control characters other than tab, newlines, form feed and
/// escape. A head cut inside a character (not `complete`) still counts as text.
fn is_text(b: &[u8], complete: bool) -> bool {
    let valid = match std::str::from_utf8(b) {
        Ok(s) => s,
        Err(e) if !complete && e.error_len().is_none() => {
            match std::str::from_utf8(&b[..e.valid_up_to()]) {
                Ok(s) => s,
                Err(_) => return false,
            }
        }
        Err(_) => return false,
    };
    !valid.is_empty()
        && valid
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0C' | '\x1B'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(b: &[u8]) -> Sniffed {
        sniff(b, false)
    }

    #[test]
    fn formats_by_magic() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xFF\xD8\xFF\xE0\0\x10JFIF", "image/jpeg"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image/png"),
            (b"GIF89a\x01\0", "image/gif"),
            (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
            (b"RIFF\0\0\0\0WAVEfmt ", "audio/wav"),
            (b"\0\0\0\x20ftypisom\0\0\x02\0", "video/mp4"),
            (b"\0\0\0\x14ftypqt  ", "video/quicktime"),
            (b"\0\0\0\x20ftypM4A ", "audio/mp4"),
            (
                b"\x1A\x45\xDF\xA3\x9F\x42\x86\x81\x01\x42\x82\x84webm",
                "video/webm",
            ),
            (
                b"\x1A\x45\xDF\xA3\x9F\x42\x82\x88matroska",
                "video/x-matroska",
            ),
            (b"ID3\x04\0\0\0\0\0\0", "audio/mpeg"),
            (b"\xFF\xFB\x90\x64", "audio/mpeg"),
            (b"\xFF\xF1\x50\x80", "audio/aac"),
            (b"OggS\0\x02\0\0\0\0\0\0\0\0", "audio/ogg"),
            (b"fLaC\0\0\0\x22", "audio/flac"),
            (b"PK\x03\x04\x14\0\0\0", "application/zip"),
            (b"%PDF-1.7\n", "application/pdf"),
            (b"\x1F\x8B\x08\0", "application/gzip"),
        ];
        for (bytes, want) in cases {
            assert_eq!(known(bytes), Sniffed::Known(want), "{want}");
        }
    }

    #[test]
    fn text_and_json() {
        assert_eq!(sniff(br#" {"a": [1, 2]}"#, true), Sniffed::Json);
        assert_eq!(sniff(b"\xEF\xBB\xBF[1,2,3]", true), Sniffed::Json);
        // Looks like JSON but is not, when the whole body is known.
        assert_eq!(sniff(b"{not json", true), Sniffed::Text);
        // A long body's head is only checked for its first character.
        assert_eq!(sniff(b"{\"frames\": [1, 2", false), Sniffed::Json);
        assert_eq!(sniff("hello, wörld\n".as_bytes(), true), Sniffed::Text);
        assert_eq!(sniff(b"a,b,c\n1,2,3\n", true), Sniffed::Text);
        // A head cut in the middle of a character is still text; a whole body is not.
        let cut = &"ééé".as_bytes()[..5];
        assert_eq!(sniff(cut, false), Sniffed::Text);
        assert_eq!(sniff(cut, true), Sniffed::Binary);
    }

    #[test]
    fn binary() {
        assert_eq!(sniff(b"\0\x01\x02\x03", true), Sniffed::Binary);
        assert_eq!(sniff(b"text with a \0 nul", true), Sniffed::Binary);
        assert_eq!(sniff(b"\x80\x81\x82", true), Sniffed::Binary);
        // FF then a byte that is not an MPEG frame header's.
        assert_eq!(sniff(b"\xFF\xFB\xFC\x00", true), Sniffed::Binary);
        // An MP4 box header without the `ftyp` box is not called MP4.
        assert_eq!(sniff(b"\0\0\0\x20moov\0\0", true), Sniffed::Binary);
    }
}
