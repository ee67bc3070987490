//! Baselines that need gradients through the frozen base (LoRA, Adapter, full integration).
//!
//! The base (a llama-architecture GGUF such as SmolLM2-135M) is dequantized to f32 tensors
//! that are never trained, and run as a differentiable candle graph over whole padded
//! batches; only the method's own weights are [`Var`]s. Three methods (DESIGN.md section 1,
//! "Baselines"):
//!
//! * [`BaseGradMethod::Lora`]: LoRA on **every** linear projection of every layer (q, k, v,
//!   o, gate, up, down): `W x + (alpha / r) B A x`, `alpha = 2r` (scale 2), `A` uniform in
//!   `+-1/sqrt(in)`, `B = 0`. (q and k rows are held in the split-half RoPE order, see below;
//!   LoRA on q/k lives in that basis, an equivalent parameterisation.)
//! * [`BaseGradMethod::Adapter`]: two *parallel* bottleneck adapters per layer (He et al.
//!   2022), one beside the attention block and one beside the MLP: each reads the normed input
//!   of its block and adds `U relu(D h + b_d) + b_u` to the residual stream next to the block's
//!   output. `U = 0` and `b_u = 0` at init.
//! * [`BaseGradMethod::FullIntegration`]: a ladder side network whose output is fed back into
//!   the base's residual stream after every layer `i`:
//!   `z_i = D_i(h_i)` (the shared, frozen published down-projection
//!   [`spa_model::DownProjection`]), `m_i = mu_i z_i + (1 - mu_i) s_{i-1}` (LST mixing,
//!   `mu_i = sigmoid(alpha_i / 0.1)`, as [`spa_model::side`]), `s_i = m_i + W2 silu(W1
//!   rms(m_i))` (a position-wise MLP block of inner size `width / 2`: **no side attention**, a
//!   documented simplification so the budget goes to the per-layer up-projections), and
//!   `h_i <- h_i + U_i s_i` (`U_i = 0` at init), which the base's later layers then see.
//!
//! With the zero inits, every method computes exactly the base's logits before training.
//! Parameter counts for SmolLM2-135M (the SPA side network of width 64 over 30 taps has
//! 1,269,728 trainable weights, [`spa_model::SideConfig::param_count`]): LoRA rank 4 =
//! 1,221,120; Adapter bottleneck 18 = 1,279,800; full integration width 64 = 1,230,750
//! ([`BaseGradMethod::param_count`], [`BaseGradMethod::matched`]).
//!
//! Implementation notes: GGUF stores q/k rows in llama.cpp's interleaved-RoPE order; the rows
//! are permuted once at load into the split-half order (the attention scores are unchanged),
//! so RoPE is a cheap narrow/cat. candle-nn's fused norm/softmax/RoPE have no backward, so
//! they are written from basic ops ([`ops`]); frozen matrices use a custom op whose backward
//! skips the weight gradient. The loss is the token-weighted mean NLL over all target
//! tokens of a batch; ragged batches are right-padded (causal attention makes padding
//! invisible to real positions) and the LM head runs on target positions only.

mod ops;

use crate::error::{Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use spa_model::side::F32Tensor;
use spa_model::{Arch, BaseConfig, DownProjection, SpaTokenizer};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// LoRA scale `alpha / r` (alpha = 2 r).
const LORA_SCALE: f64 = 2.0;
/// LST mixing temperature (as the SPA side network's default).
const SIDE_TEMPERATURE: f64 = 0.1;
/// Epsilon of the side block's norm.
const SIDE_EPS: f64 = 1e-5;
/// Epsilon of the projection's input normalisation (as [`DownProjection`]).
const PROJ_EPS: f64 = 1e-6;
/// Projections LoRA is applied to, with their GGUF tensor names.
const LORA_TARGETS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];
/// Format tag of saved weights.
const FORMAT: &str = "spa-basegrad-v1";

/// A fine-tuning method that needs gradients through the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseGradMethod {
    /// LoRA of the given rank on all seven projections of every layer.
    Lora {
        /// Rank r.
        rank: usize,
    },
    /// Two parallel bottleneck adapters per layer.
    Adapter {
        /// Bottleneck size.
        bottleneck: usize,
    },
    /// Side network fed back into the residual stream after every layer.
    FullIntegration {
        /// Side width (the published projection's width; a multiple of 32).
        width: usize,
    },
}

