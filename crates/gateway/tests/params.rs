//! Parameters are never silently ignored: every route in the OpenAPI document (and the
//! OpenAI routes) answers an unknown query parameter with `400 unknown_parameter` naming
//! it; `POST /v1/files` takes its options as form fields too (the `curl -F` way) and
//! refuses unknown ones; the OpenAI routes refuse fields OpenAI does not document.
#![allow(clippy::unwrap_used)]

mod support;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;

use kiln_gateway::router;
use serde_json::{Value, json};
use support::noise_png;
use tower_service::Service as _;

struct Gw {
    dir: tempfile::TempDir,
    app: axum::Router,
}

async fn gateway() -> Gw {
    let dir = tempfile::tempdir().unwrap();
    // The library ships no model; the binary's default one, as the OpenAI routes see it.
    let state = support::state(&dir, |config| {
        config.openai.models.insert(
            "kiln-demo".into(),
            kiln_gateway::openai::ModelConfig::default(),
        );
        config.openai.default_model = "kiln-demo".into();
    })
    .await;
    Gw {
        dir,
        app: router(state),
    }
}

impl Gw {
    async fn call(&self, method: &str, uri: &str, ct: &str, body: impl Into<Body>) -> (u16, Value) {
        // Images calls answer at once (202) instead of waiting for a worker.
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("prefer", "respond-async");
        if !ct.is_empty() {
            b = b.header("content-type", ct);
        }
        let resp = self
            .app
            .clone()
            .call(b.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        // Errors are JSON; a success may be something else (`/metrics` is text).
        let v = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) if status < 400 => Value::Null,
            Err(e) => panic!("{method} {uri}: {status} is not JSON ({e}): {bytes:?}"),
        };
        (status, v)
    }

    /// Files in the store (the spool excluded).
    fn stored(&self) -> usize {
        let dir = self.dir.path().join("files");
        walk(&dir)
    }
}

fn walk(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|f| f == ".incoming") {
            continue;
        }
        if p.is_dir() {
            n += walk(&p);
        } else if !p.extension().is_some_and(|x| x == "json" || x == "db") {
            n += 1;
        }
    }
    n
}

/// A multipart body with these (name, filename, content type, content) parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (Vec<u8>, String) {
    let boundary = "kilnparamsboundary7";
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

