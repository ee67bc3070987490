//! `GET /healthz`, `GET /metrics` and `GET /v1/model` (the manifest).

use super::{auth, proto};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use spa_protocol::FrameKind;
use std::sync::Arc;

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn metrics_h(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let (n, bytes, ended) = {
        let s = st.sessions();
        (s.len(), s.total_bytes(), s.ended)
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(n, bytes, &ended),
    )
}

pub(crate) async fn model_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth(&st, &headers)?;
    Ok(proto(FrameKind::Manifest, st.manifest(), &st))
}
