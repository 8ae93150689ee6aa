//! The provider worker: a kiln worker whose handlers forward tasks of type
//! `openai.<provider>` to upstream OpenAI-compatible image APIs. It speaks the real worker
//! protocol, so the queue's durability, leases and attempt history apply unchanged;
//! reference images come from, and results go to, the files API ([`Files`]). With
//! `references = "upload"` the references are uploaded to the provider's kiln-upload
//! target before the call, and every upload is recorded on the task like the upstream
//! attempts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_worker::{Files, TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};

use crate::client::{Call, Image, OpenAiCompatible};
use crate::config::{ProviderConfig, task_type};
use crate::error::{ProviderError, attempts_json, summary};
use crate::references::UploadRecord;

/// A worker that runs the tasks of `providers` (by name): for each, a handler of task type
/// [`task_type`]`(name)` that calls the upstream with [`OpenAiCompatible`]. Its slots are
/// the providers' `concurrency` added up (`cfg.slots` is not used); the rest of `cfg`
/// (gateway URL, token, state directory, labels) is taken as it is. The files API is
/// reached with [`Files::new`]`(&cfg)`. Each provider's settings are checked first
/// ([`ProviderConfig::validate`]); the error names the provider.
pub fn worker(
    cfg: WorkerConfig,
    providers: &BTreeMap<String, ProviderConfig>,
) -> Result<Worker, ProviderError> {
    let files = Files::new(&cfg);
    let sent_dir = cfg.state_dir.join("sent");
    let slots = providers
        .values()
        .map(|p| p.concurrency)
        .sum::<u32>()
        .max(1);
    let mut w = Worker::new(WorkerConfig { slots, ..cfg });
    for (name, p) in providers {
        p.validate(name, &format!("providers.{name}"))
            .map_err(ProviderError::Invalid)?;
        let up = Arc::new(
            OpenAiCompatible::new(name, p.clone())
                .map_err(|e| ProviderError::Invalid(format!("providers.{name}: {e}")))?,
        );
        let run = Runner {
            up,
            files: files.clone(),
            sent_dir: sent_dir.clone(),
            replay_safe: !p.idempotency_header.is_empty(),
        };
        w = w.handler(&task_type(name), move |ctx| run.clone().run(ctx));
    }
    Ok(w)
}

fn bad_input(msg: impl Into<String>) -> TaskError {
    TaskError::fatal("invalid_input", msg)
}

fn content_type(data: &[u8]) -> &'static str {
    match image::guess_format(data) {
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Gif) => "image/gif",
        _ => "image/png",
    }
}

/// Marks that a task's call is about to reach the upstream; a later attempt of the same
/// task finds the mark and, unless replays are safe, is not sent again.
async fn mark(dir: &Path, task_id: &str) -> Result<bool, TaskError> {
    let path = dir.join(task_id);
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(true);
    }
    let failed = |p: &Path, e: std::io::Error| {
        TaskError::retryable("worker_state", format!("cannot write {}: {e}", p.display()))
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| failed(dir, e))?;
    tokio::fs::write(&path, b"sent")
        .await
        .map_err(|e| failed(&path, e))?;
    Ok(false)
}

/// One provider's handler.
#[derive(Clone)]
struct Runner {
    up: Arc<OpenAiCompatible>,
    files: Files,
    sent_dir: PathBuf,
    replay_safe: bool,
}

impl Runner {
    async fn fetch(&self, id: &Value) -> Result<Image, TaskError> {
        let id = id
            .as_str()
            .ok_or_else(|| bad_input("reference image ids must be strings"))?;
        let data = self.files.download(id).await?;
        let ct = content_type(&data);
        Ok(Image::new(data, ct))
    }

    /// The upstream call a task's input asks for, its references downloaded.
    async fn call(&self, ctx: &TaskContext) -> Result<Call, TaskError> {
        let input = &ctx.input;
        let fields = input
            .as_object()
            .cloned()
            .ok_or_else(|| bad_input("the input must be an object"))?;
        let edit = input["operation"] == "edit";
        let mut references = Vec::new();
        if edit {
            for id in input["images"].as_array().into_iter().flatten() {
                references.push(self.fetch(id).await?);
            }
            if references.is_empty() {
                return Err(bad_input("an edit needs input.images (file ids)"));
            }
        }
        let mask = match input.get("mask") {
            Some(id) if edit => Some(self.fetch(id).await?),
            _ => None,
        };
        Ok(Call {
            task_id: ctx.task_id.clone(),
            fields,
            references,
            mask,
            time_left: ctx.deadline.map(|d| {
                std::time::Duration::from_millis(d.saturating_sub(kiln_protocol::now_ms()))
            }),
        })
    }