fn assert_unknown(status: u16, v: &Value, name: &str, what: &str) {
    assert_eq!(status, 400, "{what}: {v}");
    assert_eq!(v["error"]["code"], "unknown_parameter", "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("{name:?}")), "{what}: {message}");
}

#[tokio::test]
async fn every_route_refuses_an_unknown_query_parameter() {
    let gw = gateway().await;
    let (_, doc) = gw.call("GET", "/openapi.json", "", Body::empty()).await;
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_ascii_uppercase(), path.clone(), false));
        }
    }
    assert!(routes.len() >= 20, "{routes:?}");
    for (m, p) in [
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/edits"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{id}"),
    ] {
        routes.push((m.to_owned(), p.to_owned(), true));
    }
    for (method, path, openai) in &routes {
        let concrete = path.replace("{id}", "x1");
        assert!(!concrete.contains('{'), "{path}: another path parameter");
        // Documented parameters stay accepted beside the unknown one.
        let known: Vec<String> = doc["paths"][path][method.to_ascii_lowercase()]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        let mut query = String::new();
        if let Some(k) = known.first() {
            query.push_str(&format!("{k}=1&"));
        }
        let uri = format!("{concrete}?{query}kiln_unknown%5B%5D=1");
        let (status, v) = gw.call(method, &uri, "application/json", "{}").await;
        let what = format!("{method} {uri}");
        assert_unknown(status, &v, "kiln_unknown[]", &what);
        for k in &known {
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(k.as_str()), "{what}: {message} lists {k}");
        }
        if *openai {
            assert_eq!(v["error"]["param"], "kiln_unknown[]", "{what}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        }
        // The same request without it is not refused for its parameters (the live feed
        // is a stream that does not end).
        if path == "/v1/events" {
            continue;
        }
        let uri = format!("{concrete}?{query}");
        let (_, v) = gw.call(method, &uri, "application/json", "{}").await;
        assert_ne!(
            v["error"]["code"], "unknown_parameter",
            "{method} {uri}: {v}"
        );
    }
    // A long name is cut in the message; a query that does not parse is the route's own 422.
    let long = "n".repeat(10_000);
    let (status, v) = gw
        .call("GET", &format!("/v1/tasks?{long}=1"), "", Body::empty())
        .await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().len() < 500);
    let (status, _) = gw
        .call("GET", "/v1/tasks?limit=abc", "", Body::empty())
        .await;
    assert_eq!(status, 422);
    let (status, _) = gw
        .call("GET", "/v1/tasks?limit=5&status=queued", "", Body::empty())
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn upload_options_are_taken_as_form_fields() {
    let gw = gateway().await;
    // About 4.4 MB of noise: stored as sent without options, compressed with them.
    let png = noise_png(1210, 1210, 7);
    assert!(png.len() > 4_000_000, "{}", png.len());
    for (order, parts) in [
        (
            "options after the file",
            vec![
                ("file", Some("big.png"), png.as_slice()),
                ("max_bytes", None, b"300000".as_slice()),
                ("max_dim", None, b"2048".as_slice()),
            ],
        ),
        (
            "options before the file",
            vec![
                ("max_bytes", None, b" 300000 ".as_slice()),
                ("max_dim", None, b"2048".as_slice()),
                ("file", Some("big.png"), png.as_slice()),
            ],
        ),
    ] {
        let (body, ct) = multipart(&parts);
        let (status, v) = gw.call("POST", "/v1/files", &ct, body).await;
        assert_eq!(status, 201, "{order}: {v}");
        let bytes = v["bytes"].as_u64().unwrap();
        assert!(bytes <= 300_000, "{order}: stored {bytes} bytes");
        assert!(v["width"].as_u64().unwrap() <= 2048, "{order}: {v}");
        assert_eq!(v["content_type"], "image/jpeg", "{order}: {v}");
    }
    // One option in the query, the other in the form.
    let (body, ct) = multipart(&[("max_dim", None, b"100"), ("file", Some("big.png"), &png)]);
    let (status, v) = gw
        .call("POST", "/v1/files?max_bytes=50000", &ct, body)
        .await;
    assert_eq!(status, 201, "{v}");
    assert!(v["bytes"].as_u64().unwrap() <= 50_000, "{v}");
    assert!(v["width"].as_u64().unwrap() <= 100, "{v}");
    // Without options the file is stored as sent.
    let (body, ct) = multipart(&[("file", Some("big.png"), &png)]);
    let (status, v) = gw.call("POST", "/v1/files", &ct, body).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), png.len() as u64);
}

