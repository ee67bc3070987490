//! The trainer: side blocks + gate (+ up-projection) on cached features, with early stopping,
//! checkpoints and exact resume.
//!
//! Loss (DESIGN.md "our precise reading"), per loss position with target `y`, gate
//! probabilities `p = softmax(G s + g)` and shortlist probabilities `P_f` (base) and `P_g`
//! (side path `f + g`):
//! - SPA: `-log(p_base P_f(y) + p_side P_g(y))` (the mixture LM loss)
//!   `+ beta * CE(p, side if log P_g(y) - log P_f(y) > margin else base)` (the CATE term: the gate
//!   learns where the side path's treatment effect is positive by a margin)
//!   `+ lambda * p_side` (usage cost: a side token that overrides the draft costs a round trip).
//! - LST and full separation: `-log P_g(y)` (side always on, no gate).
//!
//! The optimizer is AdamW with candle-nn's update rule, reimplemented here so its moments can
//! be saved in checkpoints (candle-nn keeps them private): resuming from a checkpoint continues
//! bit for bit.

use crate::error::{Result, TrainError};
use crate::features::SeqFeatures;
use crate::sidegrad::{make_batch_masked, SideGraph, SideInput};
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use spa_model::GateMode;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Training method over cached features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Ladder side + learned gate.
    Spa,
    /// Ladder side, always on, no gate (Sung et al.).
    Lst,
    /// A side network that never sees the base's hidden states (token embeddings in), combined
    /// with the base only at the output; no gate.
    FullSeparation,
}

impl Method {
    /// Name in results.
    pub fn name(self) -> &'static str {
        match self {
            Method::Spa => "spa",
            Method::Lst => "lst",
            Method::FullSeparation => "full_separation",
        }
    }
    /// Input kind.
    pub fn input(self) -> SideInput {
        match self {
            Method::FullSeparation => SideInput::Embeddings,
            _ => SideInput::BaseTaps,
        }
    }
    /// Whether the gate classifier is trained and used.
    pub fn gated(self) -> bool {
        self == Method::Spa
    }
}

/// Hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Method.
    pub method: Method,
    /// Learning rate.
    pub lr: f64,
    /// Sequences per step (paper: 8).
    pub batch: usize,
    /// Step budget.
    pub max_steps: usize,
    /// Validation every N steps.
    pub eval_every: usize,
    /// Stop after this many validations without improvement.
    pub patience: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Usage cost lambda.
    pub usage_cost: f64,
    /// Weight of the CATE term.
    pub cate_weight: f64,
    /// Margin (nats) by which the side path must beat the base to count as a positive effect.
    pub cate_margin: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Learning-rate multiplier of the gate classifier: its bias must move by ~2 nats to flip
    /// the untrained "prefer base" decision, which Adam's ~lr-per-step moves would need
    /// thousands of steps for.
    pub gate_lr_mult: f64,
    /// Train only on the positions whose target token is marked here (indexed by token id;
    /// `None`: every position). Not part of the run's identity in files.
    #[serde(skip)]
    pub loss_targets: Option<std::sync::Arc<Vec<bool>>>,
    /// Sequences per forward/backward pass (0: the whole batch). A step's batch runs as
    /// micro-batches of this size whose gradients are summed, weighted by their loss
    /// positions, before one optimizer update: the same update as the whole batch (up to
    /// float rounding), with the autograd graph of a micro-batch only in memory (the graph of
    /// 8 x 64 positions through 30 side blocks holds ~400 MB). Not part of the run's identity.
    #[serde(skip)]
    pub micro_batch: usize,
    /// SPA only: train the gate classifier alone, the side network frozen at the weights the
    /// graph starts from (the two-stage SPA of `spa eval`: an LST network, then its gate).
    /// Absent from files when false, so the identities of earlier runs do not change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gate_only: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Spa,
            lr: 1e-3,
            batch: 8,
            max_steps: 200,
            eval_every: 25,
            patience: 3,
            seed: 0,
            usage_cost: 0.05,
            cate_weight: 0.5,
            cate_margin: 0.1,
            weight_decay: 0.01,
            gate_lr_mult: 30.0,
            loss_targets: None,
            micro_batch: 0,
            gate_only: false,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr < 1.0) || self.batch == 0 || self.eval_every == 0 {
            return Err(TrainError::Config(
                "lr must be in (0, 1); batch and eval_every positive".into(),
            ));
        }
        if self.usage_cost < 0.0
            || self.cate_weight < 0.0
            || !self.usage_cost.is_finite()
            || !(self.gate_lr_mult > 0.0 && self.gate_lr_mult <= 1000.0)
        {
            return Err(TrainError::Config("loss weights must be >= 0".into()));
        }
        if self.gate_only && !self.method.gated() {
            return Err(TrainError::Config(format!(
                "gate_only needs a gated method, not {}",
                self.method.name()
            )));
        }
        Ok(())
    }
}

