//! Attacker probes against the real `kiln serve` over TCP on 127.0.0.1, each bounded in
//! count and time (docs/SECURITY.md lists them with their results):
//!
//! - `hostile_json_gets_4xx_json_and_the_server_stays_healthy`: 100k-level nesting, a
//!   30 MB string, wrong types and 100 MB bodies (declared and chunked) on every JSON route.
//! - `hostile_images_are_refused_or_handled_with_bounded_memory`: PNG, JPEG and WebP
//!   declaring 100000x100000 (JPEG: 65535x65535, its most), a truncated PNG, a PNG/HTML
//!   polyglot, an SVG with a script, a GIF of 10,000 frames, a JPEG with a 10 MB ICC
//!   profile and a PNG with a 10 MB `eXIf` chunk; the server's peak RSS (VmHWM) stays under
//!   [`RSS_BOUND_KIB`].
//! - `ids_that_try_to_leave_the_store_are_400_or_404`: `../`, encoded separators, NUL and
//!   10 KB ids on the file and task routes.
//! - `floods_do_not_starve_healthz`: 500 half-open slow-header connections and 300 SSE
//!   subscribers at once, `/healthz` answering throughout and every subscriber seeing the
//!   task end.
//! - `acknowledged_submissions_survive_kill_9`: 2,000 submissions in at most 20 s, the
//!   server killed with SIGKILL midway; every task answered 2xx exists after a restart.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Server, call, post_json, proc_kib, start};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// The bound the peak RSS of the server must stay under through the image probes (which
/// include holding a 10 MB upload in memory for its check).
const RSS_BOUND_KIB: u64 = 300 * 1024;

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

async fn healthy(base: &str) {
    let started = Instant::now();
    let r = call(base, "GET", "/healthz", "", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// The status of the answer to a request with this head whose body (`len` bytes of `x`,
/// sent with `Content-Length` or chunked) may be cut off by the server's answer.
async fn big_body(base: &str, path: &str, len: usize, chunked: bool) -> u16 {
    let mut s = TcpStream::connect(addr(base)).await.unwrap();
    let framing = if chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {len}")
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        while sent < len {
            let ok = if chunked {
                let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
                c.extend_from_slice(&chunk);
                c.extend_from_slice(b"\r\n");
                w.write_all(&c).await
            } else {
                w.write_all(&chunk).await
            };
            if ok.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let sent = writer.await.unwrap();
    let status = line.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    assert!(
        status != 0,
        "{path}: no answer ({sent} bytes sent): {line:?}"
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_gets_4xx_json_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[("KILN_GATEWAY__KNOWN_TASK_TYPES", "echo")]);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    let huge = "x".repeat(30 << 20);
    let headers = [
        ("content-type", "application/json"),
        ("prefer", "respond-async"),
    ];
    for route in ["/v1/tasks", "/v1/images/generations", "/v1/images/edits"] {
        let field = if route == "/v1/tasks" {
            "task_type"
        } else {
            "prompt"
        };
        let bodies: Vec<(String, String)> = vec![
            ("100k-level array".into(), deep.clone()),
            ("100k-level object".into(), deep_obj.clone()),
            (
                "100k levels inside a field".into(),
                format!("{{\"{field}\":{deep}}}"),
            ),
            ("a 30 MB string".into(), json!({field: huge}).to_string()),
            (
                "a number for a string".into(),
                json!({field: 5}).to_string(),
            ),
            (
                "an array for a string".into(),
                json!({field: []}).to_string(),
            ),
            ("null".into(), "null".into()),
            ("an array".into(), "[]".into()),
            ("a string".into(), "\"x\"".into()),
            ("truncated".into(), format!("{{\"{field}\":\"x")),
            (
                "not UTF-8".into(),
                String::from_utf8_lossy(b"{\"a\":\"\xff\"}").into(),
            ),
            (
                "wrong types everywhere".into(),
                json!({field: "x", "n": "many", "size": 7, "input": 5, "priority": "high",
                    "labels": "a", "images": "x"})
                .to_string(),
            ),
        ];
        for (what, body) in bodies {
            let r = call(&s.base, "POST", route, body, &headers).await;
            assert!(
                (400..500).contains(&r.status),
                "{route} {what}: {}",
                r.status
            );
            assert!(r.json()["error"]["message"].is_string(), "{route} {what}");
        }
        for chunked in [false, true] {
            let status = big_body(&s.base, route, 100 << 20, chunked).await;
            assert_eq!(status, 413, "{route} 100 MB (chunked: {chunked})");
        }
        healthy(&s.base).await;
    }
    let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "echo"}), &[]).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let hwm = proc_kib(s.child.id(), "VmHWM");
    eprintln!("json probes: server VmHWM {hwm} KiB");
}

