//! Queue ETA and `POST /v1/tasks/{id}/retry` with real workers over loopback WebSockets.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod served;

use kiln_gateway::{Scope, hash_key};
use serde_json::{Value, json};

use served::{Gw, serve, sleeper};

async fn submit(gw: &Gw, input: Value) -> Value {
    let r = gw
        .call(
            "POST",
            "/v1/tasks",
            &[],
            json!({"task_type": "sleep", "input": input}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Run times (first start to completion, ms) of the succeeded tasks `ids`, from the store.
async fn run_times(gw: &Gw, ids: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for id in ids {
        let t = gw.state.broker().queue().get(id).await.unwrap().unwrap();
        out.push(t.completed_at.unwrap() - t.started_at.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tasks_carry_an_eta_and_wait_for_a_worker_when_none_serves_them() {
    let gw = serve(|_| {}).await;
    // No worker: the task waits for one, with no estimate.
    let first = submit(&gw, json!({"ms": 1200})).await;
    assert_eq!(first["status"], "queued");
    assert_eq!(first["queue_position"], 0);
    assert_eq!(first["waiting_for_worker"], true);
    assert!(first["estimated_start_s"].is_null() && first["estimated_finish_s"].is_null());

    // One slot: the first task runs, and two more give the recorded run times.
    let w = sleeper(gw.worker_url(), &gw.dir.path().join("w"), 1);
    let worker = tokio::spawn(w.run());
    let mut done = vec![first["id"].as_str().unwrap().to_owned()];
    for _ in 0..2 {
        done.push(
            submit(&gw, json!({"ms": 1200})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in &done {
        gw.wait_status(id, "succeeded", 30).await;
    }
    let runs = run_times(&gw, &done).await;
    let (fastest, slowest) = (*runs.iter().min().unwrap(), *runs.iter().max().unwrap());

    // One task runs, three wait behind it.
    let running = submit(&gw, json!({"ms": 1200})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.wait_status(&running, "running", 10).await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(
            submit(&gw, json!({"ms": 1200})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut last_start = 0;
    let mut estimates = Vec::new();
    for (p, id) in queued.iter().enumerate() {
        let asked_at = kiln_broker::now_ms();
        let t = gw.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(t["status"], "queued", "{t}");
        assert_eq!(t["queue_position"], p as u64);
        assert_eq!(t["waiting_for_worker"], false);
        let start = t["estimated_start_s"].as_u64().unwrap();
        let finish = t["estimated_finish_s"].as_u64().unwrap();
        // Position p starts within round p of the one slot (the running task first), and
        // finishes one run later.
        let p = p as u64;
        assert!(
            start * 1000 + 500 >= p * fastest,
            "position {p}: {start} s, runs {runs:?}"
        );
        assert!(
            start * 1000 <= (p + 1) * slowest + 500,
            "position {p}: {start} s, runs {runs:?}"
        );
        assert!(finish >= start && finish * 1000 <= start * 1000 + slowest + 1000);
        assert!(
            start >= last_start,
            "the start never comes earlier further back"
        );
        last_start = start;
        estimates.push((asked_at, start));
    }
    // The list shows the same fields.
    let page = gw.get("/v1/tasks?status=queued").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert!(
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["estimated_start_s"].is_u64())
    );

    // The estimates against the real starts (the estimate is rounded to a second).
    for (p, (id, (asked_at, start_s))) in queued.iter().zip(&estimates).enumerate() {
        gw.wait_status(id, "succeeded", 30).await;
        let t = gw.state.broker().queue().get(id).await.unwrap().unwrap();
        let actual = t.started_at.unwrap() as i64 - *asked_at as i64;
        eprintln!("eta: position {p}: estimated {start_s} s, started after {actual} ms");
        // Within one run time (plus the rounding): the estimate is taken while a task runs,
        // and a loaded machine stretches each run past the recorded ones.
        let err = actual - (*start_s * 1000) as i64;
        let bound = slowest as i64 + 500;
        assert!(
            (-bound..=bound).contains(&err),
            "position {p}: off by {err} ms (bound {bound} ms)"
        );
    }

    // The worker goes away: queued tasks wait for a worker again.
    worker.abort();
    gw.wait_workers(0).await;
    let waiting = submit(&gw, json!({"ms": 1})).await;
    let t = gw
        .get(&format!("/v1/tasks/{}", waiting["id"].as_str().unwrap()))
        .await;
    assert_eq!(t["status"], "queued");
    assert_eq!(t["waiting_for_worker"], true);
    assert!(t["estimated_start_s"].is_null() && t["estimated_finish_s"].is_null());
    // Tasks that are not queued carry no estimate.
    let t = gw.get(&format!("/v1/tasks/{}", done[0])).await;
    assert!(t["queue_position"].is_null() && t["estimated_start_s"].is_null());
    assert_eq!(t["waiting_for_worker"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_retried_as_a_new_attempt_and_other_states_are_refused() {
    let gw = serve(|_| {}).await;
    let w = sleeper(gw.worker_url(), &gw.dir.path().join("w"), 1);
    let worker = tokio::spawn(w.run());
    let t = submit(&gw, json!({"ms": 10, "fail_first": true})).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let failed = gw.wait_status(&id, "failed", 20).await;
    assert_eq!(failed["error"]["code"], "first_run");
    assert_eq!(failed["attempts"].as_array().unwrap().len(), 1);

    let r = gw
        .call("POST", &format!("/v1/tasks/{id}/retry"), &[], Value::Null)
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let back = r.json();
    assert_eq!(
        (back["id"].as_str(), back["status"].as_str()),
        (Some(id.as_str()), Some("queued"))
    );
    assert_eq!(back["input"], t["input"]);
    assert!(back["completed_at"].is_null());
    let done = gw.wait_status(&id, "succeeded", 20).await;
    assert_eq!(done["output"], json!({"slept": 10}));
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        attempts[0]["error"],
        "first_run: the first run of this task fails"
    );
    assert!(attempts[1]["error"].is_null());
    // The retry is in the task's events: queued again after the first completion.
    let events = gw
        .state
        .broker()
        .queue()
        .events_after(&id, 0)
        .await
        .unwrap();
    let kinds: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.kind.name() != "progress")
        .map(|e| {
            (
                e.kind.name().to_owned(),
                e.kind.data()["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("status", "queued"),
        ("status", "running"),
        ("status", "failed"),
        ("completed", "failed"),
        ("status", "queued"),
        ("status", "running"),
        ("status", "succeeded"),
        ("completed", "succeeded"),
    ];
    assert_eq!(kinds, want.map(|(a, b)| (a.to_owned(), b.to_owned())));

    // Succeeded, queued and unknown tasks: refused, naming the state.
    let r = gw
        .call("POST", &format!("/v1/tasks/{id}/retry"), &[], Value::Null)
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"]["code"], "conflict");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is succeeded")
    );
    worker.abort();
    gw.wait_workers(0).await;
    let q = submit(&gw, json!({"ms": 1})).await;
    let qid = q["id"].as_str().unwrap();
    let r = gw
        .call("POST", &format!("/v1/tasks/{qid}/retry"), &[], Value::Null)
        .await;
    assert_eq!(r.status, 409);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is queued")
    );
    let r = gw
        .call("POST", "/v1/tasks/task_nope/retry", &[], Value::Null)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    // A canceled task is retried, with the attempts asked for; a grant out of range is 422.
    gw.call("POST", &format!("/v1/tasks/{qid}/cancel"), &[], Value::Null)
        .await;
    let r = gw
        .call(
            "POST",
            &format!("/v1/tasks/{qid}/retry?max_attempts=0"),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 422);
    let r = gw
        .call(
            "POST",
            &format!("/v1/tasks/{qid}/retry?max_attempts=5"),
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 202);
    let t = gw.state.broker().queue().get(qid).await.unwrap().unwrap();
    assert_eq!((t.max_attempts, t.attempt), (5, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_needs_the_files_of_its_input_and_the_submit_scope() {
    let gw = serve(|c| {
        c.api_key_hashes = vec![
            hash_key("reader", Scope::Read),
            hash_key("sender", Scope::Submit),
        ];
    })
    .await;
    let send = [("authorization", "Bearer sender")];
    let stored = gw
        .state
        .files()
        .put(
            bytes::Bytes::from_static(b"{}"),
            "application/json",
            None,
            None,
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = json!({"task_type": "sleep", "input": {"images": [stored.id]}});
        let r = gw.call("POST", "/v1/tasks", &send, body).await;
        assert_eq!(r.status, 202);
        let id = r.json()["id"].as_str().unwrap().to_owned();
        let r = gw
            .call(
                "POST",
                &format!("/v1/tasks/{id}/cancel"),
                &send,
                Value::Null,
            )
            .await;
        assert_eq!(r.status, 202);
        ids.push(id);
    }
    let retry = |id: &str| format!("/v1/tasks/{id}/retry");
    let r = gw
        .call(
            "POST",
            &retry(&ids[0]),
            &[("authorization", "Bearer reader")],
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        gw.call("POST", &retry(&ids[0]), &[], Value::Null)
            .await
            .status,
        401
    );
    let r = gw.call("POST", &retry(&ids[0]), &send, Value::Null).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["status"], "queued");
    // Once the file is deleted, a retry would fail at once: refused.
    assert!(gw.state.files().delete(&stored.id).await.unwrap());
    let r = gw.call("POST", &retry(&ids[1]), &send, Value::Null).await;
    assert_eq!(r.status, 409);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains(&stored.id) && msg.contains("deleted"), "{msg}");
    let t = gw
        .state
        .broker()
        .queue()
        .get(&ids[1])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state.as_str(), "canceled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_eta_fields_and_the_retry_route() {
    let gw = serve(|_| {}).await;
    let doc = gw.get("/openapi.json").await;
    let view = &doc["components"]["schemas"]["TaskView"];
    let props = view["properties"].as_object().unwrap();
    // Every field of a task object is in the schema, and every required one is in the object.
    let t = submit(&gw, json!({"ms": 1})).await;
    for k in t.as_object().unwrap().keys() {
        assert!(props.contains_key(k), "{k} is not in the TaskView schema");
    }
    for k in view["required"].as_array().unwrap() {
        assert!(t.get(k.as_str().unwrap()).is_some(), "required {k} missing");
    }
    let types = |k: &str| props[k]["type"].clone();
    assert_eq!(types("waiting_for_worker"), json!("boolean"));
    for k in ["estimated_start_s", "estimated_finish_s", "queue_position"] {
        assert_eq!(types(k), json!(["integer", "null"]), "{k}: {}", props[k]);
    }
    let retry = &doc["paths"]["/v1/tasks/{id}/retry"]["post"];
    let params: Vec<&str> = retry["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["id", "max_attempts"]);
    for status in ["202", "404", "409", "422"] {
        assert!(retry["responses"][status].is_object(), "{status}");
    }
}
