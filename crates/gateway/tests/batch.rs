//! `POST /v1/tasks/batch`: every item answered on its own (created, duplicate, or invalid with
//! the status and error of the single route), an invalid item never keeps the others from
//! being stored, each item idempotent by its request id, and the whole call refused (nothing
//! stored) over 1,000 items, over the body limit, or empty.
#![allow(clippy::unwrap_used)]

mod support;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use kiln_gateway::router;
use serde_json::{Value, json};
use tower_service::Service as _;

async fn app(
    tweak: impl FnOnce(&mut kiln_gateway::GatewayConfig),
) -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let state = support::state(&dir, tweak).await;
    (dir, router(state))
}

async fn call(app: &axum::Router, method: &str, uri: &str, body: Body) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let resp = app.clone().call(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {uri}: {status} is not JSON ({e}): {bytes:?}"));
    (status, v)
}

async fn post(app: &axum::Router, uri: &str, body: &Value) -> (u16, Value) {
    call(app, "POST", uri, Body::from(body.to_string())).await
}

/// Ids of the stored tasks, newest first.
async fn stored(app: &axum::Router) -> Vec<String> {
    let (status, v) = call(app, "GET", "/v1/tasks?limit=500", Body::empty()).await;
    assert_eq!(status, 200, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn each_item_is_answered_and_an_invalid_one_does_not_poison_the_others() {
    let (_dir, app) = app(|c| c.max_task_input_bytes = 1024).await;
    let seen = json!({"task_type": "t", "input": {"p": 0}, "request_id": "seen"});
    let (status, first) = post(&app, "/v1/tasks", &seen).await;
    assert_eq!(status, 202, "{first}");
    let items = json!([
        {"task_type": "t", "input": {"p": 1}, "request_id": "a"},
        {"task_type": "bad type!", "input": {}},
        seen,
        {"task_type": "t", "input": {"p": "other"}, "request_id": "seen"},
        {"task_type": "t", "bogus": 1},
        {"task_type": "t", "input": {"big": "x".repeat(2000)}},
        {"task_type": "t", "input": {"p": 1}, "request_id": "a"},
        {"task_type": "t", "input": {"p": 2}, "priority": 3, "labels": ["gpu=a100"]},
    ]);
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "tasks": items })).await;
    assert_eq!(status, 207, "{v}");
    let data = v["data"].as_array().unwrap();
    let got: Vec<(u64, &str, u64)> = data
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().unwrap(),
                d["result"].as_str().unwrap(),
                d["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, "created", 202),
            (1, "invalid", 422),
            (2, "duplicate", 202),
            (3, "invalid", 409),
            (4, "invalid", 422),
            (5, "invalid", 413),
            (6, "duplicate", 202),
            (7, "created", 202),
        ]
    );
    assert_eq!(
        (
            v["created"].as_u64(),
            v["duplicates"].as_u64(),
            v["invalid"].as_u64()
        ),
        (Some(2), Some(2), Some(4))
    );
    // The error object of the single route.
    for (i, code) in [
        (1, "invalid_field"),
        (3, "conflict"),
        (4, "invalid_field"),
        (5, "payload_too_large"),
    ] {
        let e = &data[i]["error"];
        assert_eq!(e["code"], code, "{e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
        assert_eq!(e["retryable"], false);
        assert!(data[i]["task"].is_null());
    }
    assert!(
        data[4]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus")
    );
    assert_eq!(data[2]["task"]["id"], first["id"], "the stored task");
    assert_eq!(
        data[6]["task"]["id"], data[0]["task"]["id"],
        "the earlier item's task"
    );
    let last = &data[7]["task"];
    assert_eq!(
        (last["status"].as_str(), last["priority"].as_i64()),
        (Some("queued"), Some(3))
    );
    assert_eq!(last["labels"], json!(["gpu=a100"]));
    // Stored: the task from before and the two created now, in the order given.
    let a = data[0]["task"]["id"].as_str().unwrap().to_owned();
    let b = last["id"].as_str().unwrap().to_owned();
    let first = first["id"].as_str().unwrap().to_owned();
    assert_eq!(stored(&app).await, [b.clone(), a.clone(), first]);
    let (status, t) = call(&app, "GET", &format!("/v1/tasks/{a}"), Body::empty()).await;
    assert_eq!((status, &t["input"]), (200, &json!({"p": 1})));
}

#[tokio::test]
async fn the_same_batch_again_creates_nothing() {
    let (_dir, app) = app(|_| {}).await;
    let tasks: Vec<Value> = (0..50)
        .map(|i| json!({"task_type": "t", "input": {"i": i}, "request_id": format!("r{i}")}))
        .collect();
    let body = json!({ "tasks": tasks });
    let (status, one) = post(&app, "/v1/tasks/batch", &body).await;
    assert_eq!((status, one["created"].as_u64()), (207, Some(50)), "{one}");
    let (status, two) = post(&app, "/v1/tasks/batch", &body).await;
    assert_eq!(
        (status, two["duplicates"].as_u64()),
        (207, Some(50)),
        "{two}"
    );
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["task"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&one), ids(&two));
    assert_eq!(stored(&app).await.len(), 50);
}

#[tokio::test]
async fn too_many_items_too_large_or_empty_is_refused_whole() {
    let (_dir, app) = app(|c| c.max_body_bytes = 200_000).await;
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"task_type": "t", "input": i}))
        .collect();
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "tasks": many })).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    let big: Vec<Value> = (0..10)
        .map(|i| json!({"task_type": "t", "input": {"i": i, "pad": "x".repeat(30_000)}}))
        .collect();
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "tasks": big })).await;
    assert_eq!(status, 413, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "tasks": [] })).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_field")),
        "{v}"
    );
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "task": [] })).await;
    assert!((400..500).contains(&status), "{status} {v}");
    let (status, v) = call(&app, "POST", "/v1/tasks/batch", Body::from("{\"tasks\": [")).await;
    assert_eq!(status, 400, "{v}");
    assert!(stored(&app).await.is_empty(), "nothing stored");
    // 1,000 is allowed.
    let most: Vec<Value> = (0..1000)
        .map(|i| json!({"task_type": "t", "input": i}))
        .collect();
    let (status, v) = post(&app, "/v1/tasks/batch", &json!({ "tasks": most })).await;
    assert_eq!((status, v["created"].as_u64()), (207, Some(1000)));
}

#[tokio::test]
async fn the_openapi_document_describes_the_batch_route() {
    let (_dir, app) = app(|_| {}).await;
    let (status, doc) = call(&app, "GET", "/openapi.json", Body::empty()).await;
    assert_eq!(status, 200);
    let op = &doc["paths"]["/v1/tasks/batch"]["post"];
    assert!(op["responses"]["207"].is_object(), "{op}");
    let body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .unwrap();
    let name = body.rsplit('/').next().unwrap();
    let tasks = &doc["components"]["schemas"][name]["properties"]["tasks"];
    assert_eq!(tasks["maxItems"], 1000, "{tasks}");
    assert!(
        tasks["items"]["$ref"]
            .as_str()
            .unwrap()
            .ends_with("/CreateTask"),
        "{tasks}"
    );
    for s in ["BatchAnswer", "BatchItem", "ItemError"] {
        assert!(doc["components"]["schemas"][s].is_object(), "{s}");
    }
}