/// Validation figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    /// Validation criterion (early stopping, lr choice): the mixture NLL for SPA (the CATE
    /// and usage terms are excluded: they shape the gate, not the distribution), -log P_side
    /// for LST and full separation.
    pub loss: f64,
    /// Mean -log P(y) of the emitted distribution (gate-selected for SPA, side for LST).
    pub nll: f64,
    /// Fraction of positions where the gate picks the side path (LST: 1).
    pub side_usage: f64,
    /// Fraction of positions where the chosen path's argmax differs from the base's.
    pub override_rate: f64,
    /// Mean gate probability of the side path (soft usage; LST: 1).
    pub p_side_mean: f64,
    /// Positions.
    pub positions: usize,
}

/// Progress of a run, passed to the callback after every step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Step budget.
    pub max_steps: usize,
    /// Training loss of this step.
    pub loss: f64,
    /// Latest validation loss.
    pub val_loss: Option<f64>,
}

/// Result of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Steps taken.
    pub steps: usize,
    /// Validation before training.
    pub initial: EvalStats,
    /// Best validation (its weights are the ones left in the graph).
    pub best: EvalStats,
    /// (step, validation loss) history.
    pub history: Vec<(usize, f64)>,
    /// Stopped early (patience exhausted).
    pub early_stopped: bool,
    /// Seconds of training.
    pub seconds: f64,
}

