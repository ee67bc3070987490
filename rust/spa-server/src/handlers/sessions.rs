//! `POST /v1/sessions`, `DELETE /v1/sessions/{id}`, and the session lookup of the per-session
//! endpoints.

use super::{auth, proto};
use crate::errors::bad_frame;
use crate::{ApiError, AppState, Lookup, Sequence, Session};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use spa_protocol::{
    decode_frame, CreateSessionRequest, CreateSessionResponse, ErrorCode, FrameKind, Mode,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// Session `id` of `owner`: 410 when it ended (expired, reclaimed or evicted), 404 when unknown
/// or another key's.
pub(crate) fn session(
    st: &AppState,
    id: &str,
    owner: usize,
) -> Result<Arc<Mutex<Session>>, ApiError> {
    match st.sessions().get(id, owner) {
        Lookup::Found(s) => Ok(s),
        Lookup::Gone => Err(ApiError::new(
            StatusCode::GONE,
            ErrorCode::SessionGone,
            "session was evicted; create a new one and re-prefill",
        )),
        Lookup::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such session",
        )),
    }
}

pub(crate) async fn create_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let req: CreateSessionRequest =
        decode_frame(&body, FrameKind::CreateSessionRequest, &st.config.limits)
            .map_err(bad_frame)?;
    let mut s = st.sessions();
    s.expire_idle();
    // At the key's cap its least-recently-used idle session makes room (its device gets 410
    // and re-prefills). Only when every session of the key is in a step is this overload.
    if !s.make_room(owner, st.config.max_sessions_per_key) {
        drop(s);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Limit,
            "every session of this key is busy; retry later",
        );
        e.frame.retry_after_ms = 1000;
        st.metrics.limited.fetch_add(1, Relaxed);
        return Err(e);
    }
    // The layer-split baseline runs layer by layer on the candle engine; every other mode
    // runs on the server's engine.
    let cache: Box<dyn Sequence> = if req.mode == Mode::LayerSplit as i32 {
        Box::new(st.base.new_cache())
    } else {
        match st.engine.new_sequence() {
            Ok(c) => c,
            Err(e) => {
                drop(s);
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Limit,
                    format!("the base engine cannot take another session: {e}"),
                );
                e.frame.retry_after_ms = 1000;
                st.metrics.limited.fetch_add(1, Relaxed);
                return Err(e);
            }
        }
    };
    let id = s.create(
        owner,
        Session {
            cache,
            mode: req.mode,
            layer_state: None,
        },
    );
    drop(s);
    Ok(proto(
        FrameKind::CreateSessionResponse,
        &CreateSessionResponse { session_id: id },
        &st,
    ))
}

pub(crate) async fn delete_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let owner = auth(&st, &headers)?;
    if st.sessions().delete(&id, owner) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such session",
        ))
    }
}