impl BaseGradMethod {
    /// Short name as used in results tables ("lora", "adapter", "full_integration").
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lora { .. } => "lora",
            Self::Adapter { .. } => "adapter",
            Self::FullIntegration { .. } => "full_integration",
        }
    }

    /// Trainable weights of this method on a base with configuration `cfg`.
    pub fn param_count(&self, cfg: &BaseConfig) -> usize {
        shapes(*self, cfg)
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// The three methods sized to the trainable-parameter budget `budget` (e.g. the SPA side
    /// network's [`spa_model::SideConfig::param_count`]): the LoRA rank and adapter bottleneck
    /// with the count closest to it, and full integration at `width`.
    pub fn matched(cfg: &BaseConfig, budget: usize, width: usize) -> [BaseGradMethod; 3] {
        let best = |f: &dyn Fn(usize) -> BaseGradMethod| {
            (1..=256usize)
                .min_by_key(|&r| f(r).param_count(cfg).abs_diff(budget))
                .unwrap_or(1)
        };
        let rank = best(&|r| Self::Lora { rank: r });
        let bottleneck = best(&|r| Self::Adapter { bottleneck: r });
        [
            Self::Lora { rank },
            Self::Adapter { bottleneck },
            Self::FullIntegration { width },
        ]
    }

    fn validate(&self) -> Result<()> {
        match *self {
            Self::Lora { rank: 0 } | Self::Adapter { bottleneck: 0 } => Err(TrainError::Config(
                "LoRA rank / adapter bottleneck must be positive".into(),
            )),
            Self::FullIntegration { width } if width < 2 || !width.is_multiple_of(2) => Err(
                TrainError::Config(format!("full-integration width {width} must be even")),
            ),
            _ => Ok(()),
        }
    }
}

fn lora_dims(cfg: &BaseConfig, target: &str) -> (usize, usize) {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    match target {
        "q" => (d, cfg.n_heads * hd),
        "k" | "v" => (d, cfg.n_kv_heads * hd),
        "o" => (cfg.n_heads * hd, d),
        "gate" | "up" => (d, cfg.ffn),
        _ => (cfg.ffn, d),
    }
}

/// Trainable tensors of a method: name -> shape.
fn shapes(method: BaseGradMethod, cfg: &BaseConfig) -> BTreeMap<String, Vec<usize>> {
    let d = cfg.hidden;
    let mut m = BTreeMap::new();
    match method {
        BaseGradMethod::Lora { rank } => {
            for i in 0..cfg.n_layers {
                for t in LORA_TARGETS {
                    let (inp, out) = lora_dims(cfg, t);
                    m.insert(format!("layers.{i}.{t}.lora_a"), vec![rank, inp]);
                    m.insert(format!("layers.{i}.{t}.lora_b"), vec![out, rank]);
                }
            }
        }
        BaseGradMethod::Adapter { bottleneck: r } => {
            for i in 0..cfg.n_layers {
                for a in ["adapter_attn", "adapter_mlp"] {
                    m.insert(format!("layers.{i}.{a}.down"), vec![r, d]);
                    m.insert(format!("layers.{i}.{a}.down_bias"), vec![r]);
                    m.insert(format!("layers.{i}.{a}.up"), vec![d, r]);
                    m.insert(format!("layers.{i}.{a}.up_bias"), vec![d]);
                }
            }
        }
        BaseGradMethod::FullIntegration { width: w } => {
            let f = w / 2;
            m.insert("side.alpha".into(), vec![cfg.n_layers]);
            for i in 0..cfg.n_layers {
                m.insert(format!("side.{i}.norm"), vec![w]);
                m.insert(format!("side.{i}.w1"), vec![f, w]);
                m.insert(format!("side.{i}.w2"), vec![w, f]);
                m.insert(format!("side.{i}.up"), vec![d, w]);
            }
        }
    }
    m
}

/// Initial value of one trainable tensor (see the module docs).
fn init_value(name: &str, shape: &[usize], rng: &mut StdRng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let zero = name.ends_with("lora_b")
        || name.ends_with(".up")
        || name.ends_with("_bias")
        || name == "side.alpha";
    if zero {
        return vec![0.0; n];
    }
    if name.ends_with(".norm") {
        return vec![1.0; n];
    }
    let fan_in = shape.last().copied().unwrap_or(1) as f32;
    // LoRA A: kaiming-uniform bound 1/sqrt(in) (as PEFT); other matrices: unit-variance
    // outputs, bound sqrt(3/in).
    let bound = if name.ends_with("lora_a") {
        1.0 / fan_in.sqrt()
    } else {
        (3.0 / fan_in).sqrt()
    };
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// Options of [`BaseGradModel::train`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseGradTrainConfig {
    /// Examples per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Step budget.
    pub max_steps: usize,
    /// Validation every this many steps (and after the last step).
    pub eval_every: usize,
    /// Early stopping: stop after this many evaluations without improvement (0 = never).
    pub patience: usize,
    /// Seed of the (deterministic) shuffling.
    pub seed: u64,
    /// Examples longer than this keep their last `max_len` tokens (the target is at the end);
    /// 0 = no limit.
    pub max_len: usize,
}

