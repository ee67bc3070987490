//! The base engine behind the server: what runs the frozen base model's forward passes.
//!
//! [`BaseEngine`] is the one interface the step handler and the batcher use: make a sequence
//! (a session's KV cache, [`Sequence`]), advance many sequences by their new tokens in one call
//! ([`BaseEngine::forward_batch`]) with every layer's output ("taps") and the final normed
//! state of each new position, and truncate or drop a sequence. Two engines implement it:
//!
//! - [`CandleEngine`]: our own kernels over candle ([`BaseModel`]). Batch-invariant: a prompt
//!   prefilled in one call gives bit-identical states to the same tokens fed one by one, so a
//!   session re-prefilled after eviction continues with exactly the same tokens. The reference,
//!   and the default.
//! - `LlamaCppEngine` (cargo feature `llamacpp`, [`crate::llamacpp`]): llama.cpp through
//!   `llama-cpp-sys-2`, every session a sequence id in one llama.cpp context, the taps read by
//!   the graph evaluation callback.

use spa_model::{BaseModel, BaseOutput, KvCache, Result, SpaError};
use std::any::Any;
use std::sync::Arc;

/// One session's state in an engine: its KV cache. Dropping it frees its memory (an engine may
/// reclaim it lazily, at its next forward pass).
pub trait Sequence: Send + std::fmt::Debug {
    /// Positions held (the absolute position of the next token).
    fn len(&self) -> usize;
    /// True when nothing is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most positions this sequence can hold.
    fn max_len(&self) -> usize;
    /// Rolls back to `len` positions (keeps `0..len`; no-op when `len` is not below the length).
    fn truncate(&mut self, len: usize);
    /// Bytes of KV memory this sequence holds (the server's eviction budget counts these).
    fn capacity_bytes(&self) -> usize;
    /// Checks that `extra` more positions fit.
    fn check_room(&self, extra: usize) -> Result<()> {
        let requested = self.len() + extra;
        if requested > self.max_len() {
            return Err(SpaError::ContextOverflow {
                requested,
                max: self.max_len(),
            });
        }
        Ok(())
    }
    /// The candle KV cache, for the code paths that need the candle engine itself (the
    /// layer-split baseline); `None` for other engines' sequences.
    fn as_kv_cache(&mut self) -> Option<&mut KvCache> {
        None
    }
    /// For engine implementations: this sequence as `Any`, to get their own type back.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl Sequence for KvCache {
    fn len(&self) -> usize {
        KvCache::len(self)
    }
    fn max_len(&self) -> usize {
        KvCache::max_len(self)
    }
    fn truncate(&mut self, len: usize) {
        KvCache::truncate(self, len)
    }
    fn capacity_bytes(&self) -> usize {
        KvCache::capacity_bytes(self)
    }
    fn as_kv_cache(&mut self) -> Option<&mut KvCache> {
        Some(self)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// What one sequence's forward pass gives: the new positions' taps and final states, and the
/// logits of the last new position when the engine computed them itself.
#[derive(Debug)]
pub struct EngineOutput {
    /// Per-layer residual stream and final normed state of the new positions.
    pub base: BaseOutput,
    /// LM-head logits of the last new position (full vocabulary), or `None` when the caller
    /// should compute them from `base.hidden` ([`BaseModel::last_logits`]).
    pub last_logits: Option<Vec<f32>>,
}

impl EngineOutput {
    /// Logits of the last new position: the engine's own (moved out, not copied), else
    /// `base`'s LM head over the last final state.
    pub fn take_last_logits(&mut self, base: &BaseModel) -> Result<Vec<f32>> {
        if let Some(l) = self.last_logits.take() {
            return Ok(l);
        }
        let rows = self.base.hidden.dim(0)?;
        base.last_logits(&self.base.hidden.narrow(0, rows - 1, 1)?)
    }
}

/// A base model engine (see the module docs).
pub trait BaseEngine: Send + Sync {
    /// Short name (`candle`, `llamacpp`), as `spa serve --engine` takes it.
    fn name(&self) -> &'static str;
    /// Whether a position's outputs depend only on its sequence's tokens, not on what else is
    /// in the batch or the cache, nor on how the sequence was split into steps (a re-prefill
    /// in one batch gives the numbers its rounds gave). Then every guarantee of the device
    /// runtime is exact under any load (docs/serving.md, "Exactness"): `true` for candle,
    /// `false` (the default) for llama.cpp and any engine that has not shown it.
    fn batch_invariant(&self) -> bool {
        false
    }
    /// A new, empty sequence.
    fn new_sequence(&self) -> Result<Box<dyn Sequence>>;
    /// Advances each sequence by its tokens (all non-empty, ids valid, room checked by the
    /// caller) in one pass; outputs in `jobs` order. An error fails the whole batch, and the
    /// sequences' lengths are then unspecified (callers truncate before every step).
    fn forward_batch(
        &self,
        jobs: &mut [(&[u32], &mut (dyn Sequence + 'static))],
    ) -> Result<Vec<EngineOutput>>;
    /// [`BaseEngine::forward_batch`] of one sequence.
    fn forward(&self, tokens: &[u32], seq: &mut (dyn Sequence + 'static)) -> Result<EngineOutput> {
        self.forward_batch(&mut [(tokens, seq)])?
            .pop()
            .ok_or_else(|| SpaError::InvalidConfig("the engine returned no output".into()))
    }
}

/// The candle engine: [`BaseModel`]'s batch-invariant forward over [`KvCache`]s.
#[derive(Debug, Clone)]
pub struct CandleEngine {
    base: Arc<BaseModel>,
}

impl CandleEngine {
    /// An engine over `base`.
    pub fn new(base: Arc<BaseModel>) -> Self {
        Self { base }
    }
}

impl BaseEngine for CandleEngine {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn batch_invariant(&self) -> bool {
        true
    }

    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(self.base.new_cache()))
    }

    fn forward_batch(
        &self,
        jobs: &mut [(&[u32], &mut (dyn Sequence + 'static))],
    ) -> Result<Vec<EngineOutput>> {
        let mut pairs = Vec::with_capacity(jobs.len());
        for (tokens, seq) in jobs.iter_mut() {
            let cache = seq.as_kv_cache().ok_or_else(|| {
                SpaError::InvalidConfig("the candle engine got another engine's sequence".into())
            })?;
            pairs.push((*tokens, cache));
        }
        Ok(self
            .base
            .forward_batch(&mut pairs)?
            .into_iter()
            .map(|base| EngineOutput {
                base,
                last_logits: None,
            })
            .collect())
    }
}

/// The engine `spa serve` runs by default: candle, also in builds with the `llamacpp` feature.
/// llama.cpp is faster (82.9 against 48.9 tok/s of decode with taps, 85.3 against 71.6 tok/s at
/// 32 sessions on a 2-core machine, docs/serving.md) but not batch-invariant: the runtime's
/// guarantees that speculative rounds give the tokens of local decoding on the same engine and
/// that a re-prefill after eviction continues with the same tokens hold on llama.cpp only while a
/// session is alone on the server (its kernels depend on the batch and the cache; spa-runtime's
/// suites pass on it one test at a time, comparing tokens in all but the two that run sessions
/// side by side; see [`BaseEngine::batch_invariant`]), on candle under any load. Operators who
/// want the speed ask for it with `--engine llamacpp`.
pub const DEFAULT_ENGINE: &str = "candle";

/// Engine names `engine_by_name` knows, in this build.
pub const ENGINES: &[&str] = if cfg!(feature = "llamacpp") {
    &["candle", "llamacpp"]
} else {
    &["candle"]
};

/// The engine called `name` over `base` (`candle`, or `llamacpp` in builds with the
/// `llamacpp` feature, sized for `kv_budget_bytes` of KV cache; see
/// [`crate::llamacpp::LlamaCppConfig::for_budget`]).
pub fn engine_by_name(
    name: &str,
    base: &Arc<BaseModel>,
    kv_budget_bytes: usize,
) -> Result<Arc<dyn BaseEngine>> {
    engine_with(name, base, kv_budget_bytes, 0)
}

/// The engine named by the environment variable `SPA_ENGINE` (`candle` when unset), as the
/// test suites choose the engine of their servers (`SPA_ENGINE=llamacpp cargo test ...` in a
/// build with the `llamacpp` feature), with `kv_budget_bytes` of KV cache.
pub fn engine_from_env(
    base: &Arc<BaseModel>,
    kv_budget_bytes: usize,
) -> Result<Arc<dyn BaseEngine>> {
    let name = std::env::var("SPA_ENGINE").unwrap_or_else(|_| "candle".into());
    engine_by_name(&name, base, kv_budget_bytes)
}

/// [`engine_by_name`] with `gpu_layers` layers of the llama.cpp engine on a GPU (builds with
/// the `cuda`, `metal` or `vulkan` feature; `-1`: all). The candle engine runs on the CPU and
/// ignores it.
pub fn engine_with(
    name: &str,
    base: &Arc<BaseModel>,
    kv_budget_bytes: usize,
    gpu_layers: i32,
) -> Result<Arc<dyn BaseEngine>> {
    match name {
        "candle" => Ok(Arc::new(CandleEngine::new(base.clone()))),
        #[cfg(feature = "llamacpp")]
        "llamacpp" => {
            let cfg = crate::llamacpp::LlamaCppConfig {
                n_gpu_layers: gpu_layers,
                ..crate::llamacpp::LlamaCppConfig::for_budget(base.config(), kv_budget_bytes)
            };
            Ok(Arc::new(crate::llamacpp::LlamaCppEngine::load(
                base.path(),
                base.config(),
                &cfg,
            )?))
        }
        #[cfg(not(feature = "llamacpp"))]
        "llamacpp" => {
            let _ = (kv_budget_bytes, gpu_layers);
            Err(SpaError::InvalidConfig(
                "this build has no llama.cpp engine: build with `--features llamacpp`".into(),
            ))
        }
        other => Err(SpaError::InvalidConfig(format!(
            "unknown engine {other:?} (known: {})",
            ENGINES.join(", ")
        ))),
    }
}
