//! The operator console (feature `ui`): plain HTML, CSS and ES modules from the top-level
//! `ui/` folder, embedded at compile time and served under `/ui/`. The page and its assets
//! need no key (they hold no data); everything they show comes from the API with the key
//! the operator types in. Assets are revalidated on each load (`Cache-Control: no-cache`
//! with a content ETag), so an upgraded binary never serves a stale script.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

macro_rules! asset {
    ($path:literal, $ty:expr) => {
        (
            $path,
            $ty,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../ui/", $path)) as &[u8],
        )
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console: path under `/ui/`, content type, content.
static ASSETS: &[(&str, &str, &[u8])] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/sse.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/chart.js", JS),
    asset!("js/overview.js", JS),
    asset!("js/tasks.js", JS),
    asset!("js/task.js", JS),
];

/// Only this origin's scripts, styles and API; images and videos also from `blob:` URLs
/// (files are fetched with the key and shown from memory).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|(_, _, body)| format!("\"{}\"", &hex::encode(Sha256::digest(body))[..20]))
            .collect()
    })
}

/// `/ui` (redirects to `/ui/`), `/ui/`, `/ui/config.json` and `/ui/{asset}`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(redirect))
        .route("/ui/config.json", get(config))
        .route(
            "/ui/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(p): Path<String>, h: HeaderMap| async move { serve(&p, &h) }),
        )
}

async fn redirect() -> Response {
    // Relative, so the console works under a path prefix too.
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "ui/")]).into_response()
}

/// What the page needs before it asks for a key: whether one is needed.
async fn config(State(state): State<AppState>) -> Response {
    let auth = !state.inner.api_keys.is_empty();
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({ "auth": auth })),
    )
        .into_response()
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|(p, _, _)| *p == path) else {
        return ApiError::not_found(format!("no console file {path:?}")).into_response();
    };
    let (_, ty, body) = ASSETS[i];
    let tag = &etags()[i];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, ty)], body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_stays_small_and_complete() {
        let total: usize = ASSETS.iter().map(|(_, _, b)| b.len()).sum();
        assert!(total < 300 * 1024, "console is {total} bytes");
        let index = std::str::from_utf8(ASSETS[0].2).unwrap();
        for (p, _, body) in ASSETS {
            // XML namespaces are names, not fetches.
            let text = String::from_utf8_lossy(body).replace("http://www.w3.org/2000/svg", "");
            // Nothing fetched from elsewhere.
            assert!(!text.contains("https://"), "{p} names an external URL");
            assert!(!text.contains("http://"), "{p} names an external URL");
        }
        assert!(index.contains("js/app.js"));
    }

    #[test]
    fn every_imported_module_is_served() {
        for (p, _, body) in ASSETS.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            let text = std::str::from_utf8(body).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let name = line
                    .rsplit_once("'./")
                    .map(|(_, r)| r.trim_end_matches("';"));
                let Some(name) = name else { continue };
                let full = format!("js/{name}");
                assert!(
                    ASSETS.iter().any(|(q, _, _)| *q == full),
                    "{p} imports {full}, which is not embedded"
                );
            }
        }
    }
}
