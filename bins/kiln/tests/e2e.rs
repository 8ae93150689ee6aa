//! End-to-end tests: the real `kiln` binary on a free loopback port, driven over HTTP.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{PG_URL, Resp, call, pg_schema, post_json, start, start_logging, wait_status};

/// Waits until the task's `timings` has `stage` (stages measured around the end are
/// recorded just after it) and returns the task.
async fn wait_timing(base: &str, id: &str, stage: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let t = call(base, "GET", &format!("/v1/tasks/{id}"), "", &[])
            .await
            .json();
        if t["timings"][stage].is_u64() {
            return t;
        }
        assert!(
            Instant::now() < until,
            "task {id} has no timings.{stage}: {t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that the stage timings are plausible: present, and the parts within the whole.
fn check_timings(t: &Value, wall_ms: u64, worker_stages: &[&str]) {
    let tm = &t["timings"];
    let ms = |k: &str| {
        tm[k]
            .as_u64()
            .unwrap_or_else(|| panic!("timings.{k} missing: {tm}"))
    };
    let (queued, dispatch, run, upload) = (
        ms("queued_ms"),
        ms("dispatch_ms"),
        ms("run_ms"),
        ms("upload_ms"),
    );
    assert!(dispatch <= queued, "{tm}");
    // Server times are whole Unix ms, so their difference can round up by 1 ms.
    assert!(
        queued + run <= wall_ms.saturating_add(1),
        "queued + run above the wall time {wall_ms}: {tm}"
    );
    let worker = tm["worker"].as_object().unwrap_or_else(|| panic!("{tm}"));
    for stage in worker_stages {
        assert!(
            worker[*stage].is_u64(),
            "timings.worker.{stage} missing: {tm}"
        );
    }
    let worker_sum: u64 = worker.values().map(|v| v.as_u64().unwrap()).sum();
    assert!(worker_sum <= run, "worker stages above run_ms: {tm}");
    // The gateway stores the output inside the worker's upload request.
    assert!(upload <= worker["upload_ms"].as_u64().unwrap(), "{tm}");
}

/// Reads an SSE response to its end: `(id, event, data)` triples.
fn parse_sse(body: &[u8]) -> Vec<(i64, String, Value)> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut ev, mut data) = (None, None, None);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = serde_json::from_str(v).ok();
            }
        }
        if let (Some(i), Some(e), Some(d)) = (id, ev, data) {
            out.push((i, e, d));
        }
    }
    out
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_create_stream_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let began = Instant::now();
    let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "txt2img", "input": {"prompt": "a red lighthouse", "width": 320, "height": 200, "seed": 9}}), &[]).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let t = r.json();
    let id = t["id"].as_str().unwrap().to_owned();
    assert_eq!(r.headers["location"], format!("/v1/tasks/{id}").as_str());
    // The SSE stream runs to the `completed` event and ends.
    let sse = call(&s.base, "GET", &format!("/v1/tasks/{id}/events"), "", &[]).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = parse_sse(&sse.body);
    let kinds: Vec<&str> = events.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"status"));
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(kinds.contains(&"progress"));
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    let done = &events.last().unwrap().2;
    assert_eq!(done["status"], "succeeded");
    // The task object and the image.
    wait_status(&s.base, &id, "succeeded", 10).await;
    let wall_ms = began.elapsed().as_millis() as u64;
    let t = wait_timing(&s.base, &id, "upload_ms").await;
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
    check_timings(&t, wall_ms, &["render_ms", "encode_ms", "upload_ms"]);
    assert!(
        t["timings"].get("compress_ms").is_none(),
        "no reference image"
    );
    let file = &t["output"]["files"][0];
    let img = call(&s.base, "GET", file["url"].as_str().unwrap(), "", &[]).await;
    assert_eq!(img.status, 200);
    assert_eq!(img.headers["content-type"], "image/png");
    let decoded = image::load_from_memory(&img.body).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (320, 200));
    // Resume after the second event: only later events come back.
    let resumed = call(
        &s.base,
        "GET",
        &format!("/v1/tasks/{id}/events"),
        "",
        &[("last-event-id", &events[1].0.to_string())],
    )
    .await;
    let later = parse_sse(&resumed.body);
    // Every later event comes back, except previews superseded by a later preview.
    let last_preview = events.iter().rposition(|e| e.1 == "preview");
    let want: Vec<_> = events
        .iter()
        .enumerate()
        .skip(2)
        .filter(|(i, e)| e.1 != "preview" || Some(*i) == last_preview)
        .map(|(_, e)| e.0)
        .collect();
    assert_eq!(later.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    assert!(
        kinds.contains(&"preview"),
        "the demo worker sends previews: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_compress_and_img2img() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    // Raw upload with compression to fit 40 KB and 300 px.
    let r = call(
        &s.base,
        "POST",
        "/v1/files?max_bytes=40000&max_dim=300",
        png(900, 600),
        &[("content-type", "image/png")],
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let f = r.json();
    assert!(f["bytes"].as_u64().unwrap() <= 40_000);
    assert_eq!(
        (f["width"].as_u64(), f["height"].as_u64()),
        (Some(300), Some(200))
    );
    // Multipart upload without compression.
    let boundary = "kilnboundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    body.extend(png(64, 48));
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let m = call(&s.base, "POST", "/v1/files", body, &[("content-type", &ct)]).await;
    assert_eq!(m.status, 201, "{:?}", String::from_utf8_lossy(&m.body));
    assert_eq!(m.json()["width"], 64);
    // img2img on the compressed upload.
    let r = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "img2img", "input": {"image": f["id"], "prompt": "grayscale please"}}),
        &[],
    )
    .await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    wait_status(&s.base, &id, "succeeded", 15).await;
    let t = wait_timing(&s.base, &id, "upload_ms").await;
    // The reference image was compressed at upload; its time counts for the task.
    let t = if t["timings"]["compress_ms"].is_u64() {
        t
    } else {
        wait_timing(&s.base, &id, "compress_ms").await
    };
    check_timings(
        &t,
        u64::MAX,
        &[
            "download_ms",
            "decode_ms",
            "render_ms",
            "encode_ms",
            "upload_ms",
        ],
    );
    assert_eq!(t["output"]["transforms"], json!(["grayscale"]));
    let out = call(
        &s.base,
        "GET",
        t["output"]["files"][0]["url"].as_str().unwrap(),
        "",
        &[],
    )
    .await;
    let img = image::load_from_memory(&out.body).unwrap();
    assert_eq!((img.width(), img.height()), (300, 200));
    assert!(matches!(img, image::DynamicImage::ImageLuma8(_)));
    // delete_asset removes a file the worker created.
    let del = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "delete_asset", "input": {"file_id": t["output"]["files"][0]["id"]}}),
        &[],
    )
    .await;
    let del_id = del.json()["id"].as_str().unwrap().to_owned();
    wait_status(&s.base, &del_id, "succeeded", 10).await;
    assert_eq!(call(&s.base, "GET", out_url(&t), "", &[]).await.status, 404);
    // ...but not one it did not create.
    let del = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "delete_asset", "input": {"file_id": f["id"]}}),
        &[],
    )
    .await;
    let t = wait_status(&s.base, del.json()["id"].as_str().unwrap(), "failed", 10).await;
    assert_eq!(t["error"]["code"], "not_owner");
}

