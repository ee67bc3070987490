//! The personal side network (ladder side-tuning), its gate classifier and the shared
//! down-projection.
//!
//! Data flow for one position `t` (DESIGN.md sections 1-2):
//!
//! ```text
//! z_i = D_i(h_i(t))                      shared frozen down-projection of base tap i (server)
//! m_i = mu_i * z_i + (1 - mu_i) * s_{i-1}  LST mixing, mu_i = sigmoid(alpha_i / T), s_{-1} = 0
//! s_i = Block_i(m_i)                     pre-norm transformer block (attention + SwiGLU MLP)
//! s   = RMSNorm(s_last)
//! p   = softmax(G s + g)                 gate: p[1] = probability of the side path
//! h'  = h_final + U s                    up-projection added to the base's final normed state
//! ```
//!
//! The (tied, frozen) LM head is applied to `h'` by [`crate::head::DeviceHead`].
//! Weights are kept as an f32 master copy ([`SideWeights`], saved as safetensors) and turned
//! into an inference network ([`SideNetwork`]) in f32, q8_0 or q4_0.

use crate::error::{Result, SpaError};
use crate::linear::QuantMode;
use crate::qmat::QRows;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Width of one side attention head.
pub const SIDE_HEAD_DIM: usize = 32;
/// Side-network sizes used in the paper's Table 1 for SmolLM2: small / medium / full.
pub const SIDE_SIZES: [(&str, usize); 3] = [("small", 32), ("medium", 64), ("full", 128)];

/// Shape of a side network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideConfig {
    /// Side width (multiple of 32 so every matrix quantizes in whole blocks).
    pub width: usize,
    /// Base layers that feed side blocks (one block per tap), ascending.
    pub taps: Vec<usize>,
    /// SwiGLU inner size as a multiple of `width`.
    pub ffn_mult: usize,
    /// LST gate temperature T in mu = sigmoid(alpha / T).
    pub temperature: f32,
    /// Base hidden size d.
    pub base_hidden: usize,
    /// RoPE base of the side attention.
    pub rope_theta: f32,
    /// A learned gate takes the side path where its side probability exceeds this (0.5 unless
    /// training chose another on validation, see `spa_train::train::choose_gate_threshold`;
    /// 1.0: never). Files written before it existed read as 0.5.
    #[serde(default = "default_gate_threshold")]
    pub gate_threshold: f32,
}

fn default_gate_threshold() -> f32 {
    0.5
}

impl SideConfig {
    /// Default side for a base with `n_layers` layers and hidden size `hidden`: width 64, all taps.
    pub fn new(hidden: usize, n_layers: usize, width: usize) -> Self {
        Self {
            width,
            taps: (0..n_layers).collect(),
            ffn_mult: 2,
            temperature: 0.1,
            base_hidden: hidden,
            rope_theta: 10_000.0,
            gate_threshold: default_gate_threshold(),
        }
    }

