//! Parameters are never silently ignored: a query parameter, form field or JSON field that a
//! route does not take is `400 unknown_parameter`, naming it and listing the ones it takes.
//!
//! Query parameters are checked for every route by one layer ([`layer`]) against the
//! OpenAPI document, so a route's documented parameters are exactly the ones it accepts (a
//! route outside the document takes none). Form and JSON fields are checked by the handlers
//! that read them, with [`check_fields`] and the field lists below. Without the `openapi`
//! feature there is no document, and the query check is off (form and JSON fields are still
//! checked).
#![cfg_attr(
    not(all(feature = "openapi", feature = "openai")),
    allow(dead_code, unused_imports)
)]

#[cfg(feature = "openapi")]
use std::collections::HashMap;
#[cfg(feature = "openapi")]
use std::sync::OnceLock;

#[cfg(feature = "openapi")]
use axum::extract::{MatchedPath, Query, Request};
#[cfg(feature = "openapi")]
use axum::http::Method;
use axum::http::StatusCode;
#[cfg(feature = "openapi")]
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
#[cfg(feature = "openai")]
use crate::openai::OpenAiError;

/// The request fields of `POST /v1/images/generations`: OpenAI's documented ones.
pub(crate) const GENERATION_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "response_format",
    "style",
    "user",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "partial_images",
    "stream",
];

/// The request fields of `POST /v1/images/edits` besides the images and the mask: OpenAI's
/// documented ones (multipart and JSON).
pub(crate) const EDIT_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "response_format",
    "user",
    "background",
    "moderation",
    "input_fidelity",
    "output_format",
    "output_compression",
    "partial_images",
    "stream",
];

/// Where a parameter was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// In the query string.
    Query,
    /// As a multipart form field.
    Form,
    /// As a field of a JSON or multipart body (the OpenAI routes).
    Body,
}

impl Place {
    fn as_str(self) -> &'static str {
        match self {
            Self::Query => "query parameter",
            Self::Form => "form field",
            Self::Body => "field",
        }
    }
}

/// A parameter the route does not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unknown {
    /// Its name, as sent.
    pub(crate) name: String,
    /// Where it was sent.
    pub(crate) place: Place,
    /// The names the route takes there.
    pub(crate) known: Vec<String>,
}

impl Unknown {
    fn message(&self) -> String {
        let mut name: String = self.name.chars().take(100).collect();
        if name.len() < self.name.len() {
            name.push('…');
        }
        let known = if self.known.is_empty() {
            "none".to_owned()
        } else {
            self.known.join(", ")
        };
        format!(
            "unknown {} {name:?}; this route takes: {known}",
            self.place.as_str()
        )
    }
}

impl From<Unknown> for ApiError {
    fn from(u: Unknown) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "unknown_parameter", u.message())
    }
}

#[cfg(feature = "openai")]
impl From<Unknown> for OpenAiError {
    fn from(u: Unknown) -> Self {
        OpenAiError {
            param: Some(u.name.clone().into()),
            ..OpenAiError::new(StatusCode::BAD_REQUEST, "unknown_parameter", u.message())
        }
    }
}

/// The first of `names` that is not in `known`.
pub(crate) fn check_fields<'a>(
    names: impl IntoIterator<Item = &'a str>,
    known: &[&str],
    place: Place,
) -> Result<(), Unknown> {
    match names.into_iter().find(|n| !known.contains(n)) {
        None => Ok(()),
        Some(name) => Err(Unknown {
            name: name.to_owned(),
            place,
            known: known.iter().map(|k| (*k).to_owned()).collect(),
        }),
    }
}

#[cfg(feature = "openapi")]
type Table = HashMap<(String, String), Vec<String>>;

/// Query parameters per (method, path template), from the OpenAPI document.
#[cfg(feature = "openapi")]
fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap_or_default();
        let mut table = Table::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let names = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                table.insert((method.to_ascii_uppercase(), path.clone()), names);
            }
        }
        table
    })
}

/// The query parameters `method path` takes (`path` is the route's template, e.g.
/// `/v1/tasks/{id}`); a route outside the OpenAPI document takes none.
#[cfg(feature = "openapi")]
pub(crate) fn query_names(method: &Method, path: &str) -> &'static [String] {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    table()
        .get(&(method.to_owned(), path.to_owned()))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Refuses a request whose query names a parameter its route does not take (in OpenAI's
/// error shape on the OpenAI routes). Requests that matched no route, CORS preflights and
/// queries that do not parse (left to the route's own extractor) pass.
#[cfg(feature = "openapi")]
pub(crate) async fn layer(req: Request, next: Next) -> Response {
    if let (Some(path), Some(_)) = (req.extensions().get::<MatchedPath>(), req.uri().query())
        && req.method() != Method::OPTIONS
        && let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
    {
        let known = query_names(req.method(), path.as_str());
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        if let Err(u) = check_fields(pairs.iter().map(|(k, _)| k.as_str()), &known, Place::Query) {
            let openai =
                path.as_str().starts_with("/v1/images/") || path.as_str().starts_with("/v1/models");
            return if openai {
                OpenAiError::from(u).into_response()
            } else {
                ApiError::from(u).into_response()
            };
        }
    }
    next.run(req).await
}

#[cfg(all(test, feature = "openapi"))]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_the_documented_query_parameters() {
        let names = query_names(&Method::GET, "/v1/tasks");
        for want in ["status", "limit", "cursor", "created_after"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert_eq!(
            query_names(&Method::POST, "/v1/files"),
            ["max_bytes", "max_dim"]
        );
        assert_eq!(
            query_names(&Method::HEAD, "/v1/tasks/{id}/events"),
            query_names(&Method::GET, "/v1/tasks/{id}/events")
        );
        assert!(query_names(&Method::POST, "/v1/tasks").is_empty());
        assert!(query_names(&Method::POST, "/v1/images/generations").is_empty());
    }

    #[test]
    fn an_unknown_field_is_named_with_the_known_ones() {
        assert_eq!(
            check_fields(["prompt", "n"], GENERATION_FIELDS, Place::Body),
            Ok(())
        );
        let u = check_fields(["prompt", "seed"], GENERATION_FIELDS, Place::Body).unwrap_err();
        assert_eq!(u.name, "seed");
        let e = ApiError::from(u.clone());
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("unknown field \"seed\""),
            "{}",
            e.message
        );
        assert!(e.message.contains("prompt, model"), "{}", e.message);
        let o = OpenAiError::from(u);
        assert_eq!(o.param.as_deref(), Some("seed"));
        let long = "x".repeat(10_000);
        let e = ApiError::from(check_fields([long.as_str()], &[], Place::Query).unwrap_err());
        assert!(e.message.len() < 300, "{}", e.message.len());
        assert!(e.message.ends_with("takes: none"), "{}", e.message);
    }
}
