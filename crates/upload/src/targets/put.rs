//! HTTP PUT of the file to a given (presigned) URL.

use http::{HeaderMap, HeaderValue, Method, Uri, header};

use super::{BoxFuture, UploadFile, UploadResult, UploadTarget};
use crate::client::{HttpRequest, UploadClient};
use crate::error::UploadError;

/// PUT to a URL that already carries its authorisation (an S3/R2/GCS presigned URL, a
/// WebDAV location). PUT is idempotent, so every failure class may be replayed.
#[derive(Debug, Clone)]
pub struct PresignedPut {
    /// The URL.
    pub url: Uri,
    /// Extra headers (some presigned URLs sign `Content-Type` or `x-amz-*` headers).
    pub headers: HeaderMap,
    /// Name for logs and fallback reports. Default: `put`.
    pub name: String,
}

impl PresignedPut {
    /// A PUT to `url`.
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            headers: HeaderMap::new(),
            name: "put".into(),
        }
    }
}

impl UploadTarget for PresignedPut {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>> {
        Box::pin(async move {
            let mut req =
                HttpRequest::new(Method::PUT, self.url.clone(), vec![file.payload.clone()]);
            req.headers = self.headers.clone();
            if !req.headers.contains_key(header::CONTENT_TYPE)
                && let Ok(v) = HeaderValue::from_str(&file.mime)
            {
                req.headers.insert(header::CONTENT_TYPE, v);
            }
            req.progress = file.progress.clone();
            let sent = client.send(&self.name, req).await?;
            let mut r = UploadResult::from_sent(&self.name, file.payload.len(), &sent);
            r.url = Some(strip_query(&self.url));
            r.etag = sent
                .headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok(r)
        })
    }
}

/// The URL without its query (presigned signatures are not part of the object's address).
fn strip_query(u: &Uri) -> String {
    let s = u.to_string();
    match s.split_once('?') {
        Some((a, _)) => a.to_owned(),
        None => s,
    }
}
