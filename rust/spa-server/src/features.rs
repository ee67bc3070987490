//! POST /v1/features: base features of a token sequence for on-device personalization.
//!
//! Stateless: one base pass over the tokens (no session, nothing kept, nothing logged but
//! counts), the shared projection applied to every tapped layer (from `taps_from` on), the
//! base's top-k candidates per position (none for `top_k` 0) and the final normed hidden state
//! at the requested positions (the device's LM head scores the whole vocabulary from it). The device trains its side network on these; weights, gradients
//! and losses never come back.

use crate::errors::{bad_frame, blocking};
use crate::handlers::{auth, proto};
use crate::{ApiError, AppState};
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
/// Most continuations per hidden position.
pub const MAX_CONTINUATIONS: usize = 16;
/// Most continuation tokens (hidden positions x continuations) in one request: each is one
/// token of base compute.
pub const MAX_CONTINUATION_TOKENS: usize = 2048;

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
    // Candidate lists need a next token; hidden states alone do not.
    let min_tokens = if k == 0 { 1 } else { 2 };
    if !(min_tokens..=MAX_FEATURE_TOKENS).contains(&n)
        || k > MAX_FEATURE_TOP_K
        || req.hidden_positions.len() > MAX_FEATURE_TOKENS
        || req.continuations as usize > MAX_CONTINUATIONS
        || req.continuation_positions.len() * req.continuations as usize > MAX_CONTINUATION_TOKENS
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Limit,
            format!(
                "features: 1..={MAX_FEATURE_TOKENS} tokens (2 with candidates), top_k 0..={MAX_FEATURE_TOP_K}, at most {MAX_FEATURE_TOKENS} hidden positions, continuations 0..={MAX_CONTINUATIONS} and at most {MAX_CONTINUATION_TOKENS} continuation tokens"
            ),
        ));
    }
    if req.taps_from as usize >= n
        || req
            .hidden_positions
            .iter()
            .chain(&req.continuation_positions)
            .any(|&p| p as usize >= n)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "features: taps_from, hidden and continuation positions must be below the token count"
                .to_string(),
        ));
    }
    let st2 = st.clone();
    let res = blocking(move || -> Result<FeaturesResponse, ApiError> {
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
        let from = req.taps_from as usize;
        let z = st2
            .proj
            .apply_taps(&out.taps)
            .map_err(|e| bad(e.to_string()))?;
        let (n_taps, width) = (st2.proj.meta().taps.len(), st2.proj.meta().width);
        let flat: Vec<f32> = z[from..].iter().flatten().flatten().copied().collect();
        let mut resp = FeaturesResponse {
            taps: Some(encode_i8_rows(&flat, (n - from) * n_taps, width)),
            ..Default::default()
        };
        let c = req.continuations as usize;
        if !req.hidden_positions.is_empty() || (c > 0 && !req.continuation_positions.is_empty()) {
            let all: Vec<Vec<f32>> = out.hidden.to_vec2().map_err(|e| bad(e.to_string()))?;
            let d = all.first().map_or(0, Vec::len);
            if !req.hidden_positions.is_empty() {
                // The LM head's input at the requested positions, int8 per row like the step
                // answers' draft states: the device scores the whole vocabulary with its head.
                let rows: Vec<f32> = req
                    .hidden_positions
                    .iter()
                    .flat_map(|&p| all[p as usize].iter().copied())
                    .collect();
                resp.hidden = Some(encode_i8_rows(&rows, req.hidden_positions.len(), d));
            }
            if c > 0 && !req.continuation_positions.is_empty() {
                let (ids, states) = base
                    .word_continuations(&cache, &all, &req.continuation_positions, c)
                    .map_err(|e| bad(e.to_string()))?;
                resp.cont_hidden = Some(encode_i8_rows(&states, ids.len(), d));
                resp.cont_ids = ids;
            }
        }
        if k > 0 {
            let hid = out
                .hidden
                .narrow(0, 0, n - 1)
                .map_err(|e| bad(e.to_string()))?;
            let logits: Vec<Vec<f32>> = base
                .logits(&hid)
                .and_then(|l| Ok(l.to_vec2()?))
                .map_err(|e| bad(e.to_string()))?;
            for (j, row) in logits.iter().enumerate() {
                let y = req.tokens[j + 1];
                let (ids, vals, t) = shortlist_with_target(row, y, k, -1.0e4);
                resp.cand_ids.extend(ids);
                resp.cand_logits.extend(vals);
                resp.target_idx.push(t);
            }
        }
        resp.compute_us = t0.elapsed().as_micros() as u64;
        Ok(resp)
    })
    .await??;
    Ok(proto(FrameKind::FeaturesResponse, &res, &st))
}