    /// Checks the configuration against a base with `n_layers` layers.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if self.width == 0 || !self.width.is_multiple_of(32) {
            return Err(SpaError::InvalidConfig(format!(
                "side width {} must be a positive multiple of 32 (q4_0/q8_0 blocks); e.g. 32, 64, 128",
                self.width
            )));
        }
        if self.taps.is_empty() {
            return Err(SpaError::InvalidConfig(
                "at least one tapped layer is needed".into(),
            ));
        }
        if self.taps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SpaError::InvalidConfig(
                "taps must be strictly ascending".into(),
            ));
        }
        if let Some(&t) = self.taps.iter().find(|&&t| t >= n_layers) {
            return Err(SpaError::InvalidConfig(format!(
                "tap {t} but the base has {n_layers} layers"
            )));
        }
        if self.ffn_mult == 0 || self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(SpaError::InvalidConfig(
                "ffn_mult and temperature must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.gate_threshold) {
            return Err(SpaError::InvalidConfig(format!(
                "gate threshold {} must be within [0, 1]",
                self.gate_threshold
            )));
        }
        Ok(())
    }

    /// Inner size of the side MLP.
    pub fn ffn(&self) -> usize {
        self.width * self.ffn_mult
    }

    /// The expected tensors: name -> shape.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (w, f, d) = (self.width, self.ffn(), self.base_hidden);
        let mut m = BTreeMap::new();
        m.insert("alpha".to_string(), vec![self.taps.len()]);
        for i in 0..self.taps.len() {
            for (n, s) in [
                ("attn_norm", vec![w]),
                ("wq", vec![w, w]),
                ("wk", vec![w, w]),
                ("wv", vec![w, w]),
                ("wo", vec![w, w]),
                ("mlp_norm", vec![w]),
                ("w_gate", vec![f, w]),
                ("w_up", vec![f, w]),
                ("w_down", vec![w, f]),
            ] {
                m.insert(format!("blocks.{i}.{n}"), s);
            }
        }
        m.insert("final_norm".into(), vec![w]);
        m.insert("up".into(), vec![d, w]);
        m.insert("gate.weight".into(), vec![2, w]);
        m.insert("gate.bias".into(), vec![2]);
        m
    }

    /// Trainable parameter count.
    pub fn param_count(&self) -> usize {
        self.tensor_shapes()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Multiply-accumulates of side blocks + gate for one position (attention over `ctx`
    /// cached positions; up-projection and head excluded).
    pub fn macs_per_position(&self, ctx: usize) -> usize {
        let (w, f) = (self.width, self.ffn());
        self.taps.len() * (4 * w * w + 3 * w * f + 2 * ctx * w) + 2 * w
    }
}

/// A named f32 tensor of the master copy.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Dims.
    pub shape: Vec<usize>,
    /// Row-major data.
    pub data: Vec<f32>,
}

/// f32 master weights of a side network + gate (what is trained and saved).
#[derive(Debug, Clone, PartialEq)]
pub struct SideWeights {
    /// Shape.
    pub config: SideConfig,
    /// Tensors by name (see [`SideConfig::tensor_shapes`]).
    pub tensors: BTreeMap<String, F32Tensor>,
}

impl SideWeights {
    /// Random initialisation (seeded). `up_scale` scales the up-projection; 0 makes the side
    /// path initially equal to the base (the usual start for training). The gate starts at
    /// "base" everywhere (zero weights, bias favouring the base path).
    pub fn init(config: SideConfig, seed: u64, up_scale: f32) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm") {
                vec![1.0; n]
            } else if name == "gate.bias" {
                // Untrained gate prefers the base path (p_side = sigmoid(-2) = 0.12).
                vec![1.0, -1.0]
            } else if name == "alpha" || name == "gate.weight" {
                vec![0.0; n]
            } else {
                let fan_in = *shape.last().unwrap_or(&1) as f32;
                let scale = if name == "up" { up_scale } else { 1.0 } / fan_in.sqrt();
                (0..n)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale * 3f32.sqrt())
                    .collect()
            };
            tensors.insert(name, F32Tensor { shape, data });
        }
        Ok(Self { config, tensors })
    }

    /// Borrows a tensor by name.
    pub fn get(&self, name: &str) -> Result<&F32Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| SpaError::InvalidConfig(format!("missing side tensor `{name}`")))
    }

    /// Checks every tensor is present with the configured shape.
    pub fn check_shapes(&self) -> Result<()> {
        let want = self.config.tensor_shapes();
        for (name, shape) in &want {
            let t = self.get(name)?;
            if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                return Err(SpaError::WrongShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: t.shape.clone(),
                });
            }
        }
        if let Some(extra) = self.tensors.keys().find(|k| !want.contains_key(*k)) {
            return Err(SpaError::InvalidConfig(format!(
                "unexpected side tensor `{extra}`"
            )));
        }
        Ok(())
    }
}

struct SideBlock {
    attn_norm: Vec<f32>,
    wq: QRows,
    wk: QRows,
    wv: QRows,
    wo: QRows,
    mlp_norm: Vec<f32>,
    w_gate: QRows,
    w_up: QRows,
    w_down: QRows,
}

