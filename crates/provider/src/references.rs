//! `references = "upload"`: reference images (and the mask) of an edit are uploaded to a
//! kiln-upload target first, and the edit call names them by URL or id in a JSON body
//! (`images: [{"image_url": …}]` or `[{"file_id": …}]`, OpenAI's JSON form of
//! `/images/edits`). The targets are kiln-upload's own; this module only maps settings to
//! them and records what each upload did.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use kiln_upload::{
    Fallback, JsonBase64, Multipart, PresignedPut, S3, S3Config, UploadClient, UploadConfig,
    UploadError, UploadFile, UploadTarget,
};
use serde::{Deserialize, Serialize};

use crate::client::Image;
use crate::error::{Attempt, log_attempts};

/// A secret read by the binary from an environment variable; never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How an uploaded reference is named in the edit call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SendAs {
    /// `{"image_url": "<the upload's URL>"}`: the upstream downloads the image.
    #[default]
    ImageUrl,
    /// `{"file_id": "<the upload's id>"}`: the target is the upstream's own file store.
    FileId,
}

/// [`crate::ProviderConfig::upload`]: where references go before an edit call with
/// `references = "upload"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReferenceUploadConfig {
    /// How the call names an uploaded reference: `image_url` or `file_id`.
    /// Default: `image_url`.
    pub send_as: SendAs,
    /// The kiln-upload target. Default: none (required with `references = "upload"`).
    pub target: Option<TargetConfig>,
    /// The upload client: timeouts, connection pool and the retry policy (kiln-retry) of
    /// every upload request. Default: kiln-upload's defaults (3 retries, 60 s per attempt).
    pub client: UploadConfig,
}

/// A kiln-upload target, by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TargetConfig {
    /// JSON POST with the file base64-encoded (`{fileName, fileMimeType, content}`).
    JsonBase64(JsonBase64Config),
    /// `multipart/form-data` POST (image hosts such as ImgBB).
    Multipart(MultipartConfig),
    /// HTTP PUT to a URL (a WebDAV collection, a bucket that takes an auth header).
    PresignedPut(PutConfig),
    /// S3 PutObject (multipart upload above a threshold), SigV4-signed.
    S3(S3TargetConfig),
    /// Targets tried in order until one succeeds.
    Fallback(FallbackConfig),
}

/// `kind = "json_base64"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JsonBase64Config {
    /// Endpoint URL. Default: empty (required).
    pub url: String,
    /// Extra headers sent as they are. Default: none.
    pub headers: BTreeMap<String, String>,
    /// Extra headers whose values the binary reads from the named environment variables,
    /// e.g. `{ "x-api-key" = "ASSETS_KEY" }`. Default: none.
    pub headers_env: BTreeMap<String, String>,
    /// Field of the file name. Default: `fileName`.
    pub name_field: String,
    /// Field of the MIME type. Default: `fileMimeType`.
    pub mime_field: String,
    /// Field of the base64 content. Default: `content`.
    pub content_field: String,
    /// Dotted JSON path of the file id in the answer. Default: `fileId`.
    pub id_path: String,
    /// Dotted JSON path of the URL in the answer; empty: none. Default: `uri`.
    pub uri_path: String,
    /// Whether a request that may have been processed may be replayed (the endpoint
    /// deduplicates). Default: false.
    pub idempotent: bool,
    /// Name in logs, errors and the task's record. Default: `json_base64`.
    pub name: String,
    /// Values of `headers_env`, filled by the binary.
    #[serde(skip)]
    pub resolved_headers: BTreeMap<String, Secret>,
}

impl Default for JsonBase64Config {
    fn default() -> Self {
        Self {
            url: String::new(),
            headers: BTreeMap::new(),
            headers_env: BTreeMap::new(),
            name_field: "fileName".into(),
            mime_field: "fileMimeType".into(),
            content_field: "content".into(),
            id_path: "fileId".into(),
            uri_path: "uri".into(),
            idempotent: false,
            name: "json_base64".into(),
            resolved_headers: BTreeMap::new(),
        }
    }
}

