//! The image options of generations and edits (`quality`, `background`, `output_format`,
//! `output_compression`, `moderation`, `style`, `stream`, `partial_images`), validated as
//! OpenAI's API does, and `output_format`/`output_compression` applied to a result the
//! worker returned in another format.

use axum::body::Bytes;
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::AppState;

/// The validated options of one call.
#[derive(Debug, Clone, Default)]
pub(crate) struct ImageOptions {
    /// `low`, `medium`, `high`, `auto`, ...
    pub(crate) quality: Option<String>,
    /// `transparent`, `opaque` or `auto`.
    pub(crate) background: Option<String>,
    /// `png`, `jpeg` or `webp`.
    pub(crate) output_format: Option<String>,
    /// 0 to 100, for `jpeg` and `webp`.
    pub(crate) output_compression: Option<u8>,
    /// `stream: true`: answer with server-sent events.
    pub(crate) stream: bool,
    /// Partial images to stream before the completed one (0 to 3).
    pub(crate) partial_images: u8,
}

const QUALITIES: &[&str] = &[
    "auto", "low", "medium", "high", "xhigh", "max", "standard", "hd",
];
const BACKGROUNDS: &[&str] = &["transparent", "opaque", "auto"];
const MODERATIONS: &[&str] = &["low", "auto"];
const FORMATS: &[&str] = &["png", "jpeg", "webp"];
/// Most partial images of one streamed call.
pub(crate) const MAX_PARTIAL_IMAGES: u64 = 3;

fn one_of(
    fields: &Map<String, Value>,
    key: &'static str,
    allowed: &[&str],
) -> Result<Option<String>, OpenAiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(Some(s.clone())),
        Some(v) => Err(OpenAiError::invalid(
            key,
            format!(
                "Invalid value for '{key}': {v}. Supported values are: {}.",
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// An integer field (JSON number, or a multipart string).
fn integer(
    fields: &Map<String, Value>,
    key: &'static str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, OpenAiError> {
    let n = match fields.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(x)) => x.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(OpenAiError::invalid(
            key,
            format!(
                "'{key}' must be an integer from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn boolean(fields: &Map<String, Value>, key: &'static str) -> Result<bool, OpenAiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(_) => Err(OpenAiError::invalid(
            key,
            format!("'{key}' must be a boolean"),
        )),
    }
}

/// Validates the options and returns them with the fields to pass to the worker (or
/// upstream) as they are: `quality`, `background`, `output_format`, `output_compression`,
/// `moderation`, `style`, and `partial_images` when streaming.
pub(crate) fn parse(
    fields: &Map<String, Value>,
) -> Result<(ImageOptions, Map<String, Value>), OpenAiError> {
    let quality = one_of(fields, "quality", QUALITIES)?;
    let background = one_of(fields, "background", BACKGROUNDS)?;
    let moderation = one_of(fields, "moderation", MODERATIONS)?;
    let output_format = match fields.get("output_format") {
        Some(Value::String(s)) if s == "jpg" => Some("jpeg".to_owned()),
        _ => one_of(fields, "output_format", FORMATS)?,
    };
    let output_compression = integer(fields, "output_compression", 0..=100)?.map(|n| n as u8);
    let stream = boolean(fields, "stream")?;
    let partial_images = integer(fields, "partial_images", 0..=MAX_PARTIAL_IMAGES)?;
    let format = output_format.as_deref().unwrap_or("png");
    // Results are converted to JPEG and WebP by kiln-compress; a gateway built without it
    // converts only to PNG (with the `image` crate), so it refuses the others up front.
    #[cfg(not(feature = "compress"))]
    if format != "png" {
        return Err(OpenAiError::invalid(
            "output_format",
            format!("output_format {format} needs a server built with image compression; use png"),
        ));
    }
    if background.as_deref() == Some("transparent") && format == "jpeg" {
        return Err(OpenAiError::invalid(
            "background",
            "a transparent background needs output_format png or webp",
        ));
    }
    if format == "png" && output_compression.is_some_and(|c| c < 100) {
        return Err(OpenAiError::invalid(
            "output_compression",
            "output_compression below 100 is not supported for the png output format",
        ));
    }
    let style = match fields.get("style") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(OpenAiError::invalid("style", "`style` must be a string"));
        }
    };
    let mut extras = Map::new();
    for (k, v) in [
        ("quality", &quality),
        ("background", &background),
        ("output_format", &output_format),
        ("moderation", &moderation),
        ("style", &style),
    ] {
        if let Some(v) = v {
            extras.insert(k.into(), v.clone().into());
        }
    }
    if let Some(c) = output_compression {
        extras.insert("output_compression".into(), c.into());
    }
    let partial_images = if stream {
        let n = partial_images.unwrap_or(0) as u8;
        extras.insert("partial_images".into(), n.into());
        n
    } else {
        0
    };
    Ok((
        ImageOptions {
            quality,
            background,
            output_format,
            output_compression,
            stream,
            partial_images,
        },
        extras,
    ))
}

