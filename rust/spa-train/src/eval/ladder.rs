//! Ladder training phase: SPA, LST and full separation train on the cached features (plus SPA at
//! the other widths of Table 1 on its tasks), each becoming the device runtime's q8 model.

use super::features::TaskData;
use super::tables::Tally;
use super::{paper, EvalOptions, Setup, SizeRow};
use crate::data::{Split, Task};
use crate::error::{Result, TrainError};
use crate::features;
use crate::sidegrad::SideGraph;
use crate::train::{self, Method, TrainConfig};
use spa_model::{
    GateMode, PersonalVocab, QuantMode, SideConfig, SideNetwork, SidePlugin, SideWeights,
};
use spa_runtime::DeviceModel;
use std::path::PathBuf;
use std::time::Instant;

/// A trained ladder method ready to generate.
pub(super) struct Ladder {
    /// Row name: the method's name, with `_w{width}` for Table 1's other widths.
    pub(super) name: String,
    /// Side width.
    pub(super) width: usize,
    pub(super) method: Method,
    pub(super) device: DeviceModel,
    pub(super) sep_in: Option<Vec<f32>>,
    pub(super) params: usize,
    /// Validation loss (initial, best).
    pub(super) val: (f64, f64),
}

/// A task's trained ladder methods.
pub(super) struct Ladders {
    /// In training order.
    pub(super) ladders: Vec<Ladder>,
    /// The saved SPA plugin (the profile's width).
    pub(super) spa_plugin: Option<PathBuf>,
}

/// Trains SPA, LST and full separation at the profile's width (and SPA at Table 1's other
/// widths on Table 1's tasks); fills Table 1's validation side usage.
pub(super) fn train(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &TaskData,
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<Ladders> {
    let p = &opts.profile;
    let base = &setup.base;
    let t_train = Instant::now();
    let mut ladders: Vec<Ladder> = Vec::new();
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
        let proj = setup.proj_of(w);
        let mut cfg = SideConfig::new(base.config().hidden, setup.n_layers, w);
        cfg.taps = setup.taps.clone();
        let init = SideWeights::init(cfg, 17, 0.0)?;
        let make = || SideGraph::new(&init, method.input(), setup.head_f32.clone(), 17);
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
            &data.feats[&(Split::Train, w)],
            &data.feats[&(Split::Val, w)],
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
            let mut plugin = SidePlugin::init(base, proj, 17, 0.0)?;
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
        let name = if w == p.width {
            method.name().to_string()
        } else {
            format!("{}_w{w}", method.name())
        };
        ladders.push(Ladder {
            name,
            width: w,
            method,
            device,
            sep_in: sep,
            params,
            val: (choice.report.initial.loss, choice.report.best.loss),
        });
        if method == Method::Spa && p.table1_tasks.contains(&task) {
            let val_usage = choice.report.best.side_usage * 100.0;
            let idx = p.table1_widths.iter().position(|&x| x == w);
            if let Some(i) = idx {
                let table1 = &mut tally.table1;
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
    tally.timings.insert(
        format!("{}_train_s", task.name()),
        t_train.elapsed().as_secs_f64(),
    );
    Ok(Ladders {
        ladders,
        spa_plugin: spa_plugin_path,
    })
}
