//! The side network + gate as a differentiable candle graph over whole (padded) sequences.
//!
//! It computes exactly what [`spa_model::SideNetwork::step`] computes position by position
//! (same tensor names, LST mixing, pre-norm blocks with split-half RoPE, SwiGLU, final norm,
//! gate, up-projection); a test checks the two agree. Parameters live in a candle-nn
//! [`VarMap`] under the names of [`SideConfig::tensor_shapes`], so they export directly to
//! [`SideWeights`].
//!
//! The LM head is applied only to the shortlist the device scores at inference (base top-k +
//! target): `logit_side(c) = logit_base(c) + E[c] . (U s)`, with `E` the frozen tied head rows.

use crate::error::{Result, TrainError};
use crate::features::SeqFeatures;
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::VarMap;
use spa_model::side::SIDE_HEAD_DIM;
use spa_model::{SideConfig, SideWeights};
use std::collections::BTreeMap;

const EPS: f64 = 1e-5;

/// Where the side blocks' inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideInput {
    /// Ladder side-tuning: the down-projected base taps (SPA, LST).
    BaseTaps,
    /// Full separation: a trainable projection of the (frozen, device-held) token embedding,
    /// the same vector for every block: the side never sees the base's hidden states.
    Embeddings,
}

/// A padded batch of sequences ready for the graph.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T, n_taps, w]` dequantized taps (or zeros for [`SideInput::Embeddings`]).
    pub taps: Tensor,
    /// `[B, T, d]` token embeddings (only for [`SideInput::Embeddings`]).
    pub emb: Option<Tensor>,
    /// Flat indices `b * T + t` of the loss positions `[N]`.
    pub loss_pos: Tensor,
    /// Candidate ids `[N * C]`.
    pub cand_ids: Tensor,
    /// Base candidate logits `[N, C]`.
    pub cand_logits: Tensor,
    /// Target index in each candidate row `[N]`.
    pub target_idx: Tensor,
    /// Loss positions.
    pub n: usize,
}

/// Builds a batch from cached features (`emb` = the head matrix when embeddings are needed).
pub fn make_batch(
    seqs: &[&SeqFeatures],
    n_taps: usize,
    width: usize,
    emb: Option<&Tensor>,
) -> Result<Batch> {
    make_batch_masked(seqs, n_taps, width, emb, None)
}

/// [`make_batch`] keeping only the loss positions whose target token `t` has `keep[t]` (e.g.
/// the tokens that start a word, where a suggestion strip is scored).
pub fn make_batch_masked(
    seqs: &[&SeqFeatures],
    n_taps: usize,
    width: usize,
    emb: Option<&Tensor>,
    keep: Option<&[bool]>,
) -> Result<Batch> {
    let dev = Device::Cpu;
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        return Err(TrainError::Data("empty batch".into()));
    }
    let c = seqs[0].cand_logits.len() / seqs[0].n_loss().max(1);
    let mut taps = vec![0f32; b * t * n_taps * width];
    let mut toks = vec![0u32; b * t];
    let (mut loss_pos, mut cand_ids, mut cand_logits, mut target_idx) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        let f = s.taps_f32(width);
        let o = i * t * n_taps * width;
        taps[o..o + f.len()].copy_from_slice(&f);
        toks[i * t..i * t + s.len()].copy_from_slice(&s.tokens);
        let lp0 = s.loss_start - 1;
        for j in 0..s.n_loss() {
            let target = s.tokens[lp0 + j + 1] as usize;
            if keep.is_some_and(|k| !k.get(target).copied().unwrap_or(false)) {
                continue;
            }
            loss_pos.push((i * t + lp0 + j) as u32);
            cand_ids.extend_from_slice(&s.cand_ids[j * c..(j + 1) * c]);
            cand_logits.extend_from_slice(&s.cand_logits[j * c..(j + 1) * c]);
            target_idx.push(s.target_idx[j]);
        }
    }
    let n = loss_pos.len();
    if n == 0 || cand_logits.len() != n * c {
        return Err(TrainError::Data("batch without loss positions".into()));
    }
    let emb = match emb {
        Some(e) => {
            let ids = Tensor::from_vec(toks, b * t, &dev)?;
            Some(e.index_select(&ids, 0)?.reshape((b, t, ()))?)
        }
        None => None,
    };
    Ok(Batch {
        taps: Tensor::from_vec(taps, (b, t, n_taps, width), &dev)?,
        emb,
        loss_pos: Tensor::from_vec(loss_pos, n, &dev)?,
        cand_ids: Tensor::from_vec(cand_ids, n * c, &dev)?,
        cand_logits: Tensor::from_vec(cand_logits, (n, c), &dev)?,
        target_idx: Tensor::from_vec(target_idx, n, &dev)?,
        n,
    })
}

