//! The upstream path: kiln A serves the OpenAI images API and forwards models to kiln B
//! (another real `kiln` with the demo worker) as its OpenAI-compatible upstream, directly
//! and through nginx with injected faults (429 + Retry-After, 502, connection reset, 403).
//! Outcomes are asserted with nginx's access log as the count of calls that reached it.
//! With `references = "upload"`, A uploads edit references to a kiln-upload target (a small
//! JSON-base64 asset endpoint here, and moto's S3) and B downloads them by URL.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_test_support::{Nginx, free_port};
use serde_json::{Value, json};
use support::{Server, call, post_json, start, start_with};

fn png_size(b64: &str) -> (u32, u32) {
    let data = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let img = image::load_from_memory(&data).unwrap();
    (img.width(), img.height())
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// What reached nginx, from the `hits` access log its server writes.
trait Hits {
    /// Requests that reached `location` (its prefix).
    fn hits(&self, prefix: &str) -> usize;
    /// Access log lines (`<uri> <status> <content type>`) starting with `prefix`.
    fn lines(&self, prefix: &str) -> Vec<String>;
}

impl Hits for Nginx {
    fn hits(&self, prefix: &str) -> usize {
        self.lines(prefix).len()
    }

    fn lines(&self, prefix: &str) -> Vec<String> {
        self.read("hits.log")
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }
}

/// nginx on `port` in front of kiln B on `backend`, one location per fault.
fn nginx(port: u16, backend: u16) -> Option<Nginx> {
    let http = "log_format hits '$uri $status $content_type';\n  \
                limit_req_zone $binary_remote_addr zone=one:1m rate=1r/s;";
    let server = format!(
        r#"  server {{
    listen 127.0.0.1:{port};
    access_log {{DIR}}/hits.log hits;
    location /ok/ {{ proxy_pass http://127.0.0.1:{backend}/; proxy_read_timeout 60s; }}
    location /limited/ {{
      limit_req zone=one; limit_req_status 429; error_page 429 = @limited;
      proxy_pass http://127.0.0.1:{backend}/;
    }}
    location @limited {{ add_header Retry-After 1 always; return 429 '{{"error":{{"message":"slow down"}}}}'; }}
    location /r429/ {{ add_header Retry-After 1 always; return 429 '{{"error":{{"message":"rate limited"}}}}'; }}
    location /r502/ {{ return 502 'bad gateway'; }}
    location /reset/ {{ return 444; }}
    location /r403/ {{ default_type application/json; return 403 '{{"error":{{"message":"reference image too large for this account"}}}}'; }}
  }}
"#
    );
    Nginx::start_plain(http, &server, &[port])
}

fn provider(name: &str, base: &str, extra: &str) -> String {
    format!(
        "[gateway.openai.providers.{name}]\nbase_url = \"{base}\"\napi_key_env = \"UPSTREAM_TEST_KEY\"\n\
         max_retries = 2\ninitial_backoff = \"100ms\"\nrequest_timeout = \"10s\"\ndeadline = \"30s\"\n{extra}\n\
         [gateway.openai.models.{name}]\nruns_on = \"provider\"\nprovider = \"{name}\"\nupstream_model = \"kiln-demo\"\n"
    )
}

/// Starts kiln A with `providers` (TOML) and waits until its provider runner is connected.
async fn kiln_a(dir: &Path, providers: &str) -> Server {
    kiln_a_env(dir, providers, &[]).await
}

/// [`kiln_a`] with more environment variables.
async fn kiln_a_env(dir: &Path, providers: &str, env: &[(&str, &str)]) -> Server {
    let path = dir.join("a.toml");
    std::fs::write(&path, providers).unwrap();
    let mut vars = vec![
        ("KILN_DEMO_WORKER__ENABLED", "false"),
        ("UPSTREAM_TEST_KEY", "upstream-secret"),
    ];
    vars.extend_from_slice(env);
    let a = start_with(&dir.join("a"), Some(&path), &vars);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let w = call(&a.base, "GET", "/v1/workers", "", &[]).await.json();
        if w["data"].as_array().is_some_and(|v| !v.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < until,
            "provider runner did not connect: {w}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a
}

async fn generate(a: &Server, model: &str, extra: Value) -> support::Resp {
    let mut body = json!({"model": model, "prompt": "a harbour", "size": "64x48", "response_format": "b64_json"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    post_json(&a.base, "/v1/images/generations", body, &[]).await
}

fn last_task_error(r: &support::Resp) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Kiln B: the upstream, with an API key that A must send.
fn kiln_b(dir: &Path) -> Server {
    kiln_b_env(dir, &[])
}

/// [`kiln_b`] with more environment variables.
fn kiln_b_env(dir: &Path, env: &[(&str, &str)]) -> Server {
    let hash = kiln_gateway::hash_secret("upstream-secret");
    let mut vars = vec![("KILN_GATEWAY__API_KEY_HASHES", hash.as_str())];
    vars.extend_from_slice(env);
    start(&dir.join("b"), &vars)
}

async fn wait_workers(b: &Server) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = call(
            &b.base,
            "GET",
            "/v1/models",
            "",
            &[("authorization", "Bearer upstream-secret")],
        )
        .await
        .json();
        if m["data"][0]["kiln"]["workers_online"].as_u64() >= Some(1) {
            return;
        }
        assert!(
            Instant::now() < until,
            "B's demo worker did not connect: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_generate_edit_and_ssrf() {
    let dir = tempfile::tempdir().unwrap();
    let b = kiln_b(dir.path());
    wait_workers(&b).await;
    let base = format!("{}/v1", b.base);
    let toml = [
        provider("direct", &base, ""),
        provider(
            "direct-url",
            &base,
            "response_format = \"url\"\nallow_loopback = true",
        ),
        provider("strict-url", &base, "response_format = \"url\""),
        provider("no-key", &base, "").replace("api_key_env = \"UPSTREAM_TEST_KEY\"\n", ""),
    ]
    .concat();
    let a = kiln_a(dir.path(), &toml).await;

    // /v1/models says where each model runs.
    let m = call(&a.base, "GET", "/v1/models", "", &[]).await.json();
    let direct = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "direct")
        .unwrap();
    assert_eq!(direct["kiln"]["runs_on"], "provider");
    assert_eq!(direct["kiln"]["upstream_host"], "127.0.0.1");

    // Generation: n and size reach B's demo worker; one attempt is recorded.
    let r = generate(&a, "direct", json!({"n": 2})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let data = r.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 2);
    assert_eq!(png_size(data[0]["b64_json"].as_str().unwrap()), (64, 48));
    let task_id = r.headers["x-kiln-task-id"].to_str().unwrap().to_owned();
    let t = call(&a.base, "GET", &format!("/v1/tasks/{task_id}"), "", &[])
        .await
        .json();
    assert_eq!(t["task_type"], "openai.direct");
    let attempts = t["output"]["upstream"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{t}");

    // Edit with two references: multipart `image[]` to B, whose demo worker joins them.
    let boundary = "XbOuNdArY";
    let mut body = Vec::new();
    for (name, value) in [
        ("model", "direct"),
        ("prompt", "mirror"),
        ("response_format", "b64_json"),
    ] {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (i, img) in [png(40, 30), png(20, 30)].iter().enumerate() {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"r{i}.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
        body.extend_from_slice(img);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = call(
        &a.base,
        "POST",
        "/v1/images/edits",
        body,
        &[("content-type", &ct)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        png_size(r.json()["data"][0]["b64_json"].as_str().unwrap()),
        (60, 30)
    );

    // Result URLs: downloaded when loopback is allowed, refused by default (SSRF).
    let r = generate(&a, "direct-url", json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        png_size(r.json()["data"][0]["b64_json"].as_str().unwrap()),
        (64, 48)
    );
    let r = generate(&a, "strict-url", json!({})).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upstream_bad_result");
    assert!(
        last_task_error(&r).contains("loopback"),
        "{}",
        last_task_error(&r)
    );

    // Without the key, B answers 401: final, with B's message, one attempt.
    let r = generate(&a, "no-key", json!({})).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upstream_refused");
    let msg = last_task_error(&r);
    assert!(
        msg.contains("401")
            && msg.contains("API key")
            && msg.contains("[attempts: #1 HTTP 401, stopped: not_retryable"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_through_nginx() {
    let dir = tempfile::tempdir().unwrap();
    let b = kiln_b(dir.path());
    wait_workers(&b).await;
    let port = free_port();
    let backend: u16 = b.base.rsplit(':').next().unwrap().parse().unwrap();
    let Some(ng) = nginx(port, backend) else {
        return;
    };
    let front = format!("http://127.0.0.1:{port}");
    let toml = [
        provider("ok", &format!("{front}/ok/v1"), ""),
        provider("limited", &format!("{front}/limited/v1"), ""),
        provider("r429", &format!("{front}/r429/v1"), ""),
        provider("r502", &format!("{front}/r502/v1"), ""),
        provider(
            "r502-idem",
            &format!("{front}/r502/v1"),
            "idempotency_header = \"Idempotency-Key\"",
        ),
        provider("reset", &format!("{front}/reset/v1"), ""),
        provider("r403", &format!("{front}/r403/v1"), ""),
    ]
    .concat();
    let a = kiln_a(dir.path(), &toml).await;

    // Through the proxy, no fault.
    let r = generate(&a, "ok", json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(ng.hits("/ok/"), 1);

    // 429 with Retry-After: retried after the wait, then passes (rate 1/s; the first
    // request of this second is taken by the probe).
    let probe = call(&front, "GET", "/limited/healthz", "", &[]).await;
    assert_eq!(probe.status, 200);
    let started = Instant::now();
    let r = generate(&a, "limited", json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(started.elapsed() >= Duration::from_millis(900));
    let task_id = r.headers["x-kiln-task-id"].to_str().unwrap().to_owned();
    let t = call(&a.base, "GET", &format!("/v1/tasks/{task_id}"), "", &[])
        .await
        .json();
    let attempts = t["output"]["upstream"]["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{t}");
    assert_eq!(attempts[0]["status"], 429, "{t}");
    assert!(attempts[0]["delay_ms"].as_u64().unwrap() >= 1000, "{t}");

    // 429 every time: three attempts (max_retries = 2), each after Retry-After, then 429.
    let started = Instant::now();
    let r = generate(&a, "r429", json!({})).await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upstream_rate_limited");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(ng.hits("/r429/"), 3);

    // 502 on a POST without an idempotency key: the upstream may have processed it, so it
    // is not replayed; with a key it is (three attempts).
    let r = generate(&a, "r502", json!({})).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_failed");
    assert_eq!(ng.hits("/r502/"), 1);
    let r = generate(&a, "r502-idem", json!({})).await;
    assert_eq!(r.status, 502);
    assert_eq!(ng.hits("/r502/"), 4);

    // A connection reset mid-request: maybe processed, not replayed, and the broker does not
    // run the task again either.
    let r = generate(&a, "reset", json!({})).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(ng.hits("/reset/"), 1);
    let task = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(task.contains("maybe_processed"), "{task}");

    // 403: final after one attempt, with the upstream's message.
    let r = generate(&a, "r403", json!({})).await;
    assert_eq!(r.status, 502);
    assert!(last_task_error(&r).contains("reference image too large for this account"));
    assert_eq!(ng.hits("/r403/"), 1);
}

/// A multipart edit body with text `fields` and `images` as `image[]` parts.
fn edit_body(fields: &[(&str, &str)], images: &[Vec<u8>]) -> (Vec<u8>, String) {
    let boundary = "XbOuNdArY";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (i, img) in images.iter().enumerate() {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"r{i}.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
        body.extend_from_slice(img);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

/// What the asset endpoint saw.
#[derive(Default)]
struct Assets {
    /// Upload requests, the refused first one included.
    posts: usize,
    /// Stored files by id: file name, MIME type, bytes.
    stored: BTreeMap<String, (String, String, Vec<u8>)>,
    /// The `x-api-key` of every upload request.
    keys: Vec<String>,
    /// Downloads.
    gets: usize,
}

type SharedAssets = Arc<Mutex<Assets>>;

/// A JSON-base64 asset endpoint on a free port: `POST /assets` takes
/// `{fileName, fileMimeType, content}` (answering 503 to the very first request) and
/// returns `{fileId, uri}`; `GET /assets/{id}` serves the file; `POST /denied` is always 403.
async fn asset_server() -> (String, SharedAssets) {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let shared = SharedAssets::default();
    let app = axum::Router::new()
        .route(
            "/assets",
            post(
                |State((s, base)): State<(SharedAssets, String)>,
                 headers: HeaderMap,
                 axum::Json(v): axum::Json<Value>| async move {
                    let mut a = s.lock().unwrap();
                    a.posts += 1;
                    let key = headers
                        .get("x-api-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    a.keys.push(key);
                    if a.posts == 1 {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(json!({"error": "warming up"})),
                        );
                    }
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(v["content"].as_str().unwrap())
                        .unwrap();
                    let id = format!("asset{}", a.stored.len());
                    let name = v["fileName"].as_str().unwrap().to_owned();
                    let mime = v["fileMimeType"].as_str().unwrap().to_owned();
                    a.stored.insert(id.clone(), (name, mime, data));
                    (
                        StatusCode::OK,
                        axum::Json(json!({"fileId": id, "uri": format!("{base}/assets/{id}")})),
                    )
                },
            ),
        )
        .route(
            "/assets/{id}",
            get(
                |State((s, _)): State<(SharedAssets, String)>, UrlPath(id): UrlPath<String>| async move {
                    let mut a = s.lock().unwrap();
                    a.gets += 1;
                    match a.stored.get(&id) {
                        Some((_, mime, data)) => {
                            ([(header::CONTENT_TYPE, mime.clone())], data.clone()).into_response()
                        }
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .route(
            "/denied",
            post(|| async {
                (
                    StatusCode::FORBIDDEN,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"error":{"message":"quota exceeded for this key"}}"#,
                )
            }),
        )
        .with_state((shared.clone(), base.clone()));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (base, shared)
}

fn dims(data: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(data).unwrap();
    (img.width(), img.height())
}

/// The size of the demo worker's edit of references of these sizes: side by side, scaled
/// to the first one's height.
fn joined(sizes: &[(u32, u32)]) -> (u32, u32) {
    let h = sizes[0].1;
    let w = sizes
        .iter()
        .map(|&(w, hh)| (u64::from(w) * u64::from(h) / u64::from(hh)) as u32)
        .sum();
    (w, h)
}

/// Ids of the files A compressed when storing them (edit references), from the sidecars
/// of its files directory.
fn compressed_ids(files: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(files)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = e.unwrap().path();
            if p.extension()? != "json" {
                return None;
            }
            let meta: Value = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            meta.get("compress_ms")?;
            Some(meta["id"].as_str()?.to_owned())
        })
        .collect()
}

/// The references A compressed since `before` was taken (content, content type), read
/// through its files API.
/// Posts a multipart edit to `a`.
async fn edit(a: &Server, fields: &[(&str, &str)], images: &[Vec<u8>]) -> support::Resp {
    let (body, ct) = edit_body(fields, images);
    call(
        &a.base,
        "POST",
        "/v1/images/edits",
        body,
        &[("content-type", &ct)],
    )
    .await
}

/// The task behind an images call's answer.
async fn task_of(a: &Server, r: &support::Resp) -> Value {
    let task_id = r.headers["x-kiln-task-id"].to_str().unwrap();
    call(&a.base, "GET", &format!("/v1/tasks/{task_id}"), "", &[])
        .await
        .json()
}

async fn new_references(
    a: &Server,
    files: &Path,
    before: &std::collections::BTreeSet<String>,
) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for id in compressed_ids(files).difference(before) {
        let f = call(&a.base, "GET", &format!("/v1/files/{id}"), "", &[]).await;
        assert_eq!(f.status, 200);
        let ct = f.headers["content-type"].to_str().unwrap().to_owned();
        out.push((f.body.to_vec(), ct));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_edit_with_references_uploaded_first() {
    let dir = tempfile::tempdir().unwrap();
    // B downloads `image_url` references from loopback (the asset endpoint, moto).
    let b = kiln_b_env(
        dir.path(),
        &[("KILN_GATEWAY__OPENAI__IMAGE_URLS__ALLOW_LOOPBACK", "true")],
    );
    wait_workers(&b).await;
    let port = free_port();
    let backend: u16 = b.base.rsplit(':').next().unwrap().parse().unwrap();
    let Some(ng) = nginx(port, backend) else {
        return;
    };
    let front = format!("http://127.0.0.1:{port}/ok/v1");
    let (assets, seen) = asset_server().await;
    let moto = kiln_test_support::Moto::start();

    let upload = |name: &str, target: String| {
        format!(
            "references = \"upload\"\n\
             [gateway.openai.providers.{name}.upload]\nsend_as = \"image_url\"\n\
             [gateway.openai.providers.{name}.upload.client.retry]\nmax_retries = 2\ninitial_backoff = \"50ms\"\n\
             [gateway.openai.providers.{name}.upload.target]\n{target}\n"
        )
    };
    let mut toml = [
        provider(
            "assets",
            &front,
            &upload(
                "assets",
                format!(
                    "kind = \"json_base64\"\nname = \"assets\"\nurl = \"{assets}/assets\"\n\
                     headers_env = {{ \"x-api-key\" = \"ASSET_TEST_KEY\" }}"
                ),
            ),
        ),
        "max_reference_dimension = 32\n".to_owned(),
        provider(
            "denied",
            &front,
            &upload(
                "denied",
                format!(
                    "kind = \"json_base64\"\nname = \"assets-denied\"\nurl = \"{assets}/denied\""
                ),
            ),
        ),
    ]
    .concat();
    if let Some(m) = &moto {
        let created = call(&m.endpoint(), "PUT", "/refs", "", &[]).await;
        assert_eq!(created.status, 200, "{:?}", created.body);
        // Objects are readable by anyone (as behind a public bucket domain), so B can
        // download them by URL.
        let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::refs/*"}]});
        let set = call(
            &m.endpoint(),
            "PUT",
            "/refs?policy",
            policy.to_string(),
            &[],
        )
        .await;
        assert!(set.status < 300, "{:?}", set.body);
        toml.push_str(&provider(
            "s3ref",
            &front,
            &upload(
                "s3ref",
                format!(
                    "kind = \"s3\"\nendpoint = \"{}\"\nbucket = \"refs\"\nkey_prefix = \"edits/\"\n\
                     access_key_id_env = \"S3_TEST_ID\"\nsecret_access_key_env = \"S3_TEST_SECRET\"",
                    m.endpoint()
                ),
            ),
        ));
        toml.push_str("max_reference_dimension = 32\n");
    }
    let a = kiln_a_env(
        dir.path(),
        &toml,
        &[
            ("ASSET_TEST_KEY", "asset-secret"),
            ("S3_TEST_ID", "test"),
            ("S3_TEST_SECRET", "test"),
        ],
    )
    .await;

    // Two references through the JSON-base64 endpoint, whose first answer is a 503.
    let files_a = dir.path().join("a").join("files");
    let before = compressed_ids(&files_a);
    let originals = [png(120, 90), png(60, 90)];
    let r = edit(
        &a,
        &[
            ("model", "assets"),
            ("prompt", "mirror"),
            ("response_format", "b64_json"),
        ],
        &originals,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let t = task_of(&a, &r).await;
    let task_id = t["id"].as_str().unwrap().to_owned();
    let refs = new_references(&a, &files_a, &before).await;
    assert_eq!(refs.len(), 2);
    // The endpoint stored exactly the compressed bytes (in order: the wide reference
    // first), under names fixed per task, with the key from the environment; B downloaded
    // each by its URL.
    let sizes: Vec<(u32, u32)> = {
        let s = seen.lock().unwrap();
        assert_eq!(s.posts, 3, "one 503, then two uploads");
        assert!(s.keys.iter().all(|k| k == "asset-secret"), "{:?}", s.keys);
        assert_eq!(s.gets, 2);
        assert_eq!(s.stored.len(), 2);
        (0..2)
            .map(|i| {
                let (name, mime, stored) = &s.stored[&format!("asset{i}")];
                let (_, ct) = refs
                    .iter()
                    .find(|(data, _)| data == stored)
                    .unwrap_or_else(|| panic!("asset{i} is no compressed reference of A"));
                assert_eq!(mime, ct);
                assert!(name.starts_with(&format!("kiln-{task_id}-{i}.")), "{name}");
                assert!(!originals.contains(stored), "asset{i} was not compressed");
                dims(stored)
            })
            .collect()
    };
    assert!(sizes.iter().all(|&(w, h)| w.max(h) <= 32), "{sizes:?}");
    assert!(
        sizes[0].0 > sizes[0].1 && sizes[1].0 < sizes[1].1,
        "{sizes:?}"
    );
    // The final answer is B's edit of the compressed references.
    assert_eq!(
        png_size(r.json()["data"][0]["b64_json"].as_str().unwrap()),
        joined(&sizes)
    );
    // B got one JSON edit call, no multipart.
    let edits = ng.lines("/ok/v1/images/edits");
    assert_eq!(edits.len(), 1, "{edits:?}");
    assert!(edits[0].ends_with("200 application/json"), "{edits:?}");
    // Every upload attempt is recorded on the task.
    let ups = t["output"]["upstream"]["uploads"].as_array().unwrap();
    assert_eq!(ups.len(), 2, "{t}");
    assert_eq!(ups[0]["part"], "image[0]");
    assert_eq!(ups[0]["target"], "assets");
    assert_eq!(
        ups[0]["bytes"],
        seen.lock().unwrap().stored["asset0"].2.len()
    );
    assert_eq!(ups[0]["url"], format!("{assets}/assets/asset0"));
    assert_eq!(ups[0]["id"], "asset0");
    let tries = ups[0]["attempts"].as_array().unwrap();
    assert_eq!(tries.len(), 2, "{t}");
    assert_eq!(tries[0]["status"], 503, "{t}");
    assert!(tries[0]["delay_ms"].is_u64(), "{t}");
    assert!(
        tries[1]["class"].is_null() && tries[1]["error"].is_null(),
        "{t}"
    );
    assert_eq!(ups[1]["part"], "image[1]");
    assert_eq!(ups[1]["attempts"].as_array().unwrap().len(), 1);
    assert!(ups[0]["total_ms"].is_u64());
    assert_eq!(
        t["output"]["upstream"]["attempts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A target that refuses: not retried, the task fails naming the target, the status and
    // the body, and the upstream is never called.
    let r = edit(
        &a,
        &[("model", "denied"), ("prompt", "mirror")],
        &[png(20, 20)],
    )
    .await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upstream_upload_failed");
    let msg = last_task_error(&r);
    assert!(
        msg.contains("`assets-denied`")
            && msg.contains("HTTP 403")
            && msg.contains("quota exceeded for this key")
            && msg.contains("[attempts: #1 HTTP 403]"),
        "{msg}"
    );
    assert_eq!(seen.lock().unwrap().posts, 3, "/denied is not /assets");
    assert_eq!(ng.hits("/ok/v1/images/edits"), 1);

    // S3 (moto): the object holds the compressed reference; B read it by its URL.
    let Some(m) = moto else {
        return;
    };
    let before = compressed_ids(&files_a);
    let r = edit(
        &a,
        &[
            ("model", "s3ref"),
            ("prompt", "mirror"),
            ("response_format", "b64_json"),
        ],
        &[png(100, 50)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let t = task_of(&a, &r).await;
    let task_id = t["id"].as_str().unwrap().to_owned();
    let refs = new_references(&a, &files_a, &before).await;
    assert_eq!(refs.len(), 1);
    let up = &t["output"]["upstream"]["uploads"][0];
    assert_eq!(up["target"], "s3", "{t}");
    let key = up["id"].as_str().unwrap();
    assert!(
        key.starts_with(&format!("edits/kiln-{task_id}-0.")),
        "{key}"
    );
    assert_eq!(up["url"], format!("{}/refs/{key}", m.endpoint()));
    let object = call(&m.endpoint(), "GET", &format!("/refs/{key}"), "", &[]).await;
    assert_eq!(object.status, 200);
    assert!(
        object.body.as_ref() == refs[0].0.as_slice(),
        "the object differs"
    );
    assert_eq!(
        png_size(r.json()["data"][0]["b64_json"].as_str().unwrap()),
        dims(&refs[0].0)
    );
    let edits = ng.lines("/ok/v1/images/edits");
    assert_eq!(edits.len(), 2, "{edits:?}");
    assert!(edits[1].ends_with("200 application/json"), "{edits:?}");
}
