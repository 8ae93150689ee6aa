//! Fuzz the multipart form of `POST /v1/files` through the real router: any body must get a
//! JSON answer with a client status (or 201), never a panic or a 5xx, and whatever is
//! stored is removed again.
//!
//! `cd crates/gateway/fuzz && mkdir -p corpus/upload_form && RUSTC_BOOTSTRAP=1 cargo fuzz run -O upload_form corpus/upload_form seeds/upload_form -- -runs=1000000`
#![no_main]

mod common;

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::begin();
    let req = Request::post("/v1/files")
        .header("content-type", "multipart/form-data; boundary=kiln")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let (status, v) = common::send(req);
    assert!(
        matches!(status, 201 | 400 | 413 | 415 | 422),
        "{status}: {v}"
    );
    if status == 201 {
        let id = v["id"].as_str().expect("a file id");
        assert!(v["bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
        let del = Request::delete(format!("/v1/files/{id}"))
            .body(Body::empty())
            .expect("a request");
        let (status, v) = common::send(del);
        assert_eq!(status, 204, "{v}");
    } else {
        assert!(v["error"]["code"].is_string(), "{status}: {v}");
    }
});
