//! HTTP rules that hold for every route: the `Host` check against DNS rebinding, the
//! cross-origin check of the no-auth mode, form content types refused where no form is
//! expected, and the JSON shape of every error, whoever produced it.

use std::net::{Ipv4Addr, Ipv6Addr};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// Content types a browser sends cross-site without a preflight.
const FORM_TYPES: &[&str] = &[
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
];

/// The rules in order: `Host`, then (without API keys) the origin of state-changing
/// requests, then form content types.
pub(crate) async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let cfg = state.config();
    let no_keys = state.inner.api_keys.is_empty();
    let path = req.uri().path();
    let method = req.method();
    // With keys, probes (which send the pod address as Host) still reach the health routes.
    let probe = !no_keys && matches!(path, "/healthz" | "/readyz");
    if (no_keys || !cfg.allowed_hosts.is_empty()) && !probe {
        // Browsers always send Host; a request without one is no rebinding attempt.
        if let Some(host) = request_host(&req)
            && !host_allowed(host, &cfg.allowed_hosts)
        {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "host_not_allowed",
                format!(
                    "Host {host:?} is not served here; use a loopback name or one listed in \
                     gateway.allowed_hosts"
                ),
            )
            .into_response();
        }
    }
    let reads = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if no_keys
        && (!reads || upgrade)
        && let Some(why) = cross_origin(req.headers(), request_authority(&req), &cfg.cors_origins)
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!(
                "cross-origin {method} refused ({why}): without API keys only same-origin \
                 pages and non-browser clients may change state"
            ),
        )
        .into_response();
    }
    if !reads
        && let Some(ct) = form_type(req.headers())
        && !(*method == Method::POST && matches!(path, "/v1/files" | "/v1/images/edits"))
    {
        return ApiError::unsupported_type(format!(
            "{method} {path} does not take {ct}; send JSON with Content-Type: application/json"
        ))
        .into_response();
    }
    next.run(req).await
}

/// The authority of the request (host and port): the URI's or the `Host` header.
fn request_authority(req: &Request) -> Option<&str> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(raw.rsplit('@').next().unwrap_or(raw))
}

/// The host name of the request, without the port.
fn request_host(req: &Request) -> Option<&str> {
    request_authority(req).map(strip_port)
}

fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Loopback names always; otherwise only names listed in `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || h.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(&h))
}

/// Why a request comes from another origin, if it does: `Sec-Fetch-Site` says so, or its
/// `Origin` is neither the request's own (`authority`: host and port) nor one allowed by
/// CORS.
fn cross_origin(headers: &HeaderMap, authority: Option<&str>, cors: &[String]) -> Option<String> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| cors.iter().any(|c| c.eq_ignore_ascii_case(o))) {
        return None;
    }
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    let origin = origin?;
    let own = origin
        .split_once("://")
        .zip(authority)
        .is_some_and(|((_, o), a)| o.eq_ignore_ascii_case(a));
    (!own).then(|| format!("Origin: {origin}"))
}

/// The content type, when it is one a cross-site form can send.
fn form_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    FORM_TYPES.contains(&essence.as_str()).then_some(essence)
}

/// Turns every error response that is not JSON (a rejection from an extractor or a layer)
/// into the JSON error shape: OpenAI's on the OpenAI routes, kiln's elsewhere.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let openai = path.starts_with("/v1/images/") || path.starts_with("/v1/models");
    let resp = next.run(req).await;
    if resp.status().as_u16() < 400 || is_json(resp.headers()) {
        return resp;
    }
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let code = code_for(status);
    let mut out = if openai {
        openai_error(status, code, message)
    } else {
        ApiError::new(status, code, message).into_response()
    };
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(feature = "openai")]
fn openai_error(status: StatusCode, code: &'static str, message: String) -> Response {
    crate::openai::OpenAiError::new(status, code, message).into_response()
}

#[cfg(not(feature = "openai"))]
fn openai_error(status: StatusCode, code: &'static str, message: String) -> Response {
    ApiError::new(status, code, message).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

/// The stable error code of a status.
pub(crate) fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "malformed_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        409 => "conflict",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "invalid_field",
        429 => "rate_limited",
        431 => "headers_too_large",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "request_failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_listed_hosts_only() {
        let allowed = vec!["kiln.example.com".to_owned()];
        for h in [
            "localhost",
            "LOCALHOST",
            "app.localhost",
            "127.0.0.1",
            "127.9.9.9",
            "::1",
        ] {
            assert!(host_allowed(h, &[]), "{h}");
        }
        for h in [
            "evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "localhost.evil",
        ] {
            assert!(!host_allowed(h, &allowed), "{h}");
        }
        assert!(host_allowed("Kiln.Example.com", &allowed));
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("localhost:8080"), "localhost");
        assert_eq!(strip_port("localhost"), "localhost");
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert_eq!(cross_origin(&h, Some("127.0.0.1:8080"), &[]), None);
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert_eq!(cross_origin(&h, Some("127.0.0.1:8080"), &[]), None);
        h.insert(header::ORIGIN, "http://127.0.0.1:3000".parse().unwrap());
        assert!(cross_origin(&h, Some("127.0.0.1:8080"), &[]).is_some());
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_origin(&h, Some("127.0.0.1:8080"), &[]).is_some());
        let cors = vec!["https://evil.example".to_owned()];
        assert_eq!(cross_origin(&h, Some("127.0.0.1:8080"), &cors), None);
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(cross_origin(&h, Some("127.0.0.1:8080"), &[]).is_some());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_origin(&h, Some("127.0.0.1:8080"), &[]).is_some());
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert_eq!(cross_origin(&h, Some("127.0.0.1:8080"), &[]), None);
    }
}
