//! `spa eval`: re-measures the paper's Tables 1-3 on our base and data, with honest baselines.
//!
//! For every task: examples are split by hash (train / validation / test); features of the
//! training and validation sequences are computed once (one base pass, cached); SPA, LST and
//! full separation train on the cache; LoRA, Adapter and full integration train through the base
//! ([`crate::basegrad`], a reduced profile: fewer examples, shorter inputs); every method then
//! generates greedily (same decoding for all) on the test examples and is scored with ROUGE-L.
//!
//! Ladder methods (SPA, LST, full separation) generate with exactly the device runtime's
//! decision rule ([`spa_runtime::DeviceModel::process`]: q8 side network and head, int8 wire
//! tensors, the base's top-k shortlist), the base running in-process. The base's KV cache after
//! the prompt is computed once per example and forked for each method.
//!
//! Rounds per token: SPA and full separation under our speculative protocol (K drafts per round,
//! a round ends at the first override), simulated exactly from each generation's override trace
//! (`tests/equivalence.rs` of spa-runtime proves the wire protocol emits the same tokens); LST
//! with the paper's protocol (one transmission per token); LoRA L, Adapter 2L and full
//! integration L round trips per token (per-layer exchange, DESIGN.md).

use crate::basegrad::{BaseGradMethod, BaseGradModel, BaseGradTrainConfig};
use crate::data::{self, Example, Split, Task};
use crate::error::{Result, TrainError};
use crate::features::{self, SeqFeatures, SeqSpec};
use crate::sidegrad::SideGraph;
use crate::train::{self, Method, TrainConfig};
use serde::{Deserialize, Serialize};
use spa_model::{
    argmax, top_k, BaseModel, CandleTensor, DeviceHead, DownProjection, GateMode, KvCache,
    PersonalVocab, QuantMode, SideConfig, SideNetwork, SideWeights,
};
use spa_protocol::{encode_i8_rows, Limits, PositionState};
use spa_runtime::DeviceModel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sizes of an evaluation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// "quick" or "full".
    pub name: String,
    /// Tasks.
    pub tasks: Vec<Task>,
    /// Training examples per task (ladder methods).
    pub n_train: usize,
    /// Validation examples per task.
    pub n_val: usize,
    /// Test examples per task.
    pub n_test: usize,
    /// Source texts cut to this many words.
    pub max_words: usize,
    /// Training steps (ladder methods).
    pub steps: usize,
    /// Learning rates tried (chosen on validation).
    pub lrs: Vec<f64>,
    /// Side width of the methods' side networks.
    pub width: usize,
    /// Widths of Table 1 (small / medium / full).
    pub table1_widths: Vec<usize>,
    /// Tasks of Table 1.
    pub table1_tasks: Vec<Task>,
    /// Base candidates per position (the server's top-k).
    pub top_k: usize,
    /// Drafts per round (K).
    pub draft: usize,
    /// Reduced profile of the methods that train through the base: examples per task.
    pub basegrad_train: usize,
    /// ... their steps.
    pub basegrad_steps: usize,
    /// ... their longest training sequence (tokens).
    pub basegrad_max_len: usize,
    /// ... tasks they run on (all tasks of the profile when it equals `tasks`).
    pub basegrad_tasks: Vec<Task>,
    /// Round-trip time of the latency model (ms).
    pub rtt_ms: f64,
    /// Downlink bandwidth of the latency model (Mbit/s).
    pub mbit_s: f64,
}

impl Profile {
    /// The quick profile (what CI runs on a small slice; < 15 min on 2 cores).
    pub fn quick() -> Self {
        Self {
            name: "quick".into(),
            tasks: Task::ALL.to_vec(),
            n_train: 24,
            n_val: 6,
            n_test: 6,
            max_words: 80,
            steps: 24,
            lrs: vec![1e-3],
            width: 64,
            table1_widths: vec![32, 64, 128],
            table1_tasks: vec![Task::Xsum],
            top_k: 32,
            draft: 8,
            basegrad_train: 8,
            basegrad_steps: 4,
            basegrad_max_len: 96,
            basegrad_tasks: vec![Task::Xsum, Task::Coqa],
            rtt_ms: 50.0,
            mbit_s: 10.0,
        }
    }

    /// The full profile (hours on 2 cores): what the README's numbers come from.
    pub fn full() -> Self {
        Self {
            name: "full".into(),
            n_train: 400,
            n_val: 40,
            n_test: 40,
            max_words: 200,
            steps: 600,
            lrs: vec![2e-4, 5e-4, 1e-3],
            table1_tasks: vec![Task::Xsum, Task::Coqa],
            basegrad_train: 96,
            basegrad_steps: 60,
            basegrad_max_len: 224,
            basegrad_tasks: Task::ALL.to_vec(),
            ..Self::quick()
        }
    }

