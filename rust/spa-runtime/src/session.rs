//! A generation session over speculative rounds (DESIGN.md section 2).
//!
//! Round: the device sends `(position, tokens)`; the server truncates its cache to `position`,
//! appends `tokens` and drafts K tokens; the device runs side + gate over every returned
//! position, accepts drafts until the first position where the gate picks the side path and the
//! side token differs, emits that token, rolls its side cache back, and the next round carries it.
//! Position `q`'s state predicts the token at `q + 1`, so after a correction at `q + 1` the side
//! state up to `q` stays valid. Every round re-sends its absolute position, so a retried round
//! never duplicates or loses a token; an evicted or restarted server session is re-prefilled
//! from the token history kept here.

use crate::client::Client;
use crate::device::{DeviceModel, WireSampling};
use crate::error::{Result, RuntimeError};
use spa_model::SideCache;
use spa_protocol::{Limits, Mode, StepRequest, TapBits};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A server that loses every new session (e.g. a non-sticky load balancer) ends the call with
/// [`RuntimeError::SessionGone`] after this many re-prefills without a successful round.
pub const MAX_REPREFILLS_IN_A_ROW: u32 = 3;

/// Per-generation statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens emitted.
    pub tokens: usize,
    /// Step round trips (including re-prefills, excluding retries of the same round).
    pub rounds: usize,
    /// Request bytes sent (including retries).
    pub bytes_up: u64,
    /// Response bytes received.
    pub bytes_down: u64,
    /// Time spent in the side network, gate and head on the device.
    pub t_device: Duration,
    /// Wall time of requests minus the server's compute time.
    pub t_net: Duration,
    /// Server compute time reported in responses (T_pretrained).
    pub t_pretrained: Duration,
    /// Total wall time.
    pub t_total: Duration,
    /// Draft positions decided.
    pub decisions: usize,
    /// Decisions where the gate chose the side path.
    pub side_chosen: usize,
    /// Emitted tokens that differ from the base's draft.
    pub overrides: usize,
    /// Times the session was re-created and re-prefilled.
    pub reprefills: usize,
    /// Drafts asked for over all rounds (the sum of each round's K).
    pub drafts_requested: usize,
}

impl GenerationStats {
    /// Round trips per generated token (the paper's M).
    pub fn rounds_per_token(&self) -> f64 {
        self.rounds as f64 / self.tokens.max(1) as f64
    }
    /// Fraction of decisions that used the side path.
    pub fn side_usage(&self) -> f64 {
        self.side_chosen as f64 / self.decisions.max(1) as f64
    }
    /// Fraction of emitted tokens that overrode the base draft.
    pub fn override_rate(&self) -> f64 {
        self.overrides as f64 / self.tokens.max(1) as f64
    }
}

/// K chosen per round from the recent override rate instead of a fixed K.
///
/// A round ends at its first override, so drafts past it are bytes sent for nothing, while a
/// round that runs out of drafts costs a round trip. With an estimated per-token override
/// probability `p` (overrides over emitted tokens, both decayed by [`AdaptiveDraft::DECAY`] per
/// round, starting from the prior of the first K), the next round asks for the smallest K at
/// which 90% of rounds would have ended by an override: `(1 - p)^K <= 0.1`, clamped to
/// `[min, max]`. A plugin that rarely overrides gets `max`; one that overrides every few
/// tokens gets a short round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveDraft {
    /// Smallest K.
    pub min: u32,
    /// Largest K.
    pub max: u32,
}

impl Default for AdaptiveDraft {
    fn default() -> Self {
        Self { min: 2, max: 16 }
    }
}

impl AdaptiveDraft {
    /// Weight kept per round by the override and token counts.
    pub const DECAY: f64 = 0.7;

    /// The K of the next round for `overrides` over `tokens` (decayed counts).
    pub fn next_k(&self, overrides: f64, tokens: f64) -> u32 {
        let (lo, hi) = (self.min.max(1), self.max.max(self.min.max(1)));
        let p = (overrides / tokens.max(1e-9)).clamp(0.0, 1.0);
        if p <= 1e-6 {
            return hi;
        }
        if p >= 1.0 - 1e-6 {
            return lo;
        }
        let k = (0.1f64.ln() / (1.0 - p).ln()).ceil();
        (k.max(lo as f64).min(hi as f64)) as u32
    }
}

/// Decoding settings of the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeParams {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Drafts per round (K); with [`RuntimeParams::adaptive_draft`], the first round's K.
    pub draft: u32,
    /// Choose K per round from the recent override rate (see [`AdaptiveDraft`]); `None`: every
    /// round asks for `draft`.
    pub adaptive_draft: Option<AdaptiveDraft>,
    /// Candidates per draft position requested from the server (0 = server default).
    pub top_k: u32,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Sampling (temperature 0: greedy).
    pub sampling: WireSampling,
    /// How the server encodes the taps it sends (every prompt position carries 30 rows of
    /// them): [`TapBits::Int4`] (default: about half the bytes down of int8, at no measurable
    /// ROUGE-L cost on the four tasks of README's "Training and evaluation") or
    /// [`TapBits::Int8`].
    pub tap_bits: TapBits,
}

