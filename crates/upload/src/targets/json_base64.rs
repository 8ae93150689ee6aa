//! JSON POST with the file base64-encoded (`{fileName, fileMimeType, content}` style).

use base64::Engine as _;
use http::{HeaderValue, Method, Uri, header};

use super::{
    BoxFuture, UploadFile, UploadResult, UploadTarget, content_error, json_path, parse_json,
    required,
};
use crate::body::Payload;
use crate::client::{HttpRequest, UploadClient};
use crate::error::UploadError;

/// POSTs `{"<name_field>": ..., "<mime_field>": ..., "<content_field>": "<base64>"}` plus
/// fixed extra fields, and maps the answer's fields to a file id and a URI.
#[derive(Debug, Clone)]
pub struct JsonBase64 {
    /// Endpoint URL.
    pub url: Uri,
    /// Extra headers (e.g. an API key).
    pub headers: http::HeaderMap,
    /// Field carrying the file name. Default: `fileName`.
    pub name_field: String,
    /// Field carrying the MIME type. Default: `fileMimeType`.
    pub mime_field: String,
    /// Field carrying the base64 content. Default: `content`.
    pub content_field: String,
    /// Dotted JSON path of the file id in the answer. Default: `fileId`.
    pub id_path: String,
    /// Dotted JSON path of the URI in the answer, if any. Default: `uri`.
    pub uri_path: Option<String>,
    /// Whether replays are safe. Default: false.
    pub idempotent: bool,
    /// Name for logs and fallback reports. Default: `json_base64`.
    pub name: String,
}

impl JsonBase64 {
    /// A JSON upload to `url` with the defaults above.
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            headers: http::HeaderMap::new(),
            name_field: "fileName".into(),
            mime_field: "fileMimeType".into(),
            content_field: "content".into(),
            id_path: "fileId".into(),
            uri_path: Some("uri".into()),
            idempotent: false,
            name: "json_base64".into(),
        }
    }
}

impl UploadTarget for JsonBase64 {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>> {
        Box::pin(async move {
            // base64 grows the body by 4/3: check the limit before reading the file.
            let encoded_len = file.payload.len().div_ceil(3) * 4;
            let limit = client.config().max_body_bytes;
            if encoded_len > limit {
                return Err(UploadError::TooLarge {
                    size: encoded_len,
                    limit,
                });
            }
            let raw = file.payload.read_all().await.map_err(UploadError::Body)?;
            let mut obj = serde_json::Map::new();
            obj.insert(self.name_field.clone(), file.file_name.clone().into());
            obj.insert(self.mime_field.clone(), file.mime.clone().into());
            obj.insert(
                self.content_field.clone(),
                base64::engine::general_purpose::STANDARD
                    .encode(&raw)
                    .into(),
            );
            let body = serde_json::to_vec(&serde_json::Value::Object(obj))
                .map_err(|e| UploadError::Config(e.to_string()))?;
            let mut req =
                HttpRequest::new(Method::POST, self.url.clone(), vec![Payload::from(body)]);
            req.headers = self.headers.clone();
            req.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            req.headers
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            req.idempotent = self.idempotent;
            req.progress = file.progress.clone();
            let sent = client.send(&self.name, req).await?;
            let json = parse_json(&sent).map_err(|e| content_error(&self.name, e))?;
            let id =
                required(&sent, &json, &self.id_path).map_err(|e| content_error(&self.name, e))?;
            let mut r = UploadResult::from_sent(&self.name, file.payload.len(), &sent);
            r.id = Some(id);
            r.url = self.uri_path.as_deref().and_then(|p| json_path(&json, p));
            Ok(r)
        })
    }
}