    /// Uploads (when configured), then the upstream call unless an earlier attempt may
    /// have sent it. Returns the call's outcome and the uploads made before it.
    async fn steps(
        &self,
        ctx: &TaskContext,
        call: &Call,
    ) -> Result<(Result<crate::Output, ProviderError>, Vec<UploadRecord>), TaskError> {
        // Uploads first: a failed upload leaves no mark, since the upstream was not called.
        ctx.progress("upload", 0, 3);
        let uploads = match self.up.upload_references(call).await {
            Ok(u) => u,
            Err(e) => return Ok((Err(e), Vec::new())),
        };
        ctx.progress("upstream", 1, 3);
        if mark(&self.sent_dir, &ctx.task_id).await? && !self.replay_safe {
            return Err(TaskError::fatal(
                "upstream_maybe_processed",
                format!(
                    "an earlier attempt of this task may have reached {}; it is not sent \
                     again (configure idempotency_header if the upstream deduplicates){}",
                    self.up.name(),
                    uploads_summary(&uploads)
                ),
            ));
        }
        let recorded = uploads.clone();
        Ok((self.up.send(call, uploads).await, recorded))
    }

    async fn run(self, ctx: TaskContext) -> Result<Value, TaskError> {
        let call = self.call(&ctx).await?;
        let (result, uploaded) = tokio::select! {
            r = self.steps(&ctx, &call) => r?,
            _ = ctx.cancelled() => {
                // The upstream may have the call already; the mark stays so it is never resent.
                return Err(TaskError::fatal(
                    "canceled",
                    format!("canceled while {} was working on it", self.up.name()),
                ));
            }
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => return Err(self.failed(&ctx, e, &uploaded).await),
        };
        ctx.progress("store", 2, 3);
        let mut files = Vec::with_capacity(out.images.len());
        for img in &out.images {
            files.push(
                self.files
                    .upload(img.data.to_vec(), &img.content_type)
                    .await?,
            );
        }
        let _ = tokio::fs::remove_file(self.sent_dir.join(&ctx.task_id)).await;
        Ok(json!({
            "files": files,
            "revised_prompts": out.revised_prompts,
            "usage": out.usage,
            "upstream": {
                "provider": self.up.name(),
                "attempts": attempts_json(&out.attempts),
                "uploads": out.uploads,
            },
        }))
    }

    /// The task error of a failed call, with its attempts and uploads.
    async fn failed(
        &self,
        ctx: &TaskContext,
        e: ProviderError,
        uploaded: &[UploadRecord],
    ) -> TaskError {
        if e.upstream_untouched() {
            // Nothing reached the upstream: a later attempt may send it.
            let _ = tokio::fs::remove_file(self.sent_dir.join(&ctx.task_id)).await;
        }
        tracing::warn!(message = "upstream call failed", provider = self.up.name(), task_id = %ctx.task_id, code = e.code(), error = %e);
        let uploads = match &e {
            ProviderError::Upload { uploads, .. } => uploads_summary(uploads),
            _ => uploads_summary(uploaded),
        };
        let message = format!("{e} [attempts: {}]{uploads}", summary(e.attempts()));
        if e.is_retryable() {
            TaskError::retryable(e.code(), message)
        } else {
            TaskError::fatal(e.code(), message)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_is_marked_once_per_task() {
        let dir = tempfile::tempdir().unwrap();
        let sent = dir.path().join("sent");
        assert!(!mark(&sent, "t1").await.unwrap());
        assert!(mark(&sent, "t1").await.unwrap());
        assert!(!mark(&sent, "t2").await.unwrap());
    }

    #[test]
    fn references_are_typed_by_their_bytes() {
        assert_eq!(content_type(b"\xFF\xD8\xFF\xE0rest"), "image/jpeg");
        assert_eq!(content_type(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(content_type(b"GIF89a..."), "image/gif");
        assert_eq!(content_type(b"\x89PNG\r\n\x1a\n"), "image/png");
    }

    #[test]
    fn bad_settings_stop_the_worker_from_being_built() {
        let mut providers = BTreeMap::new();
        providers.insert(
            "acme".to_owned(),
            ProviderConfig {
                base_url: "not a url".into(),
                ..ProviderConfig::default()
            },
        );
        let e = worker(WorkerConfig::default(), &providers).unwrap_err();
        assert_eq!(e.code(), "invalid_input");
        assert!(e.to_string().contains("providers.acme.base_url"), "{e}");
        providers.get_mut("acme").unwrap().base_url = "http://127.0.0.1:9/v1".into();
        let w = worker(WorkerConfig::default(), &providers).unwrap();
        assert_eq!(w.config().slots, 4);
    }
}
