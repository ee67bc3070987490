//! `POST /v1/sessions/{id}/layer`: the layer-split baseline, one round trip per layer.

use super::sessions::session;
use super::{auth, proto};
use crate::errors::{bad_frame, blocking};
use crate::{ApiError, AppState};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use spa_model::argmax;
use spa_protocol::{
    decode_frame, decode_tensor, encode_f16, ErrorCode, FrameKind, LayerRequest, LayerResponse,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Layer-split baseline: the device applies a personal adapter after every layer, so each layer
/// of each token is one round trip. `layer == 0` starts token `token` at `position`.
pub(crate) async fn layer_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let req: LayerRequest =
        decode_frame(&body, FrameKind::LayerRequest, &st.config.limits).map_err(bad_frame)?;
    let sess = session(&st, &id, owner)?;
    let st2 = st.clone();
    let res = blocking(move || -> Result<LayerResponse, ApiError> {
        let t0 = Instant::now();
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, m);
        let mut s = sess.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *s;
        let cache = s.cache.as_kv_cache().ok_or_else(|| {
            bad("layer requests need a layer-split session (mode LAYER_SPLIT)".into())
        })?;
        let base = &st2.base;
        let n_layers = base.config().n_layers as u32;
        let hidden = base.config().hidden;
        let pos = req.position as usize;
        let mut x: Vec<f32> = if req.layer == 0 {
            if pos > cache.len() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::PositionAhead,
                    "position ahead; re-prefill",
                ));
            }
            cache.truncate(pos);
            let e = base.embed(&[req.token]).map_err(|e| bad(e.to_string()))?;
            e.flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| bad(e.to_string()))?
        } else {
            match s.layer_state.take() {
                Some((p, l, x)) if p == req.position && l == req.layer => x,
                _ => return Err(bad("layer request out of order".into())),
            }
        };
        if let Some(d) = &req.delta {
            let d = decode_tensor(d, &st2.config.limits).map_err(|e| bad(e.to_string()))?;
            if d.data.len() != hidden {
                return Err(bad(format!(
                    "delta has {} values, expected {hidden}",
                    d.data.len()
                )));
            }
            x.iter_mut().zip(&d.data).for_each(|(a, b)| *a += b);
        }
        let t = candle_tensor(&x, hidden).map_err(|e| bad(e.to_string()))?;
        if req.layer >= n_layers {
            let h = base.final_norm(&t).map_err(|e| bad(e.to_string()))?;
            let logits = base.last_logits(&h).map_err(|e| bad(e.to_string()))?;
            return Ok(LayerResponse {
                activation: None,
                layer: req.layer,
                done: true,
                next_token: argmax(&logits).unwrap_or(0) as u32,
                compute_us: t0.elapsed().as_micros() as u64,
            });
        }
        let y = base
            .layer_forward(req.layer as usize, &t, pos, cache)
            .map_err(|e| bad(e.to_string()))?;
        let yv: Vec<f32> = y
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| bad(e.to_string()))?;
        let act = encode_f16(&yv, 1, hidden);
        s.layer_state = Some((req.position, req.layer + 1, yv));
        Ok(LayerResponse {
            activation: Some(act),
            layer: req.layer,
            done: false,
            next_token: 0,
            compute_us: t0.elapsed().as_micros() as u64,
        })
    })
    .await??;
    st.metrics.layer_rounds.fetch_add(1, Relaxed);
    Ok(proto(FrameKind::LayerResponse, &res, &st))
}

fn candle_tensor(x: &[f32], hidden: usize) -> spa_model::Result<spa_model::CandleTensor> {
    Ok(spa_model::CandleTensor::from_vec(
        x.to_vec(),
        (1, hidden),
        &spa_model::CandleDevice::Cpu,
    )?)
}