impl Default for BaseGradTrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            lr: 5e-4,
            weight_decay: 0.01,
            max_steps: 200,
            eval_every: 20,
            patience: 3,
            seed: 0,
            max_len: 192,
        }
    }
}

impl BaseGradTrainConfig {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.eval_every == 0 {
            return Err(TrainError::Config(
                "batch_size and eval_every must be positive".into(),
            ));
        }
        let ok = self.lr.is_finite()
            && self.lr > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if !ok {
            return Err(TrainError::Config(format!(
                "bad learning rate {} / weight decay {}",
                self.lr, self.weight_decay
            )));
        }
        if self.max_len == 1 {
            return Err(TrainError::Config("max_len must be 0 or >= 2".into()));
        }
        Ok(())
    }
}

/// Progress of [`BaseGradModel::train`], reported after every step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainProgress {
    /// Steps done.
    pub step: usize,
    /// Step budget.
    pub max_steps: usize,
    /// Training loss of this step (mean NLL per target token).
    pub loss: f64,
    /// Validation loss, when this step ran a validation.
    pub val_loss: Option<f64>,
    /// Best validation loss so far.
    pub best_val_loss: f64,
    /// Seconds since training started.
    pub seconds: f64,
}

/// Result of [`BaseGradModel::train`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Method trained.
    pub method: BaseGradMethod,
    /// Trainable weights.
    pub trainable_params: usize,
    /// Steps taken.
    pub steps: usize,
    /// Validation loss before training.
    pub initial_val_loss: f64,
    /// Best validation loss (the weights left in the model are those of this point).
    pub best_val_loss: f64,
    /// Step of the best validation loss (0 = the initial weights).
    pub best_step: usize,
    /// (step, validation loss) history.
    pub history: Vec<(usize, f64)>,
    /// (step, training loss) of every step.
    pub train_losses: Vec<(usize, f64)>,
    /// Stopped by patience before the step budget.
    pub early_stopped: bool,
    /// Wall-clock seconds of the whole run (validations included).
    pub seconds: f64,
    /// Mean seconds per optimizer step (forward + backward + update, validations excluded).
    pub seconds_per_step: f64,
}

/// One frozen transformer layer (f32, q/k rows in split-half RoPE order).
#[derive(Debug)]
struct FrozenLayer {
    attn_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// Per-layer keys/values of a generation (`[1, n_kv_heads, positions, head_dim]`).
type KvCache = Vec<Option<(Tensor, Tensor)>>;

/// The tensors one forward pass reads: method weights by name (tracked Vars for training,
/// detached copies for inference), or none for the bare base.
struct Params {
    map: BTreeMap<String, Tensor>,
}

impl Params {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.map
            .get(name)
            .ok_or_else(|| TrainError::Config(format!("missing trainable tensor {name}")))
    }
}

/// The frozen base in f32 plus one method's trainable weights.
pub struct BaseGradModel {
    cfg: BaseConfig,
    identity: String,
    tokenizer: SpaTokenizer,
    method: BaseGradMethod,
    embed: Tensor,
    layers: Vec<FrozenLayer>,
    norm: Tensor,
    head: Tensor,
    rope: (Tensor, Tensor),
    base_params: usize,
    /// Projection `(P_i [w, d], b_i [w])` per layer (full integration only) and its fingerprint.
    proj: Option<(Vec<(Tensor, Tensor)>, String)>,
    vars: BTreeMap<String, Var>,
}

impl std::fmt::Debug for BaseGradModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseGradModel")
            .field("method", &self.method)
            .field("base", &&self.identity[..12.min(self.identity.len())])
            .field("trainable_params", &self.trainable_params())
            .finish()
    }
}

/// Reads a GGUF's tensors into f32; q/k rows re-ordered from interleaved to split-half RoPE.
struct Loaded {
    cfg: BaseConfig,
    identity: String,
    tokenizer: SpaTokenizer,
    embed: Tensor,
    layers: Vec<FrozenLayer>,
    norm: Tensor,
    head: Tensor,
    tied: bool,
}

