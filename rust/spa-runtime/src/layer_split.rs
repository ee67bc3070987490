//! The layer-split baseline (the paper's LoRA-split / Adapter-split): personal adapter weights
//! stay on the device, so after every base layer the activation crosses the network, the device
//! adds its adapter output, and the server continues with the next layer. One round trip per
//! layer per token, plus one for the head (LoRA-split: M = L + 1; Adapter-split would need two
//! per layer). Measured over the same server and link as SPA.

use crate::client::Client;
use crate::error::{Result, RuntimeError};
use crate::session::GenerationStats;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spa_protocol::{decode_tensor, encode_f16, LayerRequest, Limits, Mode, StepRequest};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A LoRA-style adapter per layer: `delta = B (A x)`, rank `r`, held on the device.
#[derive(Debug, Clone)]
pub struct LoraAdapters {
    a: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
    rank: usize,
    hidden: usize,
}

impl LoraAdapters {
    /// Small random adapters for `layers` layers (seeded).
    pub fn random(layers: usize, hidden: usize, rank: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = |n: usize, s: f32| {
            (0..n)
                .map(|_| (rng.random::<f32>() - 0.5) * s)
                .collect::<Vec<f32>>()
        };
        let a = (0..layers).map(|_| m(rank * hidden, 0.05)).collect();
        let b = (0..layers).map(|_| m(hidden * rank, 0.01)).collect();
        Self { a, b, rank, hidden }
    }

    /// Adapter output of layer `l` for activation `x`.
    pub fn apply(&self, l: usize, x: &[f32]) -> Vec<f32> {
        let (r, d) = (self.rank, self.hidden);
        let a = &self.a[l % self.a.len()];
        let b = &self.b[l % self.b.len()];
        let u: Vec<f32> = (0..r)
            .map(|i| {
                a[i * d..(i + 1) * d]
                    .iter()
                    .zip(x)
                    .map(|(p, q)| p * q)
                    .sum()
            })
            .collect();
        (0..d)
            .map(|j| (0..r).map(|i| b[j * r + i] * u[i]).sum())
            .collect()
    }
}

/// Generates `max_tokens` greedy tokens in layer-split mode; returns tokens and statistics.
pub async fn generate(
    client: &Client,
    prompt: &[u32],
    max_tokens: usize,
    adapters: &LoraAdapters,
) -> Result<(Vec<u32>, GenerationStats)> {
    let limits = Limits::default();
    let t_start = Instant::now();
    let up0 = client.traffic.up.load(Relaxed);
    let down0 = client.traffic.down.load(Relaxed);
    let id = client.create_session(Mode::LayerSplit).await?;
    let mut st = GenerationStats::default();
    // The prompt is prefilled as in every mode; its first draft is the first token.
    let t0 = Instant::now();
    let r = client
        .step(
            &id,
            &StepRequest {
                position: 0,
                tokens: prompt.to_vec(),
                draft: 1,
                top_k: 1,
                ..Default::default()
            },
        )
        .await?;
    st.rounds += 1;
    st.t_pretrained += Duration::from_micros(r.compute_us);
    st.t_net += t0
        .elapsed()
        .saturating_sub(Duration::from_micros(r.compute_us));
    let mut next = r
        .states
        .last()
        .map(|s| s.draft_token)
        .ok_or_else(|| RuntimeError::Protocol("empty prefill".into()))?;
    let mut out = Vec::new();
    let mut pos = prompt.len() as u64;
    while out.len() < max_tokens {
        out.push(next);
        st.tokens += 1;
        if out.len() == max_tokens {
            break;
        }
        let mut layer = 0u32;
        let mut delta = None;
        loop {
            let req = LayerRequest {
                position: pos,
                token: next,
                layer,
                delta: delta.take(),
            };
            let t0 = Instant::now();
            let resp = client.layer(&id, &req).await?;
            let server = Duration::from_micros(resp.compute_us);
            st.t_pretrained += server;
            st.t_net += t0.elapsed().saturating_sub(server);
            st.rounds += 1;
            if resp.done {
                next = resp.next_token;
                break;
            }
            let act = decode_tensor(
                resp.activation.as_ref().ok_or_else(|| {
                    RuntimeError::Protocol("layer response without activation".into())
                })?,
                &limits,
            )?;
            let td = Instant::now();
            let d = adapters.apply(layer as usize, &act.data);
            st.t_device += td.elapsed();
            delta = Some(encode_f16(&d, 1, d.len()));
            layer += 1;
        }
        pos += 1;
    }
    let _ = client.delete_session(&id).await;
    st.t_total = t_start.elapsed();
    st.bytes_up = client.traffic.up.load(Relaxed) - up0;
    st.bytes_down = client.traffic.down.load(Relaxed) - down0;
    Ok((out, st))
}