/// Outputs at the loss positions.
#[derive(Debug)]
pub struct Heads {
    /// Gate log-probabilities `[N, 2]` (0 = base path, 1 = side path).
    pub gate_logp: Tensor,
    /// log P_side(target) over the shortlist `[N]`.
    pub logp_side: Tensor,
    /// log P_base(target) over the shortlist `[N]` (constant).
    pub logp_base: Tensor,
    /// Side path's argmax == base path's argmax `[N]` (u8, constant): "no override".
    pub same_argmax: Tensor,
}

/// The trainable side network.
pub struct SideGraph {
    /// Shape.
    pub config: SideConfig,
    /// Input kind.
    pub input: SideInput,
    /// Parameters by name.
    pub varmap: VarMap,
    vars: BTreeMap<String, Var>,
    head: FrozenHead,
}

/// The frozen tied head rows the shortlist loss reads.
#[derive(Clone)]
enum FrozenHead {
    /// f32 `[vocab, d]` (evaluation, full separation's embeddings).
    Dense(Tensor),
    /// The device's quantized head (personalization on the device: no f32 copy of the head);
    /// each batch's shortlist rows are dequantized.
    Device(spa_model::DeviceHead),
}

impl FrozenHead {
    /// Rows of `ids` (`[N]` u32) as `[N, d]` f32.
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            FrozenHead::Dense(h) => Ok(h.index_select(ids, 0)?),
            FrozenHead::Device(h) => {
                let ids: Vec<u32> = ids.to_vec1()?;
                let rows = h.rows_f32(&ids)?;
                Ok(Tensor::from_vec(
                    rows,
                    (ids.len(), h.hidden()),
                    &Device::Cpu,
                )?)
            }
        }
    }
}

impl std::fmt::Debug for SideGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideGraph")
            .field("config", &self.config)
            .field("input", &self.input)
            .finish()
    }
}

fn rms(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + EPS)?.sqrt()?)?.broadcast_mul(w)?)
}

impl SideGraph {
    /// Wraps master weights (copied into fresh Vars). `head` = frozen tied head `[vocab, d]`.
    pub fn new(w: &SideWeights, input: SideInput, head: Tensor, seed: u64) -> Result<Self> {
        Self::build(w, input, FrozenHead::Dense(head), seed)
    }

    /// [`SideGraph::new`] for ladder side-tuning over the device's quantized head: the shortlist
    /// rows of each batch are dequantized, and no f32 copy of the head is held (on-device
    /// personalization).
    pub fn with_device_head(
        w: &SideWeights,
        head: &spa_model::DeviceHead,
        seed: u64,
    ) -> Result<Self> {
        Self::build(
            w,
            SideInput::BaseTaps,
            FrozenHead::Device(head.clone()),
            seed,
        )
    }

