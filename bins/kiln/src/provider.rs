//! The provider runner: an in-process kiln worker whose handlers forward tasks of type
//! `openai.<provider>` to upstream OpenAI-compatible image APIs. It speaks the real worker
//! protocol, so the broker's durability, leases and attempt history apply unchanged;
//! reference images come from, and results go to, the gateway's files API. With
//! `references = "upload"` the references are uploaded to the provider's kiln-upload target
//! before the call, and every upload is recorded on the task like the upstream attempts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_gateway::openai::{
    Call, Image, OpenAiCompatible, ProviderConfig, ProviderError, UploadRecord, attempts_json,
    summary,
};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};

use crate::serve::{FilesApi, bad_input, transient};

/// Builds the runner for `providers`.
pub(crate) fn worker(
    url: String,
    token: Option<String>,
    state_dir: PathBuf,
    providers: &BTreeMap<String, ProviderConfig>,
) -> anyhow::Result<Worker> {
    let api = FilesApi::new(&url, token.clone(), &state_dir);
    let slots = providers
        .values()
        .map(|p| p.concurrency)
        .sum::<u32>()
        .max(1);
    let sent_dir = state_dir.join("sent");
    let mut w = Worker::new(WorkerConfig {
        url,
        token,
        state_dir,
        slots,
        labels: vec!["provider".into()],
        ..WorkerConfig::default()
    });
    for (name, cfg) in providers {
        let up = Arc::new(
            OpenAiCompatible::new(name, cfg.clone())
                .map_err(|e| anyhow::anyhow!("gateway.openai.providers.{name}: {e}"))?,
        );
        let replay_safe = !cfg.idempotency_header.is_empty();
        let (api, sent_dir) = (api.clone(), sent_dir.clone());
        w = w.handler(&ProviderConfig::task_type(name), move |ctx| {
            run(up.clone(), api.clone(), sent_dir.clone(), replay_safe, ctx)
        });
    }
    Ok(w)
}

fn content_type(data: &[u8]) -> &'static str {
    match image::guess_format(data) {
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Gif) => "image/gif",
        _ => "image/png",
    }
}

async fn fetch(api: &FilesApi, id: &Value) -> Result<Image, TaskError> {
    let id = id
        .as_str()
        .ok_or_else(|| bad_input("reference image ids must be strings"))?;
    let data = api.download(id).await?;
    let ct = content_type(&data);
    Ok(Image::new(data, ct))
}

/// Marks that a task's call is about to reach the upstream; a later attempt of the same
/// task finds the mark and, unless replays are safe, is not sent again.
async fn mark(dir: &Path, task_id: &str) -> Result<bool, TaskError> {
    let path = dir.join(task_id);
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(true);
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| transient(format!("cannot write {}: {e}", dir.display())))?;
    tokio::fs::write(&path, b"sent")
        .await
        .map_err(|e| transient(format!("cannot write {}: {e}", path.display())))?;
    Ok(false)
}

async fn run(
    up: Arc<OpenAiCompatible>,
    api: FilesApi,
    sent_dir: PathBuf,
    replay_safe: bool,
    ctx: TaskContext,
) -> Result<Value, TaskError> {
    let input = ctx.input.clone();
    let fields = input
        .as_object()
        .cloned()
        .ok_or_else(|| bad_input("the input must be an object"))?;
    let edit = input["operation"] == "edit";
    let mut references = Vec::new();
    if edit {
        for id in input["images"].as_array().into_iter().flatten() {
            references.push(fetch(&api, id).await?);
        }
        if references.is_empty() {
            return Err(bad_input("an edit needs input.images (file ids)"));
        }
    }
    let mask = match input.get("mask") {
        Some(id) if edit => Some(fetch(&api, id).await?),
        _ => None,
    };
    let mut call = Call::default();
    call.task_id = ctx.task_id.clone();
    call.fields = fields;
    call.references = references;
    call.mask = mask;
    call.time_left = ctx
        .deadline
        .map(|d| std::time::Duration::from_millis(d.saturating_sub(kiln_protocol::now_ms())));
    let steps = async {
        // Uploads first: a failed upload leaves no mark, since the upstream was not called.
        ctx.progress("upload", 0, 3);
        let uploads = match up.upload_references(&call).await {
            Ok(u) => u,
            Err(e) => return Ok((Err(e), Vec::new())),
        };
        ctx.progress("upstream", 1, 3);
        if mark(&sent_dir, &ctx.task_id).await? && !replay_safe {
            return Err(TaskError {
                code: "upstream_maybe_processed".into(),
                message: format!(
                    "an earlier attempt of this task may have reached {}; it is not sent \
                     again (configure idempotency_header if the upstream deduplicates){}",
                    up.name(),
                    uploads_summary(&uploads)
                ),
                retryable: false,
            });
        }
        let recorded = uploads.clone();
        Ok((up.send(&call, uploads).await, recorded))
    };
    let (result, uploaded) = tokio::select! {
        r = steps => r?,
        _ = ctx.cancelled() => {
            // The upstream may have the call already; the mark stays so it is never resent.
            return Err(TaskError {
                code: "canceled".into(),
                message: format!("canceled while {} was working on it", up.name()),
                retryable: false,
            });
        }
    };
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            if e.upstream_untouched() {
                // Nothing reached the upstream: a later attempt may send it.
                let _ = tokio::fs::remove_file(sent_dir.join(&ctx.task_id)).await;
            }
            tracing::warn!(message = "upstream call failed", provider = up.name(), task_id = %ctx.task_id, code = e.code(), error = %e);
            let uploads = match &e {
                ProviderError::Upload { uploads, .. } => uploads_summary(uploads),
                _ => uploads_summary(&uploaded),
            };
            return Err(TaskError {
                code: e.code().into(),
                message: format!("{e} [attempts: {}]{uploads}", summary(e.attempts())),
                retryable: e.is_retryable(),
            });
        }
    };
    ctx.progress("store", 2, 3);
    let mut files = Vec::with_capacity(out.images.len());
    for img in &out.images {
        files.push(api.upload(img.data.to_vec(), &img.content_type).await?);
    }
    let _ = tokio::fs::remove_file(sent_dir.join(&ctx.task_id)).await;
    Ok(json!({
        "files": files,
        "revised_prompts": out.revised_prompts,
        "usage": out.usage,
        "upstream": {
            "provider": up.name(),
            "attempts": attempts_json(&out.attempts),
            "uploads": out.uploads,
        },
    }))
}

/// The uploads that succeeded, for a task's error message.
fn uploads_summary(uploads: &[UploadRecord]) -> String {
    if uploads.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = uploads
        .iter()
        .map(|u| {
            format!(
                "{} to {} in {} ms [attempts: {}]",
                u.part,
                u.target,
                u.total_ms,
                summary(&u.attempts)
            )
        })
        .collect();
    format!(" [uploaded: {}]", parts.join("; "))
}