fn load_gguf(path: &Path) -> Result<Loaded> {
    let file = spa_model::GgufFile::read(path)?;
    let identity = file.identity().to_string();
    let content = file.content();
    let cfg = BaseConfig::from_gguf(content)?;
    if cfg.arch != Arch::Llama {
        return Err(TrainError::Model(spa_model::SpaError::Unsupported(
            format!(
                "gradient baselines support llama-architecture bases, not {:?}",
                cfg.arch
            ),
        )));
    }
    let tokenizer = SpaTokenizer::from_gguf(content)?;
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let get = |name: &str, expected: &[usize]| -> Result<Tensor> {
        let q = file.tensor(name, expected)?;
        Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    };
    // Row permutation interleaved -> split-half within each head.
    let perm = |heads: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..heads)
            .flat_map(|h| {
                (0..hd).map(move |j| {
                    let src = if j < hd / 2 {
                        2 * j
                    } else {
                        2 * (j - hd / 2) + 1
                    };
                    (h * hd + src) as u32
                })
            })
            .collect();
        Ok(Tensor::from_vec(idx, heads * hd, &Device::Cpu)?)
    };
    let (pq, pk) = (perm(cfg.n_heads)?, perm(cfg.n_kv_heads)?);
    let embed = get("token_embd.weight", &[cfg.vocab, d])?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        layers.push(FrozenLayer {
            attn_norm: get(&p("attn_norm"), &[d])?,
            q: get(&p("attn_q"), &[cfg.n_heads * hd, d])?.index_select(&pq, 0)?,
            k: get(&p("attn_k"), &[cfg.n_kv_heads * hd, d])?.index_select(&pk, 0)?,
            v: get(&p("attn_v"), &[cfg.n_kv_heads * hd, d])?,
            o: get(&p("attn_output"), &[d, cfg.n_heads * hd])?,
            ffn_norm: get(&p("ffn_norm"), &[d])?,
            gate: get(&p("ffn_gate"), &[cfg.ffn, d])?,
            up: get(&p("ffn_up"), &[cfg.ffn, d])?,
            down: get(&p("ffn_down"), &[d, cfg.ffn])?,
        });
    }
    let norm = get("output_norm.weight", &[d])?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let head = if tied {
        embed.clone()
    } else {
        get("output.weight", &[cfg.vocab, d])?
    };
    Ok(Loaded {
        cfg,
        identity,
        tokenizer,
        embed,
        layers,
        norm,
        head,
        tied,
    })
}

/// The published projection's matrices as tensors (read back through its safetensors form,
/// the only public view of its weights).
fn projection_tensors(p: &DownProjection, n_layers: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let meta = p.meta();
    if meta.taps != (0..n_layers).collect::<Vec<_>>() {
        return Err(TrainError::Config(
            "full integration needs a projection of every layer".into(),
        ));
    }
    let dir = std::env::temp_dir();
    let file = dir.join(format!(
        "spa-basegrad-proj-{}-{}.safetensors",
        std::process::id(),
        p.fingerprint()
    ));
    p.save(&file)?;
    let loaded = spa_model::io::load_f32(&file);
    let _ = std::fs::remove_file(&file);
    let (mut t, _) = loaded?;
    let mut out = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let mut take = |name: String| -> Result<Tensor> {
            let x = t
                .remove(&name)
                .ok_or_else(|| TrainError::Config(format!("projection lacks {name}")))?;
            Ok(Tensor::from_vec(x.data, x.shape, &Device::Cpu)?)
        };
        out.push((
            take(format!("proj.{i}.weight"))?,
            take(format!("proj.{i}.bias"))?,
        ));
    }
    Ok(out)
}

impl BaseGradModel {
    /// Loads the base from `gguf` and initialises `method`'s weights with `seed`.
    ///
    /// Full integration uses the published PCA projection of width `width`, cached in
    /// `$SPA_HOME/projections` (computed there on first use, as `spa serve` does).
    pub fn new(gguf: &Path, method: BaseGradMethod, seed: u64) -> Result<Self> {
        let proj = match method {
            BaseGradMethod::FullIntegration { width } => {
                let base = spa_model::BaseModel::load(gguf)?;
                let taps: Vec<usize> = (0..base.config().n_layers).collect();
                let dir = spa_model::paths::spa_home().join("projections");
                Some(DownProjection::published(&base, width, &taps, &dir)?)
            }
            _ => None,
        };
        Self::with_projection(gguf, method, seed, proj.as_ref())
    }