    fn build(w: &SideWeights, input: SideInput, head: FrozenHead, seed: u64) -> Result<Self> {
        w.check_shapes()?;
        let varmap = VarMap::new();
        let mut vars = BTreeMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Tensor("poisoned".into()))?;
            for (name, t) in &w.tensors {
                let v = Var::from_tensor(&Tensor::from_vec(
                    t.data.clone(),
                    t.shape.clone(),
                    &Device::Cpu,
                )?)?;
                data.insert(name.clone(), v.clone());
                vars.insert(name.clone(), v);
            }
            if input == SideInput::Embeddings {
                let (wd, d) = (w.config.width, w.config.base_hidden);
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5e9a);
                let a = (3.0 / d as f32).sqrt();
                let init: Vec<f32> = (0..wd * d).map(|_| rng.random_range(-a..a)).collect();
                let v = Var::from_tensor(&Tensor::from_vec(init, (wd, d), &Device::Cpu)?)?;
                data.insert("sep_in".into(), v.clone());
                vars.insert("sep_in".into(), v);
            }
        }
        Ok(Self {
            config: w.config.clone(),
            input,
            varmap,
            vars,
            head,
        })
    }

    fn v(&self, n: &str) -> Result<&Tensor> {
        self.vars
            .get(n)
            .map(|v| v.as_tensor())
            .ok_or_else(|| TrainError::Config(format!("missing side tensor {n}")))
    }

    /// The frozen f32 head (`None` over the device's quantized head).
    pub fn head(&self) -> Option<&Tensor> {
        match &self.head {
            FrozenHead::Dense(h) => Some(h),
            FrozenHead::Device(_) => None,
        }
    }

    /// All trainable variables (for the optimizer).
    pub fn all_vars(&self) -> Vec<Var> {
        self.vars.values().cloned().collect()
    }

    /// Variables except the gate classifier (LST / full separation never train it).
    pub fn vars_without_gate(&self) -> Vec<Var> {
        self.vars
            .iter()
            .filter(|(n, _)| !n.starts_with("gate."))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Trainable parameter count of the variables the method trains.
    pub fn param_count(&self, with_gate: bool) -> usize {
        self.vars
            .iter()
            .filter(|(n, _)| with_gate || !n.starts_with("gate."))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Exports the current values as master weights (the `sep_in` projection of full
    /// separation is returned separately).
    pub fn to_weights(&self) -> Result<(SideWeights, Option<Vec<f32>>)> {
        let mut tensors = BTreeMap::new();
        let mut sep = None;
        for (n, v) in &self.vars {
            let data: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
            if n == "sep_in" {
                sep = Some(data);
                continue;
            }
            tensors.insert(
                n.clone(),
                spa_model::side::F32Tensor {
                    shape: v.as_tensor().dims().to_vec(),
                    data,
                },
            );
        }
        let w = SideWeights {
            config: self.config.clone(),
            tensors,
        };
        w.check_shapes()?;
        Ok((w, sep))
    }

    /// Overwrites the variables with `w` (and `sep`).
    pub fn load_weights(&self, w: &SideWeights, sep: Option<&[f32]>) -> Result<()> {
        for (n, v) in &self.vars {
            if n == "sep_in" {
                if let Some(s) = sep {
                    v.set(&Tensor::from_vec(
                        s.to_vec(),
                        v.as_tensor().dims(),
                        &Device::Cpu,
                    )?)?;
                }
                continue;
            }
            let t = w.get(n)?;
            v.set(&Tensor::from_vec(
                t.data.clone(),
                t.shape.clone(),
                &Device::Cpu,
            )?)?;
        }
        Ok(())
    }

    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let half = SIDE_HEAD_DIM / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for i in 0..half {
                let f = p as f32
                    / self
                        .config
                        .rope_theta
                        .powf(2.0 * i as f32 / SIDE_HEAD_DIM as f32);
                cos.push(f.cos());
                sin.push(f.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (1, t, 1, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (1, t, 1, half), &Device::Cpu)?,
        ))
    }

    /// Final side states `[B, T, w]` (after the final norm).
    pub fn states(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t, n_taps, w) = batch.taps.dims4()?;
        if n_taps != self.config.taps.len() || w != self.config.width {
            return Err(TrainError::Config(
                "batch does not match the side shape".into(),
            ));
        }
        let heads = w / SIDE_HEAD_DIM;
        let half = SIDE_HEAD_DIM / 2;
        let (cos, sin) = self.rope_tables(t)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), &Device::Cpu)?;
        let scale = 1.0 / (SIDE_HEAD_DIM as f64).sqrt();
        let mu = (self.v("alpha")? / self.config.temperature as f64)?;
        let mu = candle_nn::ops::sigmoid(&mu)?;
        let sep_input = match (self.input, &batch.emb) {
            (SideInput::Embeddings, Some(e)) => Some(e.broadcast_matmul(&self.v("sep_in")?.t()?)?),
            (SideInput::Embeddings, None) => {
                return Err(TrainError::Config(
                    "full separation needs embeddings".into(),
                ))
            }
            _ => None,
        };
        let rope = |x: &Tensor| -> Result<Tensor> {
            // x [B, T, H, 32]: split halves (i, i + 16), as SideNetwork::rope.
            let x1 = x.narrow(3, 0, half)?;
            let x2 = x.narrow(3, half, half)?;
            let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let bb = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
            Ok(Tensor::cat(&[a, bb], 3)?)
        };
        let mut s = Tensor::zeros((b, t, w), DType::F32, &Device::Cpu)?;
        for i in 0..n_taps {
            let n = |x: &str| format!("blocks.{i}.{x}");
            let z = match &sep_input {
                Some(e) => e.clone(),
                None => batch.taps.i((.., .., i, ..))?.contiguous()?,
            };
            let mui = mu.i(i)?;
            let one_minus = (1.0 - &mui)?;
            let mut m = (z.broadcast_mul(&mui)? + s.broadcast_mul(&one_minus)?)?;
            let a = rms(&m, self.v(&n("attn_norm"))?)?;
            // One [B*T, in] x [in, out] product (one gemm call, not one per sequence).
            let lin = |x: &Tensor, name: &str| -> Result<Tensor> {
                let wt = self.v(&n(name))?.t()?;
                let (o, i) = (wt.dim(1)?, wt.dim(0)?);
                Ok(x.reshape((b * t, i))?.matmul(&wt)?.reshape((b, t, o))?)
            };
            let q = rope(&lin(&a, "wq")?.reshape((b, t, heads, SIDE_HEAD_DIM))?)?;
            let k = rope(&lin(&a, "wk")?.reshape((b, t, heads, SIDE_HEAD_DIM))?)?;
            let v = lin(&a, "wv")?.reshape((b, t, heads, SIDE_HEAD_DIM))?;
            let (q, k, v) = (
                q.transpose(1, 2)?.contiguous()?,
                k.transpose(1, 2)?.contiguous()?,
                v.transpose(1, 2)?.contiguous()?,
            );
            let sc = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax(&sc, D::Minus1)?;
            let att = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, w))?;
            m = (m + lin(&att, "wo")?)?;
            let f = rms(&m, self.v(&n("mlp_norm"))?)?;
            let g = lin(&f, "w_gate")?;
            let u = lin(&f, "w_up")?;
            let act = (g.silu()? * u)?;
            m = (m + lin(&act, "w_down")?)?;
            s = m;
        }
        rms(&s, self.v("final_norm")?)
    }

    /// Side-path logits over each loss position's shortlist `[N][C]` and the gate's side
    /// probability `[N]` (inference, no gradients kept).
    pub fn scores(&self, batch: &Batch) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let st = self.states(batch)?.detach();
        let (b, t, w) = st.dims3()?;
        let st = st.reshape((b * t, w))?.index_select(&batch.loss_pos, 0)?;
        let gate = st
            .matmul(&self.v("gate.weight")?.t()?)?
            .broadcast_add(self.v("gate.bias")?)?;
        let p = candle_nn::ops::softmax(&gate, D::Minus1)?
            .narrow(1, 1, 1)?
            .squeeze(1)?;
        let delta = st.matmul(&self.v("up")?.t()?)?;
        let (n, c) = batch.cand_logits.dims2()?;
        let d = delta.dim(1)?;
        let e = self.head.rows(&batch.cand_ids)?.reshape((n, c, d))?;
        let side = (batch.cand_logits.clone() + e.matmul(&delta.unsqueeze(2)?)?.squeeze(2)?)?;
        Ok((side.to_vec2()?, p.to_vec1()?))
    }

    /// Gate and shortlist probabilities at the loss positions.
    pub fn heads(&self, batch: &Batch) -> Result<Heads> {
        let st = self.states(batch)?;
        let (b, t, w) = st.dims3()?;
        let st = st.reshape((b * t, w))?.index_select(&batch.loss_pos, 0)?; // [N, w]
        let gate = st
            .matmul(&self.v("gate.weight")?.t()?)?
            .broadcast_add(self.v("gate.bias")?)?;
        let gate_logp = candle_nn::ops::log_softmax(&gate, D::Minus1)?;
        let delta = st.matmul(&self.v("up")?.t()?)?; // [N, d]
        let (n, c) = batch.cand_logits.dims2()?;
        let d = delta.dim(1)?;
        let e = self.head.rows(&batch.cand_ids)?.reshape((n, c, d))?;
        let side = (batch.cand_logits.clone() + e.matmul(&delta.unsqueeze(2)?)?.squeeze(2)?)?;
        let lps = candle_nn::ops::log_softmax(&side, D::Minus1)?;
        let lpb = candle_nn::ops::log_softmax(&batch.cand_logits, D::Minus1)?;
        let ti = batch.target_idx.unsqueeze(1)?;
        let same = side
            .detach()
            .argmax(D::Minus1)?
            .eq(&batch.cand_logits.argmax(D::Minus1)?)?;
        Ok(Heads {
            gate_logp,
            logp_side: lps.gather(&ti, 1)?.squeeze(1)?,
            logp_base: lpb.gather(&ti, 1)?.squeeze(1)?,
            same_argmax: same,
        })
    }
}
