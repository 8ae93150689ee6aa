//! S3 multipart uploads through a fault-injecting proxy in front of moto (both on
//! 127.0.0.1): a fault on one part is retried for that part only, the object read back is
//! byte-identical, a permanent failure aborts the upload. moto comes from the venv
//! `scripts/prepare.sh` creates (`target/.venv-s3`, or `KILN_MOTO_SERVER`); without it the tests
//! print a notice and skip, except under `CI=true`, where a missing moto fails them.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

#[path = "support/fault_proxy.rs"]
mod fault_proxy;
mod support;

use std::time::Duration;

use fault_proxy::{Fault, FaultProxy, raw};
use http::Method;
use kiln_retry::{AttemptLog, Class};
use kiln_test_support::Moto;
use kiln_upload::{S3, S3Config, UploadClient, UploadConfig, UploadError, UploadFile};

const PART: u64 = 5 << 20;
const BUCKET: &str = "kiln-test";
const SECRET: &str = "test";
const REGION: &str = "us-east-1";

fn s3(endpoint: String) -> S3 {
    S3::new(S3Config {
        endpoint,
        bucket: BUCKET.into(),
        region: REGION.into(),
        access_key_id: "test".into(),
        secret_access_key: SECRET.into(),
        session_token: None,
        path_style: true,
        key_prefix: String::new(),
        multipart_threshold: PART,
        part_size: PART,
        public_base_url: None,
    })
    .unwrap()
}

fn cfg() -> UploadConfig {
    let mut c = UploadConfig {
        max_response_bytes: 64 << 20,
        attempt_timeout: Duration::from_secs(20),
        ..UploadConfig::default()
    };
    c.retry.initial_backoff = Duration::from_millis(20);
    c.retry.max_backoff = Duration::from_millis(200);
    c.retry.deadline = Some(Duration::from_secs(60));
    c
}

