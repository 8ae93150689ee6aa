//! Maps hyper / h2 outcomes onto kiln-retry classes.
//!
//! | outcome | class |
//! |---|---|
//! | remote GOAWAY NO_ERROR before response headers | `Refused` (any method) |
//! | remote RST_STREAM REFUSED_STREAM | `Refused` (any method) |
//! | other resets, GOAWAY with an error, EOF, I/O errors | `MaybeProcessed` (idempotent only) |
//! | request canceled, or the connection gone, before it was written | `NotSent` |
//! | our own body failed (file unreadable) | `Permanent` |

use std::error::Error as StdError;

use h2::Reason;
use kiln_retry::Class;

/// The class of a hyper failure and what it means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Classified {
    pub(crate) class: Class,
    pub(crate) h2_reason: Option<&'static str>,
    /// The connection must not take new requests.
    pub(crate) connection_broken: bool,
}

/// The stable name of an HTTP/2 error code.
pub(crate) fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::NO_ERROR => "NO_ERROR",
        Reason::PROTOCOL_ERROR => "PROTOCOL_ERROR",
        Reason::INTERNAL_ERROR => "INTERNAL_ERROR",
        Reason::FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
        Reason::SETTINGS_TIMEOUT => "SETTINGS_TIMEOUT",
        Reason::STREAM_CLOSED => "STREAM_CLOSED",
        Reason::FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
        Reason::REFUSED_STREAM => "REFUSED_STREAM",
        Reason::CANCEL => "CANCEL",
        Reason::COMPRESSION_ERROR => "COMPRESSION_ERROR",
        Reason::CONNECT_ERROR => "CONNECT_ERROR",
        Reason::ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
        Reason::INADEQUATE_SECURITY => "INADEQUATE_SECURITY",
        Reason::HTTP_1_1_REQUIRED => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

fn find_h2(e: &hyper::Error) -> Option<&h2::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return Some(h);
        }
        cur = err.source();
    }
    None
}

/// Classifies a hyper error. `before_response` is true while sending the request (no
/// response headers yet); a failure while reading the response body is never `Refused`.
pub(crate) fn classify_hyper(e: &hyper::Error, before_response: bool) -> Classified {
    let mk = |class, h2_reason, connection_broken| Classified {
        class,
        h2_reason,
        connection_broken,
    };
    if let Some(h) = find_h2(e) {
        let reason = h.reason();
        let name = reason.map(reason_name);
        if h.is_go_away() {
            let refused = h.is_remote() && reason == Some(Reason::NO_ERROR) && before_response;
            let class = if refused {
                Class::Refused
            } else {
                Class::MaybeProcessed
            };
            return mk(class, name, true);
        }
        if h.is_reset() {
            let refused =
                h.is_remote() && reason == Some(Reason::REFUSED_STREAM) && before_response;
            let class = if refused {
                Class::Refused
            } else {
                Class::MaybeProcessed
            };
            return mk(class, name, false);
        }
        return mk(Class::MaybeProcessed, name, true);
    }
    if e.is_closed() && before_response {
        // The connection task had already ended (after a GOAWAY or a close) when the
        // request was handed to it: nothing was written.
        return mk(Class::NotSent, None, true);
    }
    if e.is_canceled() {
        // The dispatcher dropped the request before writing it (the connection closed).
        return mk(Class::NotSent, None, true);
    }
    if e.is_user() {
        // Our own request body failed, or the request was malformed.
        return mk(Class::Permanent, None, false);
    }
    mk(Class::MaybeProcessed, None, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names() {
        assert_eq!(reason_name(Reason::REFUSED_STREAM), "REFUSED_STREAM");
        assert_eq!(reason_name(Reason::from(0x99)), "UNKNOWN");
    }
}
