//! The local reference: plain token-by-token SPA decoding with the same side network, wire
//! quantization and decision rule as the speculative runtime, over the base in-process
//! ([`generate_local`]) or any engine's forward pass ([`generate_local_on`]). Used to check that
//! speculative rounds (any K) produce exactly the same tokens.

use crate::device::DeviceModel;
use crate::error::Result;
use spa_model::{argmax, top_k, BaseModel, BaseOutput, DownProjection};
use spa_protocol::{position_state, HeadState, Limits, TapBits};

/// Greedy SPA decoding, one token per step, no network, with the taps a runtime with default
/// [`RuntimeParams`](crate::RuntimeParams) receives. Returns the generated ids.
pub fn generate_local(
    base: &BaseModel,
    proj: &DownProjection,
    device: &DeviceModel,
    prompt: &[u32],
    max_tokens: usize,
    top: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    generate_local_with(
        base,
        proj,
        device,
        prompt,
        max_tokens,
        top,
        stop,
        crate::RuntimeParams::default().tap_bits,
    )
}

/// [`generate_local`] with the taps encoded with `bits`, as a runtime asking the server for
/// them (`RuntimeParams::tap_bits`) receives them.
#[allow(clippy::too_many_arguments)]
pub fn generate_local_with(
    base: &BaseModel,
    proj: &DownProjection,
    device: &DeviceModel,
    prompt: &[u32],
    max_tokens: usize,
    top: usize,
    stop: &[u32],
    bits: TapBits,
) -> Result<Vec<u32>> {
    let mut cache = base.new_cache();
    let forward = |tokens: &[u32]| -> spa_model::Result<(BaseOutput, Vec<f32>)> {
        let o = base.forward(tokens, &mut cache)?;
        let rows = o.hidden.dim(0)?;
        let logits = base.last_logits(&o.hidden.narrow(0, rows - 1, 1)?)?;
        Ok((o, logits))
    };
    generate_local_on(forward, proj, device, prompt, max_tokens, top, stop, bits)
}

/// The same greedy SPA decoding over any base forward pass: `forward(tokens)` advances one
/// sequence of the base by `tokens` and returns the base's output for them (every layer's
/// residual stream, the final normed states) and the logits of the last of them. A server that
/// runs another engine (llama.cpp, with its own numerics) gives the tokens of local decoding on
/// that engine when its forward pass is passed here.
#[allow(clippy::too_many_arguments)]
pub fn generate_local_on<F>(
    mut forward: F,
    proj: &DownProjection,
    device: &DeviceModel,
    prompt: &[u32],
    max_tokens: usize,
    top: usize,
    stop: &[u32],
    bits: TapBits,
) -> Result<Vec<u32>>
where
    F: FnMut(&[u32]) -> spa_model::Result<(BaseOutput, Vec<f32>)>,
{
    let limits = Limits::default();
    let mut side_cache = device.side.new_cache();
    let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
    let mut out = Vec::new();
    let mut feed: Vec<u32> = prompt.to_vec();
    let mut pos0 = 0usize;
    while out.len() < max_tokens {
        let (o, logits) = forward(&feed)?;
        let z = proj.apply_taps(&o.taps)?;
        let mut decision = None;
        for (i, zp) in z.iter().enumerate() {
            let flat: Vec<f32> = zp.iter().flatten().copied().collect();
            let pos = (pos0 + i) as u64;
            let s = if i + 1 == z.len() {
                let h = o
                    .hidden
                    .narrow(0, i, 1)
                    .map_err(spa_model::SpaError::from)?;
                let hv: Vec<f32> = h
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(spa_model::SpaError::from)?;
                let ids = top_k(&logits, top);
                let lv: Vec<f32> = ids.iter().map(|&t| logits[t as usize]).collect();
                let head = HeadState {
                    hidden: &hv,
                    topk_ids: &ids,
                    topk_logits: &lv,
                    draft_token: argmax(&logits).unwrap_or(0) as u32,
                };
                position_state(pos, &flat, n_taps, width, bits, Some(head))
            } else {
                position_state(pos, &flat, n_taps, width, bits, None)
            };
            decision = device.process(&s, &mut side_cache, &limits)?;
        }
        pos0 += feed.len();
        let Some(d) = decision else { break };
        if stop.contains(&d.token) {
            break;
        }
        out.push(d.token);
        feed = vec![d.token];
    }
    Ok(out)
}
