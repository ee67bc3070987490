//! POST /v1/features: base features of a token sequence for on-device personalization.
//!
//! Stateless: one base pass over the tokens (no session, nothing kept, nothing logged but
//! counts), the shared projection applied to every tapped layer, and the base's top-k
//! candidates per position. The device trains its side network on these; weights, gradients
//! and losses never come back.

use crate::{auth, bad_frame, proto, ApiError, AppState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use spa_model::shortlist_with_target;
use spa_protocol::{
    decode_frame, encode_i8_rows, ErrorCode, FeaturesRequest, FeaturesResponse, FrameKind,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Most tokens in one features request.
pub const MAX_FEATURE_TOKENS: usize = 512;
/// Most candidates per position.
pub const MAX_FEATURE_TOP_K: usize = 64;

pub(crate) async fn features_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let req: FeaturesRequest =
        decode_frame(&body, FrameKind::FeaturesRequest, &st.config.limits).map_err(bad_frame)?;
    let n = req.tokens.len();
    let k = req.top_k as usize;
    if !(2..=MAX_FEATURE_TOKENS).contains(&n) || !(1..=MAX_FEATURE_TOP_K).contains(&k) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Limit,
            format!("features: 2..={MAX_FEATURE_TOKENS} tokens and top_k 1..={MAX_FEATURE_TOP_K}"),
        ));
    }
    let st2 = st.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<FeaturesResponse, ApiError> {
        let t0 = Instant::now();
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, m);
        let base = &st2.base;
        base.tokenizer()
            .check_ids(&req.tokens)
            .map_err(|e| bad(e.to_string()))?;
        let mut cache = base.new_cache();
        let out = base
            .forward(&req.tokens, &mut cache)
            .map_err(|e| bad(e.to_string()))?;
        let z = st2
            .proj
            .apply_taps(&out.taps)
            .map_err(|e| bad(e.to_string()))?;
        let (n_taps, width) = (st2.proj.meta().taps.len(), st2.proj.meta().width);
        let flat: Vec<f32> = z.iter().flatten().flatten().copied().collect();
        let hid = out
            .hidden
            .narrow(0, 0, n - 1)
            .map_err(|e| bad(e.to_string()))?;
        let logits: Vec<Vec<f32>> = base
            .logits(&hid)
            .and_then(|l| Ok(l.to_vec2()?))
            .map_err(|e| bad(e.to_string()))?;
        let mut resp = FeaturesResponse {
            taps: Some(encode_i8_rows(&flat, n * n_taps, width)),
            ..Default::default()
        };
        for (j, row) in logits.iter().enumerate() {
            let y = req.tokens[j + 1];
            let (ids, vals, t) = shortlist_with_target(row, y, k, -1.0e4);
            resp.cand_ids.extend(ids);
            resp.cand_logits.extend(vals);
            resp.target_idx.push(t);
        }
        resp.compute_us = t0.elapsed().as_micros() as u64;
        Ok(resp)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })??;
    Ok(proto(FrameKind::FeaturesResponse, &res, &st))
}