/// Side KV cache: per block, keys and values `[positions, width]` (plain vectors).
#[derive(Debug, Clone, Default)]
pub struct SideCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl SideCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Rolls back to `pos` positions (keeps positions `0..pos`).
    pub fn truncate(&mut self, pos: usize) {
        if pos >= self.len {
            return;
        }
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let w = buf.len() / self.len.max(1);
            buf.truncate(pos * w);
        }
        self.len = pos;
    }
    /// Drops everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Output of the side network at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct SideStep {
    /// Gate probability of the side path (softmax index 1).
    pub p_side: f32,
    /// Final side state `s` (after the final norm), `[width]`.
    pub state: Vec<f32>,
    /// `h_final + U s`: the hidden state the LM head scores for the side path, `[hidden]`.
    pub hidden: Vec<f32>,
}

/// Inference form of a side network + gate in one [`QuantMode`].
pub struct SideNetwork {
    config: SideConfig,
    mode: QuantMode,
    mu: Vec<f32>,
    blocks: Vec<SideBlock>,
    final_norm: Vec<f32>,
    up: QRows,
    gate_w: Vec<f32>,
    gate_b: Vec<f32>,
    rope: (Vec<f32>, Vec<f32>),
    max_positions: usize,
}

impl std::fmt::Debug for SideNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideNetwork")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .field("bytes", &self.bytes())
            .finish()
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const SIDE_EPS: f32 = 1e-5;