/// `kind = "multipart"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultipartConfig {
    /// Endpoint URL. Default: empty (required).
    pub url: String,
    /// Query parameters whose values the binary reads from the named environment
    /// variables, e.g. `{ key = "IMGBB_KEY" }`. Default: none.
    pub query_env: BTreeMap<String, String>,
    /// Name of the file field. Default: `image`.
    pub file_field: String,
    /// Extra text fields. Default: none.
    pub fields: BTreeMap<String, String>,
    /// Dotted JSON path of the URL in the answer. Default: `data.url`.
    pub url_path: String,
    /// Dotted JSON path of an id in the answer; empty: none. Default: `data.id`.
    pub id_path: String,
    /// Whether replays are safe. Default: false.
    pub idempotent: bool,
    /// Name in logs, errors and the task's record. Default: `multipart`.
    pub name: String,
    /// Values of `query_env`, filled by the binary.
    #[serde(skip)]
    pub resolved_query: BTreeMap<String, Secret>,
}

impl Default for MultipartConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            query_env: BTreeMap::new(),
            file_field: "image".into(),
            fields: BTreeMap::new(),
            url_path: "data.url".into(),
            id_path: "data.id".into(),
            idempotent: false,
            name: "multipart".into(),
            resolved_query: BTreeMap::new(),
        }
    }
}

/// `kind = "presigned_put"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PutConfig {
    /// URL of each object; `{name}` is replaced by the file name
    /// (`kiln-<task id>-<n>.<ext>`, the same on every attempt of a task). Default: empty
    /// (required).
    pub url: String,
    /// Extra headers sent as they are. Default: none.
    pub headers: BTreeMap<String, String>,
    /// Extra headers whose values the binary reads from the named environment variables.
    /// Default: none.
    pub headers_env: BTreeMap<String, String>,
    /// Name in logs, errors and the task's record. Default: `put`.
    pub name: String,
    /// Values of `headers_env`, filled by the binary.
    #[serde(skip)]
    pub resolved_headers: BTreeMap<String, Secret>,
}

impl Default for PutConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            headers: BTreeMap::new(),
            headers_env: BTreeMap::new(),
            name: "put".into(),
            resolved_headers: BTreeMap::new(),
        }
    }
}

/// `kind = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3TargetConfig {
    /// Endpoint, e.g. `https://s3.eu-west-1.amazonaws.com`. Default: empty (required).
    pub endpoint: String,
    /// Bucket. Default: empty (required).
    pub bucket: String,
    /// Signing region. Default: `us-east-1`.
    pub region: String,
    /// Environment variable holding the access key id. Default: empty (required).
    pub access_key_id_env: String,
    /// Environment variable holding the secret access key. Default: empty (required).
    pub secret_access_key_env: String,
    /// Environment variable holding a session token; empty: none. Default: empty.
    pub session_token_env: String,
    /// Path-style URLs (`endpoint/bucket/key`). Default: true.
    pub path_style: bool,
    /// Prefix of the object keys. Default: empty.
    pub key_prefix: String,
    /// Base URL the upstream reads objects from (a public bucket domain); empty: the
    /// object's endpoint URL. Default: empty.
    pub public_base_url: String,
    /// Name in logs, errors and the task's record. Default: `s3`.
    pub name: String,
    /// Credentials, filled by the binary: access key id, secret key, session token.
    #[serde(skip)]
    pub credentials: Option<(Secret, Secret, Option<Secret>)>,
}

impl Default for S3TargetConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            access_key_id_env: String::new(),
            secret_access_key_env: String::new(),
            session_token_env: String::new(),
            path_style: true,
            key_prefix: String::new(),
            public_base_url: String::new(),
            name: "s3".into(),
            credentials: None,
        }
    }
}

/// `kind = "fallback"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// The targets, tried in order. Default: none (at least one required).
    pub targets: Vec<TargetConfig>,
}

