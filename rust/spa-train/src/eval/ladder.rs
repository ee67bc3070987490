//! Ladder training phase: SPA, LST and full separation train on the cached features (plus SPA at
//! the other widths of Table 1 on its tasks), each becoming the device runtime's q8 model.
//!
//! A trained side network is kept under `<work dir>/ladders/`, named by the hash of everything
//! its training read ([`Job::train_settings`]), so a run interrupted after training (during the
//! generations) does not train again.

use super::features::TaskData;
use super::runs::{data_hash, settings_hash, RUNS_VERSION};
use super::tables::Tally;
use super::{EvalOptions, Setup};
use crate::data::{Split, Task};
use crate::error::{Result, TrainError};
use crate::features;
use crate::sidegrad::SideGraph;
use crate::train::{self, GatePoint, Method, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use spa_model::side::F32Tensor;
use spa_model::{
    GateMode, PersonalVocab, QuantMode, SideConfig, SideNetwork, SidePlugin, SideWeights,
};
use spa_protocol::TapBits;
use spa_runtime::DeviceModel;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a gated method's threshold is chosen: the best teacher-forced top-1 accuracy on the
/// validation examples over `train::GATE_THRESHOLDS` (runs made with a fixed 0.5 lack it).
const GATE_RULE: &str = "validation-top1-sweep";

/// One ladder method to evaluate on a task.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) method: Method,
    pub(super) width: usize,
    /// Row name: the method's name, with `_w{width}` for Table 1's other widths and `_int4`
    /// for int4 taps.
    pub(super) name: String,
    /// How the taps cross the wire in its generations (the training features are int8 in
    /// every case: an int4 row is the same trained network receiving coarser taps).
    pub(super) tap_bits: TapBits,
    /// Two-stage SPA: LST's trained side network, frozen, then only its gate trained with
    /// SPA's objective ([`TrainConfig::gate_only`]).
    pub(super) from_lst: bool,
}

impl Job {
    /// Name of its trained network: the row name without the wire variant, so that SPA with
    /// int4 taps decodes with SPA's network.
    fn trained_name(&self) -> &str {
        self.name.strip_suffix(INT4_SUFFIX).unwrap_or(&self.name)
    }

    /// The training configuration (the learning rate is chosen from the profile's `lrs`).
    fn config(&self, opts: &EvalOptions) -> TrainConfig {
        let p = &opts.profile;
        TrainConfig {
            method: self.method,
            max_steps: p.steps,
            eval_every: (p.steps / 6).max(5),
            patience: 3,
            seed: 1,
            gate_only: self.from_lst,
            ..Default::default()
        }
    }

    /// The plain job at this width that the two-stage job starts from (LST).
    fn lst(&self) -> Job {
        Job {
            method: Method::Lst,
            width: self.width,
            name: Method::Lst.name().to_string(),
            tap_bits: TapBits::Int8,
            from_lst: false,
        }
    }

    /// SPA at the profile's width, trained the paper's way, with int8 taps: the job whose
    /// plugin the protocol measurement loads.
    fn is_main_spa(&self, opts: &EvalOptions) -> bool {
        self.method == Method::Spa
            && self.width == opts.profile.width
            && self.tap_bits == TapBits::Int8
            && !self.from_lst
    }

    /// Everything the trained weights depend on.
    pub(super) fn train_settings(
        &self,
        setup: &Setup,
        opts: &EvalOptions,
        task: Task,
        data: &TaskData,
    ) -> serde_json::Value {
        let p = &opts.profile;
        let mut s = json!({
            "version": RUNS_VERSION,
            "kind": "ladder",
            "base": setup.base.identity(),
            "projection": setup.proj_of(self.width).fingerprint(),
            "task": task.name(),
            "method": self.method.name(),
            "width": self.width,
            "train": data_hash(&data.tr),
            "val": data_hash(&data.va),
            "top_k": p.top_k,
            "lrs": p.lrs,
            "init_seed": 17,
            "train_config": self.config(opts),
        });
        if self.from_lst {
            s["init_from"] = json!(settings_hash(
                &self.lst().train_settings(setup, opts, task, data)
            ));
        }
        s
    }

    /// Everything the run's result depends on (training, test examples, decoding, protocol).
    pub(super) fn run_settings(
        &self,
        setup: &Setup,
        opts: &EvalOptions,
        task: Task,
        data: &TaskData,
    ) -> serde_json::Value {
        let mut s = json!({
            "training": self.train_settings(setup, opts, task, data),
            "test": data_hash(&data.te),
            "max_new": task.max_new_tokens(),
            "draft": opts.profile.draft,
        });
        if self.method.gated() {
            // The gate threshold is chosen on validation after training (GATE_RULE).
            s["gate_rule"] = json!(GATE_RULE);
        }
        if self.tap_bits != TapBits::Int8 {
            s["tap_bits"] = json!(self.tap_bits.wire());
        }
        s
    }
}

/// Suffix of the rows whose generations receive int4 taps.
pub(super) const INT4_SUFFIX: &str = "_int4";