    /// Like [`BaseGradModel::new`] with an explicit projection (required for full
    /// integration, ignored otherwise); it must be made for this base, over every layer, with
    /// the method's width.
    pub fn with_projection(
        gguf: &Path,
        method: BaseGradMethod,
        seed: u64,
        projection: Option<&DownProjection>,
    ) -> Result<Self> {
        method.validate()?;
        let l = load_gguf(gguf)?;
        let proj = match (method, projection) {
            (BaseGradMethod::FullIntegration { width }, Some(p)) => {
                let m = p.meta();
                if m.base != l.identity || m.width != width || m.hidden != l.cfg.hidden {
                    return Err(TrainError::Config(format!(
                        "projection (base {}, width {}) does not fit base {} / width {width}",
                        &m.base[..12.min(m.base.len())],
                        m.width,
                        &l.identity[..12]
                    )));
                }
                Some((
                    projection_tensors(p, l.cfg.n_layers)?,
                    p.fingerprint().to_string(),
                ))
            }
            (BaseGradMethod::FullIntegration { .. }, None) => {
                return Err(TrainError::Config(
                    "full integration needs a down-projection".into(),
                ))
            }
            _ => None,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for (name, shape) in shapes(method, &l.cfg) {
            let data = init_value(&name, &shape, &mut rng);
            let v = Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)?;
            vars.insert(name, v);
        }
        let mut base_params = l.embed.elem_count() + l.norm.elem_count();
        if !l.tied {
            base_params += l.head.elem_count();
        }
        for y in &l.layers {
            base_params += [
                &y.attn_norm,
                &y.q,
                &y.k,
                &y.v,
                &y.o,
                &y.ffn_norm,
                &y.gate,
                &y.up,
                &y.down,
            ]
            .iter()
            .map(|t| t.elem_count())
            .sum::<usize>();
        }
        let rope = ops::rope_tables(l.cfg.rope_theta, l.cfg.head_dim, l.cfg.context.min(8192))?;
        log::info!(
            "basegrad: {} on base {} ({} trainable / {} frozen weights)",
            method.name(),
            &l.identity[..12],
            method.param_count(&l.cfg),
            base_params
        );
        Ok(Self {
            cfg: l.cfg,
            identity: l.identity,
            tokenizer: l.tokenizer,
            method,
            embed: l.embed,
            layers: l.layers,
            norm: l.norm,
            head: l.head,
            rope,
            base_params,
            proj,
            vars,
        })
    }

    /// The method.
    pub fn method(&self) -> BaseGradMethod {
        self.method
    }

    /// The base's configuration.
    pub fn config(&self) -> &BaseConfig {
        &self.cfg
    }

    /// The tokenizer embedded in the GGUF.
    pub fn tokenizer(&self) -> &SpaTokenizer {
        &self.tokenizer
    }

    /// Identity (sha256) of the base GGUF.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Trainable weights.
    pub fn trainable_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Frozen base weights (the tied embedding counted once).
    pub fn base_params(&self) -> usize {
        self.base_params
    }

