//! `multipart/form-data` POST (image hosts such as ImgBB).

use bytes::Bytes;
use http::{HeaderValue, Method, Uri, header};

use super::{
    BoxFuture, UploadFile, UploadResult, UploadTarget, content_error, parse_json, required,
};
use crate::body::Payload;
use crate::client::{HttpRequest, UploadClient};
use crate::error::UploadError;

/// A form POST with the file in one field, optional text fields, and the URL picked from
/// the JSON answer by a dotted path.
///
/// POST is not idempotent: a request the server may have processed is not replayed
/// (set [`Multipart::idempotent`] when the server deduplicates).
#[derive(Debug, Clone)]
pub struct Multipart {
    /// Endpoint URL (may carry an API key in its query).
    pub url: Uri,
    /// Name of the file field. Default: `image`.
    pub file_field: String,
    /// Extra text fields.
    pub fields: Vec<(String, String)>,
    /// Dotted JSON path of the URL in the answer. Default: `data.url`.
    pub url_path: String,
    /// Dotted JSON path of an id in the answer, if any. Default: `data.id`.
    pub id_path: Option<String>,
    /// Whether replays are safe. Default: false.
    pub idempotent: bool,
    /// Name for logs and fallback reports. Default: `multipart`.
    pub name: String,
}

impl Multipart {
    /// A form POST to `url` with ImgBB-style defaults.
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            file_field: "image".into(),
            fields: Vec::new(),
            url_path: "data.url".into(),
            id_path: Some("data.id".into()),
            idempotent: false,
            name: "multipart".into(),
        }
    }
}

fn quote(s: &str) -> String {
    s.replace(['"', '\r', '\n'], "_")
}

/// Builds the three body segments: preamble (text fields and the file part's header), the
/// file, and the closing boundary.
pub(crate) fn form_segments(
    boundary: &str,
    fields: &[(String, String)],
    file_field: &str,
    file: &UploadFile,
) -> Vec<Payload> {
    let mut head = String::new();
    for (k, v) in fields {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{v}\r\n",
            quote(k)
        ));
    }
    head.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
        quote(file_field),
        quote(&file.file_name),
        quote(&file.mime)
    ));
    let tail = format!("\r\n--{boundary}--\r\n");
    vec![
        Payload::Bytes(Bytes::from(head)),
        file.payload.clone(),
        Payload::Bytes(Bytes::from(tail)),
    ]
}

impl UploadTarget for Multipart {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>> {
        Box::pin(async move {
            let boundary = format!("kiln-{:016x}", rand_u64());
            let body = form_segments(&boundary, &self.fields, &self.file_field, file);
            let mut req = HttpRequest::new(Method::POST, self.url.clone(), body);
            let ct = HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                .map_err(|e| UploadError::Config(e.to_string()))?;
            req.headers.insert(header::CONTENT_TYPE, ct);
            req.headers
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            req.idempotent = self.idempotent;
            req.progress = file.progress.clone();
            let sent = client.send(&self.name, req).await?;
            let json = parse_json(&sent).map_err(|e| content_error(&self.name, e))?;
            let url =
                required(&sent, &json, &self.url_path).map_err(|e| content_error(&self.name, e))?;
            let mut r = UploadResult::from_sent(&self.name, file.payload.len(), &sent);
            r.url = Some(url);
            r.id = self
                .id_path
                .as_deref()
                .and_then(|p| super::json_path(&json, p));
            Ok(r)
        })
    }
}

/// A boundary-quality random number without an RNG dependency.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn form_is_well_formed() {
        let f = UploadFile::new(b"PNGDATA".to_vec(), "a\".png", "image/png");
        let segs = form_segments("B", &[("key".into(), "v".into())], "image", &f);
        let spec = crate::body::BodySpec::new(segs);
        use http_body_util::BodyExt;
        let all = spec
            .open(None)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let s = String::from_utf8(all.to_vec()).unwrap();
        assert_eq!(
            s,
            "--B\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nv\r\n--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a_.png\"\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--B--\r\n"
        );
    }
}
