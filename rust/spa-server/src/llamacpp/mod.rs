//! The llama.cpp base engine (cargo feature `llamacpp`): the same GGUF run by llama.cpp, every
//! session a sequence id in one llama.cpp context with a unified KV cache, and one
//! `llama_decode` for every session a batch advances.
//!
//! Taps come from llama.cpp's graph evaluation callback, which copies each layer's output
//! (`l_out-<layer>`) and the final norm (`result_norm`) as they are computed. Every token of a
//! batch is marked as an output: the last layer (and so its tap) is computed only for output
//! rows. The callback splits the graph at each observed tensor, so its cost is per decode, not
//! per token: batching sessions amortizes it.
//!
//! Unlike [`crate::CandleEngine`], this engine is not batch-invariant: a prompt prefilled in
//! one call and the same tokens fed one by one agree to float rounding, not bit for bit, so a
//! session re-prefilled after eviction may (rarely) continue differently. The agreement with
//! the candle engine is measured by `tests/llamacpp_engine.rs` and `spa bench model`.
//!
//! GPU: build with the `cuda`, `metal` or `vulkan` feature and set
//! [`LlamaCppConfig::n_gpu_layers`] (docs/serving.md).

mod ffi;

use crate::base_engine::{BaseEngine, EngineOutput, Sequence};
use spa_model::{BaseOutput, CandleDevice, CandleTensor, Result, SpaError};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Settings of the llama.cpp engine.
#[derive(Debug, Clone)]
pub struct LlamaCppConfig {
    /// KV cells over all sessions together (one cell per position of a session).
    pub kv_cells: u32,
    /// Most live sessions (llama.cpp sequence ids; at most 256).
    pub max_sessions: u32,
    /// Most tokens per `llama_decode` (larger batches run as several decodes). Every token is
    /// an output, so llama.cpp keeps `max_batch x vocab` floats of logits (~100 MB at 512).
    pub max_batch: u32,
    /// CPU threads.
    pub threads: i32,
    /// Layers offloaded to a GPU (needs a GPU feature; `-1`: all).
    pub n_gpu_layers: i32,
    /// Where the last position's logits come from. `true` (the default): llama.cpp's own LM
    /// head, which it computes for every output row (prompt rows included: every token is an
    /// output). `false`: the graph stops after the final norm (`result_norm`), and the server
    /// computes the logits of each sequence's last position with the base's head over that
    /// state ([`EngineOutput::take_last_logits`](crate::EngineOutput::take_last_logits)):
    /// llama.cpp skips its head for every row, and the logits no longer depend on the batch
    /// (llama.cpp runs its tied q8_0 head through one kernel for a single row and another for
    /// several). Drafts then agree with the candle engine's more often (97.8 % against 96.4 %
    /// of 1,000 positions) and prefill is 8 % faster, but decode is 7 % slower (the base's
    /// head over one row costs more than llama.cpp's), so the default stays llama.cpp's head;
    /// docs/serving.md has the figures.
    pub llama_head: bool,
}

impl Default for LlamaCppConfig {
    fn default() -> Self {
        Self {
            kv_cells: 16384,
            max_sessions: 256,
            max_batch: 512,
            threads: std::thread::available_parallelism()
                .map(|n| n.get() as i32)
                .unwrap_or(2),
            n_gpu_layers: 0,
            llama_head: true,
        }
    }
}

impl LlamaCppConfig {
    /// The settings for a server whose KV budget is `kv_budget_bytes` for `base`'s shape:
    /// as many cells as the budget pays for (f16 K and V), at least 4,096 and at most 262,144.
    pub fn for_budget(base: &spa_model::BaseConfig, kv_budget_bytes: usize) -> Self {
        let cells = kv_budget_bytes / bytes_per_cell(base).max(1);
        Self {
            kv_cells: cells.clamp(4096, 262_144) as u32,
            ..Self::default()
        }
    }
}

/// Bytes of f16 K and V one position takes over all layers.
fn bytes_per_cell(c: &spa_model::BaseConfig) -> usize {
    2 * 2 * c.n_layers * c.n_kv_heads * c.head_dim // f16 K and V
}

/// Sequence ids: free ones, and those of dropped sequences whose KV cells are not cleared yet
/// (cleared under the context lock at the next forward pass, then free again).
#[derive(Debug, Default)]
struct IdPool {
    free: Vec<i32>,
    dropped: Vec<i32>,
}

