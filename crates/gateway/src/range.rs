//! The `Range` header of `GET /v1/files/{id}`: one byte range (`bytes=a-b`, `bytes=a-`,
//! `bytes=-n`), so that players can seek in a video.

/// What to send for a request's `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ranged {
    /// The whole file (no header, another unit, several ranges, bad syntax, or an
    /// `If-Range` that does not match).
    Full,
    /// Bytes `start..=end`, both within the file.
    Part {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// A syntactically valid range that lies outside the file: 416.
    Unsatisfiable,
}

/// Reads `range` for a file of `size` bytes. `if_range` is the request's `If-Range`
/// header and `etag` the file's: a range applies only when they match (or there is no
/// `If-Range`).
pub(crate) fn parse(range: Option<&str>, if_range: Option<&str>, etag: &str, size: u64) -> Ranged {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Ranged::Full;
    };
    if if_range.is_some_and(|v| v.trim() != etag) || spec.contains(',') {
        return Ranged::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Full;
    };
    let num = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-n: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part {
                    start: size.saturating_sub(n),
                    end: size - 1,
                }
            }
        }
        // bytes=a- or bytes=a-b.
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                return Ranged::Full;
            }
            if start >= size {
                return Ranged::Unsatisfiable;
            }
            Ranged::Part {
                start,
                end: end.map_or(size - 1, |e| e.min(size - 1)),
            }
        }
        _ => Ranged::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(r: &str, size: u64) -> Ranged {
        parse(Some(r), None, "\"e\"", size)
    }
    fn part(start: u64, end: u64) -> Ranged {
        Ranged::Part { start, end }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(p("bytes=0-9", 100), part(0, 9));
        assert_eq!(p("bytes=90-200", 100), part(90, 99));
        assert_eq!(p("bytes=10-", 100), part(10, 99));
        assert_eq!(p("bytes=-10", 100), part(90, 99));
        assert_eq!(p("bytes=-500", 100), part(0, 99));
        assert_eq!(p("bytes=99-99", 100), part(99, 99));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(p("bytes=100-", 100), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=100-200", 100), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=-0", 100), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=0-0", 0), Ranged::Unsatisfiable);
        assert_eq!(parse(None, None, "\"e\"", 100), Ranged::Full);
        assert_eq!(p("items=0-9", 100), Ranged::Full);
        assert_eq!(p("bytes=0-1,5-6", 100), Ranged::Full);
        assert_eq!(p("bytes=9-1", 100), Ranged::Full);
        assert_eq!(p("bytes=a-b", 100), Ranged::Full);
        assert_eq!(p("bytes=-", 100), Ranged::Full);
        assert_eq!(p("bytes=+1-2", 100), Ranged::Full);
        assert_eq!(
            parse(Some("bytes=0-9"), Some("\"e\""), "\"e\"", 100),
            part(0, 9)
        );
        assert_eq!(
            parse(Some("bytes=0-9"), Some("\"old\""), "\"e\"", 100),
            Ranged::Full
        );
    }
}
