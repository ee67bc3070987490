//! `POST /v1/sessions/{id}/step`: the speculative draft step (see [`crate::engine`]).

use super::sessions::session;
use super::{auth, proto};
use crate::errors::{bad_frame, blocking};
use crate::{run_step_with, ApiError, AppState, Sequence};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use spa_protocol::{decode_frame, FrameKind, StepRequest};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

pub(crate) async fn step_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let counted = |e| {
        let e = bad_frame(e);
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            st.metrics.limited.fetch_add(1, Relaxed);
        }
        e
    };
    let req: StepRequest =
        decode_frame(&body, FrameKind::StepRequest, &st.config.limits).map_err(counted)?;
    req.validate(&st.config.limits).map_err(counted)?;
    let sess = session(&st, &id, owner)?;
    let st2 = st.clone();
    let t0 = Instant::now();
    let (res, bytes) = blocking(move || {
        let mut s = sess.lock().unwrap_or_else(|p| p.into_inner());
        // Forward passes go through the batching engine, so concurrent sessions share them.
        let lane = if st2.config.batch_lane_per_key {
            owner
        } else {
            0
        };
        let fwd = |t: &[u32], c: &mut Box<dyn Sequence>| st2.batcher.forward(lane, t, c);
        let r = run_step_with(
            &st2.base,
            &st2.proj,
            &mut s.cache,
            &req,
            st2.config.top_k,
            &fwd,
        )
        .map(|r| (r, req.tokens.len()));
        (r, s.cache.capacity_bytes())
    })
    .await?;
    {
        let mut s = st.sessions();
        s.set_bytes(&id, bytes);
        s.evict_to(st.config.kv_budget_bytes, &id);
    }
    st.metrics.observe_step(t0.elapsed().as_micros() as u64);
    let (resp, n_in) = res.map_err(ApiError::from_step)?;
    st.metrics.rounds.fetch_add(1, Relaxed);
    st.metrics.tokens_in.fetch_add(n_in as u64, Relaxed);
    st.metrics.drafts_out.fetch_add(
        resp.states.iter().filter(|s| s.is_draft).count() as u64,
        Relaxed,
    );
    Ok(proto(FrameKind::StepResponse, &resp, &st))
}
