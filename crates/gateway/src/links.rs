//! The links the API returns (`Location` headers, file URLs in task outputs, file objects
//! and OpenAI `data[].url`): `public_base_url`, then the prefix the router is mounted under
//! in a host app (`Router::nest("/kiln", …)`, found by comparing the request's original URI
//! with the path the router sees), then the route.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;

use crate::AppState;

/// Builds the URLs of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Links {
    /// Everything before `/v1/…`, without a trailing `/` (empty: relative links at the
    /// root).
    base: String,
}

impl Links {
    /// Links under `public_base` (scheme, host and any path a proxy adds) and `prefix`
    /// (the nest prefix).
    pub(crate) fn new(public_base: Option<&str>, prefix: &str) -> Self {
        let public = public_base.unwrap_or("").trim_end_matches('/');
        let prefix = prefix.trim_end_matches('/');
        Self {
            base: format!("{public}{prefix}"),
        }
    }

    /// The task `id`.
    pub(crate) fn task(&self, id: &str) -> String {
        format!("{}/v1/tasks/{id}", self.base)
    }

    /// The file `id`.
    pub(crate) fn file(&self, id: &str) -> String {
        format!("{}/v1/files/{id}", self.base)
    }
}

/// The prefix a host router stripped before this router saw the request: the original
/// path minus the path seen here (empty when not nested).
fn nest_prefix(parts: &Parts) -> &str {
    let seen = parts.uri.path();
    parts
        .extensions
        .get::<OriginalUri>()
        .and_then(|o| o.0.path().strip_suffix(seen))
        .filter(|p| p.starts_with('/'))
        .unwrap_or("")
}

impl FromRequestParts<AppState> for Links {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let base = state.config().public_base_url.as_deref();
        Ok(Self::new(base, nest_prefix(parts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(original: &str, seen: &str) -> Parts {
        let mut req = axum::http::Request::builder()
            .uri(seen)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        req.extensions
            .insert(OriginalUri(original.parse().unwrap()));
        req
    }

    #[test]
    fn prefix_is_what_the_host_stripped() {
        assert_eq!(nest_prefix(&parts("/v1/tasks", "/v1/tasks")), "");
        assert_eq!(nest_prefix(&parts("/kiln/v1/tasks", "/v1/tasks")), "/kiln");
        assert_eq!(
            nest_prefix(&parts("/a/b/v1/files/x?y=1", "/v1/files/x")),
            "/a/b"
        );
        // Not a suffix (a host that rewrote the path): no prefix rather than a wrong one.
        assert_eq!(nest_prefix(&parts("/other", "/v1/tasks")), "");
    }

    #[test]
    fn base_then_prefix_then_route() {
        assert_eq!(Links::new(None, "").task("t1"), "/v1/tasks/t1");
        assert_eq!(Links::new(None, "/kiln").file("f1"), "/kiln/v1/files/f1");
        assert_eq!(
            Links::new(Some("https://x.example/api/"), "/kiln").task("t1"),
            "https://x.example/api/kiln/v1/tasks/t1"
        );
        assert_eq!(
            Links::new(Some("https://x.example"), "").file("f1"),
            "https://x.example/v1/files/f1"
        );
    }
}