impl ImageOptions {
    /// The MIME type the caller asked for, if any.
    pub(crate) fn mime(&self) -> Option<&'static str> {
        match self.output_format.as_deref()? {
            "jpeg" => Some("image/jpeg"),
            "webp" => Some("image/webp"),
            _ => Some("image/png"),
        }
    }

    /// `bytes` (of type `mime`) in the requested format: as they are when they already
    /// have it (or none was asked for), else decoded and encoded again, with
    /// `output_compression` as the quality of JPEG and WebP (default 100).
    pub(crate) async fn convert(
        &self,
        bytes: Bytes,
        mime: &str,
    ) -> Result<(Bytes, String), OpenAiError> {
        let Some(want) = self.mime() else {
            return Ok((bytes, mime.to_owned()));
        };
        if mime == want {
            return Ok((bytes, mime.to_owned()));
        }
        let quality = self.output_compression.unwrap_or(100).max(1);
        let out = tokio::task::spawn_blocking(move || encode(&bytes, want, quality))
            .await
            .map_err(|e| OpenAiError::from(crate::error::ApiError::internal(e)))??;
        Ok((Bytes::from(out), want.to_owned()))
    }

    /// The id of the result file `id` in the requested format: `id` itself when the worker
    /// returned it so, else a new stored file converted from it. Also its bytes.
    pub(crate) async fn apply(
        &self,
        state: &AppState,
        id: &str,
    ) -> Result<(String, Bytes), OpenAiError> {
        let (meta, data) = state
            .files()
            .read(id)
            .await
            .map_err(|e| OpenAiError::from(crate::files::storage_error(e)))?
            .ok_or_else(|| {
                OpenAiError::new(
                    axum::http::StatusCode::GONE,
                    "file_gone",
                    format!("the result file {id} was deleted"),
                )
            })?;
        let (out, mime) = self.convert(data.clone(), &meta.content_type).await?;
        if mime == meta.content_type {
            return Ok((id.to_owned(), data));
        }
        let stored = crate::files::store_image(state, out.clone(), &mime, None, None).await?;
        tracing::info!(message = "result converted to the requested output format", from = %meta.content_type, to = %mime, file_id = %id, converted = %stored.id);
        Ok((stored.id, out))
    }
}

/// Encodes `input` as `want` (quality 1 to 100 for JPEG and WebP).
fn encode(input: &[u8], want: &str, quality: u8) -> Result<Vec<u8>, OpenAiError> {
    let failed = |e: String| {
        OpenAiError::from(crate::error::ApiError::internal(format!(
            "cannot convert the image to {want}: {e}"
        )))
    };
    if want == "image/png" {
        let img = image::load_from_memory(input).map_err(|e| failed(e.to_string()))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| failed(e.to_string()))?;
        return Ok(out.into_inner());
    }
    #[cfg(not(feature = "compress"))]
    {
        let _ = quality;
        Err(failed(
            "this server converts results only to PNG".to_owned(),
        ))
    }
    #[cfg(feature = "compress")]
    let opts = kiln_compress::CompressOptions {
        max_bytes: usize::MAX,
        max_dimension: 1 << 14,
        format: if want == "image/webp" {
            kiln_compress::OutputFormat::Webp
        } else {
            kiln_compress::OutputFormat::Jpeg
        },
        passthrough: false,
        max_quality: quality,
        min_quality: quality,
        min_dimension: 1,
        ..kiln_compress::CompressOptions::default()
    };
    #[cfg(feature = "compress")]
    kiln_compress::compress(input, &opts)
        .map(|c| c.bytes)
        .map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn options_are_validated_as_openai_does() {
        let (o, extras) = parse(&fields(
            json!({"quality": "high", "background": "transparent",
            "output_format": "webp", "output_compression": 60, "moderation": "low",
            "stream": true, "partial_images": 2}),
        ))
        .unwrap();
        assert_eq!(
            (o.stream, o.partial_images, o.output_compression),
            (true, 2, Some(60))
        );
        assert_eq!(extras["output_compression"], 60);
        assert_eq!(extras["partial_images"], 2);
        assert_eq!(extras["moderation"], "low");
        // Multipart sends strings.
        let (o, _) = parse(&fields(json!({"stream": "true", "partial_images": "3",
            "output_compression": "80", "output_format": "jpeg"})))
        .unwrap();
        assert_eq!((o.stream, o.partial_images), (true, 3));
        let (o, extras) = parse(&fields(json!({"partial_images": 2}))).unwrap();
        assert_eq!(o.partial_images, 0, "partial images only stream");
        assert!(extras.get("partial_images").is_none());
        for (bad, param) in [
            (json!({"quality": "ultra"}), "quality"),
            (json!({"background": "pink"}), "background"),
            (json!({"moderation": "none"}), "moderation"),
            (json!({"output_format": "bmp"}), "output_format"),
            (
                json!({"output_compression": 101, "output_format": "jpeg"}),
                "output_compression",
            ),
            (json!({"output_compression": 50}), "output_compression"),
            (
                json!({"partial_images": 4, "stream": true}),
                "partial_images",
            ),
            (json!({"stream": "yes"}), "stream"),
            (
                json!({"background": "transparent", "output_format": "jpeg"}),
                "background",
            ),
        ] {
            let e = parse(&fields(bad.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}: {e:?}");
        }
    }

    #[tokio::test]
    async fn a_png_result_is_converted_to_the_requested_format() {
        let img =
            image::RgbImage::from_fn(32, 16, |x, y| image::Rgb([x as u8 * 8, y as u8 * 16, 90]));
        let mut png = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let png = Bytes::from(png.into_inner());
        let (o, _) = parse(&fields(
            json!({"output_format": "jpeg", "output_compression": 40}),
        ))
        .unwrap();
        let (out, mime) = o.convert(png.clone(), "image/png").await.unwrap();
        assert_eq!(mime, "image/jpeg");
        assert_eq!(image::guess_format(&out).unwrap(), image::ImageFormat::Jpeg);
        let (same, _) = ImageOptions::default()
            .convert(png.clone(), "image/png")
            .await
            .unwrap();
        assert_eq!(same, png, "no format asked: untouched");
        let (o, _) = parse(&fields(json!({"output_format": "png"}))).unwrap();
        let (out, _) = o.convert(png.clone(), "image/png").await.unwrap();
        assert_eq!(out, png, "already the requested format: untouched");
    }
}
