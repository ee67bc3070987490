//! The compute of one step, independent of HTTP: truncate the session's KV cache to the
//! device's position, append its tokens, draft K tokens greedily, and package per-position
//! base states (projected taps, final hidden, draft token, top-k candidates).

use crate::base_engine::{EngineOutput, Sequence};
use spa_model::{argmax, top_k, BaseModel, DownProjection, KvCache, SpaError};
use spa_protocol::{
    position_state, sampling, HeadState, ProtocolError, StepRequest, StepResponse, TapBits,
};
use std::time::Instant;

/// Why a step could not run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The device claims more accepted positions than the server holds (e.g. after a restart
    /// or an eviction): the device must re-prefill.
    #[error("position {requested} is ahead of the session ({held} positions held)")]
    PositionAhead {
        /// Requested position.
        requested: u64,
        /// Positions held.
        held: usize,
    },
    /// Model error (bad token id, context overflow...).
    #[error(transparent)]
    Model(#[from] SpaError),
    /// A field of the request the handler's validation did not cover (e.g. `tap_bits`).
    #[error(transparent)]
    Request(#[from] ProtocolError),
}

/// A forward pass over a session's sequence (the batcher's, or the engine's own).
pub type ForwardFn<'a> =
    dyn Fn(&[u32], &mut Box<dyn Sequence>) -> spa_model::Result<EngineOutput> + 'a;

/// Runs one step on `cache` (see module docs). Deterministic: the same request on the same
/// prefix gives the same response, which makes steps idempotent by position.
pub fn run_step(
    base: &BaseModel,
    proj: &DownProjection,
    cache: &mut KvCache,
    req: &StepRequest,
    default_top_k: usize,
) -> Result<StepResponse, StepError> {
    let forward = |t: &[u32], c: &mut Box<dyn Sequence>| {
        let cache = c
            .as_kv_cache()
            .ok_or_else(|| SpaError::InvalidConfig("not a candle sequence".into()))?;
        Ok(EngineOutput {
            base: base.forward(t, cache)?,
            last_logits: None,
        })
    };
    let mut boxed: Box<dyn Sequence> = Box::new(std::mem::replace(cache, KvCache::new(0, 0)));
    let res = run_step_with(base, proj, &mut boxed, req, default_top_k, &forward);
    if let Some(c) = boxed.as_any_mut().downcast_mut::<KvCache>() {
        *cache = std::mem::replace(c, KvCache::new(0, 0));
    }
    res
}

/// [`run_step`] on any engine's sequence, with the forward pass supplied by the caller (the
/// server's batcher). `base` gives the tokenizer (id checks) and, when the engine did not
/// compute them, the last position's logits.
pub fn run_step_with(
    base: &BaseModel,
    proj: &DownProjection,
    cache: &mut Box<dyn Sequence>,
    req: &StepRequest,
    default_top_k: usize,
    forward: &ForwardFn<'_>,
) -> Result<StepResponse, StepError> {
    let t0 = Instant::now();
    let held = cache.len();
    if req.position as usize > held {
        return Err(StepError::PositionAhead {
            requested: req.position,
            held,
        });
    }
    base.tokenizer().check_ids(&req.tokens)?;
    let bits = TapBits::from_wire(req.tap_bits)?;
    let k = req.draft.max(1) as usize;
    let max = cache.max_len();
    let need = req.position as usize + req.tokens.len() + k - 1;
    if need > max {
        return Err(SpaError::ContextOverflow {
            requested: need,
            max,
        }
        .into());
    }
    let top = if req.top_k == 0 {
        default_top_k
    } else {
        (req.top_k as usize).min(256)
    };
    cache.truncate(req.position as usize);
    let width = proj.meta().width;
    let n_taps = proj.meta().taps.len();
    let mut states = Vec::with_capacity(req.tokens.len() + k - 1);
    let mut out = forward(&req.tokens, cache)?;
    let mut pos = req.position;
    for j in 0..k {
        let z = proj.apply_taps(&out.base.taps)?;
        let seq = z.len();
        for (i, zp) in z.iter().enumerate() {
            let flat: Vec<f32> = zp.iter().flatten().copied().collect();
            if i + 1 < seq {
                states.push(position_state(pos, &flat, n_taps, width, bits, None));
                pos += 1;
                continue;
            }
            let h = out
                .base
                .hidden
                .narrow(0, seq - 1, 1)
                .map_err(SpaError::from)?;
            let hv: Vec<f32> = h
                .flatten_all()
                .map_err(SpaError::from)?
                .to_vec1()
                .map_err(SpaError::from)?;
            let logits = out.take_last_logits(base)?;
            let ids = top_k(&logits, top);
            let lv: Vec<f32> = ids.iter().map(|&i| logits[i as usize]).collect();
            let draft = if req.temperature > 0.0 {
                // Sampled draft from q over the top-k, computed from the logits as sent (f16).
                let q =
                    sampling::distribution(&sampling::wire_round(&lv), req.temperature, req.top_p);
                ids[sampling::draw(&q, sampling::rng_for(req.seed, pos, 0).uniform())]
            } else {
                argmax(&logits).unwrap_or(0) as u32
            };
            let head = HeadState {
                hidden: &hv,
                topk_ids: &ids,
                topk_logits: &lv,
                draft_token: draft,
            };
            states.push(position_state(pos, &flat, n_taps, width, bits, Some(head)));
            pos += 1;
            if j + 1 < k {
                out = forward(&[draft], cache)?;
            }
        }
    }
    Ok(StepResponse {
        states,
        compute_us: t0.elapsed().as_micros() as u64,
        cache_len: cache.len() as u64,
    })
}
