//! Targets tried in order until one succeeds.

use super::{BoxFuture, UploadFile, UploadResult, UploadTarget};
use crate::client::UploadClient;
use crate::error::UploadError;

/// Tries each target in order (e.g. R2, then ImgBB). The result lists every target that
/// failed before the one that succeeded; if all fail, [`UploadError::AllTargetsFailed`]
/// carries every error.
pub struct Fallback {
    targets: Vec<Box<dyn UploadTarget>>,
    name: String,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.targets.iter().map(|t| t.name()).collect();
        f.debug_struct("Fallback").field("targets", &names).finish()
    }
}

impl Fallback {
    /// A chain of targets.
    pub fn new(targets: Vec<Box<dyn UploadTarget>>) -> Self {
        let name = targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(">");
        Self { targets, name }
    }
}

impl UploadTarget for Fallback {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>> {
        Box::pin(async move {
            let mut errors: Vec<(String, UploadError)> = Vec::new();
            for t in &self.targets {
                match t.upload(client, file).await {
                    Ok(mut r) => {
                        r.failures = errors
                            .iter()
                            .map(|(n, e)| (n.clone(), e.to_string()))
                            .collect();
                        return Ok(r);
                    }
                    Err(e) => {
                        tracing::warn!(message = "target failed, trying the next", target = t.name(), error = %e);
                        errors.push((t.name().to_owned(), e));
                    }
                }
            }
            Err(UploadError::AllTargetsFailed(errors))
        })
    }
}
