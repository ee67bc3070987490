//! The middleware in front of every route: bounded body reads and the access log.

use crate::{ApiError, AppState};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use spa_protocol::ErrorCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Log target of the access log: one info line per request with a body read, `METHOD ROUTE
/// STATUS body=<bytes>B <ms>ms`, session ids replaced by `{id}` (never keys, ids or content).
/// `spa serve` shows it with `RUST_LOG=spa_server::access=info`.
pub const ACCESS_LOG: &str = "spa_server::access";

/// Reads every request body up front, bounded in size (`max_frame_bytes`, 413) and in time
/// (`body_timeout`, 408), so a client trickling its body (slow loris) or sending an endless one
/// holds no handler, session lock or compute. Declared lengths over the limit are refused
/// before anything is read.
pub(crate) async fn body_guard(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = st.config.limits.max_frame_bytes;
    let too_large = || {
        st.metrics.limited.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Limit,
            format!("request body exceeds {limit} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(st.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            st.metrics.body_timeouts.fetch_add(1, Relaxed);
            // Under the crate's target, like the server's other lifecycle lines.
            log::info!(
                target: "spa_server",
                "request body not received within {:?}; closing",
                st.config.body_timeout
            );
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                "request body not received in time",
            )
            .into_response();
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
        Ok(Err(e)) => {
            // Over the limit (chunked bodies have no declared length) or a broken stream.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "request body could not be read",
                )
                .into_response()
            }
        }
        Ok(Ok(bytes)) => {
            let (method, route, len) = (
                parts.method.clone(),
                route_of(parts.uri.path()),
                bytes.len(),
            );
            let t0 = std::time::Instant::now();
            let r = next
                .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await;
            log::info!(
                target: ACCESS_LOG,
                "{method} {route} {} body={len}B {}ms",
                r.status().as_u16(),
                t0.elapsed().as_millis()
            );
            r
        }
    }
}

/// The route of `path` with session ids redacted (`/v1/sessions/{id}/step`); unknown paths are
/// reported as `other`, so nothing a client chose reaches the log.
pub(crate) fn route_of(path: &str) -> &'static str {
    let seg: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match seg.as_slice() {
        ["", "healthz"] => "/healthz",
        ["", "metrics"] => "/metrics",
        ["", "v1", "model"] => "/v1/model",
        ["", "v1", "features"] => "/v1/features",
        ["", "v1", "device-pack"] => "/v1/device-pack",
        ["", "v1", "sessions"] => "/v1/sessions",
        ["", "v1", "sessions", _] => "/v1/sessions/{id}",
        ["", "v1", "sessions", _, "step"] => "/v1/sessions/{id}/step",
        ["", "v1", "sessions", _, "layer"] => "/v1/sessions/{id}/layer",
        _ => "other",
    }
}
