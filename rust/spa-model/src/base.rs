//! The frozen base model: GGUF loading and a forward pass that exposes per-layer taps.
//!
//! Follows the structure of candle's `quantized_llama` (QMatMul weights, interleaved RoPE for
//! GGUF llama files) with three additions SPA needs: the hidden state after every layer is
//! returned ("taps"), the KV cache can be truncated (rollback), and Gemma-3 runs through the
//! same code with its differences switched on by [`Arch`].

use crate::config::{Arch, BaseConfig};
use crate::error::{Result, SpaError};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::linear::{BaseKernel, Linear, QuantMode};
use crate::tokenizer::SpaTokenizer;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One sequence of a batched layer call: its first position, length and cache.
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// Absolute position of the first row.
    pub pos: usize,
    /// Rows of this sequence.
    pub seq: usize,
    /// Its KV cache.
    pub cache: &'a mut KvCache,
}

/// How one forward call computes its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// Each query row is attended exactly as a one-token decode step would be (same shapes,
    /// same kernels): a prompt prefilled in one call gives bit-identical states to the same
    /// tokens fed one by one. The server uses it, so a session re-prefilled after eviction
    /// continues with the same tokens.
    #[default]
    BatchInvariant,
    /// All query rows of a sequence in one masked matrix product per layer, and the weight
    /// matrices as dense f32 products ([`Linear::forward_dense`]; the first call dequantizes
    /// them, ~4 bytes per weight, kept for the model's lifetime): several times faster on long
    /// prompts, equal to [`ForwardMode::BatchInvariant`] up to float rounding (summation order).
    /// For offline passes that need no re-prefill equality: the training feature pass.
    Fast,
}

/// Per-position outputs of a base forward pass.
#[derive(Debug, Clone)]
pub struct BaseOutput {
    /// Residual stream after each layer, `n_layers` tensors of shape `[seq, hidden]`.
    pub taps: Vec<Tensor>,
    /// Final normed hidden state `[seq, hidden]` (the LM head's input).
    pub hidden: Tensor,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// q, k, v stacked (one kernel call), when the weights allow it.
    qkv: Option<Linear>,
    /// gate and up stacked.
    gate_up: Option<Linear>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
}

/// Rows (one-token branches) per batched forward of [`BaseModel::word_continuations`].
pub const CONT_BATCH_ROWS: usize = 32;

/// The frozen base language model.
#[derive(Debug)]
pub struct BaseModel {
    cfg: BaseConfig,
    tokenizer: SpaTokenizer,
    identity: String,
    path: PathBuf,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Linear,
    rope_global: (Tensor, Tensor),
    rope_local: (Tensor, Tensor),
    /// Per token id: starts a word (see [`BaseModel::word_starts`]); built on first use.
    word_starts: std::sync::OnceLock<Vec<bool>>,
}

fn rope_tables(theta: f32, head_dim: usize, len: usize) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, len as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let f = pos.broadcast_mul(&inv)?;
    Ok((f.cos()?, f.sin()?))
}

/// sha256 of a byte slice as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Gemma-3 GGUFs mix Q5_0, Q4_K, Q6_K and Q8_0 matrices. candle multiplies those with
/// activations rounded to 8 bits (Q8_0 / Q8_K blocks); Gemma's residual stream has large
/// outliers, so that rounding costs ~2% relative error in the hidden states (~0.3 in the
/// logits) and moves greedy output away from the float reference after a few tokens. Such
/// matrices are therefore re-quantized once at load to Q8_0 and run on the crate's own
/// f32-activation kernels (as SmolLM2 does), which also lets q/k/v and gate/up be fused:
/// error ~0.6%, ~0.07 in the logits, for ~40 MB more weight memory. `SPA_GEMMA_NATIVE_QUANT=1`
/// keeps the GGUF formats on candle's kernels instead.
fn gemma_linear(q: QTensor) -> Result<Linear> {
    let native = matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4_1)
        || std::env::var_os("SPA_GEMMA_NATIVE_QUANT").is_some();
    if native {
        return Linear::from_qtensor(q);
    }
    Linear::from_f32(&q.dequantize(&Device::Cpu)?, QuantMode::Q8)
}

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
}

