//! kiln's own `/v1/images/edits` in OpenAI's JSON form: references by `file_id` (a kiln
//! file), `data:` URL or `image_url` (downloaded under the SSRF checks, loopback refused
//! unless `gateway.openai.image_urls.allow_loopback`), against the real binary and its demo
//! worker. The OpenAI Python SDK sends edits only as multipart, so this form is tested here.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{Server, call, post_json, start};

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64_size(v: &Value) -> (u32, u32) {
    let data = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let img = image::load_from_memory(&data).unwrap();
    (img.width(), img.height())
}

fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

async fn ready(s: &Server) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = call(&s.base, "GET", "/v1/models", "", &[]).await.json();
        if m["data"][0]["kiln"]["workers_online"].as_u64() >= Some(1) {
            return;
        }
        assert!(
            Instant::now() < until,
            "the demo worker did not connect: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn upload(s: &Server, bytes: Vec<u8>) -> String {
    let r = call(
        &s.base,
        "POST",
        "/v1/files",
        bytes,
        &[("content-type", "image/png")],
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn edit(s: &Server, images: Value, extra: Value) -> support::Resp {
    let mut body = json!({"prompt": "mirror", "response_format": "b64_json", "images": images});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    post_json(&s.base, "/v1/images/edits", body, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_edits_by_file_id_data_url_and_image_url() {
    let dir = tempfile::tempdir().unwrap();
    let strict = start(&dir.path().join("strict"), &[]);
    let open = start(
        &dir.path().join("open"),
        &[("KILN_GATEWAY__OPENAI__IMAGE_URLS__ALLOW_LOOPBACK", "true")],
    );
    ready(&strict).await;
    ready(&open).await;

    // A kiln file and a data URL, side by side (the demo edit joins references).
    let id = upload(&strict, png(40, 30)).await;
    let r = edit(
        &strict,
        json!([{"file_id": id}, {"image_url": data_url(&png(20, 30))}]),
        json!({"n": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(b64_size(&r.json()), (60, 30));
    // A mask by file id is accepted.
    let r = edit(
        &strict,
        json!([{"file_id": id}]),
        json!({"mask": {"file_id": id}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(b64_size(&r.json()), (40, 30));

    // An http URL: refused at loopback by default, before any connection ...
    let url = format!("{}/v1/files/{id}", strict.base);
    let r = edit(&strict, json!([{"image_url": url}]), json!({})).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json()["error"].clone();
    assert_eq!(e["code"], "image_url_unusable");
    assert_eq!(e["param"], "images");
    assert!(e["message"].as_str().unwrap().contains("loopback"), "{e}");
    // ... and downloaded where loopback is allowed (here: a file of the other server).
    let r = edit(&open, json!([{"image_url": url}]), json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(b64_size(&r.json()), (40, 30));
    // A URL that is not an image is refused with what came back.
    let r = edit(
        &open,
        json!([{"image_url": format!("{}/v1/models", open.base)}]),
        json!({}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not an image"),
        "{}",
        r.json()
    );

    // Malformed references are 400 with the parameter named.
    for (images, extra, param) in [
        (json!(null), json!({}), "images"),
        (json!([]), json!({}), "images"),
        (
            json!([{"image_url": data_url(b"x"), "file_id": id}]),
            json!({}),
            "images",
        ),
        (
            json!([{"file_id": "file_00000000000000000000000000000000"}]),
            json!({}),
            "images",
        ),
        (
            json!([{"file_id": "../../etc/passwd"}]),
            json!({}),
            "images",
        ),
        (json!(["just a string"]), json!({}), "images"),
        (
            json!([{"image_url": "data:image/png;base64,@@@"}]),
            json!({}),
            "images",
        ),
        (json!([{"file_id": id}]), json!({"mask": "nope"}), "mask"),
    ] {
        let r = edit(&strict, images.clone(), extra).await;
        assert_eq!(
            r.status,
            400,
            "{images}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["param"], param, "{images}: {}", r.json());
    }
    let r = call(
        &strict.base,
        "POST",
        "/v1/images/edits",
        "prompt=x",
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_content_type");
    let r = call(
        &strict.base,
        "POST",
        "/v1/images/edits",
        "{not json",
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
}
