//! Every series the Grafana dashboard and the Prometheus alert rules use exists on a real
//! `kiln serve` (with its demo worker, after one task ran): the metric names and label
//! values are parsed out of `deploy/grafana/kiln-dashboard.json` and
//! `deploy/prometheus/alerts.yml` and looked up in `/metrics`.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use support::*;

/// A series selector: metric name, `label="value"` and `label=~"a|b"` matchers.
#[derive(Debug)]
struct Selector {
    name: String,
    equal: Vec<(String, String)>,
    any_of: Vec<(String, Vec<String>)>,
    expr: String,
}

/// Labels Prometheus adds at scrape time (or the dashboard's `$job` variable matches).
const SCRAPE_LABELS: &[&str] = &["job", "instance"];

fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            // Skip string literals (label values, templates).
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let name = &expr[start..i];
            if !(name.starts_with("kiln_") || name == "up") {
                continue;
            }
            let mut sel = Selector {
                name: name.to_owned(),
                equal: Vec::new(),
                any_of: Vec::new(),
                expr: expr.to_owned(),
            };
            if i < b.len() && b[i] == b'{' {
                let end = expr[i..]
                    .find('}')
                    .map(|e| i + e)
                    .expect("unclosed selector");
                for m in expr[i + 1..end].split(',').filter(|m| !m.trim().is_empty()) {
                    let (label, op, value) = if let Some((l, v)) = m.split_once("=~") {
                        (l, "=~", v)
                    } else if let Some((l, v)) = m.split_once('=') {
                        (l, "=", v)
                    } else {
                        panic!("matcher {m:?} in {expr}")
                    };
                    let label = label.trim().to_owned();
                    let value = value.trim().trim_matches('"').to_owned();
                    if SCRAPE_LABELS.contains(&label.as_str()) {
                        continue;
                    }
                    match op {
                        "=" => sel.equal.push((label, value)),
                        _ => sel
                            .any_of
                            .push((label, value.split('|').map(str::to_owned).collect())),
                    }
                }
                i = end + 1;
            }
            out.push(sel);
            continue;
        }
        i += 1;
    }
    out
}

fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    out.push(x.as_str().expect("expr is a string").to_owned());
                } else {
                    dashboard_exprs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// The `expr:` values of a rules file (one line, or a `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix("expr:") {
            let indent = l.len() - t.len();
            if rest.trim() == "|" {
                let mut block = String::new();
                i += 1;
                while i < lines.len() {
                    let n = lines[i];
                    let nt = n.trim_start();
                    if !nt.is_empty() && n.len() - nt.len() <= indent {
                        break;
                    }
                    block.push_str(nt);
                    block.push('\n');
                    i += 1;
                }
                out.push(block);
                continue;
            }
            out.push(rest.trim().to_owned());
        }
        i += 1;
    }
    out
}

/// `(name, labels)` of every sample in a text exposition.
fn samples(text: &str) -> Vec<(String, HashMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, _value) = l.rsplit_once(' ').expect("sample line");
            match series.split_once('{') {
                None => (series.to_owned(), HashMap::new()),
                Some((name, rest)) => {
                    let body = rest.trim_end_matches('}');
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').expect("label");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            }
        })
        .collect()
}

fn exists(sel: &Selector, all: &[(String, HashMap<String, String>)]) -> Result<(), String> {
    let base: Vec<&HashMap<String, String>> = all
        .iter()
        .filter(|(n, l)| {
            *n == sel.name
                && sel
                    .equal
                    .iter()
                    .all(|(k, v)| l.get(k).map(String::as_str) == Some(v.as_str()))
        })
        .map(|(_, l)| l)
        .collect();
    if base.is_empty() {
        return Err(format!(
            "no series {}{:?} (used in `{}`)",
            sel.name,
            sel.equal,
            sel.expr.trim()
        ));
    }
    for (k, values) in &sel.any_of {
        for v in values {
            if !base.iter().any(|l| l.get(k) == Some(v)) {
                return Err(format!(
                    "no series {}{{{k}=\"{v}\"}} (used in `{}`)",
                    sel.name,
                    sel.expr.trim()
                ));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_of_the_dashboard_and_alerts_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/kiln-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    assert!(
        exprs.len() >= 15,
        "the dashboard has {} queries",
        exprs.len()
    );
    let rules =
        rule_exprs(&std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap());
    assert!(rules.len() >= 8, "alerts.yml has {} rules", rules.len());
    exprs.extend(rules);

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let r = post_json(
        &server.base,
        "/v1/tasks",
        json!({"task_type": "txt2img", "input": {"prompt": "metrics", "width": 32, "height": 32}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    wait_status(&server.base, &id, "succeeded", 30).await;
    let text = String::from_utf8(
        call(&server.base, "GET", "/metrics", "", &[])
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let all = samples(&text);

    let mut missing = Vec::new();
    let mut checked = 0;
    for e in &exprs {
        for sel in selectors(e) {
            // `up` is Prometheus' own series, not kiln's.
            if sel.name == "up" {
                continue;
            }
            checked += 1;
            if let Err(m) = exists(&sel, &all) {
                missing.push(m);
            }
        }
    }
    assert!(checked >= 25, "only {checked} selectors parsed");
    assert!(
        missing.is_empty(),
        "missing series:\n{}",
        missing.join("\n")
    );
    // The run was observed: the histograms count the task.
    assert!(
        text.contains("kiln_queue_wait_seconds_count{task_type=\"txt2img\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kiln_tasks_completed_total{task_type=\"txt2img\",status=\"succeeded\"} 1")
    );
}

#[test]
fn selectors_are_parsed_with_their_matchers() {
    let s = selectors(
        r#"sum(rate(kiln_upload_attempts_total{job=~"$job",class=~"refused|maybe_processed"}[5m])) / sum(kiln_queue_depth)"#,
    );
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name, "kiln_upload_attempts_total");
    assert_eq!(
        s[0].any_of,
        vec![(
            "class".to_owned(),
            vec!["refused".to_owned(), "maybe_processed".to_owned()]
        )]
    );
    assert_eq!(s[1].name, "kiln_queue_depth");
    let r = rule_exprs(
        "  - alert: A\n    expr: |\n      a_b > 0\n      unless c\n    for: 1m\n  - alert: B\n    expr: up == 0\n",
    );
    assert_eq!(
        r,
        vec!["a_b > 0\nunless c\n".to_owned(), "up == 0".to_owned()]
    );
}