/// Two full parts and a short third one.
fn body() -> Vec<u8> {
    (0..2 * PART as u32 + 12_345)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

struct Env {
    moto: Moto,
    proxy: FaultProxy,
    /// Through the proxy.
    target: S3,
    /// Straight to moto (bucket creation, read-back), not seen by the proxy.
    direct: S3,
    client: UploadClient,
}

async fn env(cfg: UploadConfig) -> Option<Env> {
    let moto = Moto::start()?;
    let proxy = FaultProxy::start(moto.port, SECRET, REGION).await;
    let (client, _) = support::client(cfg);
    let direct = s3(moto.endpoint());
    direct.create_bucket(&client).await.unwrap();
    Some(Env {
        target: s3(proxy.endpoint()),
        direct,
        proxy,
        moto,
        client,
    })
}

/// The attempt log split per request (each request numbers its attempts from 1), as the
/// number of attempts of each.
fn per_request(log: &[AttemptLog]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for a in log {
        if a.attempt == 1 {
            out.push(1);
        } else {
            *out.last_mut().unwrap() += 1;
        }
    }
    out
}

/// Requests the proxy saw: [create, part 1, part 2, part 3, complete, abort].
fn counts(p: &FaultProxy) -> [usize; 6] {
    [
        p.count(Method::POST, &["uploads"]),
        p.count(Method::PUT, &["partNumber=1", "uploadId"]),
        p.count(Method::PUT, &["partNumber=2", "uploadId"]),
        p.count(Method::PUT, &["partNumber=3", "uploadId"]),
        p.count(Method::POST, &["uploadId"]),
        p.count(Method::DELETE, &["uploadId"]),
    ]
}

async fn in_progress_uploads(moto: &Moto) -> String {
    let (status, body) = raw(moto.port, Method::GET, &format!("/{BUCKET}?uploads")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Uploads `key` through the proxy and checks the object moto stores, the requests the proxy
/// saw and that every signature matched what reached the proxy.
/// Returns the attempt log.
async fn upload_ok(
    e: &Env,
    key: &str,
    want_counts: [usize; 6],
    want_log: &[usize],
) -> Vec<AttemptLog> {
    let data = body();
    let r = e
        .client
        .upload(
            &e.target,
            &UploadFile::new(data.clone(), key, "application/octet-stream"),
        )
        .await
        .unwrap();
    assert_eq!(e.proxy.unfired(), Vec::<String>::new(), "every fault fired");
    assert_eq!(counts(&e.proxy), want_counts, "{:#?}", e.proxy.seen());
    assert_eq!(
        per_request(&r.attempt_log),
        want_log,
        "{:#?}",
        r.attempt_log
    );
    assert_eq!(r.attempts as usize, want_log.iter().sum::<usize>());
    assert!(e.proxy.seen().iter().all(|s| s.signature_ok));
    assert!(
        r.etag.as_deref().unwrap_or("").ends_with("-3\""),
        "{:?}",
        r.etag
    );
    let back = e.direct.get_object(&e.client, key).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back.as_ref() == data.as_slice(), "object differs");
    let uploads = in_progress_uploads(&e.moto).await;
    assert!(!uploads.contains("<UploadId>"), "{uploads}");
    r.attempt_log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_multipart_through_the_proxy_signs_for_the_proxy() {
    let Some(e) = env(cfg()).await else { return };
    let log = upload_ok(&e, "clean.bin", [1, 1, 1, 1, 1, 0], &[1, 1, 1, 1, 1]).await;
    assert!(log.iter().all(|a| a.class.is_none()), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_2_answered_503_once_is_retried_alone() {
    let Some(e) = env(cfg()).await else { return };
    e.proxy.fault(
        Method::PUT,
        &["partNumber=2", "uploadId"],
        Fault::Status(503),
        1,
    );
    let log = upload_ok(&e, "p503.bin", [1, 1, 2, 1, 1, 0], &[1, 1, 2, 1, 1]).await;
    assert_eq!(
        log[2].class,
        Some(Class::Response { status: 503 }),
        "{log:#?}"
    );
    let seen = e.proxy.seen();
    assert_eq!(seen[2].fault, Some(Fault::Status(503)));
    assert_eq!(seen[3].fault, None);
    assert!(seen[3].query.contains("partNumber=2"), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_on_upload_part_is_replayed() {
    let Some(e) = env(cfg()).await else { return };
    e.proxy
        .fault(Method::PUT, &["partNumber=2", "uploadId"], Fault::Reset, 1);
    let log = upload_ok(&e, "reset.bin", [1, 1, 2, 1, 1, 0], &[1, 1, 2, 1, 1]).await;
    assert_eq!(log[2].class, Some(Class::MaybeProcessed), "{log:#?}");
    assert!(!log[2].timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_part_is_retried() {
    let mut c = cfg();
    // Far above what a 5 MiB part takes on 127.0.0.1, so only the held answer times out.
    c.attempt_timeout = Duration::from_secs(5);
    let Some(e) = env(c).await else { return };
    e.proxy.fault(
        Method::PUT,
        &["partNumber=3", "uploadId"],
        Fault::Hold(Duration::from_secs(7)),
        1,
    );
    let log = upload_ok(&e, "slow.bin", [1, 1, 1, 2, 1, 0], &[1, 1, 1, 2, 1]).await;
    assert!(log[3].timed_out, "{log:#?}");
    assert_eq!(log[4].class, None);
}

/// S3 answers 500 InternalError for faults it asks clients to retry; kiln-retry's default
/// status list leaves 500 out, so the retry needs `retry.retry_statuses` to list it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_answered_500_is_retried_when_500_is_listed() {
    let mut c = cfg();
    c.retry.retry_statuses.push(500);
    let Some(e) = env(c).await else { return };
    e.proxy
        .fault(Method::POST, &["uploadId"], Fault::Status(500), 1);
    upload_ok(&e, "c500.bin", [1, 1, 1, 1, 2, 0], &[1, 1, 1, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_answered_500_with_the_default_statuses_fails_and_aborts() {
    let Some(e) = env(cfg()).await else { return };
    e.proxy
        .fault(Method::POST, &["uploadId"], Fault::Status(500), 1);
    let err = e
        .client
        .upload(
            &e.target,
            &UploadFile::new(body(), "c500.bin", "application/octet-stream"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            UploadError::MultipartStep {
                step: "CompleteMultipartUpload",
                part: None,
                aborted: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.status(), Some(500), "{err}");
    assert!(err.to_string().contains("InternalError"), "{err}");
    assert_eq!(counts(&e.proxy), [1, 1, 1, 1, 1, 1]);
    let uploads = in_progress_uploads(&e.moto).await;
    assert!(!uploads.contains("<UploadId>"), "{uploads}");
}

/// CompleteMultipartUpload processed by moto, its answer lost to the per-attempt timeout:
/// the replay must still end in a stored object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_processed_but_answer_lost_is_replayed() {
    let mut c = cfg();
    // Far above what a 5 MiB part takes on 127.0.0.1, so only the held answer times out.
    c.attempt_timeout = Duration::from_secs(5);
    let Some(e) = env(c).await else { return };
    e.proxy.fault(
        Method::POST,
        &["uploadId"],
        Fault::Hold(Duration::from_secs(7)),
        1,
    );
    upload_ok(&e, "lost.bin", [1, 1, 1, 1, 2, 0], &[1, 1, 1, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_status_on_a_part_aborts_the_upload() {
    let Some(e) = env(cfg()).await else { return };
    for (status, part, code, want) in [
        (403, 2u32, "AccessDenied", [1, 1, 1, 0, 0, 1]),
        (400, 1, "InvalidArgument", [2, 2, 1, 0, 0, 2]),
    ] {
        e.proxy.fault(
            Method::PUT,
            &[&format!("partNumber={part}"), "uploadId"],
            Fault::Status(status),
            1,
        );
        let err = e
            .client
            .upload(
                &e.target,
                &UploadFile::new(body(), "denied.bin", "application/octet-stream"),
            )
            .await
            .unwrap_err();
        match &err {
            UploadError::MultipartStep {
                step,
                part: p,
                aborted,
                ..
            } => {
                assert_eq!(*step, "UploadPart");
                assert_eq!(*p, Some(part));
                assert!(*aborted);
            }
            other => panic!("not a multipart step error: {other:?}"),
        }
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(!err.is_retryable(), "{err}");
        assert_eq!(err.attempts().len(), 1, "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("UploadPart {part} failed")),
            "{shown}"
        );
        assert!(shown.contains(&format!("HTTP {status}")), "{shown}");
        assert!(shown.contains(code), "{shown}");
        // Cumulative over both rounds: no part after the failed one, one abort per round.
        assert_eq!(counts(&e.proxy), want, "{:#?}", e.proxy.seen());
        let uploads = in_progress_uploads(&e.moto).await;
        assert!(!uploads.contains("<UploadId>"), "{uploads}");
        let gone = e.direct.get_object(&e.client, "denied.bin").await;
        assert_eq!(gone.unwrap_err().status(), Some(404));
    }
    // The listing does show an upload that is in progress.
    let (status, created) = raw(
        e.moto.port,
        Method::POST,
        &format!("/{BUCKET}/open?uploads"),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let uploads = in_progress_uploads(&e.moto).await;
    assert!(uploads.contains("<Key>open</Key>"), "{uploads}");
    assert_eq!(uploads.matches("<UploadId>").count(), 1, "{uploads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_rejects_a_signature_made_with_another_key() {
    let Some(moto) = Moto::start() else { return };
    let proxy = FaultProxy::start(moto.port, "not-the-secret", REGION).await;
    let (client, _) = support::client(cfg());
    let err = s3(proxy.endpoint())
        .create_bucket(&client)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].signature_ok);
}
