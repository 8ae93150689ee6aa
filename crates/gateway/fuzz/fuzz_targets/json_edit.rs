//! Fuzz the JSON form of `POST /v1/images/edits` through the real router (references by
//! `data:` URL and `file_id`; http(s) URLs are refused without a connection): any body must
//! get a JSON answer in OpenAI's shape with a client status (or 202, the task queued),
//! never a panic or a 5xx.
//!
//! `cd crates/gateway/fuzz && mkdir -p corpus/json_edit && RUSTC_BOOTSTRAP=1 cargo fuzz run -O json_edit corpus/json_edit seeds/json_edit -- -runs=1000000`
#![no_main]

mod common;

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::begin();
    let req = Request::post("/v1/images/edits")
        .header("content-type", "application/json")
        .header("prefer", "respond-async")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let (status, v) = common::send(req);
    assert!(matches!(status, 202 | 400 | 404 | 413 | 415), "{status}: {v}");
    if status != 202 {
        assert!(v["error"]["message"].is_string(), "{status}: {v}");
        assert!(v["error"]["type"].is_string(), "{status}: {v}");
    }
});