impl SideNetwork {
    /// Builds the inference network from master weights, quantizing matrices with `mode`
    /// (norms, LST mixing gates and the 2-way gate classifier stay f32: they are tiny).
    /// `max_positions` bounds the side KV cache (the base's context window).
    pub fn new(w: &SideWeights, mode: QuantMode, max_positions: usize) -> Result<Self> {
        let cfg = &w.config;
        w.check_shapes()?;
        let q = |name: &str| -> Result<QRows> {
            let t = w.get(name)?;
            QRows::new(&t.data, t.shape[0], t.shape[1], mode)
        };
        let v = |name: &str| -> Result<Vec<f32>> { Ok(w.get(name)?.data.clone()) };
        let mut blocks = Vec::new();
        for i in 0..cfg.taps.len() {
            let n = |s: &str| format!("blocks.{i}.{s}");
            blocks.push(SideBlock {
                attn_norm: v(&n("attn_norm"))?,
                wq: q(&n("wq"))?,
                wk: q(&n("wk"))?,
                wv: q(&n("wv"))?,
                wo: q(&n("wo"))?,
                mlp_norm: v(&n("mlp_norm"))?,
                w_gate: q(&n("w_gate"))?,
                w_up: q(&n("w_up"))?,
                w_down: q(&n("w_down"))?,
            });
        }
        let mu = w
            .get("alpha")?
            .data
            .iter()
            .map(|a| sigmoid(a / cfg.temperature))
            .collect();
        let half = SIDE_HEAD_DIM / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                let f = p as f32 / cfg.rope_theta.powf(2.0 * i as f32 / SIDE_HEAD_DIM as f32);
                cos.push(f.cos());
                sin.push(f.sin());
            }
        }
        Ok(Self {
            config: cfg.clone(),
            mode,
            mu,
            blocks,
            final_norm: v("final_norm")?,
            up: q("up")?,
            gate_w: v("gate.weight")?,
            gate_b: v("gate.bias")?,
            rope: (cos, sin),
            max_positions,
        })
    }

    /// Configuration.
    pub fn config(&self) -> &SideConfig {
        &self.config
    }

    /// Weight format.
    pub fn mode(&self) -> QuantMode {
        self.mode
    }

    /// Bytes of weights held on the device (side blocks, up-projection, gate).
    pub fn bytes(&self) -> usize {
        let mats: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<usize>()
                    + 4 * (b.attn_norm.len() + b.mlp_norm.len())
            })
            .sum();
        mats + self.up.bytes()
            + 4 * (self.gate_w.len() + self.gate_b.len() + self.final_norm.len() + self.mu.len())
    }

    /// An empty side KV cache.
    pub fn new_cache(&self) -> SideCache {
        SideCache {
            k: vec![Vec::new(); self.blocks.len()],
            v: vec![Vec::new(); self.blocks.len()],
            len: 0,
        }
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = SIDE_HEAD_DIM / 2;
        let (cos, sin) = (
            &self.rope.0[pos * half..(pos + 1) * half],
            &self.rope.1[pos * half..(pos + 1) * half],
        );
        for head in x.chunks_mut(SIDE_HEAD_DIM) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Runs one position. `taps[i]` is the down-projected base state of tap `i` (`[width]`),
    /// `hidden` the base's final normed hidden state (`[base_hidden]`). Appends to `cache`.
    pub fn step(
        &self,
        taps: &[Vec<f32>],
        hidden: &[f32],
        cache: &mut SideCache,
    ) -> Result<SideStep> {
        let w = self.config.width;
        if taps.len() != self.blocks.len() || taps.iter().any(|t| t.len() != w) {
            return Err(SpaError::WrongShape {
                name: "side taps".into(),
                expected: vec![self.blocks.len(), w],
                got: vec![taps.len(), taps.first().map(|t| t.len()).unwrap_or(0)],
            });
        }
        if hidden.len() != self.config.base_hidden {
            return Err(SpaError::WrongShape {
                name: "final hidden".into(),
                expected: vec![self.config.base_hidden],
                got: vec![hidden.len()],
            });
        }
        let pos = cache.len;
        if pos >= self.max_positions {
            return Err(SpaError::ContextOverflow {
                requested: pos + 1,
                max: self.max_positions,
            });
        }
        if cache.k.len() != self.blocks.len() {
            *cache = self.new_cache();
        }
        let heads = w / SIDE_HEAD_DIM;
        let scale = 1.0 / (SIDE_HEAD_DIM as f32).sqrt();
        let mut s = vec![0f32; w];
        for (i, b) in self.blocks.iter().enumerate() {
            let mu = self.mu[i];
            let mut m: Vec<f32> = taps[i]
                .iter()
                .zip(&s)
                .map(|(z, p)| mu * z + (1.0 - mu) * p)
                .collect();
            // attention
            let a = rms_norm(&m, &b.attn_norm, SIDE_EPS);
            let mut q = b.wq.matvec(&a)?;
            let mut k = b.wk.matvec(&a)?;
            let v = b.wv.matvec(&a)?;
            self.rope(&mut q, pos);
            self.rope(&mut k, pos);
            let (kc, vc) = (&mut cache.k[i], &mut cache.v[i]);
            kc.truncate(pos * w);
            vc.truncate(pos * w);
            kc.extend_from_slice(&k);
            vc.extend_from_slice(&v);
            let n = pos + 1;
            let mut att = vec![0f32; w];
            let mut scores = vec![0f32; n];
            for h in 0..heads {
                let o = h * SIDE_HEAD_DIM;
                let qh = &q[o..o + SIDE_HEAD_DIM];
                let mut max = f32::NEG_INFINITY;
                for (t, sc) in scores.iter_mut().enumerate() {
                    let kh = &kc[t * w + o..t * w + o + SIDE_HEAD_DIM];
                    *sc = qh.iter().zip(kh).map(|(x, y)| x * y).sum::<f32>() * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let out = &mut att[o..o + SIDE_HEAD_DIM];
                for (t, sc) in scores.iter().enumerate() {
                    let p = sc / sum;
                    let vh = &vc[t * w + o..t * w + o + SIDE_HEAD_DIM];
                    out.iter_mut().zip(vh).for_each(|(a, b)| *a += p * b);
                }
            }
            let o = b.wo.matvec(&att)?;
            m.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            // SwiGLU MLP
            let f = rms_norm(&m, &b.mlp_norm, SIDE_EPS);
            let g = b.w_gate.matvec(&f)?;
            let u = b.w_up.matvec(&f)?;
            let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g * sigmoid(*g) * u).collect();
            let dn = b.w_down.matvec(&act)?;
            m.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            s = m;
        }
        cache.len = pos + 1;
        let state = rms_norm(&s, &self.final_norm, SIDE_EPS);
        let g0 = self.gate_b[0]
            + self.gate_w[..w]
                .iter()
                .zip(&state)
                .map(|(a, b)| a * b)
                .sum::<f32>();
        let g1 = self.gate_b[1]
            + self.gate_w[w..]
                .iter()
                .zip(&state)
                .map(|(a, b)| a * b)
                .sum::<f32>();
        let p_side = sigmoid(g1 - g0);
        let delta = self.up.matvec(&state)?;
        let hidden = hidden.iter().zip(&delta).map(|(h, d)| h + d).collect();
        Ok(SideStep {
            p_side,
            state,
            hidden,
        })
    }
}