    /// The trainable variables by name (e.g. for a custom optimizer or inspection).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    fn params(&self, track: bool) -> Params {
        Params {
            map: self
                .vars
                .iter()
                .map(|(n, v)| {
                    let t = if track {
                        v.as_tensor().clone()
                    } else {
                        v.as_tensor().detach()
                    };
                    (n.clone(), t)
                })
                .collect(),
        }
    }

    /// `x @ W^T` (+ LoRA when on).
    fn linear(
        &self,
        p: Option<&Params>,
        i: usize,
        target: &str,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<Tensor> {
        let y = ops::frozen_linear(x, w)?;
        match (p, self.method) {
            (Some(p), BaseGradMethod::Lora { .. }) => {
                let a = p.get(&format!("layers.{i}.{target}.lora_a"))?;
                let b = p.get(&format!("layers.{i}.{target}.lora_b"))?;
                let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * LORA_SCALE)?;
                Ok((y + delta)?)
            }
            _ => Ok(y),
        }
    }

    /// Parallel adapter output for the normed block input `h`.
    fn adapter(&self, p: &Params, i: usize, which: &str, h: &Tensor) -> Result<Tensor> {
        let n = |s: &str| format!("layers.{i}.{which}.{s}");
        let z = h
            .matmul(&p.get(&n("down"))?.t()?)?
            .broadcast_add(p.get(&n("down_bias"))?)?
            .relu()?;
        Ok(z.matmul(&p.get(&n("up"))?.t()?)?
            .broadcast_add(p.get(&n("up_bias"))?)?)
    }

    /// Residual stream after the last layer, `[b * t, d]`, for tokens `[b, t]` at positions
    /// `pos..pos + t`. `p = None` runs the bare base. `cache` (batch 1) appends keys/values.
    fn trunk(
        &self,
        p: Option<&Params>,
        ids: &[u32],
        b: usize,
        t: usize,
        pos: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden);
        let rep = nh / nkv;
        if pos + t > self.rope.0.dim(0)? {
            return Err(TrainError::Config(format!(
                "sequence of {} positions exceeds the supported {}",
                pos + t,
                self.rope.0.dim(0)?
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= cfg.vocab) {
            return Err(TrainError::Data(format!(
                "token id {bad} outside the vocabulary"
            )));
        }
        let idt = Tensor::from_slice(ids, b * t, &Device::Cpu)?;
        let mut x = self.embed.index_select(&idt, 0)?;
        let cos = self.rope.0.narrow(0, pos, t)?;
        let sin = self.rope.1.narrow(0, pos, t)?;
        let mask = if t > 1 {
            Some(ops::causal_mask(t, pos, rep)?)
        } else {
            None
        };
        let scale = cfg.attn_scale as f64;
        let mut side: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let q = self.linear(p, i, "q", &h, &layer.q)?;
            let k = self.linear(p, i, "k", &h, &layer.k)?;
            let v = self.linear(p, i, "v", &h, &layer.v)?;
            let q = ops::rope_half(&q.reshape((b, t, nh, hd))?, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, nkv, rep * t, hd))?;
            let mut k = ops::rope_half(&k.reshape((b, t, nkv, hd))?, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()?;
            let mut v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c[i].take() {
                    k = Tensor::cat(&[&pk, &k], 2)?;
                    v = Tensor::cat(&[&pv, &v], 2)?;
                }
                c[i] = Some((k.detach(), v.detach()));
            }
            let mut scores = (q.matmul(&k.t()?)? * scale)?; // [b, nkv, rep*t, s]
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = ops::softmax_last(&scores)?;
            let att = probs
                .matmul(&v)? // [b, nkv, rep*t, hd]
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, nh * hd))?;
            let mut attn = self.linear(p, i, "o", &att, &layer.o)?;
            if let (Some(p), BaseGradMethod::Adapter { .. }) = (p, self.method) {
                attn = (attn + self.adapter(p, i, "adapter_attn", &h)?)?;
            }
            x = (x + attn)?;
            let h = ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let g = self.linear(p, i, "gate", &h, &layer.gate)?;
            let u = self.linear(p, i, "up", &h, &layer.up)?;
            let mut f = self.linear(p, i, "down", &(g.silu()? * u)?, &layer.down)?;
            if let (Some(p), BaseGradMethod::Adapter { .. }) = (p, self.method) {
                f = (f + self.adapter(p, i, "adapter_mlp", &h)?)?;
            }
            x = (x + f)?;
            if let (Some(p), Some((proj, _))) = (p, &self.proj) {
                let (pm, pb) = &proj[i];
                let z = ops::frozen_linear(&ops::rms_normalize(&x, PROJ_EPS)?, pm)?
                    .broadcast_add(pb)?;
                let alpha = p.get("side.alpha")?.narrow(0, i, 1)?;
                let mu = candle_nn::ops::sigmoid(&(alpha / SIDE_TEMPERATURE)?)?;
                let mut m = z.broadcast_mul(&mu)?;
                if let Some(s) = &side {
                    m = (m + s.broadcast_mul(&(1.0 - &mu)?)?)?;
                }
                let n = |s: &str| format!("side.{i}.{s}");
                let a = ops::rms_norm(&m, p.get(&n("norm"))?, SIDE_EPS)?;
                let a = a.matmul(&p.get(&n("w1"))?.t()?)?.silu()?;
                let s = (m + a.matmul(&p.get(&n("w2"))?.t()?)?)?;
                x = (x + s.matmul(&p.get(&n("up"))?.t()?)?)?;
                side = Some(s);
            }
        }
        debug_assert_eq!(x.dims(), &[b * t, d]);
        Ok(x)
    }

    /// Final norm + LM head on residual rows `[n, d]` -> `[n, vocab]`.
    fn head_logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.norm, self.cfg.rms_eps)?;
        Ok(ops::frozen_linear(&h, &self.head)?)
    }

    /// Logits `[tokens.len(), vocab]` of the model with the method's current weights.
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.logits_with(Some(&self.params(false)), tokens)
    }

    /// Logits `[tokens.len(), vocab]` of the bare frozen base (the method switched off).
    pub fn base_logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.logits_with(None, tokens)
    }

    fn logits_with(&self, p: Option<&Params>, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(TrainError::Data("no tokens".into()));
        }
        let x = self.trunk(p, tokens, 1, tokens.len(), 0, None)?;
        self.head_logits(&x)
    }

    /// Sum of target-token NLLs of a batch and the number of target tokens.
    fn nll_sum(&self, p: &Params, batch: &[(Vec<u32>, usize)]) -> Result<(Tensor, usize)> {
        if batch.is_empty() {
            return Err(TrainError::Data("empty batch".into()));
        }
        for (toks, start) in batch {
            if *start == 0 || *start >= toks.len() {
                return Err(TrainError::Data(format!(
                    "target start {start} must lie in 1..{} (the sequence length)",
                    toks.len()
                )));
            }
        }
        let b = batch.len();
        let t = batch.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; b * t];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (j, (toks, start)) in batch.iter().enumerate() {
            ids[j * t..j * t + toks.len()].copy_from_slice(toks);
            for q in *start - 1..toks.len() - 1 {
                rows.push((j * t + q) as u32);
                targets.push(toks[q + 1]);
            }
        }
        let n = rows.len();
        let x = self.trunk(Some(p), &ids, b, t, 0, None)?;
        let x = x.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
        let logits = self.head_logits(&x)?;
        let lse = ops::logsumexp_last(&logits)?;
        let tgt = logits.gather(&Tensor::from_vec(targets, (n, 1), &Device::Cpu)?, 1)?;
        Ok(((lse - tgt)?.sum_all()?, n))
    }

    /// Mean NLL per target token of a batch, differentiable w.r.t. the trainable weights.
    /// Each example is `(token ids, index of the first target token)`, the index in
    /// `1..len`: the loss covers `tokens[start..]`. Ragged batches are right-padded.
    pub fn loss(&self, batch: &[(Vec<u32>, usize)]) -> Result<Tensor> {
        let (s, n) = self.nll_sum(&self.params(true), batch)?;
        Ok((s / n as f64)?)
    }

    /// Mean NLL per target token over `data` (no gradients), in batches of `batch_size`;
    /// examples are truncated to `max_len` as in training (0 = no limit).
    pub fn evaluate(
        &self,
        data: &[(Vec<u32>, usize)],
        batch_size: usize,
        max_len: usize,
    ) -> Result<f64> {
        if data.is_empty() || batch_size == 0 {
            return Err(TrainError::Data("nothing to evaluate".into()));
        }
        let p = self.params(false);
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in data.chunks(batch_size) {
            let chunk: Vec<_> = chunk.iter().map(|e| truncate(e, max_len)).collect();
            let (s, k) = self.nll_sum(&p, &chunk)?;
            sum += s.to_scalar::<f32>()? as f64;
            n += k;
        }
        Ok(sum / n as f64)
    }

    fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars
            .values()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    fn restore(&self, snap: &[Tensor]) -> Result<()> {
        for (v, t) in self.vars.values().zip(snap) {
            v.set(t)?;
        }
        Ok(())
    }

    /// Trains with AdamW on `train`, validating on `val` every `cfg.eval_every` steps and after
    /// the last; stops early after `cfg.patience` validations without improvement and leaves
    /// the best validated weights in the model (the initial ones if nothing improved).
    /// Batches are drawn from a seeded shuffle (reshuffled every epoch): the run is
    /// deterministic for a given seed.
    pub fn train(
        &mut self,
        train: &[(Vec<u32>, usize)],
        val: &[(Vec<u32>, usize)],
        cfg: &BaseGradTrainConfig,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<TrainReport> {
        cfg.validate()?;
        if train.is_empty() || val.is_empty() {
            return Err(TrainError::Data(
                "training and validation sets must be non-empty".into(),
            ));
        }
        let t0 = Instant::now();
        let mut opt = AdamW::new(
            self.vars.values().cloned().collect(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let vbs = cfg.batch_size.max(1);
        let initial = self.evaluate(val, vbs, cfg.max_len)?;
        let mut best = (initial, 0usize, self.snapshot()?);
        let mut history = vec![(0, initial)];
        let mut train_losses = Vec::new();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng);
        let mut cursor = 0;
        let (mut bad, mut early, mut steps) = (0usize, false, 0usize);
        let mut step_secs = 0f64;
        while steps < cfg.max_steps {
            let mut batch = Vec::with_capacity(cfg.batch_size);
            while batch.len() < cfg.batch_size.min(train.len()) {
                if cursor == order.len() {
                    order.shuffle(&mut rng);
                    cursor = 0;
                }
                batch.push(truncate(&train[order[cursor]], cfg.max_len));
                cursor += 1;
            }
            let ts = Instant::now();
            let loss = self.loss(&batch)?;
            opt.backward_step(&loss)?;
            step_secs += ts.elapsed().as_secs_f64();
            steps += 1;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(TrainError::Tensor(format!(
                    "training loss became {lv} at step {steps}"
                )));
            }
            train_losses.push((steps, lv));
            let mut val_loss = None;
            if steps % cfg.eval_every == 0 || steps == cfg.max_steps {
                let vl = self.evaluate(val, vbs, cfg.max_len)?;
                history.push((steps, vl));
                val_loss = Some(vl);
                if vl < best.0 {
                    best = (vl, steps, self.snapshot()?);
                    bad = 0;
                } else {
                    bad += 1;
                }
                log::debug!("basegrad step {steps}: train {lv:.4}, val {vl:.4}");
                if cfg.patience > 0 && bad >= cfg.patience && steps < cfg.max_steps {
                    early = true;
                }
            }
            progress(TrainProgress {
                step: steps,
                max_steps: cfg.max_steps,
                loss: lv,
                val_loss,
                best_val_loss: best.0,
                seconds: t0.elapsed().as_secs_f64(),
            });
            if early {
                break;
            }
        }
        self.restore(&best.2)?;
        Ok(TrainReport {
            method: self.method,
            trainable_params: self.trainable_params(),
            steps,
            initial_val_loss: initial,
            best_val_loss: best.0,
            best_step: best.1,
            history,
            train_losses,
            early_stopped: early,
            seconds: t0.elapsed().as_secs_f64(),
            seconds_per_step: step_secs / steps.max(1) as f64,
        })
    }

    /// Greedy decoding with a KV cache (prefill of `prompt`, then one token per step).
    /// Returns the new tokens; stops before a token in `stop` or after `max_new` tokens.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(TrainError::Data("empty prompt".into()));
        }
        let p = self.params(false);
        let mut cache: KvCache = vec![None; self.cfg.n_layers];
        let mut out = Vec::new();
        let mut pos = 0;
        let mut feed = prompt.to_vec();
        while out.len() < max_new {
            let x = self.trunk(Some(&p), &feed, 1, feed.len(), pos, Some(&mut cache))?;
            pos += feed.len();
            let last = x.narrow(0, feed.len() - 1, 1)?;
            let logits: Vec<f32> = self.head_logits(&last)?.flatten_all()?.to_vec1()?;
            let next = spa_model::argmax(&logits)
                .ok_or_else(|| TrainError::Tensor("empty logits".into()))?
                as u32;
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            feed = vec![next];
        }
        Ok(out)
    }

    /// Saves the trainable weights (safetensors, with the method, base identity and
    /// projection fingerprint in the metadata).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = BTreeMap::new();
        for (n, v) in &self.vars {
            t.insert(
                n.clone(),
                F32Tensor {
                    shape: v.as_tensor().dims().to_vec(),
                    data: v.as_tensor().flatten_all()?.to_vec1()?,
                },
            );
        }
        spa_model::io::save_f32(path, &t, &self.meta_json()?)?;
        Ok(())
    }

    fn meta_json(&self) -> Result<String> {
        serde_json::to_string(&SavedMeta {
            format: FORMAT.into(),
            method: self.method,
            base: self.identity.clone(),
            projection: self.proj.as_ref().map(|(_, f)| f.clone()),
        })
        .map_err(|e| TrainError::Config(e.to_string()))
    }

    /// Loads trainable weights saved by [`BaseGradModel::save`]; the file must be for the same
    /// method, base and projection, with every tensor of the right shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let cache_err = |reason: String| TrainError::Cache {
            path: path.to_path_buf(),
            reason,
        };
        let (mut t, meta) = spa_model::io::load_f32(path)?;
        let meta: SavedMeta =
            serde_json::from_str(&meta).map_err(|e| cache_err(format!("bad metadata: {e}")))?;
        let want = SavedMeta {
            format: FORMAT.into(),
            method: self.method,
            base: self.identity.clone(),
            projection: self.proj.as_ref().map(|(_, f)| f.clone()),
        };
        if meta != want {
            return Err(cache_err(format!(
                "weights are for {:?} on base {} (projection {:?}), not this model",
                meta.method,
                &meta.base[..12.min(meta.base.len())],
                meta.projection
            )));
        }
        let mut new = Vec::with_capacity(self.vars.len());
        for (n, v) in &self.vars {
            let x = t
                .remove(n)
                .ok_or_else(|| cache_err(format!("missing tensor {n}")))?;
            if x.shape != v.as_tensor().dims() {
                return Err(cache_err(format!(
                    "tensor {n} has shape {:?}, expected {:?}",
                    x.shape,
                    v.as_tensor().dims()
                )));
            }
            new.push(Tensor::from_vec(x.data, x.shape, &Device::Cpu)?);
        }
        if let Some(extra) = t.keys().next() {
            return Err(cache_err(format!("unexpected tensor {extra}")));
        }
        self.restore(&new)
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SavedMeta {
    format: String,
    method: BaseGradMethod,
    base: String,
    projection: Option<String>,
}

/// Keeps the last `max_len` tokens of an example (0 = no limit), moving its target start
/// (at least 1, so at least one target token stays).
fn truncate(e: &(Vec<u32>, usize), max_len: usize) -> (Vec<u32>, usize) {
    let (toks, start) = e;
    if max_len == 0 || toks.len() <= max_len {
        return (toks.clone(), *start);
    }
    let cut = toks.len() - max_len;
    (toks[cut..].to_vec(), start.saturating_sub(cut).max(1))
}
