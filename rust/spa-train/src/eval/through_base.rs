//! Through-base phase: LoRA, Adapter and full integration (which need gradients through the
//! base) train under a reduced profile with a parameter budget matched to SPA, then generate
//! greedily on the same test examples as every other method and are scored with ROUGE-L. Each
//! finished method is written to its run file at once (its training is the slowest part of
//! the evaluation).

use super::features::{TaskData, Tok};
use super::runs::{data_hash, RunRecord, RunStore, RUNS_VERSION};
use super::{EvalOptions, Setup};
use crate::basegrad::{BaseGradMethod, BaseGradModel, BaseGradTrainConfig};
use crate::data::Task;
use crate::error::Result;
use crate::features;
use serde_json::json;
use std::time::Instant;

/// Validation schedule of a run of `steps` steps: (eval_every, patience), about ten points on
/// the validation curve, and no early stop before step min(steps, 100) (the floor:
/// "trained until validation loss plateaus, >= 100 steps").
pub(super) fn schedule(steps: usize) -> (usize, usize) {
    let every = (steps / 10).max(1);
    (every, steps.min(100).div_ceil(every).max(2))
}

fn sequences(toks: &[Tok]) -> Vec<(Vec<u32>, usize)> {
    toks.iter()
        .map(|t| {
            (
                t.prompt.iter().chain(&t.target).copied().collect(),
                t.prompt.len(),
            )
        })
        .collect()
}

/// Trains and scores the methods through the base on `task` (reduced profile, parameter
/// budget `budget`, SPA's), skipping those with a finished run in `store`; with `only_runs`
/// nothing is trained (missing runs are left out). Returns their run records and how many of
/// them were computed now.
#[allow(clippy::too_many_arguments)]
pub(super) fn train_and_score(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &TaskData,
    budget: usize,
    store: &RunStore,
    log_progress: &mut dyn FnMut(&str),
) -> Result<(Vec<RunRecord>, usize)> {
    let p = &opts.profile;
    let base = &setup.base;
    let (tr, va, te) = (&data.tr, &data.va, &data.te);
    let max_new = task.max_new_tokens();
    let n_train = p.basegrad_train.min(tr.len());
    let bg_train = sequences(&tr[..n_train]);
    let bg_val = sequences(va);
    let (eval_every, patience) = schedule(p.basegrad_steps);
    let cfg = BaseGradTrainConfig {
        batch_size: 4,
        lr: 1e-3,
        max_steps: p.basegrad_steps,
        eval_every,
        patience,
        seed: 1,
        max_len: p.basegrad_max_len,
        ..Default::default()
    };
    let (mut out, mut new) = (Vec::new(), 0);
    for m in BaseGradMethod::matched(base.config(), budget, p.width) {
        let settings = json!({
            "version": RUNS_VERSION,
            "kind": "through_base",
            "base": base.identity(),
            "projection": setup.proj_of(p.width).fingerprint(),
            "task": task.name(),
            "method": m,
            "train": data_hash(&tr[..n_train]),
            "val": data_hash(va),
            "test": data_hash(te),
            "max_new": max_new,
            "init_seed": 17,
            "train_config": cfg,
        });
        if let Some(r) = store.find(task.name(), m.name(), &settings) {
            out.push(r);
            continue;
        }
        if opts.only_runs {
            log::warn!(
                "{} {}: no finished run with the current settings; left out",
                task.name(),
                m.name()
            );
            continue;
        }
        let t0 = Instant::now();
        log_progress(&format!(
            "[{}] training {} through the base (reduced profile)",
            task.name(),
            m.name()
        ));
        let mut model = match m {
            BaseGradMethod::FullIntegration { .. } => {
                BaseGradModel::with_projection(&opts.model, m, 17, Some(setup.proj_of(p.width)))?
            }
            _ => BaseGradModel::new(&opts.model, m, 17)?,
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
        for t in te {
            let o = model.generate_greedy(&t.prompt, max_new, &stop)?;
            let text = base.tokenizer().decode(&o)?;
            sc.push(crate::rouge::rouge_l(&t.ex.reference, &text).f1 * 100.0);
        }
        let mut r = RunRecord::new(task.name(), m.name(), &p.name, settings, te, sc);
        r.seconds = t0.elapsed().as_secs_f64();
        r.trainable_params = model.trainable_params();
        r.rounds_per_token = match m {
            BaseGradMethod::Adapter { .. } => 2.0 * setup.n_layers as f64,
            _ => setup.n_layers as f64,
        };
        r.side_usage_pct = 100.0;
        r.val_loss = Some((rep.initial_val_loss, rep.best_val_loss));
        r.val_curve = rep.history.clone();
        r.note = format!(
            "reduced profile: {} training examples, <= {} tokens, {} of {} steps (best at step {}{}), {:.1} s/step, lr 1e-3, batch 4 ({:?})",
            bg_train.len(),
            p.basegrad_max_len,
            rep.steps,
            p.basegrad_steps,
            rep.best_step,
            if rep.early_stopped { ", stopped early" } else { "" },
            rep.seconds_per_step,
            m
        );
        store.save(&r)?;
        out.push(r);
        new += 1;
    }
    Ok((out, new))
}

#[cfg(test)]
mod tests {
    use super::schedule;

    #[test]
    fn schedule_never_stops_before_step_100() {
        for steps in [1, 4, 60, 100, 120, 150, 400] {
            let (every, patience) = schedule(steps);
            assert!(every >= 1 && patience >= 2);
            // The earliest early stop: `patience` evaluations after the initial one.
            assert!(
                every * patience >= steps.min(100),
                "{steps}: {every} x {patience}"
            );
        }
        assert_eq!(schedule(150), (15, 7));
    }
}