impl Default for RuntimeParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            draft: 8,
            adaptive_draft: None,
            top_k: 0,
            stop_tokens: Vec::new(),
            sampling: WireSampling::default(),
            tap_bits: TapBits::Int4,
        }
    }
}

/// A conversation with the server: keeps the token history and the side KV cache.
#[derive(Debug)]
pub struct SpaSession {
    client: Client,
    device: Arc<DeviceModel>,
    mode: Mode,
    id: Option<String>,
    history: Vec<u32>,
    /// Number of history tokens the server has been sent and whose states the side cache holds,
    /// except the last one, which the next round carries.
    synced: usize,
    cache: SideCache,
    limits: Limits,
    /// Where the drop's best-effort delete runs when the drop happens outside a runtime.
    runtime: Option<tokio::runtime::Handle>,
}

impl SpaSession {
    /// A new session (the server session is created lazily on the first round).
    ///
    /// Dropping it deletes its server session, best effort and in the background, on the
    /// tokio runtime current at the drop or, failing that, the one current here: the drop
    /// never blocks or fails. (Without either, the server's idle expiry collects it.)
    pub fn new(client: Client, device: Arc<DeviceModel>, mode: Mode) -> Self {
        let cache = device.side.new_cache();
        Self {
            client,
            device,
            mode,
            id: None,
            history: Vec::new(),
            synced: 0,
            cache,
            limits: Limits::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Every token of the conversation so far (prompts and generations).
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The server session id, once created.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Forgets the conversation (the server session is deleted best-effort).
    pub async fn reset(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = self.client.delete_session(&id).await;
        }
        self.history.clear();
        self.synced = 0;
        self.cache = self.device.side.new_cache();
    }

    /// Deletes the server session in the background (see [`SpaSession::new`]).
    fn delete_in_background(&mut self) {
        let Some(id) = self.id.take() else { return };
        let rt = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone());
        let Some(rt) = rt else {
            log::debug!("session dropped outside a runtime; the server's idle expiry ends it");
            return;
        };
        let client = self.client.clone();
        // A runtime that is shutting down drops the task: the delete is best effort.
        rt.spawn(async move {
            if let Err(e) = client.delete_session(&id).await {
                log::debug!("deleting a dropped session failed (its idle expiry ends it): {e}");
            }
        });
    }

    async fn ensure_session(&mut self) -> Result<String> {
        if let Some(id) = &self.id {
            return Ok(id.clone());
        }
        let id = self.client.create_session(self.mode).await?;
        self.id = Some(id.clone());
        Ok(id)
    }

