//! The HTTP handlers, one file per endpoint group, and what every handler opens with: the API
//! key check ([`auth`]) and the protobuf answer ([`proto`]). `POST /v1/features` and
//! `GET /v1/device-pack` live in [`crate::features`] and [`crate::device_pack`].

pub(crate) mod layer;
pub(crate) mod model;
pub(crate) mod sessions;
pub(crate) mod step;

use crate::{ApiError, AppState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use spa_protocol::{encode_frame, ErrorCode, FrameKind};
use std::sync::atomic::Ordering::Relaxed;

/// A protobuf answer: `msg` framed as `kind`, its bytes counted in `bytes_out`.
pub(crate) fn proto(kind: FrameKind, msg: &impl prost::Message, st: &AppState) -> Response {
    let body = encode_frame(kind, msg);
    st.metrics.bytes_out.fetch_add(body.len() as u64, Relaxed);
    ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

/// The owner (key index) of the request's API key, or 401 (counted in `unauthorized`).
pub(crate) fn auth(st: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    let h = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    st.config.keys.check(h).ok_or_else(|| {
        st.metrics.unauthorized.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or invalid API key",
        )
    })
}