/// Row name of two-stage SPA (LST's network, then a gate trained alone).
pub(super) const TWO_STAGE: &str = "spa_two_stage";

/// The ladder methods of `task`: SPA, LST and full separation at the profile's width, SPA with
/// int4 taps (the same network: the cost of halving the bytes down), and SPA at Table 1's other
/// widths on Table 1's tasks.
pub(super) fn jobs(opts: &EvalOptions, task: Task) -> Vec<Job> {
    let p = &opts.profile;
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
    let mut jobs: Vec<Job> = jobs
        .into_iter()
        .map(|(method, width)| Job {
            method,
            width,
            name: if width == p.width {
                method.name().to_string()
            } else {
                format!("{}_w{width}", method.name())
            },
            tap_bits: TapBits::Int8,
            from_lst: false,
        })
        .collect();
    jobs.insert(
        1,
        Job {
            method: Method::Spa,
            width: p.width,
            name: format!("{}{INT4_SUFFIX}", Method::Spa.name()),
            tap_bits: TapBits::Int4,
            from_lst: false,
        },
    );
    // After LST, whose network it starts from.
    jobs.insert(
        4,
        Job {
            method: Method::Spa,
            width: p.width,
            name: TWO_STAGE.to_string(),
            tap_bits: TapBits::Int8,
            from_lst: true,
        },
    );
    jobs
}

/// A trained ladder method ready to generate.
pub(super) struct Ladder {
    pub(super) job: Job,
    /// Settings of its run (see [`Job::run_settings`]).
    pub(super) settings: serde_json::Value,
    pub(super) device: DeviceModel,
    pub(super) sep_in: Option<Vec<f32>>,
    pub(super) params: usize,
    /// Validation loss (initial, best).
    pub(super) val: (f64, f64),
    /// Validation curve (step, loss).
    pub(super) val_curve: Vec<(usize, f64)>,
    /// Side usage % over the validation positions (at the best weights).
    pub(super) val_side_usage_pct: f64,
    /// Training wall time (s).
    pub(super) train_s: f64,
    /// Gated methods: the gate threshold chosen on validation and the sweep behind it.
    pub(super) gate: Option<(f32, Vec<GatePoint>)>,
}

/// What a cached trained side network carries besides its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedMeta {
    train_settings_hash: String,
    config: SideConfig,
    params: usize,
    val: (f64, f64),
    val_curve: Vec<(usize, f64)>,
    val_side_usage_pct: f64,
    train_s: f64,
    /// Gated methods: the chosen gate threshold and its validation sweep (absent in caches
    /// written before the choice existed: computed then and saved).
    #[serde(default)]
    gate: Option<(f32, Vec<GatePoint>)>,
}

/// Trained weights (and full separation's `sep_in`) with their metadata.
struct Trained {
    weights: SideWeights,
    sep_in: Option<Vec<f32>>,
    meta: CachedMeta,
}

fn save_cached(path: &Path, t: &Trained) -> Result<()> {
    let mut tensors = t.weights.tensors.clone();
    if let Some(sep) = &t.sep_in {
        tensors.insert(
            "sep_in".into(),
            F32Tensor {
                shape: vec![sep.len()],
                data: sep.clone(),
            },
        );
    }
    let meta = serde_json::to_string(&t.meta)
        .map_err(|e| TrainError::Config(format!("ladder cache metadata: {e}")))?;
    spa_model::io::save_f32(path, &tensors, &meta)?;
    Ok(())
}

