//! Base-model configuration read from GGUF metadata, and the architecture switch.
//!
//! Architecture differences (Llama vs Gemma-3) live in [`Arch`] and the few fields below;
//! the forward pass in [`crate::base`] branches on them in one place each.

use crate::error::{Result, SpaError};
use candle_core::quantized::gguf_file::{Content, Value};
use serde::{Deserialize, Serialize};

/// Supported base architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama family (SmolLM2): SiLU gated FFN, interleaved RoPE (GGUF layout).
    Llama,
    /// Gemma-3: GELU-tanh FFN, q/k norms, post-norms, NeoX RoPE, sliding-window local layers.
    Gemma3,
}

/// Hyper-parameters of a base model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseConfig {
    /// Architecture.
    pub arch: Arch,
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Hidden size d.
    pub hidden: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Key/value heads (GQA).
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// FFN inner size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context window (positions).
    pub context: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency (global layers).
    pub rope_theta: f32,
    /// RoPE base frequency of sliding-window layers (Gemma-3), else equal to `rope_theta`.
    pub rope_theta_local: f32,
    /// Sliding window of local layers (Gemma-3), `None` for full attention everywhere.
    pub sliding_window: Option<usize>,
    /// Every `global_every`-th layer uses full attention (Gemma-3: 6).
    pub global_every: usize,
    /// Multiplier applied to token embeddings (Gemma: sqrt(hidden)).
    pub embed_scale: f32,
    /// Attention score scale (1/sqrt(head_dim) or Gemma's query_pre_attn_scalar).
    pub attn_scale: f32,
}

fn get<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| SpaError::Unsupported(format!("missing GGUF metadata key `{key}`")))
}

fn get_usize(c: &Content, key: &str) -> Result<usize> {
    let v = get(c, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => {
            return Err(SpaError::Unsupported(format!(
                "metadata `{key}` is not an unsigned integer"
            )))
        }
    };
    usize::try_from(n).map_err(|_| SpaError::Unsupported(format!("metadata `{key}` too large")))
}

fn get_f32(c: &Content, key: &str) -> Result<f32> {
    match get(c, key)? {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        _ => Err(SpaError::Unsupported(format!(
            "metadata `{key}` is not a float"
        ))),
    }
}

impl BaseConfig {
    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let arch_name = match get(c, "general.architecture")? {
            Value::String(s) => s.clone(),
            _ => {
                return Err(SpaError::Unsupported(
                    "general.architecture is not a string".into(),
                ))
            }
        };
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => return Err(SpaError::Unsupported(format!("architecture `{other}`"))),
        };
        let p = |k: &str| format!("{arch_name}.{k}");
        let n_layers = get_usize(c, &p("block_count"))?;
        let hidden = get_usize(c, &p("embedding_length"))?;
        let n_heads = get_usize(c, &p("attention.head_count"))?;
        let n_kv_heads = get_usize(c, &p("attention.head_count_kv")).unwrap_or(n_heads);
        let ffn = get_usize(c, &p("feed_forward_length"))?;
        let context = get_usize(c, &p("context_length"))?;
        let rms_eps = get_f32(c, &p("attention.layer_norm_rms_epsilon"))? as f64;
        let rope_theta = get_f32(c, &p("rope.freq_base")).unwrap_or(10_000.0);
        let head_dim = get_usize(c, &p("attention.key_length")).unwrap_or(hidden / n_heads.max(1));
        let vocab = match get(c, "tokenizer.ggml.tokens")? {
            Value::Array(a) => a.len(),
            _ => {
                return Err(SpaError::Unsupported(
                    "tokenizer.ggml.tokens is not an array".into(),
                ))
            }
        };
        if n_layers == 0 || hidden == 0 || n_heads == 0 || n_kv_heads == 0 || head_dim == 0 {
            return Err(SpaError::Unsupported("zero-sized model dimension".into()));
        }
        if n_heads % n_kv_heads != 0 || !head_dim.is_multiple_of(2) {
            return Err(SpaError::Unsupported(format!(
                "heads {n_heads} / kv heads {n_kv_heads} / head dim {head_dim} not supported"
            )));
        }
        let cfg = match arch {
            Arch::Llama => BaseConfig {
                arch,
                n_layers,
                hidden,
                n_heads,
                n_kv_heads,
                head_dim,
                ffn,
                vocab,
                context,
                rms_eps,
                rope_theta,
                rope_theta_local: rope_theta,
                sliding_window: None,
                global_every: 1,
                embed_scale: 1.0,
                attn_scale: 1.0 / (head_dim as f32).sqrt(),
            },
            Arch::Gemma3 => BaseConfig {
                arch,
                n_layers,
                hidden,
                n_heads,
                n_kv_heads,
                head_dim,
                ffn,
                vocab,
                context,
                rms_eps,
                rope_theta,
                rope_theta_local: 10_000.0,
                sliding_window: Some(get_usize(c, &p("attention.sliding_window")).unwrap_or(512)),
                global_every: 6,
                embed_scale: (hidden as f32).sqrt(),
                attn_scale: 1.0 / (head_dim as f32).sqrt(),
            },
        };
        Ok(cfg)
    }

    /// Whether layer `i` attends over the full context (as opposed to a sliding window).
    pub fn is_global_layer(&self, i: usize) -> bool {
        self.sliding_window.is_none() || (i + 1).is_multiple_of(self.global_every)
    }

    /// Parameter count of the base (weights, including the embedding once).
    pub fn param_count(&self) -> usize {
        let attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads);
        let mlp = 3 * self.hidden * self.ffn;
        self.n_layers * (attn + mlp + 2 * self.hidden) + self.vocab * self.hidden + self.hidden
    }

    /// Multiply-accumulates per token of the transformer layers (LM head excluded).
    pub fn layer_macs_per_token(&self) -> usize {
        let attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads);
        self.n_layers * (attn + 3 * self.hidden * self.ffn)
    }
}