    /// A smoke slice of `self` (CI): `scale` of the examples and steps, at least 2 of each.
    pub fn slice(mut self, scale: f64) -> Self {
        let s = |n: usize| ((n as f64 * scale).round() as usize).max(2);
        self.name = format!("{}-slice{scale}", self.name);
        self.n_train = s(self.n_train).max(8);
        self.n_val = s(self.n_val);
        self.n_test = s(self.n_test);
        self.steps = s(self.steps);
        self.basegrad_train = s(self.basegrad_train).max(4);
        self.basegrad_steps = s(self.basegrad_steps);
        self
    }
}

/// One method's row of Table 3 (and the inputs of Table 2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodRow {
    /// "spa" | "lst" | "lora" | "adapter" | "full_integration" | "full_separation" | "base".
    pub method: String,
    /// ROUGE-L F1 (x100) per task name.
    pub rouge_l: BTreeMap<String, f64>,
    /// Rounds per generated token (see the module docs for the protocol of each method).
    pub rounds_per_token: f64,
    /// Rounds per token under the speculative protocol (ladder methods).
    pub rounds_per_token_speculative: Option<f64>,
    /// Positions where the side path was used (%).
    pub side_usage_pct: f64,
    /// Emitted tokens that differ from the base's draft (%).
    pub override_pct: f64,
    /// Trainable parameters as % of the base's.
    pub trainable_params_pct: f64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Bytes from server to device per generated token.
    pub bytes_per_token: f64,
    /// Device compute per token (ms), measured (ladder methods).
    pub device_ms_per_token: Option<f64>,
    /// Profile notes (e.g. the reduced profile of methods through the base).
    pub note: String,
    /// Validation loss before / after training, per task.
    pub val_loss: BTreeMap<String, (f64, f64)>,
}

/// Table 1 row: side usage by side size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeRow {
    /// small / medium / full.
    pub size: String,
    /// Side width.
    pub width: usize,
    /// Side usage % at test generations.
    pub side_usage_pct: f64,
    /// Side usage % over the validation positions (teacher-forced).
    pub val_side_usage_pct: f64,
    /// ROUGE-L per task.
    pub rouge_l: BTreeMap<String, f64>,
    /// Paper's side usage % for this size.
    pub paper_side_usage_pct: f64,
}

/// Table 2 row: latency for 50 tokens under the stated link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyRow {
    /// Method.
    pub method: String,
    /// Trainable params %.
    pub params_pct: f64,
    /// On-device compute for 50 tokens (s), measured where the method ran split.
    pub t_device_s: Option<f64>,
    /// Base compute for 50 tokens (s), measured.
    pub t_pretrained_s: f64,
    /// Network time for 50 tokens (s): rounds x (RTT + bytes / bandwidth).
    pub t_net_s: f64,
    /// Sum.
    pub t_total_s: f64,
    /// Rounds per token.
    pub rounds_per_token: f64,
    /// ROUGE-L XSum.
    pub rouge_xsum: Option<f64>,
    /// ROUGE-L CoQA.
    pub rouge_coqa: Option<f64>,
}

/// Everything `spa eval` writes to `results.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Base model (file name and sha256).
    pub base: String,
    /// Profile name.
    pub profile: String,
    /// Profile settings.
    pub settings: Option<Profile>,
    /// Table 3 (and per-method figures).
    pub table3: Vec<MethodRow>,
    /// Table 1.
    pub table1: Vec<SizeRow>,
    /// Table 2.
    pub table2: Vec<LatencyRow>,
    /// Personalization (filled by `spa personalize --json` or the eval's own run).
    pub personalization: serde_json::Value,
    /// Side usage per generated position (SPA, all tasks): % of generations using the side
    /// path at position i.
    pub side_usage_by_position: Vec<f64>,
    /// Wall time per phase (s).
    pub timings: BTreeMap<String, f64>,
    /// Notes (stand-ins, reduced profiles, what differs from the paper).
    pub notes: Vec<String>,
    /// SPA rounds per token measured through the real HTTPS protocol (loopback server + device
    /// runtime, K drafts), per task, by `spa eval`; compare with the simulated figure.
    pub measured_rounds_per_token: BTreeMap<String, f64>,
    /// Trained SPA plugins and test prompts for that measurement (not serialized).
    #[serde(skip)]
    pub protocol_inputs: Vec<ProtocolInput>,
}

/// A trained SPA plugin and test prompts, for measuring rounds through the real protocol.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProtocolInput {
    /// Task name.
    pub task: String,
    /// Saved plugin (safetensors).
    pub plugin: PathBuf,
    /// Test prompts (token ids).
    pub prompts: Vec<Vec<u32>>,
    /// New tokens per prompt.
    pub max_new: usize,
    /// Simulated rounds per token on the same prompts.
    pub simulated_rounds_per_token: f64,
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Sizes.
    pub profile: Profile,
    /// `$SPA_HOME` (data, model, projections).
    pub spa_home: PathBuf,
    /// Base GGUF.
    pub model: PathBuf,
    /// Work directory for caches and checkpoints.
    pub work_dir: PathBuf,
    /// Skip the methods that train through the base.
    pub skip_basegrad: bool,
    /// Hide progress bars.
    pub quiet: bool,
}

