//! Features phase: a task's examples are loaded, split and tokenized ([`prepare`]); the side
//! features of the training and validation sequences are computed in one base pass for every
//! width (cached on disk by a hash of their inputs) when a method has to train on them
//! ([`TaskData::ensure_features`]: a task whose runs are all finished never needs them).

use super::tables::Tally;
use super::{EvalOptions, Setup};
use crate::data::{self, Example, Split, Task};
use crate::error::{Result, TrainError};
use crate::features::{self, SeqFeatures, SeqSpec};
use spa_model::{BaseModel, DownProjection};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Tokenized example: prompt ids (chat template) and target ids (reference + end of turn).
#[derive(Debug, Clone)]
pub(super) struct Tok {
    pub(super) ex: Example,
    pub(super) prompt: Vec<u32>,
    pub(super) target: Vec<u32>,
}

/// A task's examples and the features of its training and validation sequences.
pub(super) struct TaskData {
    /// Training examples.
    pub(super) tr: Vec<Tok>,
    /// Validation examples.
    pub(super) va: Vec<Tok>,
    /// Test examples.
    pub(super) te: Vec<Tok>,
    /// Features by (split, side width), for the training and validation splits (empty until
    /// [`TaskData::ensure_features`]).
    pub(super) feats: BTreeMap<(Split, usize), Vec<SeqFeatures>>,
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

/// Loads and tokenizes `task`'s splits.
pub(super) fn prepare(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    log_progress: &mut dyn FnMut(&str),
) -> Result<TaskData> {
    let p = &opts.profile;
    let base = &setup.base;
    log_progress(&format!("[{}] loading data", task.name()));
    let all = data::load_task(&opts.spa_home, task, p.max_words)?;
    let tr = tokenize(base, &data::take_split(&all, Split::Train, p.n_train))?;
    let va = tokenize(base, &data::take_split(&all, Split::Val, p.n_val))?;
    let te = tokenize(base, &data::take_split(&all, Split::Test, p.n_test))?;
    if tr.is_empty() || va.is_empty() || te.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: a split is empty",
            task.name()
        )));
    }
    if te.len() < p.n_test {
        log::warn!(
            "{}: only {} test examples (the profile asks for {})",
            task.name(),
            te.len(),
            p.n_test
        );
    }
    Ok(TaskData {
        tr,
        va,
        te,
        feats: BTreeMap::new(),
    })
}

impl TaskData {
    /// Computes (or loads from the cache) the features of the training and validation
    /// sequences for every width, once.
    pub(super) fn ensure_features(
        &mut self,
        setup: &Setup,
        opts: &EvalOptions,
        task: Task,
        tally: &mut Tally,
    ) -> Result<()> {
        if !self.feats.is_empty() {
            return Ok(());
        }
        let p = &opts.profile;
        let t_feat = Instant::now();
        let cache_dir = opts.work_dir.join("cache");
        for (split, toks) in [(Split::Train, &self.tr), (Split::Val, &self.va)] {
            let sp = specs(toks);
            let paths: Vec<PathBuf> = setup
                .widths
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
            let proj_refs: Vec<&DownProjection> = setup.projs.iter().collect();
            let sets = features::load_or_compute(
                &setup.base,
                &proj_refs,
                p.top_k,
                &sp,
                &path_refs,
                &format!("{} {:?} features", task.name(), split),
                opts.quiet,
            )?;
            for (w, s) in setup.widths.iter().zip(sets) {
                self.feats.insert((split, *w), s.seqs);
            }
        }
        tally.timings.insert(
            format!("{}_features_s", task.name()),
            t_feat.elapsed().as_secs_f64(),
        );
        Ok(())
    }
}