/// AdamW with candle-nn's update rule and saveable moments.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    lr: f64,
    wd: f64,
    lr_mult: Vec<f64>,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    /// Optimizer over named variables.
    pub fn new(vars: Vec<(String, Var)>, lr: f64, wd: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            v: m.clone(),
            lr_mult: vec![1.0; vars.len()],
            m,
            vars,
            t: 0,
            lr,
            wd,
        })
    }

    /// Multiplies the learning rate of the variables whose name starts with `prefix`.
    pub fn set_lr_mult(&mut self, prefix: &str, mult: f64) {
        for (i, (n, _)) in self.vars.iter().enumerate() {
            if n.starts_with(prefix) {
                self.lr_mult[i] = mult;
            }
        }
    }

    /// One update from `loss`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_grads(&g)
    }

    /// The gradients of `loss` with respect to each variable, in [`AdamW::step_grads`]'s
    /// order, scaled by `weight` and added to `acc` (a micro-batch's share of a step).
    pub fn accumulate(
        &self,
        loss: &Tensor,
        weight: f64,
        acc: &mut Vec<Option<Tensor>>,
    ) -> Result<()> {
        let grads = loss.backward()?;
        acc.resize(self.vars.len(), None);
        for ((_, var), a) in self.vars.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = (g * weight)?;
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// One update from gradients given per variable (`None`: no gradient, left as is).
    pub fn step_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        self.t += 1;
        let sm = 1.0 / (1.0 - Self::B1.powi(self.t as i32));
        let sv = 1.0 / (1.0 - Self::B2.powi(self.t as i32));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(Some(g)) = grads.get(i) else {
                continue;
            };
            let m = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            let v = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let upd = ((&m * sm)? / ((&v * sv)?.sqrt()? + Self::EPS)?)?;
            let lr = self.lr * self.lr_mult[i];
            let next = ((var.as_tensor() * (1.0 - lr * self.wd))? - (upd * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The padded batch of `seqs` for `graph` (its input: taps, or embeddings from its head) with
/// `cfg`'s loss positions.
fn batch_of(
    graph: &SideGraph,
    seqs: &[&SeqFeatures],
    cfg: &TrainConfig,
) -> Result<crate::sidegrad::Batch> {
    let c = &graph.config;
    let emb = match graph.input {
        SideInput::Embeddings => Some(graph.head().cloned().ok_or_else(|| {
            TrainError::Config("full separation needs the f32 head for its embeddings".into())
        })?),
        SideInput::BaseTaps => None,
    };
    make_batch_masked(
        seqs,
        c.taps.len(),
        c.width,
        emb.as_ref(),
        cfg.loss_targets.as_deref().map(|v| v.as_slice()),
    )
}

fn objective(
    graph: &SideGraph,
    seqs: &[&SeqFeatures],
    cfg: &TrainConfig,
) -> Result<(Tensor, EvalStats)> {
    let batch = batch_of(graph, seqs, cfg)?;
    let h = graph.heads(&batch)?;
    let n = batch.n as f64;
    let not_same = (1.0 - h.same_argmax.to_dtype(candle_core::DType::F32)?)?;
    let (loss, criterion, nll, usage, overrides, soft) = if cfg.method.gated() {
        let lpb = h.gate_logp.narrow(1, 0, 1)?.squeeze(1)?;
        let lps = h.gate_logp.narrow(1, 1, 1)?.squeeze(1)?;
        let a = (&lpb + &h.logp_base)?;
        let b = (&lps + &h.logp_side)?;
        let mx = a.maximum(&b)?.detach();
        let mix = ((a - &mx)?.exp()? + (b - &mx)?.exp()?)?.log()?.add(&mx)?;
        let mix_nll = mix.neg()?.mean_all()?;
        let mix_value = mix_nll.to_scalar::<f32>()? as f64;
        let label = ((h.logp_side.detach() - h.logp_base.detach())?.gt(cfg.cate_margin)?)
            .to_dtype(candle_core::DType::F32)?;
        let cate = ((&label * &lps)? + ((1.0 - &label)? * &lpb)?)?
            .neg()?
            .mean_all()?;
        let p_side = lps.exp()?;
        let usage_cost = p_side.mean_all()?;
        let loss = ((mix_nll + (cate * cfg.cate_weight)?)? + (usage_cost * cfg.usage_cost)?)?;
        // Emitted distribution: the gate's hard decision.
        let side = p_side
            .detach()
            .gt(graph.config.gate_threshold as f64)?
            .to_dtype(candle_core::DType::F32)?;
        let emitted = ((&side * h.logp_side.detach())? + ((1.0 - &side)? * &h.logp_base)?)?;
        let nll = emitted.neg()?.mean_all()?.to_scalar::<f32>()? as f64;
        let usage = side.mean_all()?.to_scalar::<f32>()? as f64;
        let ov = (side * not_same)?.mean_all()?.to_scalar::<f32>()? as f64;
        let soft = p_side.mean_all()?.to_scalar::<f32>()? as f64;
        (loss, mix_value, nll, usage, ov, soft)
    } else {
        let loss = h.logp_side.neg()?.mean_all()?;
        let nll = loss.to_scalar::<f32>()? as f64;
        let ov = not_same.mean_all()?.to_scalar::<f32>()? as f64;
        (loss, nll, nll, 1.0, ov, 1.0)
    };
    let stats = EvalStats {
        loss: criterion,
        nll,
        side_usage: usage,
        override_rate: overrides,
        p_side_mean: soft,
        positions: n as usize,
    };
    Ok((loss, stats))
}

fn check_loss(lv: f64, step: usize) -> Result<f64> {
    if lv.is_finite() {
        Ok(lv)
    } else {
        Err(TrainError::Tensor(format!(
            "loss became {lv} at step {step}"
        )))
    }
}

/// Loss positions of one sequence under `cfg` (what [`make_batch_masked`] keeps).
fn loss_positions(s: &SeqFeatures, cfg: &TrainConfig) -> usize {
    let targets = s
        .tokens
        .get(s.loss_start..s.loss_start + s.n_loss())
        .unwrap_or(&[]);
    match cfg.loss_targets.as_deref() {
        None => targets.len(),
        Some(keep) => targets
            .iter()
            .filter(|&&t| keep.get(t as usize).copied().unwrap_or(false))
            .count(),
    }
}

/// Evaluates the objective over `set` in batches (no training).
pub fn evaluate(graph: &SideGraph, set: &[SeqFeatures], cfg: &TrainConfig) -> Result<EvalStats> {
    let mut acc = EvalStats::default();
    let per_pass = match cfg.micro_batch {
        0 => cfg.batch.max(1),
        m => m.min(cfg.batch.max(1)),
    };
    for chunk in set.chunks(per_pass) {
        let refs: Vec<&SeqFeatures> = chunk.iter().collect();
        let (_, s) = objective(graph, &refs, cfg)?;
        let n = s.positions as f64;
        acc.loss += s.loss * n;
        acc.nll += s.nll * n;
        acc.side_usage += s.side_usage * n;
        acc.override_rate += s.override_rate * n;
        acc.p_side_mean += s.p_side_mean * n;
        acc.positions += s.positions;
    }
    let n = acc.positions.max(1) as f64;
    acc.loss /= n;
    acc.nll /= n;
    acc.side_usage /= n;
    acc.override_rate /= n;
    acc.p_side_mean /= n;
    Ok(acc)
}

/// Validation figures of a gated network at one gate threshold (see [`gate_sweep`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GatePoint {
    /// Side path where the gate's side probability exceeds this (1.0: never).
    pub threshold: f32,
    /// Fraction of loss positions where the emitted path's top token is the reference token
    /// (teacher forcing; what greedy decoding emits).
    pub accuracy: f64,
    /// Mean -log P(reference) of the emitted path.
    pub nll: f64,
    /// Fraction of positions on the side path.
    pub side_usage: f64,
}

/// The thresholds [`choose_gate_threshold`] tries: always side (0), 0.1 ... 0.9, never (1).
pub const GATE_THRESHOLDS: [f32; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Teacher-forced figures of `graph`'s emitted path over `set` at each of `thresholds`, from one
/// scoring pass (shortlist logits, as in training).
pub fn gate_sweep(
    graph: &SideGraph,
    set: &[SeqFeatures],
    cfg: &TrainConfig,
    thresholds: &[f32],
) -> Result<Vec<GatePoint>> {
    let (mut hits, mut nll, mut side) = (
        vec![0usize; thresholds.len()],
        vec![0f64; thresholds.len()],
        vec![0usize; thresholds.len()],
    );
    let mut n = 0usize;
    let row_stats = |row: &[f32], t: usize| -> (bool, f64) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let z: f64 = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
        let hit = row.iter().all(|&v| v <= row[t]);
        (hit, -((row[t] - mx) as f64 - z.ln()))
    };
    for chunk in set.chunks(cfg.batch.max(1)) {
        let refs: Vec<&SeqFeatures> = chunk.iter().collect();
        let batch = batch_of(graph, &refs, cfg)?;
        let (side_rows, p) = graph.scores(&batch)?;
        let base_rows: Vec<Vec<f32>> = batch.cand_logits.to_vec2()?;
        let targets: Vec<u32> = batch.target_idx.to_vec1()?;
        for (((srow, brow), &ps), &t) in side_rows.iter().zip(&base_rows).zip(&p).zip(&targets) {
            let (s_hit, s_nll) = row_stats(srow, t as usize);
            let (b_hit, b_nll) = row_stats(brow, t as usize);
            for (i, &th) in thresholds.iter().enumerate() {
                let on_side = GateMode::Learned.use_side(ps, th);
                let (h, l) = if on_side {
                    (s_hit, s_nll)
                } else {
                    (b_hit, b_nll)
                };
                hits[i] += usize::from(h);
                nll[i] += l;
                side[i] += usize::from(on_side);
            }
            n += 1;
        }
    }
    let d = n.max(1) as f64;
    Ok(thresholds
        .iter()
        .enumerate()
        .map(|(i, &threshold)| GatePoint {
            threshold,
            accuracy: hits[i] as f64 / d,
            nll: nll[i] / d,
            side_usage: side[i] as f64 / d,
        })
        .collect())
}

/// The threshold whose emitted path is most often right on validation ([`gate_sweep`] over
/// [`GATE_THRESHOLDS`]); ties go to the higher threshold (fewer side positions, fewer rounds).
/// Returns it with the whole sweep.
pub fn choose_gate_threshold(
    graph: &SideGraph,
    val: &[SeqFeatures],
    cfg: &TrainConfig,
) -> Result<(f32, Vec<GatePoint>)> {
    let sweep = gate_sweep(graph, val, cfg, &GATE_THRESHOLDS)?;
    let best = sweep
        .iter()
        .fold(None::<&GatePoint>, |b, p| match b {
            Some(b) if b.accuracy > p.accuracy => Some(b),
            _ => Some(p),
        })
        .map_or(0.5, |p| p.threshold);
    Ok((best, sweep))
}

/// A resumable training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    step: usize,
    adam_t: usize,
    best_loss: f64,
    best_step: usize,
    since_best: usize,
    history: Vec<(usize, f64)>,
    initial: EvalStats,
    best: EvalStats,
    config: TrainConfig,
}

fn order_for(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    idx.shuffle(&mut rng);
    idx
}

fn save_tensors(path: &Path, map: &BTreeMap<String, Tensor>, meta: &str) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (k, t) in map {
        tensors.insert(
            k.clone(),
            spa_model::side::F32Tensor {
                shape: t.dims().to_vec(),
                data: t.flatten_all()?.to_vec1()?,
            },
        );
    }
    spa_model::io::save_f32(path, &tensors, meta)?;
    Ok(())
}

