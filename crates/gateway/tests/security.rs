//! The gateway's access rules, driven through the real router: worker tokens reach only
//! the protocol's routes and are rate limited, API key scopes, who reads /metrics and
//! /readyz, the no-auth mode's Host, origin and content-type rules, and the JSON shape of
//! every error (including `/openapi.json`'s parameter locations).
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, MetricsAccess, Scope, hash_key, hash_secret, router};
use serde_json::{Value, json};
use tower_service::Service as _;

/// A 1x1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

struct Gw {
    _dir: tempfile::TempDir,
    state: AppState,
    app: axum::Router,
}

async fn gateway(tweak: impl FnOnce(&mut GatewayConfig)) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let mut config = GatewayConfig {
        files_dir: dir.path().join("files"),
        queue_unknown_task_types: true,
        ..GatewayConfig::default()
    };
    tweak(&mut config);
    let state = AppState::new(config, broker).await.unwrap();
    let app = router(state.clone());
    Gw {
        _dir: dir,
        state,
        app,
    }
}

struct Resp {
    status: u16,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// The error code of a kiln-shaped JSON error.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl Gw {
    async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().call(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(body.into()).unwrap()).await
    }
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn a_worker_token_cannot_delete_files_or_reach_client_routes() {
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_secret("client-key")];
        c.worker_token_hashes = vec![hash_secret("worker-token")];
    })
    .await;
    let w = bearer("worker-token");
    let up = gw
        .call(
            "POST",
            "/v1/files",
            &[("authorization", &w), ("content-type", "image/png")],
            PNG.to_vec(),
        )
        .await;
    assert_eq!(up.status, 201, "{:?}", String::from_utf8_lossy(&up.body));
    let id = up.json()["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/files/{id}");
    let del = gw
        .call("DELETE", &path, &[("authorization", &w)], Body::empty())
        .await;
    assert_eq!(del.status, 403);
    assert_eq!(del.code(), "forbidden");
    // The file is still there, and the worker may download it.
    let get = gw
        .call("GET", &path, &[("authorization", &w)], Body::empty())
        .await;
    assert_eq!(get.status, 200);
    assert_eq!(get.body, PNG);
    for (method, uri) in [
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/task_1"),
        ("GET", "/v1/workers"),
        ("POST", "/v1/admin/queue/pause"),
        ("POST", "/v1/images/generations"),
    ] {
        let r = gw
            .call(method, uri, &[("authorization", &w)], Body::empty())
            .await;
        assert_eq!(r.status, 403, "{method} {uri}");
    }
    assert!(!gw.state.broker().is_paused());
    // An API key deletes it.
    let del = gw
        .call(
            "DELETE",
            &path,
            &[("authorization", &bearer("client-key"))],
            Body::empty(),
        )
        .await;
    assert_eq!(del.status, 204);
}

#[tokio::test]
async fn worker_tokens_are_rate_limited() {
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_secret("client-key")];
        c.worker_token_hashes = vec![hash_secret("worker-token")];
        c.worker_rate_limit_per_minute = 60;
        c.worker_rate_limit_burst = 3;
    })
    .await;
    let w = bearer("worker-token");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = gw
            .call(
                "GET",
                "/v1/files/file_0000000000000000000000000000",
                &[("authorization", &w)],
                Body::empty(),
            )
            .await;
        statuses.push(r.status);
        if r.status == 429 {
            assert_eq!(r.code(), "rate_limited");
            assert!(r.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(&statuses[..3], &[404, 404, 404], "{statuses:?}");
    assert_eq!(&statuses[3..], &[429, 429], "{statuses:?}");
}

#[tokio::test]
async fn api_key_scopes_limit_what_a_key_does() {
    let gw = gateway(|c| {
        c.api_key_hashes = vec![
            hash_key("reader", Scope::Read),
            hash_key("submitter", Scope::Submit),
            hash_secret("admin"),
        ];
    })
    .await;
    let task = json!({"task_type": "txt2img", "input": {"prompt": "x"}}).to_string();
    let json_ct = ("content-type", "application/json");
    let (r, s, a) = (bearer("reader"), bearer("submitter"), bearer("admin"));
    assert_eq!(
        gw.call("GET", "/v1/tasks", &[("authorization", &r)], Body::empty())
            .await
            .status,
        200
    );
    let refused = gw
        .call(
            "POST",
            "/v1/tasks",
            &[("authorization", &r), json_ct],
            task.clone(),
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.code(), "forbidden");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs scope submit")
    );
    let created = gw
        .call(
            "POST",
            "/v1/tasks",
            &[("authorization", &s), json_ct],
            task.clone(),
        )
        .await;
    assert_eq!(created.status, 202);
    for who in [&r, &s] {
        let pause = gw
            .call(
                "POST",
                "/v1/admin/queue/pause",
                &[("authorization", who)],
                Body::empty(),
            )
            .await;
        assert_eq!(pause.status, 403);
    }
    assert!(!gw.state.broker().is_paused());
    let pause = gw
        .call(
            "POST",
            "/v1/admin/queue/pause",
            &[("authorization", &a)],
            Body::empty(),
        )
        .await;
    assert_eq!(pause.status, 200);
    assert!(gw.state.broker().is_paused());
}