/// A session of the llama.cpp engine.
#[derive(Debug)]
pub struct LlamaSeq {
    id: i32,
    len: usize,
    /// Positions llama.cpp may hold for this id beyond `len` (cleared before the next decode).
    dirty: bool,
    max_len: usize,
    cell_bytes: usize,
    pool: Arc<Mutex<IdPool>>,
}

impl Drop for LlamaSeq {
    fn drop(&mut self) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.dropped.push(self.id);
    }
}

impl Sequence for LlamaSeq {
    fn len(&self) -> usize {
        self.len
    }
    fn max_len(&self) -> usize {
        self.max_len
    }
    fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.dirty = true;
        }
    }
    fn capacity_bytes(&self) -> usize {
        self.len * self.cell_bytes
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The llama.cpp engine (see the module docs).
#[derive(Debug)]
pub struct LlamaCppEngine {
    ctx: Mutex<ffi::Context>,
    pool: Arc<Mutex<IdPool>>,
    n_layer: usize,
    n_embd: usize,
    max_len: usize,
    cell_bytes: usize,
}

impl LlamaCppEngine {
    /// Loads the GGUF at `path` (the file the candle [`spa_model::BaseModel`] of the same
    /// server loaded) with `config`.
    pub fn load(
        path: &Path,
        base: &spa_model::BaseConfig,
        config: &LlamaCppConfig,
    ) -> Result<Self> {
        let sessions = config.max_sessions.clamp(1, 256);
        let ctx = ffi::Context::load(
            path,
            ffi::ContextParams {
                n_ctx: config.kv_cells.max(256),
                n_batch: config.max_batch.max(1),
                n_seq_max: sessions,
                n_threads: config.threads.max(1),
                n_gpu_layers: config.n_gpu_layers,
                head: config.llama_head,
            },
        )
        .map_err(SpaError::InvalidConfig)?;
        if ctx.n_layer != base.n_layers || ctx.n_embd != base.hidden || ctx.n_vocab != base.vocab {
            return Err(SpaError::InvalidConfig(format!(
                "llama.cpp read {} layers x {} hidden, vocab {} from {}; the candle model has \
                 {} x {}, vocab {}",
                ctx.n_layer,
                ctx.n_embd,
                ctx.n_vocab,
                path.display(),
                base.n_layers,
                base.hidden,
                base.vocab
            )));
        }
        let max_len = (config.kv_cells.max(256) as usize).min(ctx.n_ctx_train.max(1));
        log::info!(
            "llama.cpp engine: {} ({} layers, {} KV cells, {} sessions, {} threads, {} GPU layers, \
             logits from {})",
            path.display(),
            ctx.n_layer,
            config.kv_cells,
            sessions,
            config.threads,
            config.n_gpu_layers,
            if config.llama_head { "llama.cpp's head" } else { "the base's head" }
        );
        Ok(Self {
            n_layer: ctx.n_layer,
            n_embd: ctx.n_embd,
            ctx: Mutex::new(ctx),
            pool: Arc::new(Mutex::new(IdPool {
                free: (0..sessions as i32).rev().collect(),
                dropped: Vec::new(),
            })),
            max_len,
            cell_bytes: bytes_per_cell(base),
        })
    }

    fn lock_ctx(&self) -> std::sync::MutexGuard<'_, ffi::Context> {
        self.ctx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clears the KV cells of dropped sequences and frees their ids (context lock held).
    fn reclaim(&self, ctx: &mut ffi::Context) {
        let dropped = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut p.dropped)
        };
        for &id in &dropped {
            ctx.seq_rm(id, 0);
        }
        if !dropped.is_empty() {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.free.extend(dropped);
        }
    }
}