/// Trains `graph` in place on `train`, early-stopping on `val`; the best validation weights are
/// left in the graph. With `checkpoint = Some(dir)`, state is saved at every validation and a
/// run started with the same directory resumes from it (same data and config required).
/// `progress` is called after every step; returning `false` cancels (`TrainError::Cancelled`,
/// the checkpoint stays).
pub fn train(
    graph: &SideGraph,
    train: &[SeqFeatures],
    val: &[SeqFeatures],
    cfg: &TrainConfig,
    checkpoint: Option<&Path>,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<TrainReport> {
    cfg.validate()?;
    if train.is_empty() || val.is_empty() {
        return Err(TrainError::Data("empty training or validation set".into()));
    }
    if graph.input != cfg.method.input() {
        return Err(TrainError::Config(
            "graph input does not match the method".into(),
        ));
    }
    let start = std::time::Instant::now();
    let vars: Vec<(String, Var)> = {
        let data = graph
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Tensor("poisoned".into()))?;
        let mut v: Vec<(String, Var)> = data
            .iter()
            .filter(|(n, _)| {
                let gate = n.starts_with("gate.");
                if cfg.gate_only {
                    gate
                } else {
                    cfg.method.gated() || !gate
                }
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut opt = AdamW::new(vars.clone(), cfg.lr, cfg.weight_decay)?;
    opt.set_lr_mult("gate.", cfg.gate_lr_mult);
    let ckpt = checkpoint.map(|d| {
        (
            d.join("state.json"),
            d.join("weights.safetensors"),
            d.join("adam.safetensors"),
            d.join("best.safetensors"),
        )
    });
    let mut st = match &ckpt {
        Some((sp, wp, ap, _)) if sp.exists() => {
            let s: RunState =
                serde_json::from_slice(&std::fs::read(sp).map_err(|e| TrainError::io(sp, e))?)
                    .map_err(|e| TrainError::Cache {
                        path: sp.clone(),
                        reason: e.to_string(),
                    })?;
            if s.config != *cfg {
                return Err(TrainError::Cache {
                    path: sp.clone(),
                    reason: "checkpoint was made with another configuration".into(),
                });
            }
            let (w, _) = spa_model::io::load_f32(wp)?;
            let (a, _) = spa_model::io::load_f32(ap)?;
            for (i, (n, v)) in vars.iter().enumerate() {
                let get =
                    |m: &BTreeMap<String, spa_model::side::F32Tensor>, k: &str| -> Result<Tensor> {
                        let t = m.get(k).ok_or_else(|| TrainError::Cache {
                            path: wp.clone(),
                            reason: format!("missing {k}"),
                        })?;
                        Ok(Tensor::from_vec(
                            t.data.clone(),
                            t.shape.clone(),
                            &Device::Cpu,
                        )?)
                    };
                v.set(&get(&w, n)?)?;
                opt.m[i] = get(&a, &format!("m.{n}"))?;
                opt.v[i] = get(&a, &format!("v.{n}"))?;
            }
            opt.t = s.adam_t;
            log::info!("resuming from step {}", s.step);
            s
        }
        _ => {
            let initial = evaluate(graph, val, cfg)?;
            RunState {
                step: 0,
                adam_t: 0,
                best_loss: initial.loss,
                best_step: 0,
                since_best: 0,
                history: vec![(0, initial.loss)],
                best: initial.clone(),
                initial,
                config: cfg.clone(),
            }
        }
    };
    let snapshot = |g: &SideGraph| -> Result<HashMap<String, Tensor>> {
        let data = g
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Tensor("poisoned".into()))?;
        data.iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    };
    let mut best_weights = match &ckpt {
        Some((_, _, _, bp)) if bp.exists() && st.step > 0 => {
            let (b, _) = spa_model::io::load_f32(bp)?;
            b.into_iter()
                .map(|(k, t)| Ok((k, Tensor::from_vec(t.data, t.shape, &Device::Cpu)?)))
                .collect::<Result<HashMap<_, _>>>()?
        }
        _ => snapshot(graph)?,
    };
    let per_epoch = train.len().div_ceil(cfg.batch);
    let mut early = false;
    let mut last_val = None;
    while st.step < cfg.max_steps {
        let epoch = st.step / per_epoch;
        let order = order_for(cfg.seed, epoch, train.len());
        let k = st.step % per_epoch;
        let refs: Vec<&SeqFeatures> = order
            .iter()
            .skip(k * cfg.batch)
            .take(cfg.batch)
            .map(|&i| &train[i])
            .collect();
        let mb = if cfg.micro_batch == 0 {
            refs.len().max(1)
        } else {
            cfg.micro_batch
        };
        let lv = if mb >= refs.len() {
            let (loss, _) = objective(graph, &refs, cfg)?;
            let lv = check_loss(loss.to_scalar::<f32>()? as f64, st.step)?;
            opt.backward_step(&loss)?;
            lv
        } else {
            // Each micro-batch's loss is a mean over its positions: weighting its gradient by
            // its share of the step's positions gives the whole batch's mean.
            let total: usize = refs
                .iter()
                .map(|s| loss_positions(s, cfg))
                .sum::<usize>()
                .max(1);
            let (mut acc, mut lv) = (Vec::new(), 0.0);
            for part in refs.chunks(mb) {
                let n: usize = part.iter().map(|s| loss_positions(s, cfg)).sum();
                if n == 0 {
                    continue;
                }
                let w = n as f64 / total as f64;
                let (loss, _) = objective(graph, part, cfg)?;
                lv += w * check_loss(loss.to_scalar::<f32>()? as f64, st.step)?;
                opt.accumulate(&loss, w, &mut acc)?;
            }
            opt.step_grads(&acc)?;
            lv
        };
        st.step += 1;
        st.adam_t = opt.t;
        if st.step % cfg.eval_every == 0 || st.step == cfg.max_steps {
            // The steps' graphs were freed in the allocator's per-thread pools; hand them back
            // so that resident memory follows what is live (device-scale training).
            spa_model::mem::release_free_heap();
            let e = evaluate(graph, val, cfg)?;
            st.history.push((st.step, e.loss));
            last_val = Some(e.loss);
            if e.loss < st.best_loss - 1e-6 {
                st.best_loss = e.loss;
                st.best_step = st.step;
                st.best = e;
                st.since_best = 0;
                best_weights = snapshot(graph)?;
            } else {
                st.since_best += 1;
            }
            if let Some((sp, wp, ap, bp)) = &ckpt {
                if let Some(dir) = sp.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
                }
                let cur: BTreeMap<String, Tensor> = vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                save_tensors(wp, &cur, "{}")?;
                let mut adam = BTreeMap::new();
                for (i, (n, _)) in vars.iter().enumerate() {
                    adam.insert(format!("m.{n}"), opt.m[i].clone());
                    adam.insert(format!("v.{n}"), opt.v[i].clone());
                }
                save_tensors(ap, &adam, "{}")?;
                let best: BTreeMap<String, Tensor> = best_weights
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                save_tensors(bp, &best, "{}")?;
                let json = serde_json::to_vec_pretty(&st)
                    .map_err(|e| TrainError::Config(e.to_string()))?;
                spa_model::io::atomic_write(sp, &json)?;
            }
            if st.since_best >= cfg.patience {
                early = true;
                break;
            }
        }
        let go_on = progress(&Progress {
            step: st.step,
            max_steps: cfg.max_steps,
            loss: lv,
            val_loss: last_val,
        });
        if !go_on {
            return Err(TrainError::Cancelled);
        }
    }
    // Leave the best weights in the graph.
    {
        let data = graph
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Tensor("poisoned".into()))?;
        for (n, v) in data.iter() {
            if let Some(t) = best_weights.get(n) {
                v.set(t)?;
            }
        }
    }
    Ok(TrainReport {
        steps: st.step,
        initial: st.initial,
        best: st.best,
        history: st.history,
        early_stopped: early,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Outcome of a learning-rate sweep.
#[derive(Debug)]
pub struct LrChoice {
    /// The graph trained with the best rate (best validation weights loaded).
    pub graph: SideGraph,
    /// Its configuration.
    pub config: TrainConfig,
    /// Its run.
    pub report: TrainReport,
    /// (lr, best validation loss) of every rate tried.
    pub tried: Vec<(f64, f64)>,
}

/// Picks the learning rate from `lrs` (paper: {2e-4, 5e-4, 1e-3}) by best validation loss:
/// trains one graph per rate from the same initial weights (`make` builds a fresh graph).
pub fn select_lr(
    make: &dyn Fn() -> Result<SideGraph>,
    train_set: &[SeqFeatures],
    val: &[SeqFeatures],
    base_cfg: &TrainConfig,
    lrs: &[f64],
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<LrChoice> {
    let mut best: Option<LrChoice> = None;
    let mut tried = Vec::new();
    for &lr in lrs {
        let cfg = TrainConfig {
            lr,
            ..base_cfg.clone()
        };
        let g = make()?;
        let r = train(&g, train_set, val, &cfg, None, progress)?;
        tried.push((lr, r.best.loss));
        if best
            .as_ref()
            .is_none_or(|b| r.best.loss < b.report.best.loss)
        {
            best = Some(LrChoice {
                graph: g,
                config: cfg,
                report: r,
                tried: Vec::new(),
            });
        }
    }
    let mut b = best.ok_or_else(|| TrainError::Config("no learning rate given".into()))?;
    b.tried = tried;
    Ok(b)
}

/// Where checkpoints of a named run live.
pub fn checkpoint_dir(root: &Path, name: &str) -> PathBuf {
    root.join("checkpoints").join(name)
}
