//! The gateway inside a host app: `api_router` and `ops_router` merge and nest next to the
//! host's routes and fallback without panics, links keep the nest prefix (after
//! `public_base_url`), and kiln's metrics join the host's registry.
#![allow(clippy::unwrap_used)]

mod support;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_gateway::{AppState, api_router, ops_router, router};
use serde_json::{Value, json};
use support::state;
use tower_service::Service as _;

struct Resp {
    status: StatusCode,
    location: Option<String>,
    body: bytes::Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(app: &mut Router, method: &str, uri: &str, ct: &str, body: Vec<u8>) -> Resp {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", ct)
        .body(Body::from(body))
        .unwrap();
    let resp = app.call(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        location: parts
            .headers
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn task_body() -> Vec<u8> {
    json!({"task_type": "txt2img", "input": {"prompt": "a fox"}})
        .to_string()
        .into_bytes()
}

/// Submits a task at `uri`: its id and the `Location` answered.
async fn submit(app: &mut Router, uri: &str) -> (String, String) {
    let r = call(app, "POST", uri, "application/json", task_body()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    (id, r.location.unwrap())
}

/// The host's routes and fallback, kiln's API under `/kiln`, its ops routes under `/ops`.
fn host(state: &AppState) -> Router {
    Router::new()
        .route("/", axum::routing::get(|| async { "host" }))
        .nest("/kiln", api_router(state.clone()))
        .nest("/ops", ops_router(state.clone()))
        .fallback(|| async { (StatusCode::IM_A_TEAPOT, "host fallback") })
}

#[tokio::test]
async fn a_task_submitted_under_a_prefix_links_back_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir, |_| {}).await;
    let mut app = host(&state);

    let (id, location) = submit(&mut app, "/kiln/v1/tasks").await;
    assert_eq!(location, format!("/kiln/v1/tasks/{id}"));
    // The Location answers, through the host.
    let r = call(&mut app, "GET", &location, "application/json", vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], id.as_str());

    // A file stored under the prefix is linked under it, and downloads from there.
    let png = support::noise_png(8, 8, 1);
    let r = call(&mut app, "POST", "/kiln/v1/files", "image/png", png.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let file = r.json();
    let url = file["url"].as_str().unwrap().to_owned();
    assert_eq!(
        url,
        format!("/kiln/v1/files/{}", file["id"].as_str().unwrap())
    );
    assert_eq!(r.location.as_deref(), Some(url.as_str()));
    let r = call(&mut app, "GET", &url, "", vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &png[..]);

    // The host keeps its own routes and fallback; kiln's routes are not at the root.
    let r = call(&mut app, "GET", "/", "", vec![]).await;
    assert_eq!(&r.body[..], b"host");
    let r = call(
        &mut app,
        "POST",
        "/v1/tasks",
        "application/json",
        task_body(),
    )
    .await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    // Unknown paths under the prefix reach the host's fallback too (api_router has none).
    let r = call(&mut app, "GET", "/kiln/nope", "", vec![]).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    // A known path with a wrong method is still kiln's JSON 405.
    let r = call(
        &mut app,
        "PUT",
        "/kiln/v1/tasks",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    // The ops routes are where the host put them, and only there.
    let r = call(&mut app, "GET", "/ops/healthz", "", vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
    let r = call(&mut app, "GET", "/kiln/healthz", "", vec![]).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
}

#[tokio::test]
async fn the_external_base_comes_before_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir, |c| {
        c.public_base_url = Some("https://example.com/api/".into());
    })
    .await;
    let mut app = host(&state);
    let (id, location) = submit(&mut app, "/kiln/v1/tasks").await;
    assert_eq!(
        location,
        format!("https://example.com/api/kiln/v1/tasks/{id}")
    );
    // Served at the root, the same state links without a prefix.
    let mut root = router(state.clone());
    let (id, location) = submit(&mut root, "/v1/tasks").await;
    assert_eq!(location, format!("https://example.com/api/v1/tasks/{id}"));
    // router() answers unknown paths itself, with kiln's JSON 404.
    let r = call(&mut root, "GET", "/nope", "", vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn api_and_ops_routers_merge_into_a_host_with_a_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir, |_| {}).await;
    let mut app = Router::new()
        .fallback(|| async { (StatusCode::IM_A_TEAPOT, "host fallback") })
        .merge(api_router(state.clone()))
        .merge(ops_router(state.clone()));
    let (id, location) = submit(&mut app, "/v1/tasks").await;
    assert_eq!(location, format!("/v1/tasks/{id}"));
    let r = call(&mut app, "GET", "/readyz", "", vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(&mut app, "GET", "/nope", "", vec![]).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
}

#[tokio::test]
async fn metrics_join_the_hosts_registry() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir, |_| {}).await;
    let mut registry = prometheus_client::registry::Registry::default();
    state.metrics().register_into(&mut registry);
    let mut app = host(&state);
    for _ in 0..3 {
        submit(&mut app, "/kiln/v1/tasks").await;
    }
    state.refresh_metrics().await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("kiln_tasks_submitted_total{task_type=\"txt2img\"} 3"),
        "{text}"
    );
    // A scrape-time gauge, current after the refresh.
    assert!(text.contains("kiln_queue_depth 3"), "{text}");
    // The gateway's own /metrics reads the same series.
    let r = call(&mut app, "GET", "/ops/metrics", "", vec![]).await;
    let own = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        own.contains("kiln_tasks_submitted_total{task_type=\"txt2img\"} 3"),
        "{own}"
    );
}
