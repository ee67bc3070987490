//! Through-base phase: LoRA, Adapter and full integration (which need gradients through the
//! base) train under a reduced profile with a parameter budget matched to SPA, then generate
//! greedily on the test examples and are scored with ROUGE-L.

use super::features::TaskData;
use super::tables::Tally;
use super::{mean, EvalOptions, MethodRow, Setup, BASE_PARAMS};
use crate::basegrad::{BaseGradMethod, BaseGradModel, BaseGradTrainConfig};
use crate::data::Task;
use crate::error::Result;
use crate::features;
use std::time::Instant;

/// Trains and scores the methods through the base on `task` (reduced profile) and records their
/// rows of Table 3.
pub(super) fn train_and_score(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &TaskData,
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<()> {
    let p = &opts.profile;
    let base = &setup.base;
    let (tr, va, te) = (&data.tr, &data.va, &data.te);
    let rows = &mut tally.rows;
    let max_new = task.max_new_tokens();
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
                BaseGradModel::with_projection(&opts.model, m, 17, Some(setup.proj_of(p.width)))?
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
        for t in te {
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
        row.trainable_params_pct = 100.0 * model.trainable_params() as f64 / BASE_PARAMS as f64;
        row.rounds_per_token = match m {
            BaseGradMethod::Adapter { .. } => 2.0 * setup.n_layers as f64,
            _ => setup.n_layers as f64,
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
    tally.timings.insert(
        format!("{}_basegrad_s", task.name()),
        t_bg.elapsed().as_secs_f64(),
    );
    Ok(())
}