fn out_url(t: &Value) -> &str {
    t["output"]["files"][0]["url"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_cancel_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        dir.path(),
        &[
            ("KILN_GATEWAY__MAX_BODY_BYTES", "100000"),
            ("KILN_FILES__MAX_BYTES", "100000"),
            ("KILN_FILES__ALLOWED_TYPES", "image/*"),
        ],
    );
    let body =
        json!({"task_type": "txt2img", "input": {"prompt": "same", "width": 64, "height": 64}});
    let a = post_json(
        &s.base,
        "/v1/tasks",
        body.clone(),
        &[("idempotency-key", "k-1")],
    )
    .await
    .json();
    let b = post_json(
        &s.base,
        "/v1/tasks",
        body.clone(),
        &[("idempotency-key", "k-1")],
    )
    .await
    .json();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["request_id"], "k-1");
    let other = json!({"task_type": "txt2img", "input": {"prompt": "different"}});
    let c = post_json(&s.base, "/v1/tasks", other, &[("idempotency-key", "k-1")]).await;
    assert_eq!(c.status, 409);

    // Cancel a queued task (dispatch paused so it stays queued; the task above is done first
    // so the queue is empty).
    wait_status(&s.base, a["id"].as_str().unwrap(), "succeeded", 10).await;
    assert_eq!(
        call(&s.base, "POST", "/v1/admin/queue/pause", "", &[])
            .await
            .status,
        200
    );
    let q = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "txt2img", "input": {"prompt": "later"}}),
        &[],
    )
    .await
    .json();
    let id = q["id"].as_str().unwrap();
    assert_eq!(q["queue_position"], 0);
    let cancel = call(&s.base, "POST", &format!("/v1/tasks/{id}/cancel"), "", &[]).await;
    assert_eq!(cancel.status, 202);
    assert_eq!(cancel.json()["status"], "canceled");
    // One spelling in answers; the other accepted in filters.
    for spelling in ["canceled", "cancelled"] {
        let page = call(
            &s.base,
            "GET",
            &format!("/v1/tasks?status={spelling}"),
            "",
            &[],
        )
        .await
        .json();
        let listed: Vec<&str> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert!(listed.contains(&id), "{spelling}: {page}");
    }
    assert_eq!(
        call(&s.base, "POST", &format!("/v1/tasks/{id}/cancel"), "", &[])
            .await
            .status,
        409
    );
    let events = parse_sse(
        &call(&s.base, "GET", &format!("/v1/tasks/{id}/events"), "", &[])
            .await
            .body,
    );
    assert_eq!(events.last().unwrap().1, "completed");
    assert_eq!(events.last().unwrap().2["status"], "canceled");
    call(&s.base, "POST", "/v1/admin/queue/resume", "", &[]).await;

    // Every error is JSON with the right status.
    let cases: Vec<(Resp, u16, &str)> = vec![
        (
            call(
                &s.base,
                "POST",
                "/v1/tasks",
                "{not json",
                &[("content-type", "application/json")],
            )
            .await,
            400,
            "malformed_request",
        ),
        (
            call(
                &s.base,
                "POST",
                "/v1/tasks",
                body.to_string(),
                &[("content-type", "text/plain")],
            )
            .await,
            415,
            "unsupported_media_type",
        ),
        (
            post_json(
                &s.base,
                "/v1/tasks",
                json!({"task_type": "unheard_of", "input": {}}),
                &[],
            )
            .await,
            422,
            "invalid_field",
        ),
        (
            post_json(&s.base, "/v1/tasks", json!({"input": {}}), &[]).await,
            422,
            "invalid_field",
        ),
        (
            call(&s.base, "GET", "/v1/tasks/task_0000", "", &[]).await,
            404,
            "not_found",
        ),
        (
            call(&s.base, "GET", "/v1/files/file_nope", "", &[]).await,
            404,
            "not_found",
        ),
        (
            call(&s.base, "GET", "/nowhere", "", &[]).await,
            404,
            "not_found",
        ),
        (
            call(&s.base, "DELETE", "/v1/tasks", "", &[]).await,
            405,
            "method_not_allowed",
        ),
        (
            call(
                &s.base,
                "POST",
                "/v1/files",
                vec![0u8; 200_000],
                &[("content-type", "image/png")],
            )
            .await,
            413,
            "payload_too_large",
        ),
        (
            call(
                &s.base,
                "POST",
                "/v1/files",
                "hello",
                &[("content-type", "text/plain")],
            )
            .await,
            415,
            "unsupported_media_type",
        ),
        (
            call(
                &s.base,
                "POST",
                "/v1/files",
                "not a png",
                &[("content-type", "image/png")],
            )
            .await,
            422,
            "invalid_field",
        ),
        (
            call(&s.base, "GET", "/v1/tasks?status=bogus", "", &[]).await,
            422,
            "invalid_field",
        ),
    ];
    for (resp, status, code) in cases {
        assert_eq!(
            resp.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.json()["error"]["code"], code);
        assert!(
            resp.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let list = call(&s.base, "GET", "/v1/tasks?limit=2", "", &[])
        .await
        .json();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let next = list["next_cursor"].as_str().unwrap();
    let page2 = call(
        &s.base,
        "GET",
        &format!("/v1/tasks?limit=2&cursor={next}"),
        "",
        &[],
    )
    .await
    .json();
    assert_ne!(page2["data"][0]["id"], list["data"][0]["id"]);
    assert_eq!(call(&s.base, "GET", "/healthz", "", &[]).await.status, 200);
    assert_eq!(
        call(&s.base, "GET", "/readyz", "", &[]).await.json()["status"],
        "ready"
    );
    let metrics = call(&s.base, "GET", "/metrics", "", &[]).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("kiln_workers_online 1"));
    let api = call(&s.base, "GET", "/openapi.json", "", &[]).await.json();
    assert!(api["paths"]["/v1/tasks"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tasks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = {
        // No worker: tasks stay queued.
        let s = start(
            dir.path(),
            &[
                ("KILN_DEMO_WORKER__ENABLED", "false"),
                ("KILN_GATEWAY__KNOWN_TASK_TYPES", "txt2img"),
            ],
        );
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = post_json(&s.base, "/v1/tasks", json!({"task_type": "txt2img", "input": {"prompt": format!("n{i}"), "width": 32, "height": 32}}), &[]).await;
            assert_eq!(r.status, 202);
            ids.push(r.json()["id"].as_str().unwrap().to_owned());
        }
        ids
        // Dropping the server kills it with SIGKILL.
    };
    let s = start(dir.path(), &[]);
    for id in &ids {
        let t = wait_status(&s.base, id, "succeeded", 20).await;
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "hash-key", "s3cret"])
        .output()
        .unwrap();
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let s = start(dir.path(), &[("KILN_GATEWAY__API_KEY_HASHES", &hash)]);
    let body = json!({"task_type": "txt2img", "input": {"prompt": "x", "width": 16, "height": 16}});
    assert_eq!(
        post_json(&s.base, "/v1/tasks", body.clone(), &[])
            .await
            .status,
        401
    );
    assert_eq!(
        post_json(
            &s.base,
            "/v1/tasks",
            body.clone(),
            &[("authorization", "Bearer wrong")]
        )
        .await
        .status,
        401
    );
    let ok = post_json(
        &s.base,
        "/v1/tasks",
        body,
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(ok.status, 202);
    // The in-process demo worker still connects with its own token and runs the task.
    let id = ok.json()["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let t = call(
            &s.base,
            "GET",
            &format!("/v1/tasks/{id}"),
            "",
            &[("authorization", "Bearer s3cret")],
        )
        .await
        .json();
        if t["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < until, "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(&s.base, "GET", "/healthz", "", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_span_carries_the_stage_timings() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let s = start_logging(
        dir.path(),
        &[
            ("KILN_LOG__FORMAT", "json"),
            ("KILN_LOG__FILTER", "warn,kiln_gateway=info"),
        ],
        Stdio::from(log),
    );
    let r = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "txt2img", "input": {"prompt": "span", "width": 64, "height": 64}}),
        &[],
    )
    .await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    wait_status(&s.base, &id, "succeeded", 10).await;
    let t = wait_timing(&s.base, &id, "upload_ms").await;
    // The `task ended` event is logged inside the task's span, which holds the stages.
    let until = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| {
                l["fields"]["message"] == "task ended" && l["fields"]["task_id"] == id.as_str()
            });
        if let Some(l) = found {
            break l;
        }
        assert!(
            Instant::now() < until,
            "no `task ended` line for {id}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let span = &ended["span"];
    assert_eq!(span["name"], "task", "{ended}");
    assert_eq!(span["task_id"], id.as_str());
    assert_eq!(span["task_type"], "txt2img");
    assert_eq!(span["attempt"], 1);
    assert_eq!(span["status"], "succeeded");
    for stage in ["queued_ms", "dispatch_ms", "run_ms", "upload_ms"] {
        assert_eq!(span[stage], t["timings"][stage], "{stage}: {ended}");
    }
    let worker: Value = serde_json::from_str(span["worker"].as_str().unwrap()).unwrap();
    assert_eq!(worker, t["timings"]["worker"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_s3_survive_a_restart() {
    let Some(moto) = kiln_test_support::Moto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let endpoint = moto.endpoint();
    let env: Vec<(&str, &str)> = vec![
        ("KILN_STORAGE__BACKEND", "s3"),
        ("KILN_STORAGE__CREATE_BUCKET", "true"),
        ("KILN_STORAGE__S3__ENDPOINT", &endpoint),
        ("KILN_STORAGE__S3__BUCKET", "kiln-e2e"),
        ("KILN_STORAGE__S3__KEY_PREFIX", "files/"),
        ("KILN_STORAGE__S3__ACCESS_KEY_ID", "test"),
        ("KILN_STORAGE__S3__SECRET_ACCESS_KEY", "test"),
        ("KILN_STORAGE__CLIENT__RETRY__INITIAL_BACKOFF", "20ms"),
    ];
    let (upload_id, output_id, output) = {
        let s = start(dir.path(), &env);
        let ready = call(&s.base, "GET", "/readyz", "", &[]).await;
        assert_eq!(
            ready.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&ready.body)
        );
        assert_eq!(ready.json()["storage"]["backend"], "s3");
        let up = call(
            &s.base,
            "POST",
            "/v1/files",
            png(120, 80),
            &[("content-type", "image/png")],
        )
        .await;
        assert_eq!(up.status, 201, "{:?}", String::from_utf8_lossy(&up.body));
        let upload_id = up.json()["id"].as_str().unwrap().to_owned();
        let r = post_json(
            &s.base,
            "/v1/tasks",
            json!({"task_type": "img2img", "input": {"image": upload_id, "prompt": "invert"}}),
            &[],
        )
        .await;
        let id = r.json()["id"].as_str().unwrap().to_owned();
        wait_status(&s.base, &id, "succeeded", 20).await;
        let t = wait_timing(&s.base, &id, "upload_ms").await;
        let output_id = t["output"]["files"][0]["id"].as_str().unwrap().to_owned();
        let out = call(&s.base, "GET", out_url(&t), "", &[]).await;
        assert_eq!(out.status, 200);
        assert_eq!(out.headers["content-type"], "image/png");
        (upload_id, output_id, out.body)
        // Dropping the server kills it.
    };
    // Nothing went to the local files directory but the spool for streamed uploads, empty.
    let local = dir.path().join("files");
    let entries: Vec<_> = std::fs::read_dir(&local)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        entries.iter().all(|e| e == ".incoming"),
        "files were written locally: {entries:?}"
    );
    let spool = local.join(".incoming");
    assert!(
        !spool.exists() || std::fs::read_dir(&spool).unwrap().next().is_none(),
        "the spool keeps files"
    );
    // A new server process serves both files from the bucket, byte for byte.
    let s = start(dir.path(), &env);
    let again = call(&s.base, "GET", &format!("/v1/files/{output_id}"), "", &[]).await;
    assert_eq!(again.status, 200);
    assert!(again.body == output, "output differs after restart");
    let up = call(&s.base, "GET", &format!("/v1/files/{upload_id}"), "", &[]).await;
    assert!(up.body.as_ref() == png(120, 80).as_slice());
    assert_eq!(
        call(
            &s.base,
            "DELETE",
            &format!("/v1/files/{upload_id}"),
            "",
            &[]
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(&s.base, "GET", &format!("/v1/files/{upload_id}"), "", &[])
            .await
            .status,
        404
    );
    // Misconfigured storage is refused at start, naming the key.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "check"])
        .env("KILN_SERVER__DATA_DIR", dir.path())
        .env("KILN_STORAGE__BACKEND", "s3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.s3"));
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["config", "check"])
            .env("KILN_SERVER__DATA_DIR", dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[("KILN_BROKER__LEASE", "forever")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broker.lease"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[("KILN_SERVER__LISTEN", "0.0.0.0:8080")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api_key_hashes"));
    let out = run(&[("KILN_GATEWAY__NO_SUCH_KEY", "1")]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["config", "print-default"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&printed.stdout).contains("[broker]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_postgres_queue() {
    let Some(pg) = pg_schema("kiln_e2e_two").await else {
        return;
    };
    let schema = format!("kiln_e2e_two_{}", std::process::id());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let common = [
        ("KILN_QUEUE__BACKEND", "postgres"),
        ("KILN_QUEUE__POSTGRES_URL", PG_URL),
        ("KILN_QUEUE__POSTGRES_SCHEMA", schema.as_str()),
        ("KILN_GATEWAY__KNOWN_TASK_TYPES", "txt2img"),
    ];
    // A has no worker; B runs the demo worker. Tasks submitted to A run on B, and A's SSE
    // stream follows them through B's announcements.
    let mut env_a = common.to_vec();
    env_a.push(("KILN_DEMO_WORKER__ENABLED", "false"));
    let a = start(da.path(), &env_a);
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = post_json(&a.base, "/v1/tasks", json!({"task_type": "txt2img", "input": {"prompt": format!("p{i}"), "width": 32, "height": 32}}), &[]).await;
        assert_eq!(r.status, 202, "{:?}", r.json());
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let b = start(db.path(), &common);
    let sse = call(
        &a.base,
        "GET",
        &format!("/v1/tasks/{}/events", ids[0]),
        "",
        &[],
    )
    .await;
    let events = parse_sse(&sse.body);
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("completed"),
        "{events:?}"
    );
    for id in &ids {
        let t = wait_status(&a.base, id, "succeeded", 20).await;
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
        assert_eq!(
            call(&b.base, "GET", &format!("/v1/tasks/{id}"), "", &[])
                .await
                .json()["status"],
            "succeeded"
        );
    }
    drop((a, b));
    pg.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_route_by_model_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    // An OpenAI model whose tasks ask for a model the demo worker does not list.
    let s = start(
        dir.path(),
        &[(
            "KILN_GATEWAY__OPENAI__MODELS__SDXL__WORKER_MODEL",
            "sdxl-base",
        )],
    );
    let post = |body: Value| post_json(&s.base, "/v1/tasks", body, &[]);
    // The demo worker lists the model kiln-demo and the label demo: it runs this one.
    let r = post(
        json!({"task_type": "txt2img", "model": "kiln-demo", "labels": ["demo", "demo"],
        "input": {"prompt": "routed", "width": 64, "height": 64}}),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let t = r.json();
    assert_eq!(
        (&t["model"], &t["labels"]),
        (&json!("kiln-demo"), &json!(["demo"]))
    );
    let fit = t["id"].as_str().unwrap().to_owned();
    // Neither of these fits the demo worker: they wait for a worker that does.
    let mut waiting = Vec::new();
    for body in [
        json!({"task_type": "txt2img", "model": "sdxl-base", "input": {"prompt": "m"}}),
        json!({"task_type": "txt2img", "labels": ["gpu=a100"], "input": {"prompt": "l"}}),
    ] {
        let r = post(body).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        waiting.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    wait_status(&s.base, &fit, "succeeded", 20).await;
    // A plain task submitted after them still runs: they block nothing.
    let r = post(
        json!({"task_type": "txt2img", "input": {"prompt": "plain", "width": 64, "height": 64}}),
    )
    .await;
    let plain = r.json()["id"].as_str().unwrap().to_owned();
    wait_status(&s.base, &plain, "succeeded", 20).await;
    for id in &waiting {
        let t = call(&s.base, "GET", &format!("/v1/tasks/{id}"), "", &[])
            .await
            .json();
        assert_eq!(t["status"], "queued", "{t}");
        assert_eq!(t["queue_position"], 0, "{t}");
    }
    // Malformed routing is refused.
    for body in [
        json!({"task_type": "txt2img", "model": ""}),
        json!({"task_type": "txt2img", "model": "has space"}),
        json!({"task_type": "txt2img", "labels": ["ok", ""]}),
        json!({"task_type": "txt2img", "labels": (0..17).map(|i| format!("l{i}")).collect::<Vec<_>>()}),
    ] {
        let r = post(body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
    }
    // The OpenAI API asks for the configured worker model: kiln-demo runs on the demo worker.
    let r = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"model": "kiln-demo", "prompt": "a fox", "size": "64x64"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.headers["x-kiln-task-id"].to_str().unwrap().to_owned();
    let t = call(&s.base, "GET", &format!("/v1/tasks/{id}"), "", &[])
        .await
        .json();
    assert_eq!(t["model"], "kiln-demo");
    // ... and sdxl asks for sdxl-base, which no worker lists: the call answers 202.
    let r = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"model": "sdxl", "prompt": "a fox"}),
        &[("prefer", "wait=1")],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        (&r.json()["model"], &r.json()["status"]),
        (&json!("sdxl-base"), &json!("queued"))
    );
    let m = call(&s.base, "GET", "/v1/models/sdxl", "", &[])
        .await
        .json();
    assert_eq!(
        (&m["kiln"]["worker_model"], &m["kiln"]["workers_online"]),
        (&json!("sdxl-base"), &json!(0))
    );
}