// --- images ---

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(payload);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0, 0, 0, 1, 0, 1]));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

fn encoded(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn small_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]));
    encoded(image::DynamicImage::ImageRgb8(img), image::ImageFormat::Png)
}

fn jpeg_with_icc(icc_bytes: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 9]));
    let jpeg = encoded(
        image::DynamicImage::ImageRgb8(img),
        image::ImageFormat::Jpeg,
    );
    // APP2 ICC_PROFILE segments right after SOI, at most 65519 bytes of profile each.
    let per = 65_000;
    let count = icc_bytes.div_ceil(per);
    let mut out = jpeg[..2].to_vec();
    for i in 0..count {
        let n = per.min(icc_bytes - i * per);
        let len = (2 + 12 + 2 + n) as u16;
        out.extend_from_slice(&[0xff, 0xe2]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[(i + 1) as u8, count as u8]);
        out.extend(std::iter::repeat_n(0x41, n));
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    // DQT (one table), SOF0 (one component), DHT omitted, SOS, a few bytes, EOI.
    out.extend_from_slice(&[0xff, 0xdb, 0, 67, 0]);
    out.extend(std::iter::repeat_n(1u8, 64));
    out.extend_from_slice(&[0xff, 0xc0, 0, 11, 8]);
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&[1, 1, 0x11, 0]);
    out.extend_from_slice(&[0xff, 0xda, 0, 8, 1, 1, 0, 0, 63, 0]);
    out.extend_from_slice(&[0; 32]);
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