impl BaseEngine for LlamaCppEngine {
    fn name(&self) -> &'static str {
        "llamacpp"
    }

    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        let mut id = self
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .pop();
        if id.is_none() {
            // Ids of dropped sessions come back once their cells are cleared; do it now if no
            // forward pass is running.
            if let Ok(mut ctx) = self.ctx.try_lock() {
                self.reclaim(&mut ctx);
                id = self
                    .pool
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .free
                    .pop();
            }
        }
        let id =
            id.ok_or_else(|| SpaError::InvalidConfig("every llama.cpp sequence is in use".into()))?;
        Ok(Box::new(LlamaSeq {
            id,
            len: 0,
            dirty: true,
            max_len: self.max_len,
            cell_bytes: self.cell_bytes,
            pool: self.pool.clone(),
        }))
    }

    fn forward_batch(
        &self,
        jobs: &mut [(&[u32], &mut (dyn Sequence + 'static))],
    ) -> Result<Vec<EngineOutput>> {
        let mut ctx = self.lock_ctx();
        self.reclaim(&mut ctx);
        // (token, position, sequence id) of every new token, job after job.
        let mut flat: Vec<(u32, usize, i32)> = Vec::new();
        let mut ends = Vec::with_capacity(jobs.len());
        for (tokens, seq) in jobs.iter_mut() {
            let s = seq.as_any_mut().downcast_mut::<LlamaSeq>().ok_or_else(|| {
                SpaError::InvalidConfig("the llama.cpp engine got another engine's sequence".into())
            })?;
            if tokens.is_empty() {
                return Err(SpaError::InvalidConfig("no tokens".into()));
            }
            if s.dirty {
                ctx.seq_rm(s.id, s.len);
                s.dirty = false;
            }
            flat.extend(
                tokens
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (t, s.len + i, s.id)),
            );
            ends.push(flat.len());
        }
        let n_embd = self.n_embd;
        let mut layers: Vec<Vec<f32>> = vec![Vec::with_capacity(flat.len() * n_embd); self.n_layer];
        let mut norm: Vec<f32> = Vec::with_capacity(flat.len() * n_embd);
        // Per job, llama.cpp's logits of its last position (none without llama.cpp's head).
        let mut last_logits: Vec<Option<Vec<f32>>> = vec![None; jobs.len()];
        let mut job_of_logits = 0;
        let n_batch = ctx.n_batch();
        let mark_dirty = |jobs: &mut [(&[u32], &mut (dyn Sequence + 'static))]| {
            for (_, seq) in jobs.iter_mut() {
                if let Some(s) = seq.as_any_mut().downcast_mut::<LlamaSeq>() {
                    s.dirty = true;
                }
            }
        };
        let mut start = 0;
        while start < flat.len() {
            let end = (start + n_batch).min(flat.len());
            // Indices (within this chunk) of the jobs' last tokens that fall in it.
            let logits_of: Vec<usize> = ends
                .iter()
                .filter(|&&e| e > start && e <= end)
                .map(|&e| e - 1 - start)
                .collect();
            match ctx.decode(&flat[start..end], &logits_of) {
                Ok((cap, logits)) => {
                    for (dst, src) in layers.iter_mut().zip(&cap.layers) {
                        dst.extend_from_slice(src);
                    }
                    norm.extend_from_slice(&cap.norm);
                    for l in logits {
                        last_logits[job_of_logits] = Some(l);
                        job_of_logits += 1;
                    }
                }
                Err(e) => {
                    mark_dirty(jobs);
                    return Err(match e {
                        ffi::DecodeError::NoKvSlot => SpaError::InvalidConfig(
                            "the llama.cpp KV cache is full (raise the server's KV budget)".into(),
                        ),
                        ffi::DecodeError::Other(m) => {
                            SpaError::InvalidConfig(format!("llama.cpp: {m}"))
                        }
                    });
                }
            }
            start = end;
        }
        drop(ctx);
        let mut outs = Vec::with_capacity(jobs.len());
        let mut from = 0;
        for (((tokens, seq), &end), logits) in jobs.iter_mut().zip(&ends).zip(last_logits) {
            let n = end - from;
            let rows = |v: &[f32]| -> Result<CandleTensor> {
                Ok(CandleTensor::from_slice(
                    &v[from * n_embd..end * n_embd],
                    (n, n_embd),
                    &CandleDevice::Cpu,
                )?)
            };
            let taps = layers.iter().map(|l| rows(l)).collect::<Result<Vec<_>>>()?;
            let hidden = rows(&norm)?;
            if let Some(s) = seq.as_any_mut().downcast_mut::<LlamaSeq>() {
                s.len += tokens.len();
            }
            outs.push(EngineOutput {
                base: BaseOutput { taps, hidden },
                last_logits: logits,
            });
            from = end;
        }
        Ok(outs)
    }
}