/// Tokenized example: prompt ids (chat template) and target ids (reference + end of turn).
#[derive(Debug, Clone)]
struct Tok {
    ex: Example,
    prompt: Vec<u32>,
    target: Vec<u32>,
}

fn tokenize(base: &BaseModel, exs: &[Example]) -> Result<Vec<Tok>> {
    exs.iter()
        .map(|e| {
            let (prompt, target) = e.tokenize(base.tokenizer())?;
            Ok(Tok {
                ex: e.clone(),
                prompt,
                target,
            })
        })
        .collect()
}

fn specs(toks: &[Tok]) -> Vec<SeqSpec> {
    toks.iter()
        .map(|t| SeqSpec {
            tokens: t.prompt.iter().chain(&t.target).copied().collect(),
            loss_start: t.prompt.len(),
        })
        .collect()
}

/// A trained ladder method ready to generate.
struct Ladder {
    method: Method,
    device: DeviceModel,
    sep_in: Option<Vec<f32>>,
    params: usize,
    val: (f64, f64),
}

/// Per-generation trace.
#[derive(Debug, Default, Clone)]
struct GenTrace {
    tokens: Vec<u32>,
    side: Vec<bool>,
    overrides: Vec<bool>,
    device_s: f64,
    base_s: f64,
    bytes: usize,
}

/// Rounds the speculative protocol needs for an override trace with K drafts per round.
pub fn speculative_rounds(overrides: &[bool], k: usize) -> usize {
    let (mut i, mut rounds) = (0, 0);
    while i < overrides.len() {
        rounds += 1;
        let end = (i + k.max(1)).min(overrides.len());
        match overrides[i..end].iter().position(|&o| o) {
            Some(j) => i += j + 1,
            None => i = end,
        }
    }
    rounds.max(1)
}

struct Prefill {
    cache: KvCache,
    states: Vec<PositionState>,
    last_logits: Vec<f32>,
}

fn tensor_rows(t: &CandleTensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2()?)
}

fn state_for(
    proj: &DownProjection,
    base: &BaseModel,
    z: &[Vec<f32>],
    pos: usize,
    last: Option<(&[f32], &[f32], usize)>,
) -> PositionState {
    let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
    let flat: Vec<f32> = z.iter().flatten().copied().collect();
    let mut s = PositionState {
        position: pos as u64,
        taps: Some(encode_i8_rows(&flat, n_taps, width)),
        ..Default::default()
    };
    if let Some((h, logits, k)) = last {
        s.is_draft = true;
        s.draft_token = argmax(logits).unwrap_or(0) as u32;
        s.topk_ids = top_k(logits, k);
        s.hidden = Some(encode_i8_rows(h, 1, base.config().hidden));
    }
    s
}

fn prefill(base: &BaseModel, proj: &DownProjection, prompt: &[u32], k: usize) -> Result<Prefill> {
    let mut cache = base.new_cache();
    let o = base.forward(prompt, &mut cache)?;
    let z = proj.apply_taps(&o.taps)?;
    let hidden = tensor_rows(&o.hidden)?;
    let last_hidden = hidden.last().cloned().unwrap_or_default();
    let last_logits = base.last_logits(&o.hidden)?;
    let n = z.len();
    let states = z
        .iter()
        .enumerate()
        .map(|(i, zp)| {
            let last = (i + 1 == n).then_some((&last_hidden[..], &last_logits[..], k));
            state_for(proj, base, zp, i, last)
        })
        .collect();
    Ok(Prefill {
        cache,
        states,
        last_logits,
    })
}