fn resolve_map(
    key: &str,
    names: &BTreeMap<String, String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, Secret>, String> {
    names
        .iter()
        .map(|(k, var)| match lookup(var) {
            Some(v) if !v.is_empty() => Ok((k.clone(), Secret(v))),
            _ => Err(format!("{key}.{k} names {var:?}, which is not set")),
        })
        .collect()
}

fn headers(
    plain: &BTreeMap<String, String>,
    secret: &BTreeMap<String, Secret>,
) -> Result<HeaderMap, String> {
    let mut out = HeaderMap::new();
    let pairs = plain
        .iter()
        .map(|(k, v)| (k, v.as_str()))
        .chain(secret.iter().map(|(k, v)| (k, v.expose())));
    for (k, v) in pairs {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header name {k:?}: {e}"))?;
        let value = HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?;
        out.insert(name, value);
    }
    Ok(out)
}

fn url(s: &str) -> Result<Uri, String> {
    let u: Uri = s.parse().map_err(|e| format!("url {s:?}: {e}"))?;
    if !matches!(u.scheme_str(), Some("http" | "https")) || u.host().is_none() {
        return Err(format!("url {s:?} is not an http(s) URL"));
    }
    Ok(u)
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl TargetConfig {
    /// Reads the secrets this target names (`headers_env`, `query_env`, S3 credentials)
    /// through `lookup`; `key` is the target's settings key, for errors.
    pub fn resolve_secrets(
        &mut self,
        key: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        match self {
            TargetConfig::JsonBase64(t) => {
                t.resolved_headers =
                    resolve_map(&format!("{key}.headers_env"), &t.headers_env, lookup)?;
            }
            TargetConfig::PresignedPut(t) => {
                t.resolved_headers =
                    resolve_map(&format!("{key}.headers_env"), &t.headers_env, lookup)?;
            }
            TargetConfig::Multipart(t) => {
                t.resolved_query = resolve_map(&format!("{key}.query_env"), &t.query_env, lookup)?;
            }
            TargetConfig::S3(t) => {
                let get = |field: &str, var: &str| match lookup(var) {
                    Some(v) if !v.is_empty() => Ok(Secret(v)),
                    _ => Err(format!("{key}.{field} names {var:?}, which is not set")),
                };
                let id = get("access_key_id_env", &t.access_key_id_env)?;
                let secret = get("secret_access_key_env", &t.secret_access_key_env)?;
                let token = if t.session_token_env.is_empty() {
                    None
                } else {
                    Some(get("session_token_env", &t.session_token_env)?)
                };
                t.credentials = Some((id, secret, token));
            }
            TargetConfig::Fallback(f) => {
                for (i, t) in f.targets.iter_mut().enumerate() {
                    t.resolve_secrets(&format!("{key}.targets[{i}]"), lookup)?;
                }
            }
        }
        Ok(())
    }

    /// The kiln-upload target; the error says which setting is wrong.
    pub fn build(&self) -> Result<Box<dyn UploadTarget>, String> {
        Ok(match self {
            TargetConfig::JsonBase64(c) => {
                let mut t = JsonBase64::new(url(&c.url)?);
                t.headers = headers(&c.headers, &c.resolved_headers)?;
                t.name_field = c.name_field.clone();
                t.mime_field = c.mime_field.clone();
                t.content_field = c.content_field.clone();
                t.id_path = c.id_path.clone();
                t.uri_path = (!c.uri_path.is_empty()).then(|| c.uri_path.clone());
                t.idempotent = c.idempotent;
                t.name = c.name.clone();
                Box::new(t)
            }
            TargetConfig::Multipart(c) => {
                let mut u = c.url.clone();
                for (k, v) in &c.resolved_query {
                    u.push(if u.contains('?') { '&' } else { '?' });
                    u.push_str(&format!("{}={}", percent(k), percent(v.expose())));
                }
                let mut t = Multipart::new(
                    url(&u).map_err(|_| format!("url {:?} is not an http(s) URL", c.url))?,
                );
                t.file_field = c.file_field.clone();
                t.fields = c.fields.clone().into_iter().collect();
                t.url_path = c.url_path.clone();
                t.id_path = (!c.id_path.is_empty()).then(|| c.id_path.clone());
                t.idempotent = c.idempotent;
                t.name = c.name.clone();
                Box::new(t)
            }
            TargetConfig::PresignedPut(c) => {
                if !c.url.contains("{name}") {
                    return Err(format!(
                        "url {:?} must contain `{{name}}`, the object's name",
                        c.url
                    ));
                }
                url(&c.url.replace("{name}", "x"))?;
                Box::new(PutTemplate {
                    url: c.url.clone(),
                    headers: headers(&c.headers, &c.resolved_headers)?,
                    name: c.name.clone(),
                })
            }
            TargetConfig::S3(c) => {
                if c.endpoint.is_empty() || c.bucket.is_empty() {
                    return Err("endpoint and bucket must be set".into());
                }
                url(&c.endpoint)?;
                let (id, secret, token) = c.credentials.clone().unwrap_or_default();
                let cfg = S3Config {
                    endpoint: c.endpoint.clone(),
                    bucket: c.bucket.clone(),
                    region: c.region.clone(),
                    access_key_id: id.0,
                    secret_access_key: secret.0,
                    session_token: token.map(|t| t.0),
                    path_style: c.path_style,
                    key_prefix: c.key_prefix.clone(),
                    multipart_threshold: 16 << 20,
                    part_size: 8 << 20,
                    public_base_url: (!c.public_base_url.is_empty())
                        .then(|| c.public_base_url.clone()),
                };
                Box::new(
                    S3::new(cfg)
                        .map_err(|e| e.to_string())?
                        .named(c.name.clone()),
                )
            }
            TargetConfig::Fallback(f) => {
                if f.targets.is_empty() {
                    return Err("a fallback needs at least one target".into());
                }
                let targets = f
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| t.build().map_err(|e| format!("targets[{i}]: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                Box::new(Fallback::new(targets))
            }
        })
    }
}

/// A PUT to a URL made per file from a `{name}` template, through kiln-upload's
/// [`PresignedPut`].
struct PutTemplate {
    url: String,
    headers: HeaderMap,
    name: String,
}

impl UploadTarget for PutTemplate {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> kiln_upload::BoxFuture<'a, Result<kiln_upload::UploadResult, UploadError>> {
        Box::pin(async move {
            let u = self.url.replace("{name}", &percent(&file.file_name));
            let uri: Uri = u
                .parse()
                .map_err(|e| UploadError::Config(format!("bad PUT URL {u}: {e}")))?;
            let mut t = PresignedPut::new(uri);
            t.headers = self.headers.clone();
            t.name = self.name.clone();
            t.upload(client, file).await
        })
    }
}

/// A target that failed before another one of a fallback chain succeeded.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SkippedTarget {
    /// The target's name.
    pub target: String,
    /// Its error.
    pub error: String,
}

/// One uploaded reference, as recorded on the task (`output.upstream.uploads`).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct UploadRecord {
    /// `image[0]`, `image[1]`, …, or `mask`.
    pub part: String,
    /// The target that stored it.
    pub target: String,
    /// Bytes uploaded (the compressed reference).
    pub bytes: u64,
    /// The URL the target reported.
    pub url: Option<String>,
    /// The id the target reported.
    pub id: Option<String>,
    /// Time of the whole upload, retries and waits included, ms.
    pub total_ms: u64,
    /// Every attempt of every request of the upload.
    pub attempts: Vec<Attempt>,
    /// Targets of a fallback chain that failed first.
    pub skipped: Vec<SkippedTarget>,
}

/// The uploader of one provider: the target and its client.
pub(crate) struct Uploader {
    target: Box<dyn UploadTarget>,
    client: UploadClient,
    pub(crate) send_as: SendAs,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("target", &self.target.name())
            .field("send_as", &self.send_as)
            .finish_non_exhaustive()
    }
}