#[tokio::test]
async fn metrics_and_readiness_details_need_access() {
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_key("reader", Scope::Read)];
        c.metrics_token_hashes = vec![hash_secret("scraper")];
    })
    .await;
    let m = gw.call("GET", "/metrics", &[], Body::empty()).await;
    assert_eq!(m.status, 401);
    assert_eq!(m.code(), "unauthorized");
    for t in ["reader", "scraper"] {
        let m = gw
            .call(
                "GET",
                "/metrics",
                &[("authorization", &bearer(t))],
                Body::empty(),
            )
            .await;
        assert_eq!(m.status, 200, "{t}");
        assert!(String::from_utf8_lossy(&m.body).contains("kiln_workers_online"));
    }
    let ready = gw.call("GET", "/readyz", &[], Body::empty()).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), json!({"status": "ready"}));
    let ready = gw
        .call(
            "GET",
            "/readyz",
            &[("authorization", &bearer("scraper"))],
            Body::empty(),
        )
        .await;
    assert_eq!(ready.json()["workers"]["online"], 0);
    assert_eq!(
        gw.call("GET", "/healthz", &[], Body::empty()).await.status,
        200
    );

    // "token": API keys no longer read metrics; "open": anyone does.
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_secret("admin")];
        c.metrics_token_hashes = vec![hash_secret("scraper")];
        c.metrics_access = MetricsAccess::Token;
    })
    .await;
    let m = gw
        .call(
            "GET",
            "/metrics",
            &[("authorization", &bearer("admin"))],
            Body::empty(),
        )
        .await;
    assert_eq!(m.status, 401);
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_secret("admin")];
        c.metrics_access = MetricsAccess::Open;
    })
    .await;
    assert_eq!(
        gw.call("GET", "/metrics", &[], Body::empty()).await.status,
        200
    );
}

