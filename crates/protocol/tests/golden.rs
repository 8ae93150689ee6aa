//! Golden vectors: every message type decodes from its file and encodes back to the same
//! JSON, so the files are the protocol's reference frames.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::PathBuf;

use kiln_protocol::{DEFAULT_MAX_FRAME_BYTES, DecodeError, Envelope, Message};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn vectors() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_vector_round_trips() {
    let vs = vectors();
    assert!(vs.len() >= 15, "expected a vector per message type");
    for (name, text) in vs {
        let env = Envelope::decode(&text, DEFAULT_MAX_FRAME_BYTES)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want: Value = serde_json::from_str(&text).unwrap();
        let got: Value = serde_json::from_str(&env.encode()).unwrap();
        assert_eq!(got, want, "{name} does not re-encode to its golden JSON");
        assert_eq!(want["type"], env.message.type_name(), "{name}");
    }
}

#[test]
fn every_message_type_has_a_vector() {
    let names: std::collections::BTreeSet<String> = vectors()
        .into_iter()
        .map(|(_, t)| {
            serde_json::from_str::<Value>(&t).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for t in [
        "hello",
        "welcome",
        "assign",
        "ack",
        "reject",
        "progress",
        "preview",
        "result",
        "result_ack",
        "cancel",
        "release",
        "drain",
        "bye",
        "hb",
        "hb_ack",
        "error",
    ] {
        assert!(names.contains(t), "no golden vector for {t}");
    }
}

#[test]
fn unknown_fields_are_ignored() {
    for (name, text) in vectors() {
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["x_future_field"] = Value::from(1);
        if let Some(p) = v["payload"].as_object_mut() {
            p.insert("x_added_later".into(), Value::from("ok"));
        }
        let env = Envelope::decode(&v.to_string(), DEFAULT_MAX_FRAME_BYTES);
        assert!(env.is_ok(), "{name}: {env:?}");
    }
}

#[test]
fn bad_frames_are_typed_errors() {
    let d = |s: &str| Envelope::decode(s, 256).unwrap_err();
    assert_eq!(d("not json").code(), "malformed");
    assert_eq!(
        d(r#"{"type":"ack","version":"1","payload":{"seq":"x"}}"#).code(),
        "malformed"
    );
    assert_eq!(d(r#"{"type":"ack","version":"1"}"#).code(), "malformed");
    assert_eq!(
        d(r#"{"type":"warp","version":"1","payload":{}}"#).code(),
        "unknown_type"
    );
    let v = d(r#"{"type":"ack","version":"2","payload":{"seq":1}}"#);
    assert_eq!(v, DecodeError::Version("2".into()));
    assert!(v.is_fatal());
    assert_eq!(d(&"x".repeat(257)).code(), "oversized");
    let reply = Envelope::error_reply(&d("not json"), 5);
    let back = Envelope::decode(&reply.encode(), 1024).unwrap();
    assert_eq!(back.message, Message::Error);
    assert_eq!(back.error.as_deref(), Some("malformed"));
}

#[test]
fn legacy_result_slot_fills_the_output() {
    let legacy = r#"{"type":"result","version":"1","ts":1,"payload":{"lease":"l-1","status":"ok"},"result":{"url":"https://x/y.png"}}"#;
    let env = Envelope::decode(legacy, 1024).unwrap();
    match env.message {
        Message::Result(r) => assert_eq!(r.output.unwrap()["url"], "https://x/y.png"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn canceled_is_sent_and_both_spellings_are_read() {
    let frame = |status: &str| {
        format!(
            r#"{{"type":"result","version":"1","ts":1,"payload":{{"lease":"l-1","status":"{status}"}}}}"#
        )
    };
    for spelling in ["canceled", "cancelled"] {
        let env = Envelope::decode(&frame(spelling), 1024).unwrap();
        let Message::Result(r) = &env.message else {
            panic!("{:?}", env.message)
        };
        assert_eq!(r.status, kiln_protocol::messages::ResultStatus::Cancelled);
        assert!(
            env.encode().contains(r#""status":"canceled""#),
            "{}",
            env.encode()
        );
    }
    assert_eq!(
        kiln_protocol::TaskState::parse("cancelled"),
        Some(kiln_protocol::TaskState::Canceled)
    );
}

#[test]
fn peek_reads_type_and_lease_of_a_frame_too_large_to_decode() {
    let frame = format!(
        r#"{{"type":"result","version":"1","payload":{{"lease":"l-7","status":"ok","output":{{"b64":"{}"}}}}}}"#,
        "A".repeat(4096)
    );
    assert!(matches!(
        kiln_protocol::Envelope::decode(&frame, 1024),
        Err(kiln_protocol::DecodeError::Oversized { .. })
    ));
    let p = kiln_protocol::Envelope::peek(&frame).unwrap();
    assert_eq!(
        (p.kind.as_str(), p.lease.as_deref()),
        ("result", Some("l-7"))
    );
    assert!(kiln_protocol::Envelope::peek("not json").is_none());
}

#[test]
fn preview_shape_is_checked() {
    use kiln_protocol::messages::{MAX_PREVIEW_BYTES, Preview};
    let ok = Preview {
        lease: "l-1".into(),
        index: 0,
        mime: "image/png".into(),
        data: Some("iVBORw0KGgo=".into()),
        file: None,
        width: None,
        height: None,
    };
    assert_eq!(ok.check(), Ok(()));
    let by_file = Preview {
        data: None,
        file: Some("file_1".into()),
        ..ok.clone()
    };
    assert_eq!(by_file.check(), Ok(()));
    let both = Preview {
        file: Some("file_1".into()),
        ..ok.clone()
    };
    assert!(both.check().unwrap_err().contains("exactly one"));
    let neither = Preview {
        data: None,
        ..ok.clone()
    };
    assert!(neither.check().is_err());
    let svg = Preview {
        mime: "image/svg+xml".into(),
        ..ok.clone()
    };
    assert!(svg.check().unwrap_err().contains("image/svg+xml"));
    let big = Preview {
        data: Some("A".repeat((MAX_PREVIEW_BYTES + 3) / 3 * 4 + 4)),
        ..ok.clone()
    };
    assert!(big.check().unwrap_err().contains("POST /v1/files"));
    let just_fits = Preview {
        data: Some("A".repeat(MAX_PREVIEW_BYTES / 3 * 4)),
        ..ok
    };
    assert_eq!(just_fits.check(), Ok(()));
}