fn webp_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut vp8x = vec![0u8; 4];
    vp8x.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend_from_slice(b"VP8X");
    body.extend_from_slice(&(vp8x.len() as u32).to_le_bytes());
    body.extend_from_slice(&vp8x);
    // A lossless 1x1 frame that says nothing of the canvas.
    let vp8l = [
        0x2f, 0, 0, 0, 0x10, 0x07, 0x10, 0x11, 0x11, 0x88, 0x88, 0xfe, 0x07, 0,
    ];
    body.extend_from_slice(b"VP8L");
    body.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    body.extend_from_slice(&vp8l);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn gif_frames(frames: usize) -> Vec<u8> {
    let mut out = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff".to_vec();
    for _ in 0..frames {
        out.extend_from_slice(b"\x21\xf9\x04\x00\x01\x00\x00\x00");
        out.extend_from_slice(b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00");
    }
    out.push(0x3b);
    out
}

async fn upload(s: &Server, query: &str, ct: &str, body: Vec<u8>) -> support::Resp {
    call(
        &s.base,
        "POST",
        &format!("/v1/files{query}"),
        body,
        &[("content-type", ct)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_are_refused_or_handled_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let pid = s.child.id();
    let before = proc_kib(pid, "VmHWM");
    // Declared far over the 16384 px side / 64 MP limits: refused before any pixel buffer.
    for (what, ct, body) in [
        (
            "PNG 100000x100000",
            "image/png",
            png_declaring(100_000, 100_000),
        ),
        (
            "JPEG 65535x65535",
            "image/jpeg",
            jpeg_declaring(65_535, 65_535),
        ),
        (
            "WebP 100000x100000",
            "image/webp",
            webp_declaring(100_000, 100_000),
        ),
    ] {
        for query in ["", "?max_bytes=100000"] {
            let started = Instant::now();
            let r = upload(&s, query, ct, body.clone()).await;
            assert_eq!(r.status, 422, "{what}{query}: {:?}", r.body);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what}: {:?}",
                started.elapsed()
            );
        }
    }
    // Truncated inside IDAT.
    let png = small_png();
    let r = upload(&s, "", "image/png", png[..png.len() - 20].to_vec()).await;
    assert_eq!(r.status, 422, "truncated: {:?}", r.body);
    // A PNG that is also an HTML page: stored and served as the PNG it is, never as HTML.
    let mut polyglot = png.clone();
    polyglot.extend_from_slice(b"<html><script>alert(document.cookie)</script></html>");
    let r = upload(&s, "", "text/html", polyglot).await;
    assert_eq!(r.status, 201, "polyglot: {:?}", r.body);
    assert_eq!(r.json()["content_type"], "image/png");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let g = call(&s.base, "GET", &format!("/v1/files/{id}"), "", &[]).await;
    assert_eq!(g.headers["content-type"], "image/png");
    assert_eq!(g.headers["x-content-type-options"], "nosniff");
    // An SVG with a script: not an image kiln decodes; stored as sent and served sandboxed.
    let svg = br#"<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>"#;
    let r = upload(&s, "", "image/svg+xml", svg.to_vec()).await;
    assert_eq!(r.status, 201, "svg: {:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let g = call(&s.base, "GET", &format!("/v1/files/{id}"), "", &[]).await;
    assert_eq!(g.headers["content-security-policy"], "sandbox");
    assert_eq!(g.headers["x-content-type-options"], "nosniff");
    let r = upload(&s, "?max_dim=100", "image/svg+xml", svg.to_vec()).await;
    assert_eq!(r.status, 422, "svg with options: {:?}", r.body);
    // 10,000 frames: one is decoded; fast either way.
    let gif = gif_frames(10_000);
    for query in ["", "?max_dim=16"] {
        let started = Instant::now();
        let r = upload(&s, query, "image/gif", gif.clone()).await;
        assert!(
            r.status == 201 || r.status == 422,
            "gif{query}: {:?}",
            r.body
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gif: {:?}",
            started.elapsed()
        );
    }
    // A 10 MB ICC profile: stored as sent; compressed, the profile is dropped.
    let jpeg = jpeg_with_icc(10 << 20);
    let r = upload(&s, "", "image/jpeg", jpeg.clone()).await;
    assert_eq!(r.status, 201, "icc: {:?}", r.body);
    let r = upload(&s, "?max_bytes=200000", "image/jpeg", jpeg).await;
    assert_eq!(r.status, 201, "icc compressed: {:?}", r.body);
    assert!(r.json()["bytes"].as_u64().unwrap() <= 200_000);
    // A 10 MB eXIf chunk in a PNG: over the metadata bound, it never reaches the decoder.
    let mut exif = png[..33].to_vec();
    exif.extend(png_chunk(b"eXIf", &vec![0x4d; 10 << 20]));
    exif.extend_from_slice(&png[33..]);
    let r = upload(&s, "?max_dim=16", "image/png", exif).await;
    assert_eq!(r.status, 201, "exif: {:?}", r.body);
    healthy(&s.base).await;
    let hwm = proc_kib(pid, "VmHWM");
    eprintln!("image probes: server VmHWM {hwm} KiB (at start {before} KiB)");
    assert!(
        hwm < RSS_BOUND_KIB,
        "peak RSS {hwm} KiB over {RSS_BOUND_KIB} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_try_to_leave_the_store_are_400_or_404() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    // Files beside and above the store that no id may reach.
    let secret = "top secret content";
    std::fs::write(dir.path().join("secret.txt"), secret).unwrap();
    std::fs::write(dir.path().join("secret.txt.json"), "{}").unwrap();
    let long = "a".repeat(10_000);
    let ids = [
        "..%2Fsecret.txt",
        "..%2F..%2Fsecret.txt",
        "%2e%2e%2fsecret.txt",
        "%2E%2E%2Fsecret.txt",
        "..%5Csecret.txt",
        "..%252Fsecret.txt",
        "....%2F%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "secret.txt",
        "secret.txt%00.png",
        "%00",
        "a%00b",
        "..",
        ".",
        &long,
    ];
    for id in ids {
        for (method, path) in [
            ("GET", format!("/v1/files/{id}")),
            ("HEAD", format!("/v1/files/{id}")),
            ("DELETE", format!("/v1/files/{id}")),
            ("GET", format!("/v1/tasks/{id}")),
            ("POST", format!("/v1/tasks/{id}/cancel")),
            ("GET", format!("/v1/tasks/{id}/events")),
            ("POST", format!("/v1/workers/{id}/drain")),
        ] {
            let r = call(&s.base, method, &path, "", &[]).await;
            assert!(
                r.status == 400 || r.status == 404,
                "{method} {path}: {}",
                r.status
            );
            assert!(
                !String::from_utf8_lossy(&r.body).contains(secret),
                "{method} {path}"
            );
        }
    }
    // Unencoded dot segments are not a route.
    for path in ["/v1/files/../secret.txt", "/v1/files/../../etc/passwd"] {
        let mut conn = TcpStream::connect(addr(&s.base)).await.unwrap();
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 404"), "{path}: {text}");
        assert!(!text.contains(secret));
    }
    // JSON edits by file_id take the same ids.
    let r = post_json(
        &s.base,
        "/v1/images/edits",
        json!({"prompt": "x", "images": [{"file_id": "../secret.txt"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(dir.path().join("secret.txt").exists());
    healthy(&s.base).await;
}

/// Reads SSE from `conn` until `want` appears or the time runs out.
async fn sse_until(conn: &mut TcpStream, want: &str, until: Instant) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains(want) {
                    return true;
                }
            }
            Ok(Err(_)) => break,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_do_not_starve_healthz() {
    let dir = tempfile::tempdir().unwrap();
    // The demo worker off: the task stays queued until it is canceled.
    let s = start(
        dir.path(),
        &[
            ("KILN_DEMO_WORKER__ENABLED", "false"),
            ("KILN_GATEWAY__KNOWN_TASK_TYPES", "echo"),
        ],
    );
    let a = addr(&s.base);
    let mut half_open = Vec::new();
    for i in 0..500 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        half_open.push(c);
        if i % 100 == 99 {
            healthy(&s.base).await;
        }
    }
    let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "echo"}), &[]).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let mut subscribers = Vec::new();
    for i in 0..300 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        c.write_all(
            format!("GET /v1/tasks/{id}/events HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        subscribers.push(c);
        if i % 100 == 99 {
            healthy(&s.base).await;
        }
    }
    healthy(&s.base).await;
    let r = call(&s.base, "POST", &format!("/v1/tasks/{id}/cancel"), "", &[]).await;
    assert!(r.status < 300, "{:?}", r.body);
    let until = Instant::now() + Duration::from_secs(20);
    let mut ended = 0;
    for c in &mut subscribers {
        if sse_until(c, "canceled", until).await {
            ended += 1;
        }
    }
    assert_eq!(ended, 300, "subscribers that saw the task end");
    healthy(&s.base).await;
    let hwm = proc_kib(s.child.id(), "VmHWM");
    eprintln!("floods: server VmHWM {hwm} KiB with 500 half-open connections and 300 SSE streams");
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_submissions_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("KILN_DEMO_WORKER__ENABLED", "false"),
        ("KILN_GATEWAY__KNOWN_TASK_TYPES", "echo"),
    ];
    let mut s = start(dir.path(), &env);
    let base = s.base.clone();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut loops = Vec::new();
    for l in 0..8 {
        let base = base.clone();
        let acked = acked.clone();
        loops.push(tokio::spawn(async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            for i in 0..250 {
                let body = json!({"task_type": "echo", "input": {"l": l, "i": i}}).to_string();
                let req = hyper::Request::post(format!("{base}/v1/tasks"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
                else {
                    return;
                };
                if !resp.status().is_success() {
                    continue;
                }
                use http_body_util::BodyExt as _;
                let Ok(body) = resp.into_body().collect().await else {
                    return;
                };
                let v: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
                acked
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    // Kill midway: after about half the submissions were answered.
    while acked.lock().unwrap().len() < 1000 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    for l in loops {
        l.await.unwrap();
    }
    let elapsed = started.elapsed();
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} submissions answered 2xx before SIGKILL at {elapsed:?}",
        acked.len()
    );
    assert!(acked.len() >= 500, "{}", acked.len());
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    drop(s);
    let s = start(dir.path(), &env);
    let mut missing = Vec::new();
    for id in &acked {
        let r = call(&s.base, "GET", &format!("/v1/tasks/{id}"), "", &[]).await;
        if r.status != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged tasks lost: {missing:?}",
        missing.len()
    );
}