/// Why an upload failed: the target, the status, and kiln-upload's report (which carries
/// the body excerpt and every attempt).
#[derive(Debug)]
pub(crate) struct UploadFailure {
    pub(crate) part: String,
    pub(crate) target: String,
    pub(crate) error: UploadError,
}

impl Uploader {
    pub(crate) fn new(cfg: &ReferenceUploadConfig) -> Result<Self, String> {
        let target = cfg
            .target
            .as_ref()
            .ok_or("upload.target is required with references = \"upload\"")?
            .build()
            .map_err(|e| format!("upload.target: {e}"))?;
        let client =
            UploadClient::new(cfg.client.clone()).map_err(|e| format!("upload.client: {e}"))?;
        Ok(Self {
            target,
            client,
            send_as: cfg.send_as,
        })
    }

    /// The target's name.
    pub(crate) fn target_name(&self) -> &str {
        self.target.name()
    }

    /// Uploads one image under a name that is the same on every attempt of the task, so
    /// a replay overwrites instead of adding a copy where the target names objects by it.
    pub(crate) async fn upload(
        &self,
        task_id: &str,
        part: &str,
        file_stem: &str,
        img: &Image,
    ) -> Result<UploadRecord, UploadFailure> {
        let ext = match img.content_type.as_str() {
            "image/jpeg" => "jpg",
            other => other.rsplit('/').next().unwrap_or("bin"),
        };
        let file = UploadFile::new(
            img.data.clone(),
            format!("kiln-{task_id}-{file_stem}.{ext}"),
            img.content_type.clone(),
        );
        match self.client.upload(self.target.as_ref(), &file).await {
            Ok(r) => Ok(UploadRecord {
                part: part.to_owned(),
                target: r.target.clone(),
                bytes: r.bytes,
                url: r.url.clone(),
                id: r.id.clone(),
                total_ms: r.timings.total.as_millis() as u64,
                attempts: log_attempts(&r.attempt_log, None),
                skipped: r
                    .failures
                    .iter()
                    .map(|(t, e)| SkippedTarget {
                        target: t.clone(),
                        error: e.clone(),
                    })
                    .collect(),
            }),
            Err(error) => Err(UploadFailure {
                part: part.to_owned(),
                target: self.target.name().to_owned(),
                error,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_json: serde_json::Value) -> TargetConfig {
        serde_json::from_value(toml_json).unwrap()
    }

    fn build_error(t: &TargetConfig) -> String {
        match t.build() {
            Ok(_) => panic!("{t:?} must not build"),
            Err(e) => e,
        }
    }

    #[test]
    fn targets_parse_build_and_name_their_errors() {
        let t = parse(serde_json::json!({"kind": "json_base64", "url": "http://127.0.0.1:9/a"}));
        assert_eq!(t.build().unwrap().name(), "json_base64");
        let t = parse(serde_json::json!({"kind": "fallback", "targets": [
            {"kind": "presigned_put", "url": "http://h/b/{name}", "name": "dav"},
            {"kind": "multipart", "url": "http://h/up"},
        ]}));
        assert_eq!(t.build().unwrap().name(), "dav>multipart");
        let bad = parse(serde_json::json!({"kind": "presigned_put", "url": "http://h/b"}));
        assert!(build_error(&bad).contains("{name}"));
        let bad = parse(serde_json::json!({"kind": "json_base64", "url": "ftp://h/x"}));
        assert!(build_error(&bad).contains("not an http(s) URL"));
        let e = serde_json::from_value::<TargetConfig>(
            serde_json::json!({"kind": "json_base64", "url": "http://h/", "bogus": 1}),
        );
        assert!(e.is_err(), "unknown keys are refused");
    }

    #[test]
    fn secrets_come_from_the_lookup_and_are_not_printed() {
        let mut t = parse(serde_json::json!({"kind": "fallback", "targets": [
            {"kind": "json_base64", "url": "http://h/a", "headers_env": {"x-api-key": "K"}},
            {"kind": "s3", "endpoint": "http://h", "bucket": "b",
             "access_key_id_env": "ID", "secret_access_key_env": "SECRET"},
        ]}));
        let lookup = |n: &str| match n {
            "K" => Some("key-value".to_owned()),
            "ID" => Some("AKIA".to_owned()),
            _ => None,
        };
        let e = t.resolve_secrets("p.upload.target", &lookup).unwrap_err();
        assert_eq!(
            e,
            "p.upload.target.targets[1].secret_access_key_env names \"SECRET\", which is not set"
        );
        let lookup = |n: &str| Some(format!("v-{n}"));
        t.resolve_secrets("p", &lookup).unwrap();
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("v-K") && !shown.contains("v-SECRET"),
            "{shown}"
        );
        t.build().unwrap();
    }

    #[test]
    fn multipart_query_secrets_are_encoded() {
        let mut t = parse(
            serde_json::json!({"kind": "multipart", "url": "http://h/up?x=1",
            "query_env": {"key": "IMG"}}),
        );
        t.resolve_secrets("p", &|_| Some("a b&c".to_owned()))
            .unwrap();
        let TargetConfig::Multipart(c) = &t else {
            panic!("multipart")
        };
        assert_eq!(c.resolved_query["key"].expose(), "a b&c");
        assert_eq!(percent("a b&c"), "a%20b%26c");
        t.build().unwrap();
    }
}
