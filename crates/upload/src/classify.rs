//! Maps hyper / h2 outcomes onto kiln-retry classes.
//!
//! Every error kind hyper 1 and h2 0.4 can hand a client request, with its class and the
//! stable `kind` name that appears in logs and attempt errors:
//!
//! | kind | where it comes from | class |
//! |---|---|---|
//! | `h2_goaway` | remote GOAWAY NO_ERROR before response headers (stream above last-stream-id) | `Refused` (any method) |
//! | `h2_goaway` | GOAWAY with an error code, a local GOAWAY, or one after the response began | `MaybeProcessed` |
//! | `h2_reset` | remote RST_STREAM REFUSED_STREAM before response headers | `Refused` (any method) |
//! | `h2_reset` | any other reset (PROTOCOL_ERROR, INTERNAL_ERROR, CANCEL, NO_ERROR before a response) | `MaybeProcessed` |
//! | `h2_user` | h2 refused to open the stream (stream ids exhausted): nothing written | `NotSent` |
//! | `h2_protocol` | a bare HTTP/2 error code raised by hyper | `MaybeProcessed` |
//! | `dispatch_gone` | the connection task ended while hyper still held the request (an HTTP/2 stream waiting for a concurrency slot when GOAWAY arrived): no body byte left the client | `NotSent` (`MaybeProcessed` once any body byte was handed over, or for an empty body) |
//! | `canceled` | hyper handed the request back unwritten (connection closed or not ready) | `NotSent` |
//! | `closed` | the connection was already closed when the request was offered | `NotSent` |
//! | `incomplete_message` | HTTP/1.1 EOF before the response ended | `MaybeProcessed` (`NotSent` if handed back unwritten) |
//! | `parse` | an HTTP/1.1 response hyper could not parse | `MaybeProcessed` |
//! | `io` | the connection broke under an open request (EOF, reset; hyper turns h2's I/O errors into its own) | `MaybeProcessed` |
//! | `body_write` | writing the request body failed (peer reset the connection mid-upload) | `MaybeProcessed` |
//! | `body_read` | the HTTP/1.1 connection failed while the response body was read | `MaybeProcessed` |
//! | `keepalive_timeout` | no HTTP/2 PING acknowledgement within `http2_keep_alive_timeout` | `MaybeProcessed` (timed out) |
//! | `user_body` | our own body failed (a file shrank or vanished) | `Permanent` |
//! | `user` | any other misuse hyper reports (invalid request) | `Permanent` |
//!
//! Outcomes hyper does not report as errors are checked by the client: a response body
//! shorter than its `Content-Length` (hyper ends an HTTP/2 body quietly at RST_STREAM
//! NO_ERROR, RFC 9113 section 8.1) is `MaybeProcessed`; a complete response followed by
//! RST_STREAM NO_ERROR while the request body is still being sent is a success.

use std::error::Error as StdError;

use h2::Reason;
use kiln_retry::Class;

/// The class of a hyper failure and what it means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Classified {
    pub(crate) class: Class,
    /// Stable name of the error kind (see the module table).
    pub(crate) kind: &'static str,
    pub(crate) h2_reason: Option<&'static str>,
    /// The connection must not take new requests.
    pub(crate) connection_broken: bool,
}

/// What the client knows about the request when the error arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendState {
    /// No response headers yet.
    pub(crate) before_response: bool,
    /// hyper handed the request back: it was never written.
    pub(crate) handed_back: bool,
    /// Body bytes handed to hyper so far.
    pub(crate) body_polled: u64,
    /// Body length.
    pub(crate) body_len: u64,
    /// Our body failed; hyper then reports a reset or a closed connection of its own.
    pub(crate) body_failed: bool,
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

fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<T>() {
            return Some(h);
        }
        cur = err.source();
    }
    None
}