#[tokio::test]
async fn bad_upload_form_fields_are_refused_and_store_nothing() {
    let gw = gateway().await;
    let png = noise_png(64, 64, 3);
    let before = gw.stored();
    let text = b"just some text".as_slice();
    for (what, parts, status, code) in [
        (
            "an unknown field after the file",
            vec![
                ("file", Some("a.png"), png.as_slice()),
                ("quality", None, b"80".as_slice()),
            ],
            400,
            "unknown_parameter",
        ),
        (
            "an unknown field after a text file",
            vec![
                ("file", Some("a.txt"), text),
                ("purpose", None, b"vision".as_slice()),
            ],
            400,
            "unknown_parameter",
        ),
        (
            "an option given in the query and the form",
            vec![
                ("max_bytes", None, b"1000".as_slice()),
                ("file", Some("a.png"), png.as_slice()),
            ],
            422,
            "invalid_field",
        ),
        (
            "an option that is no number",
            vec![
                ("file", Some("a.png"), png.as_slice()),
                ("max_dim", None, b"big".as_slice()),
            ],
            422,
            "invalid_field",
        ),
        (
            "an image option after a text file",
            vec![
                ("file", Some("a.txt"), text),
                ("max_dim", None, b"100".as_slice()),
            ],
            422,
            "invalid_field",
        ),
        (
            "a second file",
            vec![
                ("file", Some("a.png"), png.as_slice()),
                ("file", Some("b.png"), png.as_slice()),
            ],
            400,
            "malformed_request",
        ),
        (
            "an option over the field limit",
            vec![
                ("max_dim", None, [b'1'; 2000].as_slice()),
                ("file", Some("a.png"), png.as_slice()),
            ],
            422,
            "invalid_field",
        ),
    ] {
        let (body, ct) = multipart(&parts);
        let uri = if what.contains("query") {
            "/v1/files?max_bytes=2000"
        } else {
            "/v1/files"
        };
        let (s, v) = gw.call("POST", uri, &ct, body).await;
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        if code == "unknown_parameter" {
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains("form field"), "{what}: {m}");
            assert!(m.contains("file, max_bytes, max_dim"), "{what}: {m}");
        }
    }
    assert_eq!(
        gw.stored(),
        before,
        "a refused upload left a file in the store"
    );
}

#[tokio::test]
async fn openai_routes_refuse_undocumented_fields() {
    let gw = gateway().await;
    let png = noise_png(16, 16, 1);
    // Generations (JSON).
    let (status, v) = gw
        .call(
            "POST",
            "/v1/images/generations",
            "application/json",
            json!({"prompt": "a fox", "seed": 7}).to_string(),
        )
        .await;
    assert_unknown(status, &v, "seed", "generations");
    assert_eq!(v["error"]["param"], "seed");
    // Multipart edits.
    let (body, ct) = multipart(&[
        ("image", Some("a.png"), &png),
        ("prompt", None, b"mirror"),
        ("strength", None, b"0.5"),
    ]);
    let (status, v) = gw.call("POST", "/v1/images/edits", &ct, body).await;
    assert_unknown(status, &v, "strength", "multipart edits");
    assert_eq!(v["error"]["param"], "strength");
    // JSON edits: checked before any reference is resolved (this URL is never fetched).
    let body = json!({"prompt": "mirror", "images": [{"image_url": "http://192.0.2.1/a.png"}],
        "negative_prompt": "x"});
    let (status, v) = gw
        .call(
            "POST",
            "/v1/images/edits",
            "application/json",
            body.to_string(),
        )
        .await;
    assert_unknown(status, &v, "negative_prompt", "JSON edits");
    // Every documented field passes the check (what follows may refuse a value).
    let mut fields = serde_json::Map::new();
    for (k, val) in [
        ("prompt", json!("a fox")),
        ("model", json!("kiln-demo")),
        ("n", json!(1)),
        ("size", json!("64x64")),
        ("quality", json!("high")),
        ("response_format", json!("url")),
        ("style", json!("vivid")),
        ("user", json!("u1")),
        ("background", json!("auto")),
        ("moderation", json!("low")),
        ("output_format", json!("jpeg")),
        ("output_compression", json!(90)),
        ("partial_images", json!(0)),
        ("stream", json!(false)),
    ] {
        fields.insert(k.into(), val);
    }
    let body = Value::Object(fields).to_string();
    let (status, v) = gw
        .call("POST", "/v1/images/generations", "application/json", body)
        .await;
    assert_eq!(status, 202, "{v}");
    let (body, ct) = multipart(&[
        ("image[]", Some("a.png"), &png),
        ("mask", Some("m.png"), &png),
        ("prompt", None, b"mirror"),
        ("input_fidelity", None, b"high"),
        ("output_compression", None, b"80"),
        ("user", None, b"u1"),
    ]);
    let (status, v) = gw.call("POST", "/v1/images/edits", &ct, body).await;
    assert_ne!(v["error"]["code"], "unknown_parameter", "{status} {v}");
}
