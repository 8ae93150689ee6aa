//! S3 PutObject and multipart upload against a real S3-protocol server (moto) on
//! 127.0.0.1, reading the objects back. The server comes from the venv that
//! `scripts/prepare.sh` creates (`target/.venv-s3`, or `KILN_MOTO_SERVER`); without it the
//! tests print a notice and skip, except under `CI=true`, where a missing moto fails them.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use kiln_test_support::Moto;
use kiln_upload::{Payload, S3, S3Config, UploadConfig, UploadFile};
use support::client;

fn s3(port: u16, threshold: u64) -> S3 {
    S3::new(S3Config {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "kiln-test".into(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        session_token: None,
        path_style: true,
        key_prefix: "refs/".into(),
        multipart_threshold: threshold,
        part_size: 5 << 20,
        public_base_url: None,
    })
    .unwrap()
}

fn cfg() -> UploadConfig {
    let mut c = UploadConfig {
        max_response_bytes: 64 << 20,
        ..UploadConfig::default()
    };
    c.retry.initial_backoff = Duration::from_millis(20);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_object_and_multipart_round_trip() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let (c, counters) = client(cfg());
    let target = s3(moto.port, 8 << 20);
    target.create_bucket(&c).await.unwrap();

    // PutObject from memory.
    let small: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let r = c
        .upload(
            &target,
            &UploadFile::new(small.clone(), "small.png", "image/png"),
        )
        .await
        .unwrap();
    assert_eq!(r.id.as_deref(), Some("refs/small.png"));
    assert!(r.etag.is_some());
    let url = r.url.unwrap();
    assert_eq!(
        url,
        format!("http://127.0.0.1:{}/kiln-test/refs/small.png", moto.port)
    );
    assert_eq!(
        target
            .get_object(&c, "refs/small.png")
            .await
            .unwrap()
            .as_ref(),
        small.as_slice()
    );

    // Ranged reads and delete.
    let key = target.key_for("small.png");
    let part = target.get_object_range(&c, &key, 1000, 5000).await.unwrap();
    assert_eq!(part.as_ref(), &small[1000..6000]);
    let tail = target
        .get_object_range(&c, &key, 299_990, 10)
        .await
        .unwrap();
    assert_eq!(tail.as_ref(), &small[299_990..]);
    target.delete_object(&c, &key).await.unwrap();
    let gone = target.get_object(&c, &key).await.unwrap_err();
    assert_eq!(gone.status(), Some(404), "{gone}");
    target.delete_object(&c, &key).await.unwrap();

    // Multipart from a file: 12 MiB + 7 bytes in parts of 5 MiB (3 parts).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let big: Vec<u8> = (0..(12u32 << 20) + 7).map(|i| (i % 241) as u8).collect();
    std::fs::write(&path, &big).unwrap();
    let progress = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let p2 = progress.clone();
    let file = UploadFile::new(
        Payload::file(&path).await.unwrap(),
        "big file.bin",
        "application/octet-stream",
    )
    .with_progress(move |sent, total| {
        assert_eq!(total, (12 << 20) + 7);
        let mut p = p2.lock().unwrap();
        *p = (*p).max(sent);
    });
    let r = c.upload(&target, &file).await.unwrap();
    assert_eq!(r.attempts, 5, "create + 3 parts + complete, no retries");
    assert_eq!(r.bytes, big.len() as u64);
    assert!(
        r.etag.as_deref().unwrap_or("").ends_with("-3\""),
        "{:?}",
        r.etag
    );
    assert_eq!(*progress.lock().unwrap(), big.len() as u64);
    let url = r.url.unwrap();
    assert!(url.ends_with("/kiln-test/refs/big%20file.bin"), "{url}");
    let back = target.get_object(&c, "refs/big file.bin").await.unwrap();
    assert!(back.as_ref() == big.as_slice(), "multipart object differs");
    assert_eq!(counters.snapshot().uploads_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_a_typed_404() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let (c, _) = client(cfg());
    let e = c
        .upload(
            &s3(moto.port, 8 << 20),
            &UploadFile::new(vec![1u8; 10], "x.png", "image/png"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");
    assert_eq!(e.attempts().len(), 1);
}