    /// Appends `prompt` to the conversation and generates up to `params.max_tokens` tokens,
    /// calling `on_token` for each accepted token in order (return `false` to stop early: the
    /// tokens so far are returned). `cancel` is checked between rounds and ends the call with
    /// [`RuntimeError::Cancelled`]. Returns the new tokens and statistics.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        params: &RuntimeParams,
        cancel: Option<Arc<AtomicBool>>,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        let entry = self.history.len();
        let r = self
            .generate_inner(prompt, params, cancel, &mut on_token)
            .await;
        if r.is_err() {
            // A failed or cancelled turn leaves the conversation as it was, so the app can retry
            // it without the prompt appearing twice.
            self.history.truncate(entry);
            self.synced = self.synced.min(entry.saturating_sub(1));
            self.cache.truncate(self.synced);
        }
        r
    }

    async fn generate_inner(
        &mut self,
        prompt: &[u32],
        params: &RuntimeParams,
        cancel: Option<Arc<AtomicBool>>,
        on_token: &mut impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        if prompt.is_empty() {
            return Err(RuntimeError::Config("empty prompt".into()));
        }
        if params.draft == 0 {
            return Err(RuntimeError::Config("draft K must be >= 1".into()));
        }
        self.device.tokenizer.check_ids(prompt)?;
        let t_start = Instant::now();
        let up0 = self.client.traffic.up.load(Relaxed);
        let down0 = self.client.traffic.down.load(Relaxed);
        let mut st = GenerationStats::default();
        let mut out = Vec::new();
        // The next round sends history[self.synced..] at position self.synced.
        self.history.extend_from_slice(prompt);
        let mut done = params.max_tokens == 0;
        let mut lost_in_a_row = 0u32;
        // Decayed override and token counts of the adaptive K; the prior is one override per
        // `draft` tokens, worth one round.
        let (mut ovr, mut emitted) = (1.0f64, params.draft as f64);
        let mut k = params.draft;
        while !done {
            if cancel.as_ref().is_some_and(|c| c.load(Relaxed)) {
                return Err(RuntimeError::Cancelled);
            }
            let id = self.ensure_session().await?;
            let req = StepRequest {
                position: self.synced as u64,
                tokens: self.history[self.synced..].to_vec(),
                draft: k,
                top_k: params.top_k,
                temperature: params.sampling.temperature,
                top_p: params.sampling.top_p,
                seed: params.sampling.seed,
                tap_bits: params.tap_bits.wire(),
            };
            let t0 = Instant::now();
            let resp = match self.client.step(&id, &req).await {
                Ok(r) => r,
                Err(
                    RuntimeError::SessionGone
                    | RuntimeError::NotFound
                    | RuntimeError::PositionAhead,
                ) => {
                    log::info!(
                        "server lost the session; re-prefilling {} tokens",
                        self.history.len()
                    );
                    self.id = None;
                    self.synced = 0;
                    self.cache = self.device.side.new_cache();
                    st.reprefills += 1;
                    lost_in_a_row += 1;
                    if lost_in_a_row > MAX_REPREFILLS_IN_A_ROW {
                        return Err(RuntimeError::SessionGone);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            lost_in_a_row = 0;
            let wall = t0.elapsed();
            let server = Duration::from_micros(resp.compute_us);
            st.t_pretrained += server;
            st.t_net += wall.saturating_sub(server);
            st.rounds += 1;
            st.drafts_requested += k as usize;
            // Validate positions before touching any state.
            let n_new = req.tokens.len();
            let expected = n_new + k as usize - 1;
            if resp.states.len() != expected
                || resp.states.iter().enumerate().any(|(i, s)| {
                    s.position != req.position + i as u64 || s.is_draft != (i + 1 >= n_new)
                })
            {
                return Err(RuntimeError::Protocol(format!(
                    "step answered {} states, expected {expected} from position {}",
                    resp.states.len(),
                    req.position
                )));
            }
            let td = Instant::now();
            self.cache.truncate(req.position as usize);
            let mut accepted_all = true;
            let tokens_before = st.tokens;
            for s in &resp.states {
                let Some(d) =
                    self.device
                        .process_with(s, &mut self.cache, &self.limits, &params.sampling)?
                else {
                    continue;
                };
                st.decisions += 1;
                st.side_chosen += d.side as usize;
                if params.stop_tokens.contains(&d.token) {
                    done = true;
                    break;
                }
                self.history.push(d.token);
                out.push(d.token);
                st.tokens += 1;
                let keep_going = on_token(d.token);
                if d.token != s.draft_token {
                    st.overrides += 1;
                    // Side state up to s.position stays valid; later drafts assumed the base token.
                    self.cache.truncate(s.position as usize + 1);
                    accepted_all = false;
                }
                if !keep_going || out.len() >= params.max_tokens {
                    done = true;
                }
                if !accepted_all || done {
                    break;
                }
            }
            st.t_device += td.elapsed();
            if let Some(a) = &params.adaptive_draft {
                ovr = ovr * AdaptiveDraft::DECAY + (!accepted_all) as u32 as f64;
                emitted = emitted * AdaptiveDraft::DECAY + (st.tokens - tokens_before) as f64;
                k = a.next_k(ovr, emitted);
            }
            // The last history token has not been fed to the server; everything before has.
            self.synced = self.history.len() - 1;
            self.cache.truncate(self.synced);
        }
        st.t_total = t_start.elapsed();
        st.bytes_up = self.client.traffic.up.load(Relaxed) - up0;
        st.bytes_down = self.client.traffic.down.load(Relaxed) - down0;
        Ok((out, st))
    }
}

impl Drop for SpaSession {
    fn drop(&mut self) {
        self.delete_in_background();
    }
}

#[cfg(test)]
mod tests {
    use super::AdaptiveDraft;

    #[test]
    fn adaptive_k_follows_the_override_rate() {
        let a = AdaptiveDraft { min: 2, max: 16 };
        // No override: the largest K; overrides on every token: the smallest.
        assert_eq!(a.next_k(0.0, 10.0), 16);
        assert_eq!(a.next_k(10.0, 10.0), 2);
        // p = 0.25: (0.75)^K <= 0.1 from K = 9 (0.75^8 = 0.100 > 0.1).
        assert_eq!(a.next_k(1.0, 4.0), 9);
        // p = 0.5: K = 4 (0.5^4 = 0.0625; 0.5^3 = 0.125).
        assert_eq!(a.next_k(1.0, 2.0), 4);
        // p = 0.02: K = 114 before the clamp.
        assert_eq!(a.next_k(1.0, 50.0), 16);
        // A degenerate range is still a valid K.
        let b = AdaptiveDraft { min: 0, max: 0 };
        assert_eq!(b.next_k(1.0, 4.0), 1);
        assert_eq!(b.next_k(0.0, 4.0), 1);
    }
}