/// Classifies a hyper error met while sending (`state.before_response`) or while reading
/// the response body.
pub(crate) fn classify_hyper(e: &hyper::Error, state: SendState) -> Classified {
    let mk = |class, kind, h2_reason, connection_broken| Classified {
        class,
        kind,
        h2_reason,
        connection_broken,
    };
    let before = state.before_response;
    if state.body_failed {
        // Our own body failed (a file shrank or vanished). Over HTTP/2 hyper resets the
        // stream with INTERNAL_ERROR and reports that reset; the cause is ours either way.
        return mk(Class::Permanent, "user_body", None, false);
    }
    if state.handed_back {
        // hyper returned the request unwritten (`TrySendError::take_message`): whatever the
        // error says, nothing of it reached the server.
        let kind = if e.is_canceled() {
            "canceled"
        } else if e.is_closed() {
            "closed"
        } else if e.is_incomplete_message() {
            "incomplete_message"
        } else {
            "canceled"
        };
        return mk(Class::NotSent, kind, None, true);
    }
    if let Some(h) = find::<h2::Error>(e) {
        let reason = h.reason();
        let name = reason.map(reason_name);
        if h.is_go_away() {
            let refused = h.is_remote() && reason == Some(Reason::NO_ERROR) && before;
            let class = if refused {
                Class::Refused
            } else {
                Class::MaybeProcessed
            };
            return mk(class, "h2_goaway", name, true);
        }
        if h.is_reset() {
            let refused = h.is_remote() && reason == Some(Reason::REFUSED_STREAM) && before;
            let class = if refused {
                Class::Refused
            } else {
                Class::MaybeProcessed
            };
            return mk(class, "h2_reset", name, false);
        }
        if h.is_io() {
            return mk(Class::MaybeProcessed, "io", None, true);
        }
        if reason.is_none() && before {
            // An h2 user error from opening the stream (ids exhausted, headers refused):
            // the stream was never opened, so nothing was written.
            return mk(Class::NotSent, "h2_user", None, true);
        }
        return mk(Class::MaybeProcessed, "h2_protocol", name, true);
    }
    if e.is_timeout() {
        return mk(Class::MaybeProcessed, "keepalive_timeout", None, true);
    }
    if e.is_canceled() {
        // Canceled without the request handed back: it may have been written.
        let class = if before && state.body_polled == 0 && state.body_len > 0 {
            Class::NotSent
        } else {
            Class::MaybeProcessed
        };
        return mk(class, "canceled", None, true);
    }
    if e.is_closed() {
        return mk(
            if before {
                Class::NotSent
            } else {
                Class::MaybeProcessed
            },
            "closed",
            None,
            true,
        );
    }
    if e.is_incomplete_message() {
        return mk(Class::MaybeProcessed, "incomplete_message", None, true);
    }
    if e.is_parse() {
        return mk(Class::MaybeProcessed, "parse", None, true);
    }
    if e.is_user() {
        if find::<std::io::Error>(e).is_some() {
            // Our own body failed (SendBody yields io::Error only).
            return mk(Class::Permanent, "user_body", None, false);
        }
        if is_dispatch_gone(e) {
            // The connection task ended while hyper still held the request: a stream that
            // waited for a concurrency slot when GOAWAY or EOF arrived, never given to the
            // connection. If no body byte was handed over, none of the upload reached the
            // server.
            let class = if before && state.body_polled == 0 && state.body_len > 0 {
                Class::NotSent
            } else {
                Class::MaybeProcessed
            };
            return mk(class, "dispatch_gone", None, true);
        }
        return mk(Class::Permanent, "user", None, false);
    }
    let text = e.to_string();
    let kind = if text.contains("error writing a body") {
        "body_write"
    } else if text.contains("error reading a body") {
        "body_read"
    } else if find::<std::io::Error>(e).is_some() {
        "io"
    } else {
        "other"
    };
    mk(Class::MaybeProcessed, kind, None, true)
}

/// hyper has no predicate for its `DispatchGone` user error; its cause is always one of two
/// fixed strings, and it is the only client-side user error without an I/O cause.
fn is_dispatch_gone(e: &hyper::Error) -> bool {
    let text = e.to_string();
    text.contains("dispatch task is gone")
        || e.source().is_some_and(|s| {
            let s = s.to_string();
            s == "runtime dropped the dispatch task" || s == "user code panicked"
        })
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
