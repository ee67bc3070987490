//! Features phase: a task's examples are loaded, split and tokenized, and the side features of
//! the training and validation sequences are computed in one base pass for every width (cached).

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
    /// Features by (split, side width), for the training and validation splits.
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

/// Loads and tokenizes `task`'s splits and computes (or loads) their features.
pub(super) fn prepare(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    log_progress: &mut dyn FnMut(&str),
    tally: &mut Tally,
) -> Result<TaskData> {
    let p = &opts.profile;
    let base = &setup.base;
    let t_task = Instant::now();
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
    // Features: one base pass for every width.
    let cache_dir = opts.work_dir.join("cache");
    let mut feats: BTreeMap<(Split, usize), Vec<SeqFeatures>> = BTreeMap::new();
    for (split, toks) in [(Split::Train, &tr), (Split::Val, &va)] {
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
            base,
            &proj_refs,
            p.top_k,
            &sp,
            &path_refs,
            &format!("{} {:?} features", task.name(), split),
            opts.quiet,
        )?;
        for (w, s) in setup.widths.iter().zip(sets) {
            feats.insert((split, *w), s.seqs);
        }
    }
    tally.timings.insert(
        format!("{}_features_s", task.name()),
        t_task.elapsed().as_secs_f64(),
    );
    Ok(TaskData { tr, va, te, feats })
}