impl BaseModel {
    /// Loads a GGUF base model (weights stay quantized; norms are f32).
    ///
    /// Fails with [`SpaError::MissingFile`], [`SpaError::CorruptGguf`] (bad magic, truncated,
    /// inconsistent header), [`SpaError::Unsupported`] or [`SpaError::WrongShape`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, BaseKernel::default())
    }

    /// Like [`BaseModel::load`], choosing the kernels for Q4_1 / Q8_0 matrices.
    pub fn load_with(path: impl AsRef<Path>, kernel: BaseKernel) -> Result<Self> {
        Self::from_gguf(GgufFile::read(path)?, kernel)
    }

    /// Loads and checks the file's sha256 first: a flipped byte anywhere is reported as corrupt.
    pub fn load_verified(path: impl AsRef<Path>, sha256: &str) -> Result<Self> {
        Self::from_gguf(
            GgufFile::read_verified(path, sha256)?,
            BaseKernel::default(),
        )
    }

    fn from_gguf(file: GgufFile, kernel: BaseKernel) -> Result<Self> {
        let (path, identity) = (file.path().to_path_buf(), file.identity().to_string());
        let content = file.content();
        let cfg = BaseConfig::from_gguf(content)?;
        let tokenizer = SpaTokenizer::from_gguf(content)?;
        let load = |name: &str, expected: &[usize]| file.tensor(name, expected);
        let (d, hd) = (cfg.hidden, cfg.head_dim);
        let f32t = |q: QTensor| -> Result<Tensor> { Ok(q.dequantize(&Device::Cpu)?) };
        let embed = load("token_embd.weight", &[cfg.vocab, d])?;
        let gemma = cfg.arch == Arch::Gemma3;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let lin = |q: QTensor| {
                if gemma {
                    gemma_linear(q)
                } else {
                    Linear::from_qtensor_with(q, kernel)
                }
            };
            let mut layer = Layer {
                attn_norm: f32t(load(&p("attn_norm"), &[d])?)?,
                q: lin(load(&p("attn_q"), &[cfg.n_heads * hd, d])?)?,
                k: lin(load(&p("attn_k"), &[cfg.n_kv_heads * hd, d])?)?,
                v: lin(load(&p("attn_v"), &[cfg.n_kv_heads * hd, d])?)?,
                o: lin(load(&p("attn_output"), &[d, cfg.n_heads * hd])?)?,
                q_norm: if gemma {
                    Some(f32t(load(&p("attn_q_norm"), &[hd])?)?)
                } else {
                    None
                },
                k_norm: if gemma {
                    Some(f32t(load(&p("attn_k_norm"), &[hd])?)?)
                } else {
                    None
                },
                post_attn_norm: if gemma {
                    Some(f32t(load(&p("post_attention_norm"), &[d])?)?)
                } else {
                    None
                },
                ffn_norm: f32t(load(&p("ffn_norm"), &[d])?)?,
                gate: lin(load(&p("ffn_gate"), &[cfg.ffn, d])?)?,
                up: lin(load(&p("ffn_up"), &[cfg.ffn, d])?)?,
                down: lin(load(&p("ffn_down"), &[d, cfg.ffn])?)?,
                post_ffn_norm: if gemma {
                    Some(f32t(load(&p("post_ffw_norm"), &[d])?)?)
                } else {
                    None
                },
                qkv: None,
                gate_up: None,
            };
            layer.qkv = Linear::fuse(&[&layer.q, &layer.k, &layer.v])?;
            layer.gate_up = Linear::fuse(&[&layer.gate, &layer.up])?;
            layers.push(layer);
        }
        let norm = f32t(load("output_norm.weight", &[d])?)?;
        let head = if file.has("output.weight") {
            Linear::from_qtensor_with(load("output.weight", &[cfg.vocab, d])?, kernel)?
        } else {
            Linear::from_qtensor_with(load("token_embd.weight", &[cfg.vocab, d])?, kernel)?
        };
        let rope_len = cfg.context.min(32_768);
        let rope_global = rope_tables(cfg.rope_theta, hd, rope_len)?;
        let rope_local = rope_tables(cfg.rope_theta_local, hd, rope_len)?;
        log::info!(
            "loaded {:?} base: {} layers, hidden {}, vocab {}, sha256 {}",
            cfg.arch,
            cfg.n_layers,
            cfg.hidden,
            cfg.vocab,
            &identity[..12]
        );
        Ok(Self {
            cfg,
            tokenizer,
            identity,
            path,
            embed: Arc::new(embed),
            layers,
            norm,
            head,
            rope_global,
            rope_local,
            word_starts: Default::default(),
        })
    }

    /// Per token id: whether it starts a word (a space, then letters:
    /// [`SpaTokenizer::whole_word`]). Decodes the vocabulary on first use (~0.1 s).
    pub fn word_starts(&self) -> &[bool] {
        self.word_starts.get_or_init(|| {
            (0..self.cfg.vocab as u32)
                .map(|id| self.tokenizer.whole_word(id).is_some())
                .collect()
        })
    }

    /// Word continuations (`/v1/features` `continuations`, `c >= 1`): for each of `positions` (rows of
    /// `hidden`, the final normed states of the tokens held in `cache`), the base's `c` most
    /// likely word-start tokens there ([`BaseModel::word_starts`]), most likely first, and the
    /// final normed hidden state after each, from copies of the cache's first `p + 1` positions
    /// ([`KvCache::fork_prefix`]). The branches of several positions go through one batched
    /// forward of one-token sequences ([`CONT_BATCH_ROWS`] rows), so the weights are read once
    /// for all of them. Returns `(ids [positions * c], states [positions * c * hidden])`.
    pub fn word_continuations(
        &self,
        cache: &KvCache,
        hidden: &[Vec<f32>],
        positions: &[u32],
        c: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let d = self.cfg.hidden;
        let starts = self.word_starts();
        let (mut ids, mut states) = (
            Vec::with_capacity(positions.len() * c),
            Vec::with_capacity(positions.len() * c * d),
        );
        // Positions are extended a few at a time, all their branches in one batch: the weights
        // are read once per CONT_BATCH_ROWS rows (a batch of 32 rows costs ~12 ms per row here,
        // one of 8 ~20 ms) while the branches' cache copies stay bounded.
        if c == 0 {
            return Ok((ids, states));
        }
        if starts.iter().filter(|&&s| s).count() < c {
            return Err(SpaError::InvalidConfig(format!(
                "the vocabulary has fewer than {c} word-start tokens"
            )));
        }
        let per_batch = (CONT_BATCH_ROWS / c).max(1);
        for group in positions.chunks(per_batch) {
            let mut toks: Vec<[u32; 1]> = Vec::with_capacity(group.len() * c);
            let mut caches: Vec<KvCache> = Vec::with_capacity(group.len() * c);
            for &p in group {
                let row = hidden
                    .get(p as usize)
                    .filter(|r| r.len() == d)
                    .ok_or_else(|| {
                        SpaError::InvalidConfig(format!("continuation position {p} has no state"))
                    })?;
                let logits = self.last_logits(&Tensor::from_slice(row, (1, d), &Device::Cpu)?)?;
                // The most likely word starts: every other token masked, then the shared top-k.
                let masked: Vec<f32> = logits
                    .iter()
                    .zip(starts)
                    .map(|(&l, &s)| if s { l } else { f32::NEG_INFINITY })
                    .collect();
                let order = crate::head::top_k(&masked, c);
                for &t in &order {
                    toks.push([t]);
                    caches.push(cache.fork_prefix(p as usize + 1, 1)?);
                }
                ids.extend(order);
            }
            let mut jobs: Vec<(&[u32], &mut KvCache)> = toks
                .iter()
                .map(|t| t.as_slice())
                .zip(caches.iter_mut())
                .collect();
            for out in self.forward_batch(&mut jobs)? {
                let v: Vec<f32> = out.hidden.flatten_all()?.to_vec1()?;
                states.extend_from_slice(&v[v.len() - d..]);
            }
        }
        Ok((ids, states))
    }

    /// Model hyper-parameters.
    pub fn config(&self) -> &BaseConfig {
        &self.cfg
    }

    /// The tokenizer built from the GGUF metadata.
    pub fn tokenizer(&self) -> &SpaTokenizer {
        &self.tokenizer
    }

    /// Identity of the base: sha256 of the GGUF file (hex).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Context window usable with this model (RoPE tables are built up to 32k).
    pub fn max_positions(&self) -> usize {
        self.rope_global.0.dim(0).unwrap_or(0)
    }

    /// A fresh KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layers, self.max_positions())
    }

    /// The (tied) LM head weights dequantized to f32, `[vocab, hidden]`.
    pub fn head_weight_f32(&self) -> Result<Tensor> {
        self.head.weight_f32()
    }

    /// Runs `tokens` at positions `cache.len()..` and appends them to the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<BaseOutput> {
        self.forward_with(tokens, cache, ForwardMode::BatchInvariant)
    }

    /// [`BaseModel::forward`] with a chosen [`ForwardMode`].
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<BaseOutput> {
        self.forward_batch_with(&mut [(tokens, cache)], mode)?
            .pop()
            .ok_or_else(|| SpaError::InvalidConfig("forward produced no output".into()))
    }

    /// Token embeddings `[seq, hidden]` (scaled for Gemma). Ids must be valid.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        self.tokenizer.check_ids(tokens)?;
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let x = self.embed.embedding(&ids)?;
        if self.cfg.embed_scale != 1.0 {
            return Ok((x * self.cfg.embed_scale as f64)?);
        }
        Ok(x)
    }

    /// Runs layer `i` on the residual stream `x` (`[seq, hidden]`) of positions
    /// `pos..pos+seq`, appending to layer `i` of `cache`. Used by [`BaseModel::forward`] and by
    /// the layer-split baseline, which interleaves device-side adapters between layers.
    pub fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        pos: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let seq = x.dim(0)?;
        self.layer_forward_batch(i, x, &mut [BatchItem { pos, seq, cache }])
    }

    /// Runs layer `i` for several sequences at once: `x` stacks their rows (`[sum seq, hidden]`,
    /// in `items` order). Matrix products run once over all rows (each weight is read once per
    /// batch); attention runs per sequence on its own cache.
    pub fn layer_forward_batch(
        &self,
        i: usize,
        x: &Tensor,
        items: &mut [BatchItem<'_>],
    ) -> Result<Tensor> {
        self.layer_forward_batch_with(i, x, items, ForwardMode::BatchInvariant)
    }

    /// [`BaseModel::layer_forward_batch`] with a chosen [`ForwardMode`].
    pub fn layer_forward_batch_with(
        &self,
        i: usize,
        x: &Tensor,
        items: &mut [BatchItem<'_>],
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let lin = |l: &Linear, x: &Tensor| match mode {
            ForwardMode::BatchInvariant => l.forward(x),
            ForwardMode::Fast => l.forward_dense(x),
        };
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| SpaError::InvalidConfig(format!("layer {i} of {}", cfg.n_layers)))?;
        let h = rms(x, &layer.attn_norm, cfg.rms_eps)?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (q, k, v) = match &layer.qkv {
            Some(qkv) => {
                let all = lin(qkv, &h)?;
                (
                    all.narrow(1, 0, nh * hd)?,
                    all.narrow(1, nh * hd, nkv * hd)?,
                    all.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
            None => (lin(&layer.q, &h)?, lin(&layer.k, &h)?, lin(&layer.v, &h)?),
        };
        let mut outs = Vec::with_capacity(items.len());
        let mut r0 = 0;
        for it in items.iter_mut() {
            let (qi, ki, vi) = (
                q.narrow(0, r0, it.seq)?,
                k.narrow(0, r0, it.seq)?,
                v.narrow(0, r0, it.seq)?,
            );
            outs.push(self.attention(i, layer, &qi, &ki, &vi, it.pos, it.seq, it.cache, mode)?);
            r0 += it.seq;
        }
        let attn_in = if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&outs, 0)?
        };
        let mut attn = lin(&layer.o, &attn_in)?;
        if let Some(n) = &layer.post_attn_norm {
            attn = rms(&attn, n, cfg.rms_eps)?;
        }
        let x = (x + attn)?;
        let h = rms(&x, &layer.ffn_norm, cfg.rms_eps)?;
        let (g, u) = match &layer.gate_up {
            Some(gu) => {
                let gu = lin(gu, &h)?;
                (gu.narrow(1, 0, cfg.ffn)?, gu.narrow(1, cfg.ffn, cfg.ffn)?)
            }
            None => (lin(&layer.gate, &h)?, lin(&layer.up, &h)?),
        };
        let g = match cfg.arch {
            Arch::Llama => candle_nn::ops::silu(&g)?,
            Arch::Gemma3 => g.gelu()?,
        };
        let mut f = lin(&layer.down, &(g * u)?)?;
        if let Some(n) = &layer.post_ffn_norm {
            f = rms(&f, n, cfg.rms_eps)?;
        }
        Ok((x + f)?)
    }

    /// Forward passes of several sequences in one batch (each with its own cache and position):
    /// equal to calling [`BaseModel::forward`] on each, but every weight matrix is read once.
    pub fn forward_batch(&self, jobs: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<BaseOutput>> {
        self.forward_batch_with(jobs, ForwardMode::BatchInvariant)
    }

    /// [`BaseModel::forward_batch`] with a chosen [`ForwardMode`].
    pub fn forward_batch_with(
        &self,
        jobs: &mut [(&[u32], &mut KvCache)],
        mode: ForwardMode,
    ) -> Result<Vec<BaseOutput>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = Vec::new();
        for (tokens, cache) in jobs.iter() {
            if tokens.is_empty() {
                return Err(SpaError::InvalidConfig(
                    "forward called with no tokens".into(),
                ));
            }
            cache.check_room(tokens.len())?;
            all.extend_from_slice(tokens);
        }
        let mut x = self.embed(&all)?;
        let mut items: Vec<BatchItem<'_>> = jobs
            .iter_mut()
            .map(|(t, c)| BatchItem {
                pos: c.len(),
                seq: t.len(),
                cache: c,
            })
            .collect();
        let mut layer_out = Vec::with_capacity(self.cfg.n_layers);
        for i in 0..self.cfg.n_layers {
            x = self.layer_forward_batch_with(i, &x, &mut items, mode)?;
            layer_out.push(x.clone());
        }
        let hidden = self.final_norm(&x)?;
        let mut outs = Vec::with_capacity(items.len());
        let mut r0 = 0;
        for it in &items {
            outs.push(BaseOutput {
                taps: layer_out
                    .iter()
                    .map(|t| t.narrow(0, r0, it.seq))
                    .collect::<std::result::Result<_, _>>()?,
                hidden: hidden.narrow(0, r0, it.seq)?,
            });
            r0 += it.seq;
        }
        Ok(outs)
    }

    /// The final norm: residual stream -> LM head input.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms(x, &self.norm, self.cfg.rms_eps)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        seq: usize,
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let q = q
            .contiguous()?
            .reshape((1, seq, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .contiguous()?
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .contiguous()?
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (rms(&q, qn, cfg.rms_eps)?, rms(&k, kn, cfg.rms_eps)?),
            _ => (q, k),
        };
        let global = cfg.is_global_layer(i);
        let (cos, sin) = if global {
            &self.rope_global
        } else {
            &self.rope_local
        };
        let (cos, sin) = (cos.narrow(0, pos, seq)?, sin.narrow(0, pos, seq)?);
        let (q, k) = match cfg.arch {
            Arch::Llama => (
                candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
            ),
            Arch::Gemma3 => (
                candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
            ),
        };
        let max_len = cache.max_len();
        let (k_all, v_all) = cache.layer_mut(i).append(&k, &v, max_len)?;
        let rep = nh / nkv;
        let window = if global { None } else { cfg.sliding_window };
        if mode == ForwardMode::Fast && seq > 1 {
            return matrix_attention(&q, &k_all, &v_all, pos, cfg.attn_scale, window, rep);
        }
        // Each query row is attended exactly as a one-token decode step would be (same shapes,
        // same kernels). This makes the forward pass batch-invariant: a prompt prefilled in one
        // call gives bit-identical states to the same tokens fed one by one, so a session that
        // is re-prefilled after eviction or a server restart continues with the same tokens.
        let mut rows = Vec::with_capacity(seq);
        for r in 0..seq {
            let total = pos + r + 1;
            let qr = q
                .narrow(2, r, 1)?
                .contiguous()?
                .reshape((1, nkv, rep, hd))?;
            let (kr, vr) = if r + 1 == seq {
                (k_all.clone(), v_all.clone())
            } else {
                (
                    k_all.narrow(2, 0, total)?.contiguous()?,
                    v_all.narrow(2, 0, total)?.contiguous()?,
                )
            };
            // Grouped-query attention without copying K/V: the group's query heads are rows.
            let scores = (qr.matmul(&kr.t()?)? * cfg.attn_scale as f64)?; // [1, nkv, rep, total]
            let scores = match window_mask(pos + r, total, window)? {
                Some(mask) => scores.broadcast_add(&mask)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            rows.push(probs.matmul(&vr)?.reshape((1, nh * hd))?); // [1, nh*hd]
        }
        if rows.len() == 1 {
            return Ok(rows.pop().unwrap_or_else(|| unreachable!()));
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// LM head logits for hidden states `[seq, hidden]` -> `[seq, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward(hidden)
    }

    /// [`BaseModel::logits`] with the dense f32 head of [`ForwardMode::Fast`] (offline passes).
    pub fn logits_fast(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward_dense(hidden)
    }

    /// Logits of the last position of `hidden` as a vector.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let seq = hidden.dim(0)?;
        Ok(self
            .logits(&hidden.narrow(0, seq - 1, 1)?)?
            .flatten_all()?
            .to_vec1()?)
    }
}

/// Reads a whole model file, mapping I/O errors to [`SpaError::MissingFile`].
/// Causal (and sliding-window) attention of `seq` query rows at positions `pos..pos + seq` in
/// one matrix product per KV head: `q` `[1, nh, seq, hd]`, `k`/`v` `[1, nkv, total, hd]` with
/// `total = pos + seq`; the query heads of a KV group are stacked as rows. Returns
/// `[seq, nh * hd]` in the head order of the row-by-row path.
fn matrix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    scale: f32,
    window: Option<usize>,
    rep: usize,
) -> Result<Tensor> {
    let (_, nh, seq, hd) = q.dims4()?;
    let (_, nkv, total, _) = k.dims4()?;
    let q = q.reshape((1, nkv, rep * seq, hd))?;
    let scores = (q.matmul(&k.t()?)? * scale as f64)?; // [1, nkv, rep*seq, total]
    let mut mask = Vec::with_capacity(seq * total);
    for r in 0..seq {
        let qpos = pos + r;
        mask.extend((0..total).map(|j| {
            let hidden = j > qpos || window.is_some_and(|w| qpos >= w && j <= qpos - w);
            if hidden {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        }));
    }
    let mask = Tensor::from_vec(mask, (1, 1, 1, seq, total), &Device::Cpu)?;
    let scores = scores
        .reshape((1, nkv, rep, seq, total))?
        .broadcast_add(&mask)?
        .reshape((1, nkv, rep * seq, total))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // [1, nkv, rep*seq, hd]
    Ok(out
        .reshape((nkv, rep, seq, hd))?
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((seq, nh * hd))?)
}

/// Additive sliding-window mask `[1, total]` (0 or -inf) for the query at `qpos` attending keys
/// `0..total` (`total = qpos + 1`: later keys are not cached yet, so no causal mask is needed);
/// `None` when the query may see every cached key.
fn window_mask(qpos: usize, total: usize, window: Option<usize>) -> Result<Option<Tensor>> {
    let Some(w) = window.filter(|&w| total > w) else {
        return Ok(None);
    };
    let m: Vec<f32> = (0..total)
        .map(|j| {
            if qpos >= w && j <= qpos - w {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (1, total), &Device::Cpu)?))
}

/// Index of the largest value (first on ties). `None` for an empty slice.
pub fn argmax(xs: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in xs.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// Dim helper re-exported for callers that index the last dimension.
pub const LAST: D = D::Minus1;

/// What the device needs from a base GGUF without holding the base: the tokenizer, the tied
/// LM head rows (for [`crate::DeviceHead`]) and the base identity. Reads only `token_embd`.
#[derive(Debug)]
pub struct DeviceAssets {
    /// Tokenizer.
    pub tokenizer: SpaTokenizer,
    /// Model configuration.
    pub config: BaseConfig,
    /// Base identity (sha256 of the GGUF).
    pub identity: String,
    /// LM head `[vocab, hidden]` in f32 (dequantized).
    pub head: Tensor,
}

impl DeviceAssets {
    /// Loads tokenizer + head from a base GGUF (every tensor's extent is checked first, so a
    /// damaged file is an error, never a crash).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::read(path)?;
        let content = file.content();
        let config = BaseConfig::from_gguf(content)?;
        let tokenizer = SpaTokenizer::from_gguf(content)?;
        let name = if file.has("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let q = file.tensor(name, &[config.vocab, config.hidden])?;
        let identity = file.identity().to_string();
        let head = q.dequantize(&Device::Cpu)?;
        Ok(Self {
            tokenizer,
            config,
            identity,
            head,
        })
    }
}