#[tokio::test]
async fn without_keys_cross_site_requests_and_foreign_hosts_are_refused() {
    let gw = gateway(|_| {}).await;
    let host = ("host", "127.0.0.1:8080");
    // A form POST from another site cannot pause the queue.
    let form = gw
        .call(
            "POST",
            "/v1/admin/queue/pause",
            &[
                host,
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            "a=b",
        )
        .await;
    assert_eq!(form.status, 403);
    assert_eq!(form.code(), "cross_origin");
    // Nor can a form without Origin (old browsers): forms are refused where JSON is expected.
    let form = gw
        .call(
            "POST",
            "/v1/admin/queue/pause",
            &[host, ("content-type", "application/x-www-form-urlencoded")],
            "a=b",
        )
        .await;
    assert_eq!(form.status, 415);
    assert!(!gw.state.broker().is_paused());
    // JSON sent as text/plain creates nothing.
    let body = json!({"task_type": "txt2img", "input": {"prompt": "x"}}).to_string();
    for uri in ["/v1/tasks", "/v1/images/generations"] {
        let r = gw
            .call(
                "POST",
                uri,
                &[host, ("content-type", "text/plain")],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 415, "{uri}");
        assert!(r.json()["error"].is_object());
    }
    // A cross-site multipart upload is refused; a same-origin one is not.
    let boundary = "XyZ";
    let mp = |origin: &'static str| {
        let mut data = format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\ncontent-type: image/png\r\n\r\n"
        )
        .into_bytes();
        data.extend_from_slice(PNG);
        data.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        Request::builder()
            .method("POST")
            .uri("/v1/files")
            .header("host", "127.0.0.1:8080")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header("origin", origin)
            .body(Body::from(data))
            .unwrap()
    };
    assert_eq!(gw.send(mp("https://evil.example")).await.status, 403);
    assert_eq!(gw.send(mp("http://127.0.0.1:3000")).await.status, 403);
    assert_eq!(gw.send(mp("http://127.0.0.1:8080")).await.status, 201);
    // A rebinding page (its own name as Host) reads nothing.
    for uri in ["/v1/tasks", "/readyz", "/metrics"] {
        let r = gw
            .call(
                "GET",
                uri,
                &[("host", "rebind.evil.example:8080")],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, 400, "{uri}");
        assert_eq!(r.code(), "host_not_allowed");
    }
    for h in ["localhost:8080", "[::1]:8080", "127.0.0.1"] {
        let r = gw
            .call("GET", "/v1/tasks", &[("host", h)], Body::empty())
            .await;
        assert_eq!(r.status, 200, "{h}");
    }
    // A page cannot open the worker socket either.
    let ws = gw
        .call(
            "GET",
            "/v1/workers/connect",
            &[
                host,
                ("origin", "https://evil.example"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-protocol", "kiln.v1"),
            ],
            Body::empty(),
        )
        .await;
    assert_eq!(ws.status, 403);
    // No CORS headers unless configured.
    let r = gw
        .call(
            "GET",
            "/v1/tasks",
            &[host, ("origin", "https://evil.example")],
            Body::empty(),
        )
        .await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn configured_hosts_and_origins() {
    // With keys and a host list: only loopback and the listed names.
    let gw = gateway(|c| {
        c.api_key_hashes = vec![hash_secret("k")];
        c.allowed_hosts = vec!["kiln.example.com".into()];
    })
    .await;
    let k = bearer("k");
    for (h, want) in [
        ("kiln.example.com", 200),
        ("KILN.example.com:443", 200),
        ("other.example.com", 400),
    ] {
        let r = gw
            .call(
                "GET",
                "/v1/tasks",
                &[("host", h), ("authorization", &k)],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, want, "{h}");
    }
    // Probes send the pod address.
    let r = gw
        .call(
            "GET",
            "/healthz",
            &[("host", "10.1.2.3:8080")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 200);
    // With keys and no list: any Host (the key is the protection).
    let gw = gateway(|c| c.api_key_hashes = vec![hash_secret("k")]).await;
    let r = gw
        .call(
            "GET",
            "/v1/tasks",
            &[("host", "any.example"), ("authorization", &k)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 200);
    // Without keys, an origin allowed by CORS may change state.
    let gw = gateway(|c| c.cors_origins = vec!["http://localhost:5173".into()]).await;
    let r = gw
        .call(
            "POST",
            "/v1/admin/queue/pause",
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://localhost:5173"),
                ("sec-fetch-site", "same-site"),
            ],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://localhost:5173"
    );
}

#[tokio::test]
async fn every_error_is_json() {
    let gw = gateway(|c| c.max_body_bytes = 1024).await;
    let big = json!({"prompt": "x".repeat(4096)}).to_string();
    let r = gw
        .call(
            "POST",
            "/v1/images/generations",
            &[("content-type", "application/json")],
            big.clone(),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let r = gw
        .call(
            "POST",
            "/v1/tasks",
            &[("content-type", "application/json")],
            big,
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "payload_too_large");
    for (method, uri, status) in [
        ("GET", "/v1/tasks/%FF%FE", 400),
        ("GET", "/v1/files/%C3%28", 400),
        ("GET", "/v1/models/%FF", 400),
        ("GET", "/nope", 404),
        ("PUT", "/v1/tasks", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/tasks?limit=abc", 422),
    ] {
        let r = gw.call(method, uri, &[], Body::empty()).await;
        assert_eq!(r.status, status, "{method} {uri}");
        assert!(
            r.json()["error"]["code"].is_string(),
            "{method} {uri}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[tokio::test]
async fn openapi_lists_query_parameters_as_query() {
    let gw = gateway(|_| {}).await;
    let doc = gw
        .call("GET", "/openapi.json", &[], Body::empty())
        .await
        .json();
    let mut query = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str().unwrap() {
                    "path" => assert!(
                        path.contains(&format!("{{{name}}}")),
                        "{method} {path}: path parameter {name} is not in the path"
                    ),
                    "query" => {
                        assert_ne!(p["required"], true, "{method} {path} {name}");
                        query.push(format!("{method} {path} {name}"));
                    }
                    "header" => {}
                    other => panic!("{method} {path} {name}: in {other}"),
                }
            }
        }
    }
    for want in [
        "get /v1/tasks limit",
        "get /v1/tasks cursor",
        "post /v1/files max_bytes",
        "get /v1/tasks/{id}/events last_event_id",
    ] {
        assert!(query.iter().any(|q| q == want), "{want} in {query:?}");
    }
}