/// Taps of full separation: `sep_in . e(token)` for every tapped block, `[n_taps][width]`.
fn sep_taps(sep: &[f32], emb_row: &[f32], n_taps: usize, width: usize) -> Vec<Vec<f32>> {
    let d = emb_row.len();
    let z: Vec<f32> = (0..width)
        .map(|r| {
            sep[r * d..(r + 1) * d]
                .iter()
                .zip(emb_row)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    vec![z; n_taps]
}

#[allow(clippy::too_many_arguments)]
fn ladder_generate(
    base: &BaseModel,
    proj: &DownProjection,
    emb: &[Vec<f32>],
    lad: &Ladder,
    prompt: &[u32],
    pre: &Prefill,
    max_new: usize,
    top: usize,
) -> Result<GenTrace> {
    let limits = Limits::default();
    let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
    let mut cache = pre.cache.fork()?;
    let mut side_cache = lad.device.side.new_cache();
    let mut tr = GenTrace::default();
    let stop = base.tokenizer().eos_ids().to_vec();
    let sep_state = |s: &PositionState, tok: u32| -> PositionState {
        let mut s = s.clone();
        if let Some(sep) = &lad.sep_in {
            let z = sep_taps(sep, &emb[tok as usize], n_taps, width);
            let flat: Vec<f32> = z.iter().flatten().copied().collect();
            s.taps = Some(encode_i8_rows(&flat, n_taps, width));
        }
        s
    };
    // Prompt positions: side cache only.
    let t0 = Instant::now();
    let mut decision = None;
    for (i, s) in pre.states.iter().enumerate() {
        let s = sep_state(s, prompt[i]);
        tr.bytes += state_bytes(&s);
        decision = lad.device.process(&s, &mut side_cache, &limits)?;
    }
    tr.device_s += t0.elapsed().as_secs_f64();
    let mut draft = pre.states.last().map(|s| s.draft_token).unwrap_or(0);
    while tr.tokens.len() < max_new {
        let Some(d) = decision else { break };
        tr.side.push(d.side);
        tr.overrides.push(d.token != draft);
        if stop.contains(&d.token) {
            break;
        }
        tr.tokens.push(d.token);
        let t1 = Instant::now();
        let o = base.forward(&[d.token], &mut cache)?;
        let z = proj.apply_taps(&o.taps)?;
        let h = tensor_rows(&o.hidden)?.pop().unwrap_or_default();
        let logits = base.last_logits(&o.hidden)?;
        tr.base_s += t1.elapsed().as_secs_f64();
        let s = state_for(proj, base, &z[0], cache.len() - 1, Some((&h, &logits, top)));
        let s = sep_state(&s, d.token);
        draft = s.draft_token;
        tr.bytes += state_bytes(&s);
        let t2 = Instant::now();
        decision = lad.device.process(&s, &mut side_cache, &limits)?;
        tr.device_s += t2.elapsed().as_secs_f64();
    }
    Ok(tr)
}

fn state_bytes(s: &PositionState) -> usize {
    use prost::Message;
    s.encoded_len()
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Paper figures for the report.
pub mod paper {
    /// Table 3: (method, XSum, CNN/DM, CoQA, SciQ, M).
    pub const TABLE3: [(&str, f64, f64, f64, f64, f64); 4] = [
        ("full_integration", 36.24, 40.55, 38.81, 25.91, 1.0),
        ("full_separation", 30.29, 34.19, 32.11, 23.71, 0.68),
        ("lst", 28.18, 32.15, 31.24, 23.24, 1.0),
        ("spa", 36.52, 39.22, 37.30, 25.38, 0.64),
    ];
    /// A Table 2 row: (method, % params, infer s, net s, total s, M, XSum, CoQA).
    pub type Table2Row = (&'static str, f64, f64, f64, f64, f64, f64, f64);
    /// Table 2 (LLaMA-7B, 50 new tokens).
    pub const TABLE2: [Table2Row; 4] = [
        ("lora", 0.19, 3.26, 6.37, 9.63, 32.0, 38.24, 40.32),
        ("adapter", 0.38, 3.32, 12.56, 15.88, 64.0, 38.18, 40.51),
        ("lst", 0.2, 3.29, 0.31, 3.60, 1.0, 28.78, 31.24),
        ("spa", 0.21, 3.30, 0.18, 3.48, 0.62, 35.52, 37.30),
    ];
    /// Table 1: side usage % for small / medium / full.
    pub const TABLE1: [f64; 3] = [82.3, 71.5, 61.8];
}

/// Runs the whole evaluation. `log_progress` receives one line per phase.
pub fn run(opts: &EvalOptions, log_progress: &mut dyn FnMut(&str)) -> Result<Results> {
    let p = &opts.profile;
    let t_all = Instant::now();
    let mut timings = BTreeMap::new();
    let base = BaseModel::load(&opts.model)?;
    let n_layers = base.config().n_layers;
    let taps: Vec<usize> = (0..n_layers).collect();
    let proj_dir = opts.spa_home.join("projections");
    let mut widths: Vec<usize> = p.table1_widths.clone();
    if !widths.contains(&p.width) {
        widths.push(p.width);
    }
    widths.sort();
    let projs: Vec<DownProjection> = widths
        .iter()
        .map(|&w| DownProjection::published(&base, w, &taps, &proj_dir))
        .collect::<spa_model::Result<_>>()?;
    let proj_of =
        |w: usize| -> &DownProjection { &projs[widths.iter().position(|&x| x == w).unwrap_or(0)] };
    let head_f32 = base.head_weight_f32()?;
    let emb: Vec<Vec<f32>> = head_f32.to_vec2()?;
    let dev_head = DeviceHead::from_weights(&head_f32, QuantMode::Q8)?;
    let base_params: usize = 134_515_008; // SmolLM2-135M (tied embeddings counted once)
    let mut rows: BTreeMap<String, MethodRow> = BTreeMap::new();
    let mut table1: Vec<SizeRow> = Vec::new();
    let mut by_pos: Vec<(usize, usize)> = Vec::new();
    let mut protocol_inputs = Vec::new();
    let mut base_s_tok = Vec::new();
    let mut bytes_tok: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut notes = vec![
        "ROUGE-L F1 x100, rouge-score tokenization with Porter stemming (tests/rouge.rs checks the package's outputs).".to_string(),
        "CNN/DM and SciQ are not in any registry package: WikiLingua (en) and SQuAD-shifts (new_wiki) stand in for them.".to_string(),
        format!("Greedy decoding for every method (the paper uses beam search); at most {} new tokens for summaries and 24 for QA.", Task::Xsum.max_new_tokens()),
        format!("Ladder methods: q8 side network and head, int8 wire tensors, base top-{} shortlist, exactly the device runtime's rule.", p.top_k),
    ];
    for &task in &p.tasks {
        let t_task = Instant::now();
        log_progress(&format!("[{}] loading data", task.name()));
        let all = data::load_task(&opts.spa_home, task, p.max_words)?;
        let tr = tokenize(&base, &data::take_split(&all, Split::Train, p.n_train))?;
        let va = tokenize(&base, &data::take_split(&all, Split::Val, p.n_val))?;
        let te = tokenize(&base, &data::take_split(&all, Split::Test, p.n_test))?;
        if tr.is_empty() || va.is_empty() || te.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: a split is empty",
                task.name()
            )));
        }
        // Features: one base pass for every width.
        let cache_dir = opts.work_dir.join("cache");
        let mut feats: BTreeMap<(Split, usize), Vec<SeqFeatures>> = BTreeMap::new();
        for (split, toks) in [(Split::Train, &tr), (Split::Val, &va)] {
            let sp = specs(toks);
            let paths: Vec<PathBuf> = widths
                .iter()
                .map(|w| {
                    cache_dir.join(format!(
                        "{}-{:?}-{}-w{w}.safetensors",
                        task.name(),
                        split,
                        p.name
                    ))
                })
                .collect();
            let path_refs: Vec<&Path> = paths.iter().map(|x| x.as_path()).collect();
            let proj_refs: Vec<&DownProjection> = projs.iter().collect();
            let sets = features::load_or_compute(
                &base,
                &proj_refs,
                p.top_k,
                &sp,
                &path_refs,
                &format!("{} {:?} features", task.name(), split),
                opts.quiet,
            )?;
            for (w, s) in widths.iter().zip(sets) {
                feats.insert((split, *w), s.seqs);
            }
        }
        timings.insert(
            format!("{}_features_s", task.name()),
            t_task.elapsed().as_secs_f64(),
        );
        // Train the ladder methods.
        let t_train = Instant::now();
        let mut ladders: Vec<(String, usize, Ladder)> = Vec::new();
        let mut spa_plugin_path: Option<PathBuf> = None;
        let mut jobs: Vec<(Method, usize)> = vec![
            (Method::Spa, p.width),
            (Method::Lst, p.width),
            (Method::FullSeparation, p.width),
        ];
        if p.table1_tasks.contains(&task) {
            for &w in &p.table1_widths {
                if w != p.width {
                    jobs.push((Method::Spa, w));
                }
            }
        }
        for (method, w) in jobs {
            let proj = proj_of(w);
            let mut cfg = SideConfig::new(base.config().hidden, n_layers, w);
            cfg.taps = taps.clone();
            let init = SideWeights::init(cfg, 17, 0.0)?;
            let make = || SideGraph::new(&init, method.input(), head_f32.clone(), 17);
            let tcfg = TrainConfig {
                method,
                max_steps: p.steps,
                eval_every: (p.steps / 6).max(5),
                patience: 3,
                seed: 1,
                ..Default::default()
            };
            log_progress(&format!(
                "[{}] training {} (width {w})",
                task.name(),
                method.name()
            ));
            let pb = features::progress(
                p.steps as u64 * p.lrs.len() as u64,
                &format!("{} {} w{w}", task.name(), method.name()),
                opts.quiet,
            );
            let choice = train::select_lr(
                &make,
                &feats[&(Split::Train, w)],
                &feats[&(Split::Val, w)],
                &tcfg,
                &p.lrs,
                &mut |pr| {
                    pb.inc(1);
                    pb.set_message(format!(
                        "{} {} w{w} loss {:.3}",
                        task.name(),
                        method.name(),
                        pr.loss
                    ));
                    true
                },
            )?;
            pb.finish_and_clear();
            let (weights, sep) = choice.graph.to_weights()?;
            if method == Method::Spa && w == p.width {
                let mut plugin = spa_model::SidePlugin::init(&base, proj, 17, 0.0)?;
                plugin.weights = weights.clone();
                let path = opts.work_dir.join("plugins").join(format!(
                    "{}-spa-{}.safetensors",
                    task.name(),
                    p.name
                ));
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d).map_err(|e| TrainError::io(d, e))?;
                }
                plugin.save(&path)?;
                spa_plugin_path = Some(path);
            }
            let params = choice.graph.param_count(method.gated());
            let device = DeviceModel {
                side: SideNetwork::new(&weights, QuantMode::Q8, base.max_positions())?,
                head: dev_head.clone(),
                personal: PersonalVocab::default(),
                gate: if method.gated() {
                    GateMode::Learned
                } else {
                    GateMode::AlwaysSide
                },
                tokenizer: base.tokenizer().clone(),
                base_identity: base.identity().to_string(),
                projection: proj.fingerprint().to_string(),
            };
            let name = if w == p.width {
                method.name().to_string()
            } else {
                format!("{}_w{w}", method.name())
            };
            ladders.push((
                name,
                w,
                Ladder {
                    method,
                    device,
                    sep_in: sep,
                    params,
                    val: (choice.report.initial.loss, choice.report.best.loss),
                },
            ));
            if method == Method::Spa && p.table1_tasks.contains(&task) {
                let val_usage = choice.report.best.side_usage * 100.0;
                let idx = p.table1_widths.iter().position(|&x| x == w);
                if let Some(i) = idx {
                    while table1.len() <= i {
                        table1.push(SizeRow::default());
                    }
                    let r = &mut table1[i];
                    r.size = ["small", "medium", "full"]
                        .get(i)
                        .unwrap_or(&"?")
                        .to_string();
                    r.width = w;
                    r.paper_side_usage_pct = paper::TABLE1.get(i).copied().unwrap_or(f64::NAN);
                    r.val_side_usage_pct += val_usage / p.table1_tasks.len() as f64;
                }
            }
        }
        timings.insert(
            format!("{}_train_s", task.name()),
            t_train.elapsed().as_secs_f64(),
        );
        // Generate on test examples: base once, each ladder method from the same prefill.
        let t_gen = Instant::now();
        let max_new = task.max_new_tokens();
        let mut scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut traces: BTreeMap<String, Vec<GenTrace>> = BTreeMap::new();
        let pb = features::progress(
            te.len() as u64,
            &format!("{} test generations", task.name()),
            opts.quiet,
        );
        for t in &te {
            let pre_by_w: BTreeMap<usize, Prefill> = widths
                .iter()
                .map(|&w| Ok((w, prefill(&base, proj_of(w), &t.prompt, p.top_k)?)))
                .collect::<Result<_>>()?;
            // The base alone (greedy).
            let pre = &pre_by_w[&p.width];
            let mut cache = pre.cache.fork()?;
            let mut out = Vec::new();
            let mut logits = pre.last_logits.clone();
            let stop = base.tokenizer().eos_ids().to_vec();
            let tb = Instant::now();
            while out.len() < max_new {
                let next = argmax(&logits).unwrap_or(0) as u32;
                if stop.contains(&next) {
                    break;
                }
                out.push(next);
                let o = base.forward(&[next], &mut cache)?;
                logits = base.last_logits(&o.hidden)?;
            }
            if !out.is_empty() {
                base_s_tok.push(tb.elapsed().as_secs_f64() / out.len() as f64);
            }
            let text = base.tokenizer().decode(&out)?;
            scores
                .entry("base".into())
                .or_default()
                .push(crate::rouge::rouge_l(&t.ex.reference, &text).f1 * 100.0);
            for (name, w, lad) in &ladders {
                let tr = ladder_generate(
                    &base,
                    proj_of(*w),
                    &emb,
                    lad,
                    &t.prompt,
                    &pre_by_w[w],
                    max_new,
                    p.top_k,
                )?;
                let text = base.tokenizer().decode(&tr.tokens)?;
                scores
                    .entry(name.clone())
                    .or_default()
                    .push(crate::rouge::rouge_l(&t.ex.reference, &text).f1 * 100.0);
                if name == "spa" {
                    for (i, s) in tr.side.iter().enumerate() {
                        if by_pos.len() <= i {
                            by_pos.push((0, 0));
                        }
                        by_pos[i].0 += *s as usize;
                        by_pos[i].1 += 1;
                    }
                }
                traces.entry(name.clone()).or_default().push(tr);
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        timings.insert(
            format!("{}_generate_s", task.name()),
            t_gen.elapsed().as_secs_f64(),
        );
        // Aggregate ladder rows.
        for (name, w, lad) in &ladders {
            let trs = &traces[name];
            let toks: usize = trs.iter().map(|t| t.tokens.len().max(1)).sum();
            let side: usize = trs
                .iter()
                .map(|t| t.side.iter().filter(|&&s| s).count())
                .sum();
            let ov: usize = trs
                .iter()
                .map(|t| t.overrides.iter().filter(|&&s| s).count())
                .sum();
            let decided: usize = trs.iter().map(|t| t.side.len().max(1)).sum();
            let spec_rounds: usize = trs
                .iter()
                .map(|t| speculative_rounds(&t.overrides, p.draft))
                .sum();
            let dev_ms = 1e3 * trs.iter().map(|t| t.device_s).sum::<f64>() / toks as f64;
            let bytes = trs.iter().map(|t| t.bytes).sum::<usize>() as f64 / toks as f64;
            bytes_tok.entry(name.clone()).or_default().push(bytes);
            let rouge = mean(&scores[name]);
            if name.contains("_w") || (lad.method == Method::Spa && p.table1_tasks.contains(&task))
            {
                if let Some(i) = p.table1_widths.iter().position(|x| x == w) {
                    let r = &mut table1[i];
                    r.rouge_l.insert(task.name().into(), rouge);
                    r.side_usage_pct +=
                        100.0 * side as f64 / decided as f64 / p.table1_tasks.len() as f64;
                }
                if name.contains("_w") {
                    continue;
                }
            }
            let row = rows.entry(name.clone()).or_insert_with(|| MethodRow {
                method: name.clone(),
                ..Default::default()
            });
            row.rouge_l.insert(task.name().into(), rouge);
            let n_tasks = p.tasks.len() as f64;
            let spec = spec_rounds as f64 / toks as f64;
            row.rounds_per_token_speculative =
                Some(row.rounds_per_token_speculative.unwrap_or(0.0) + spec / n_tasks);
            row.rounds_per_token += if lad.method == Method::Lst { 1.0 } else { spec } / n_tasks;
            row.side_usage_pct += 100.0 * side as f64 / decided as f64 / n_tasks;
            row.override_pct += 100.0 * ov as f64 / decided as f64 / n_tasks;
            row.trainable_params = lad.params;
            row.trainable_params_pct = 100.0 * lad.params as f64 / base_params as f64;
            row.device_ms_per_token =
                Some(row.device_ms_per_token.unwrap_or(0.0) + dev_ms / n_tasks);
            row.bytes_per_token += bytes / n_tasks;
            row.val_loss.insert(task.name().into(), lad.val);
        }
        if let (Some(path), Some(trs)) = (&spa_plugin_path, traces.get("spa")) {
            let n = te.len().min(3);
            let toks: usize = trs[..n].iter().map(|t| t.tokens.len().max(1)).sum();
            let rounds: usize = trs[..n]
                .iter()
                .map(|t| speculative_rounds(&t.overrides, p.draft))
                .sum();
            protocol_inputs.push(ProtocolInput {
                task: task.name().into(),
                plugin: path.clone(),
                prompts: te[..n].iter().map(|t| t.prompt.clone()).collect(),
                max_new,
                simulated_rounds_per_token: rounds as f64 / toks as f64,
            });
        }
        let brow = rows.entry("base".into()).or_insert_with(|| MethodRow {
            method: "base".into(),
            note: "the frozen base alone (no adaptation)".into(),
            ..Default::default()
        });
        brow.rouge_l
            .insert(task.name().into(), mean(&scores["base"]));
        brow.rounds_per_token = 1.0 / p.draft as f64;
        // Methods through the base (reduced profile).
        if !opts.skip_basegrad && p.basegrad_tasks.contains(&task) {
            let t_bg = Instant::now();
            let budget = rows.get("spa").map(|r| r.trainable_params).unwrap_or(0);
            let bg_train: Vec<(Vec<u32>, usize)> = tr
                .iter()
                .take(p.basegrad_train)
                .map(|t| {
                    (
                        t.prompt.iter().chain(&t.target).copied().collect(),
                        t.prompt.len(),
                    )
                })
                .collect();
            let bg_val: Vec<(Vec<u32>, usize)> = va
                .iter()
                .map(|t| {
                    (
                        t.prompt.iter().chain(&t.target).copied().collect(),
                        t.prompt.len(),
                    )
                })
                .collect();
            for m in BaseGradMethod::matched(base.config(), budget, p.width) {
                log_progress(&format!(
                    "[{}] training {} through the base (reduced profile)",
                    task.name(),
                    m.name()
                ));
                let mut model = match m {
                    BaseGradMethod::FullIntegration { .. } => {
                        BaseGradModel::with_projection(&opts.model, m, 17, Some(proj_of(p.width)))?
                    }
                    _ => BaseGradModel::new(&opts.model, m, 17)?,
                };
                let cfg = BaseGradTrainConfig {
                    batch_size: 4,
                    lr: 1e-3,
                    max_steps: p.basegrad_steps,
                    eval_every: (p.basegrad_steps / 2).max(1),
                    patience: 2,
                    seed: 1,
                    max_len: p.basegrad_max_len,
                    ..Default::default()
                };
                let pb = features::progress(
                    p.basegrad_steps as u64,
                    &format!("{} {}", task.name(), m.name()),
                    opts.quiet,
                );
                let rep = model.train(&bg_train, &bg_val, &cfg, &mut |pr| {
                    pb.set_position(pr.step as u64);
                    pb.set_message(format!("{} {} loss {:.3}", task.name(), m.name(), pr.loss));
                })?;
                pb.finish_and_clear();
                let mut sc = Vec::new();
                let stop = base.tokenizer().eos_ids().to_vec();
                for t in &te {
                    let out = model.generate_greedy(&t.prompt, max_new, &stop)?;
                    let text = base.tokenizer().decode(&out)?;
                    sc.push(crate::rouge::rouge_l(&t.ex.reference, &text).f1 * 100.0);
                }
                let row = rows.entry(m.name().into()).or_insert_with(|| MethodRow {
                    method: m.name().into(),
                    ..Default::default()
                });
                row.rouge_l.insert(task.name().into(), mean(&sc));
                row.trainable_params = model.trainable_params();
                row.trainable_params_pct =
                    100.0 * model.trainable_params() as f64 / base_params as f64;
                row.rounds_per_token = match m {
                    BaseGradMethod::Adapter { .. } => 2.0 * n_layers as f64,
                    _ => n_layers as f64,
                };
                row.side_usage_pct = 100.0;
                row.val_loss.insert(
                    task.name().into(),
                    (rep.initial_val_loss, rep.best_val_loss),
                );
                row.note = format!(
                    "reduced profile: {} training examples, <= {} tokens, {} steps, lr 1e-3, batch 4 ({:?})",
                    bg_train.len(),
                    p.basegrad_max_len,
                    rep.steps,
                    m
                );
            }
            timings.insert(
                format!("{}_basegrad_s", task.name()),
                t_bg.elapsed().as_secs_f64(),
            );
        }
    }
    // Table 2: 50 tokens under the stated link.
    let t_pre = mean(&base_s_tok) * 50.0;
    let mut table2 = Vec::new();
    for name in [
        "lora",
        "adapter",
        "full_integration",
        "lst",
        "full_separation",
        "spa",
    ] {
        let Some(r) = rows.get(name) else { continue };
        let bytes = mean(bytes_tok.get(name).map(|v| &v[..]).unwrap_or(&[]));
        let per_round_bytes = if r.rounds_per_token > 0.0 {
            // Layer-split rounds carry one f16 activation each way (2 x hidden bytes).
            if ["lora", "adapter", "full_integration"].contains(&name) {
                2.0 * base.config().hidden as f64
            } else {
                bytes / r.rounds_per_token
            }
        } else {
            0.0
        };
        let t_net =
            50.0 * r.rounds_per_token * (p.rtt_ms / 1e3 + per_round_bytes * 8.0 / (p.mbit_s * 1e6));
        let t_dev = r.device_ms_per_token.map(|ms| ms * 50.0 / 1e3);
        table2.push(LatencyRow {
            method: name.into(),
            params_pct: r.trainable_params_pct,
            t_device_s: t_dev,
            t_pretrained_s: t_pre,
            t_net_s: t_net,
            t_total_s: t_pre + t_net + t_dev.unwrap_or(0.0),
            rounds_per_token: r.rounds_per_token,
            rouge_xsum: r.rouge_l.get("xsum").copied(),
            rouge_coqa: r.rouge_l.get("coqa").copied(),
        });
    }
    notes.push(format!(
        "Table 2 latency: 50 tokens; T_pretrained and T_on-device measured in-process on this 2-core x86 machine; T_net modelled as rounds x (RTT {} ms + bytes / {} Mbit/s) (no tc netem here; `spa bench rounds` measures real rounds over a delaying proxy).",
        p.rtt_ms, p.mbit_s
    ));
    timings.insert("total_s".into(), t_all.elapsed().as_secs_f64());
    let order = [
        "spa",
        "lst",
        "lora",
        "adapter",
        "full_integration",
        "full_separation",
        "base",
    ];
    let mut table3: Vec<MethodRow> = Vec::new();
    for name in order {
        if let Some(r) = rows.remove(name) {
            table3.push(r);
        }
    }
    Ok(Results {
        base: format!(
            "{} sha256:{}",
            opts.model
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("?"),
            base.identity()
        ),
        profile: p.name.clone(),
        settings: Some(p.clone()),
        table3,
        table1,
        table2,
        personalization: serde_json::Value::Null,
        side_usage_by_position: by_pos
            .iter()
            .map(|(s, n)| 100.0 * *s as f64 / (*n).max(1) as f64)
            .collect(),
        timings,
        notes,
        measured_rounds_per_token: BTreeMap::new(),
        protocol_inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculative_rounds_follow_the_protocol() {
        // No override: ceil(n / K).
        assert_eq!(speculative_rounds(&[false; 16], 8), 2);
        assert_eq!(speculative_rounds(&[false; 17], 8), 3);
        // An override ends its round.
        let mut o = vec![false; 16];
        o[2] = true;
        assert_eq!(speculative_rounds(&o, 8), 3); // [0..=2], [3..11), [11..16)
        assert_eq!(speculative_rounds(&[true; 5], 8), 5);
        assert_eq!(speculative_rounds(&[], 8), 1);
    }
}
