//! One submit path: a task created through the OpenAI images API gets what one created
//! through `POST /v1/tasks` gets — a `task` span from acceptance (its `task accepted` event
//! logged in it, with the API it came through), the `compress_ms` of the reference images it
//! names, and its count in `kiln_tasks_submitted_total`.
#![cfg(feature = "openai")]
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_gateway::openai::ModelConfig;
use kiln_gateway::router;
use serde_json::{Value, json};
use tower_service::Service as _;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// The fields of a span or event, as text.
#[derive(Debug, Clone, Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// An event and the span it was logged in.
#[derive(Debug, Clone)]
struct Seen {
    span: String,
    span_fields: Fields,
    event: Fields,
}

/// Keeps every event logged inside a span.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Seen>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut f = Fields::default();
        event.record(&mut f);
        let span_fields = span
            .extensions()
            .get::<Fields>()
            .cloned()
            .unwrap_or_default();
        self.0.lock().unwrap().push(Seen {
            span: span.name().to_owned(),
            span_fields,
            event: f,
        });
    }
}

impl Capture {
    /// The `task accepted` event of task `id`, logged in its `task` span.
    fn accepted(&self, id: &str) -> Option<Seen> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.span == "task"
                    && s.span_fields.0.get("task_id").map(String::as_str) == Some(id)
                    && s.event.0.get("message").map(String::as_str) == Some("task accepted")
            })
            .cloned()
    }
}

async fn call(app: &mut axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.call(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&body)));
    (status, v)
}

/// The task's timings once `compress_ms` is recorded (in the background), or after 5 s.
async fn timings(app: &mut axum::Router, id: &str) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let req = Request::get(format!("/v1/tasks/{id}"))
            .body(Body::empty())
            .unwrap();
        let (status, t) = call(app, req).await;
        assert_eq!(status, StatusCode::OK);
        if !t["timings"]["compress_ms"].is_null() || tokio::time::Instant::now() > until {
            return t["timings"].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn multipart(boundary: &str, image: &[u8], fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
         content-type: image/png\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(image);
    for (k, v) in fields {
        out.extend_from_slice(
            format!("\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}")
                .as_bytes(),
        );
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

// One runtime thread: the spans of the spawned background work are seen by this test's
// subscriber, which is the thread's default.
#[tokio::test(flavor = "current_thread")]
async fn openai_tasks_get_the_span_and_timings_of_the_tasks_api() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let dir = tempfile::tempdir().unwrap();
    let state = support::state(&dir, |c| {
        // References of this model's edits are compressed to 20 kB.
        let m = ModelConfig {
            max_reference_bytes: 20_000,
            ..ModelConfig::default()
        };
        c.openai.models.insert("m".into(), m);
    })
    .await;
    let mut app = router(state.clone());
    let png = support::noise_png(160, 160, 7);
    assert!(png.len() > 60_000);

    // The tasks API: a compressed upload, then a task naming it.
    let req = Request::post("/v1/files?max_bytes=20000")
        .header("content-type", "image/png")
        .body(Body::from(png.clone()))
        .unwrap();
    let (status, file) = call(&mut app, req).await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    let body = json!({"task_type": "img2img", "input": {"image": file["id"], "prompt": "p"}});
    let req = Request::post("/v1/tasks")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, task) = call(&mut app, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{task}");
    let tasks_id = task["id"].as_str().unwrap().to_owned();

    // The OpenAI route: an edit whose reference is compressed to the model's limit.
    let req = Request::post("/v1/images/edits")
        .header("content-type", "multipart/form-data; boundary=B0undary")
        .header("prefer", "respond-async")
        .body(Body::from(multipart(
            "B0undary",
            &png,
            &[("model", "m"), ("prompt", "a fox")],
        )))
        .unwrap();
    let (status, task) = call(&mut app, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{task}");
    let openai_id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(task["metadata"]["api"], "openai.images");

    for (id, api) in [(&tasks_id, "tasks"), (&openai_id, "openai.images")] {
        let timings = timings(&mut app, id).await;
        let ms = &timings["compress_ms"];
        assert!(ms.is_u64(), "{api}: no compress_ms in {timings}");
        let seen = capture
            .accepted(id)
            .unwrap_or_else(|| panic!("{api}: no `task accepted` in a task span for {id}"));
        assert_eq!(seen.event.0["api"], api);
        assert_eq!(seen.span_fields.0["task_type"], "img2img");
    }
    let text = state.metrics().render();
    assert!(
        text.contains("kiln_tasks_submitted_total{task_type=\"img2img\"} 2"),
        "{text}"
    );
}