/// The cached network at `path` if it exists and was trained under `hash`.
fn load_cached(path: &Path, hash: &str) -> Option<Trained> {
    if !path.exists() {
        return None;
    }
    let loaded = (|| -> Result<Trained> {
        let (mut tensors, meta) = spa_model::io::load_f32(path)?;
        let meta: CachedMeta = serde_json::from_str(&meta).map_err(|e| TrainError::Cache {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let sep_in = tensors.remove("sep_in").map(|t| t.data);
        let weights = SideWeights {
            config: meta.config.clone(),
            tensors,
        };
        weights.check_shapes()?;
        Ok(Trained {
            weights,
            sep_in,
            meta,
        })
    })();
    match loaded {
        Ok(t) if t.meta.train_settings_hash == hash => Some(t),
        Ok(_) => None,
        Err(e) => {
            log::warn!("{}: unusable ladder cache ({e}); training", path.display());
            None
        }
    }
}

/// Trains `job` on the task's features (learning rate chosen on validation).
#[allow(clippy::too_many_arguments)]
fn train_one(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &mut TaskData,
    job: &Job,
    hash: String,
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<Trained> {
    let p = &opts.profile;
    let base = &setup.base;
    let (method, w) = (job.method, job.width);
    data.ensure_features(setup, opts, task, tally)?;
    let t0 = Instant::now();
    let mut cfg = SideConfig::new(base.config().hidden, setup.n_layers, w);
    cfg.taps = setup.taps.clone();
    let init = if job.from_lst {
        let lst = job.lst();
        let hash = settings_hash(&lst.train_settings(setup, opts, task, data));
        trained(setup, opts, task, data, &lst, hash, log_progress, tally)?.weights
    } else {
        SideWeights::init(cfg, 17, 0.0)?
    };
    let make = || SideGraph::new(&init, method.input(), setup.head_f32.clone(), 17);
    log_progress(&format!(
        "[{}] training {} (width {w})",
        task.name(),
        job.name
    ));
    let pb = features::progress(
        p.steps as u64 * p.lrs.len() as u64,
        &format!("{} {} w{w}", task.name(), method.name()),
        opts.quiet,
    );
    let choice = train::select_lr(
        &make,
        &data.feats[&(Split::Train, w)],
        &data.feats[&(Split::Val, w)],
        &job.config(opts),
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
    let (weights, sep_in) = choice.graph.to_weights()?;
    let config = weights.config.clone();
    Ok(Trained {
        weights,
        sep_in,
        meta: CachedMeta {
            train_settings_hash: hash,
            config,
            params: choice.graph.param_count(method.gated()),
            val: (choice.report.initial.loss, choice.report.best.loss),
            val_curve: choice.report.history.clone(),
            val_side_usage_pct: choice.report.best.side_usage * 100.0,
            train_s: t0.elapsed().as_secs_f64(),
            gate: None,
        },
    })
}

/// Where the trained network of `job` (trained under `hash`) is cached.
fn cache_path(opts: &EvalOptions, task: Task, job: &Job, hash: &str) -> PathBuf {
    opts.work_dir.join("ladders").join(format!(
        "{}-{}-{hash}.safetensors",
        task.name(),
        job.trained_name()
    ))
}

/// The cached trained network of `job` (under `hash`), or trains it and caches it.
#[allow(clippy::too_many_arguments)]
fn trained(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &mut TaskData,
    job: &Job,
    hash: String,
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<Trained> {
    let cache = cache_path(opts, task, job, &hash);
    if let Some(t) = load_cached(&cache, &hash) {
        log_progress(&format!(
            "[{}] {} (width {}): trained network loaded from {}",
            task.name(),
            job.name,
            job.width,
            cache.display()
        ));
        return Ok(t);
    }
    let t = train_one(setup, opts, task, data, job, hash, log_progress, tally)?;
    save_cached(&cache, &t)?;
    Ok(t)
}

/// Trains (or loads the cached training of) each of `jobs` and makes it the device runtime's
/// model; saves SPA's plugin at the profile's width for the protocol measurement.
pub(super) fn train(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &mut TaskData,
    jobs: &[Job],
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<Vec<Ladder>> {
    let base = &setup.base;
    let t_train = Instant::now();
    let mut ladders: Vec<Ladder> = Vec::new();
    for job in jobs {
        let (method, w) = (job.method, job.width);
        let proj = setup.proj_of(w);
        let hash = settings_hash(&job.train_settings(setup, opts, task, data));
        let cache = cache_path(opts, task, job, &hash);
        let mut trained = trained(setup, opts, task, data, job, hash, log_progress, tally)?;
        if method.gated() && trained.meta.gate.is_none() {
            data.ensure_features(setup, opts, task, tally)?;
            let graph =
                SideGraph::new(&trained.weights, method.input(), setup.head_f32.clone(), 17)?;
            let (t, sweep) = train::choose_gate_threshold(
                &graph,
                &data.feats[&(Split::Val, w)],
                &job.config(opts),
            )?;
            log_progress(&format!(
                "[{}] {} (width {w}): gate threshold {t} chosen on validation",
                task.name(),
                method.name()
            ));
            trained.meta.gate = Some((t, sweep));
            save_cached(&cache, &trained)?;
        }
        if let Some((t, _)) = &trained.meta.gate {
            trained.weights.config.gate_threshold = *t;
        }
        if job.is_main_spa(opts) {
            let mut plugin = SidePlugin::init(base, proj, 17, 0.0)?;
            plugin.weights = trained.weights.clone();
            plugin.save(&plugin_path(
                opts,
                task,
                &job.run_settings(setup, opts, task, data),
            ))?;
        }
        let device = DeviceModel {
            side: SideNetwork::new(&trained.weights, QuantMode::Q8, base.max_positions())?,
            head: setup.dev_head.clone(),
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
        let m = trained.meta;
        ladders.push(Ladder {
            job: job.clone(),
            settings: job.run_settings(setup, opts, task, data),
            device,
            sep_in: trained.sep_in,
            params: m.params,
            val: m.val,
            val_curve: m.val_curve,
            val_side_usage_pct: m.val_side_usage_pct,
            train_s: m.train_s,
            gate: m.gate,
        });
    }
    tally.timings.insert(
        format!("{}_train_s", task.name()),
        t_train.elapsed().as_secs_f64(),
    );
    Ok(ladders)
}

/// Where SPA's plugin of the run with `settings` is saved.
pub(super) fn plugin_path(opts: &EvalOptions, task: Task, settings: &serde_json::Value) -> PathBuf {
    opts.work_dir.join("plugins").join(format!(
        "{}-spa-{}.safetensors",
        task.name(),
        settings_hash(settings)
    ))
}
