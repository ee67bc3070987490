//! Tables phase: the run records of every (task, method) become Tables 1-3 and the [`Results`]
//! (Table 2 from the latency model, Table 3 in the report's order with 95% bootstrap intervals,
//! the paired differences of SPA against the base, LST and full integration, notes, timings).
//! Everything here is computed from the records alone, so a table rebuilt from run files is the
//! table of the run that wrote them.

use super::runs::RunRecord;
use super::{mean, EvalOptions, LatencyRow, MethodRow, PairedRow, Results, SizeRow};
use crate::data::Task;
use crate::stats;
use std::collections::BTreeMap;
use std::time::Instant;

/// What the per-task phases accumulate.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// One record per finished (task, method), in the order they were made or loaded.
    pub(super) records: Vec<RunRecord>,
    /// Inputs of the protocol measurement (one per task).
    pub(super) protocol_inputs: Vec<super::ProtocolInput>,
    /// Wall time per phase (s).
    pub(super) timings: BTreeMap<String, f64>,
    /// Notes of the run (resumed runs, runs left out).
    pub(super) notes: Vec<String>,
}

/// The base's figures the tables need.
pub(super) struct BaseInfo {
    /// "file sha256:..." of the base.
    pub(super) label: String,
    /// Hidden size (bytes of a layer-split round).
    pub(super) hidden: usize,
}

/// Methods compared with SPA in `Results::paired`.
pub const PAIRED_AGAINST: [&str; 3] = ["base", "lst", "full_integration"];

/// Other pairs in `Results::paired`: SPA with int4 taps minus SPA (the ROUGE-L cost of
/// halving the taps' bytes), and two-stage SPA (LST's network, then its gate) minus LST and
/// minus the base.
pub const PAIRED_VARIANTS: [(&str, &str); 3] = [
    ("spa_int4", "spa"),
    ("spa_two_stage", "lst"),
    ("spa_two_stage", "base"),
];

fn ci(scores: &[f64]) -> Option<(f64, f64)> {
    stats::bootstrap_mean_ci(scores, stats::RESAMPLES, stats::SEED, stats::LEVEL).ok()
}

/// Scores of `a` and `b` on their common test examples, in `a`'s order.
fn pairs(a: &RunRecord, b: &RunRecord) -> (Vec<f64>, Vec<f64>) {
    if a.example_ids == b.example_ids && a.rouge_l.len() == b.rouge_l.len() {
        return (a.rouge_l.clone(), b.rouge_l.clone());
    }
    let bmap: BTreeMap<&str, f64> = b
        .example_ids
        .iter()
        .map(|s| s.as_str())
        .zip(b.rouge_l.iter().copied())
        .collect();
    a.example_ids
        .iter()
        .zip(&a.rouge_l)
        .filter_map(|(id, &x)| bmap.get(id.as_str()).map(|&y| (x, y)))
        .unzip()
}

/// Paired bootstraps of SPA minus each of [`PAIRED_AGAINST`], and of each of
/// [`PAIRED_VARIANTS`], on every task where both ran.
fn paired(records: &[RunRecord], tasks: &[Task]) -> Vec<PairedRow> {
    let find = |task: &str, m: &str| records.iter().find(|r| r.task == task && r.method == m);
    let pairs_of = PAIRED_AGAINST
        .iter()
        .map(|&b| ("spa", b))
        .chain(PAIRED_VARIANTS);
    let mut out = Vec::new();
    for task in tasks.iter().map(|t| t.name()) {
        for (a, b) in pairs_of.clone() {
            let (Some(ra), Some(rb)) = (find(task, a), find(task, b)) else {
                continue;
            };
            let (x, y) = pairs(ra, rb);
            match stats::paired_bootstrap(&x, &y, stats::RESAMPLES, stats::SEED, stats::LEVEL) {
                Ok(d) => out.push(PairedRow {
                    a: a.into(),
                    b: b.into(),
                    task: task.into(),
                    mean_diff: d.mean_diff,
                    ci95: d.ci,
                    n: d.n,
                }),
                Err(e) => log::warn!("{task}: {a} - {b}: {e}"),
            }
        }
    }
    out
}

/// Mean of the values present (None when none is).
fn mean_some(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = xs.flatten().collect();
    (!v.is_empty()).then(|| mean(&v))
}

/// Table 3's row of `method` from its records (one per task; per-task figures averaged).
fn row(method: &str, recs: &[&RunRecord]) -> MethodRow {
    let mut r = MethodRow {
        method: method.into(),
        ..Default::default()
    };
    for rec in recs {
        let t = rec.task.clone();
        r.rouge_l.insert(t.clone(), mean(&rec.rouge_l));
        if let Some(c) = ci(&rec.rouge_l) {
            r.rouge_l_ci95.insert(t.clone(), c);
        }
        r.n_test.insert(t.clone(), rec.n);
        if let Some(v) = rec.val_loss {
            r.val_loss.insert(t.clone(), v);
        }
        if !rec.val_curve.is_empty() {
            r.val_curve.insert(t.clone(), rec.val_curve.clone());
        }
        r.trainable_params = rec.trainable_params;
    }
    let avg = |f: &dyn Fn(&RunRecord) -> f64| mean(&recs.iter().map(|x| f(x)).collect::<Vec<_>>());
    r.rounds_per_token = avg(&|x| x.rounds_per_token);
    r.rounds_per_token_speculative = mean_some(recs.iter().map(|x| x.rounds_per_token_speculative));
    r.side_usage_pct = avg(&|x| x.side_usage_pct);
    r.override_pct = avg(&|x| x.override_pct);
    r.bytes_per_token = mean_some(recs.iter().map(|x| x.bytes_per_token)).unwrap_or(0.0);
    r.device_ms_per_token = mean_some(recs.iter().map(|x| x.device_ms_per_token));
    r.trainable_params_pct = 100.0 * r.trainable_params as f64 / super::BASE_PARAMS as f64;
    // One note when every task's is the same, else each task's.
    let notes: Vec<&RunRecord> = recs
        .iter()
        .copied()
        .filter(|x| !x.note.is_empty())
        .collect();
    r.note = match notes.first() {
        Some(first) if notes.iter().all(|x| x.note == first.note) => first.note.clone(),
        _ => notes
            .iter()
            .map(|x| format!("{}: {}", x.task, x.note))
            .collect::<Vec<_>>()
            .join("; "),
    };
    r
}

/// Builds Tables 1-3 and the paired differences from the records, Table 2 from the latency
/// model, and assembles the [`Results`]; `t_all` is the start of the run (for `total_s`).
pub(super) fn assemble(
    base: &BaseInfo,
    opts: &EvalOptions,
    tally: Tally,
    t_all: Instant,
) -> Results {
    let p = &opts.profile;
    let Tally {
        records,
        protocol_inputs,
        mut timings,
        notes: run_notes,
    } = tally;
    let mut notes = vec![
        "ROUGE-L F1 x100, rouge-score tokenization with Porter stemming (tests/rouge.rs checks the package's outputs).".to_string(),
        format!("95% intervals: percentile bootstrap over the test examples ({} resamples, fixed seed); paired differences resample the same example indices for both methods.", stats::RESAMPLES),
        "CNN/DM and SciQ are not in any registry package: WikiLingua (en) and SQuAD-shifts (new_wiki) stand in for them.".to_string(),
        format!("Greedy decoding for every method (the paper uses beam search); at most {} new tokens for summaries and 24 for QA.", Task::Xsum.max_new_tokens()),
        format!("Ladder methods: q8 side network and head, int8 wire tensors, base top-{} shortlist, exactly the device runtime's rule.", p.top_k),
    ];
    notes.extend(run_notes);
    let mut by_method: BTreeMap<&str, Vec<&RunRecord>> = BTreeMap::new();
    for r in &records {
        by_method.entry(r.method.as_str()).or_default().push(r);
        timings.insert(format!("{}_{}_s", r.task, r.method), r.seconds);
    }
    let mut rows: BTreeMap<String, MethodRow> = by_method
        .iter()
        .filter(|(m, _)| !m.contains("_w"))
        .map(|(m, recs)| (m.to_string(), row(m, recs)))
        .collect();
    // Table 1: SPA by width on Table 1's tasks, each row over the same tasks: those where
    // every width ran (a width missing on one task would otherwise average other tasks).
    let width_name = |w: usize| {
        if w == p.width {
            "spa".to_string()
        } else {
            format!("spa_w{w}")
        }
    };
    let complete: Vec<&str> = p
        .table1_tasks
        .iter()
        .map(|t| t.name())
        .filter(|&t| {
            p.table1_widths.iter().all(|&w| {
                by_method
                    .get(width_name(w).as_str())
                    .is_some_and(|v| v.iter().any(|r| r.task == t))
            })
        })
        .collect();
    let mut table1 = Vec::new();
    for (i, &w) in p.table1_widths.iter().enumerate() {
        let name = width_name(w);
        let recs: Vec<&RunRecord> = by_method
            .get(name.as_str())
            .map(|v| {
                v.iter()
                    .filter(|r| complete.contains(&r.task.as_str()))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        if recs.is_empty() {
            // Not run (e.g. `spa eval --skip-table1`): no row rather than a row of zeros.
            continue;
        }
        let u: Vec<f64> = recs.iter().map(|r| r.side_usage_pct).collect();
        table1.push(SizeRow {
            size: ["small", "medium", "full"]
                .get(i)
                .unwrap_or(&"?")
                .to_string(),
            width: w,
            side_usage_pct: mean(&u),
            val_side_usage_pct: mean_some(recs.iter().map(|r| r.val_side_usage_pct)).unwrap_or(0.0),
            rouge_l: recs
                .iter()
                .map(|r| (r.task.clone(), mean(&r.rouge_l)))
                .collect(),
            paper_side_usage_pct: super::paper::TABLE1.get(i).copied().unwrap_or(f64::NAN),
        });
    }
    // Side usage per generated position (SPA, all tasks).
    let mut by_pos: Vec<(usize, usize)> = Vec::new();
    for r in by_method.get("spa").into_iter().flatten() {
        for (i, &(s, n)) in r.side_by_position.iter().enumerate() {
            if by_pos.len() <= i {
                by_pos.push((0, 0));
            }
            by_pos[i].0 += s;
            by_pos[i].1 += n;
        }
    }
    // Table 2: 50 tokens under the stated link.
    let base_s_tok: Vec<f64> = records
        .iter()
        .flat_map(|r| r.base_s_per_token.iter().copied())
        .collect();
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
        let per_round_bytes = if r.rounds_per_token > 0.0 {
            // Layer-split rounds carry one f16 activation each way (2 x hidden bytes).
            if ["lora", "adapter", "full_integration"].contains(&name) {
                2.0 * base.hidden as f64
            } else {
                r.bytes_per_token / r.rounds_per_token
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
        "spa_int4",
        "spa_two_stage",
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
    Results {
        base: base.label.clone(),
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
        rounds: Vec::new(),
        paired: paired(&records, &p.tasks),
        protocol_inputs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(task: &str, method: &str, ids: &[&str], scores: &[f64]) -> RunRecord {
        RunRecord {
            task: task.into(),
            method: method.into(),
            n: scores.len(),
            example_ids: ids.iter().map(|s| s.to_string()).collect(),
            rouge_l: scores.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn table1_rows_average_only_the_tasks_every_width_ran() {
        // SPA at width 64 ran on XSum and CoQA, the other widths on XSum only: every row is
        // XSum's, not the medium row an average of two tasks.
        let mut recs = Vec::new();
        for (m, task, usage) in [
            ("spa_w32", "xsum", 40.0),
            ("spa", "xsum", 30.0),
            ("spa", "coqa", 10.0),
            ("spa_w128", "xsum", 20.0),
        ] {
            let mut r = rec(task, m, &["a"], &[1.0]);
            r.side_usage_pct = usage;
            recs.push(r);
        }
        let mut profile = super::super::Profile::quick();
        profile.tasks = vec![Task::Xsum, Task::Coqa];
        profile.table1_tasks = vec![Task::Xsum, Task::Coqa];
        let opts = EvalOptions {
            profile,
            spa_home: "/nonexistent".into(),
            model: "/nonexistent".into(),
            work_dir: "/nonexistent".into(),
            skip_basegrad: true,
            quiet: true,
            runs_dir: None,
            only_runs: true,
        };
        let base = BaseInfo {
            label: "test".into(),
            hidden: 8,
        };
        let tally = Tally {
            records: recs,
            ..Default::default()
        };
        let r = assemble(&base, &opts, tally, Instant::now());
        let usage: Vec<(usize, f64)> = r
            .table1
            .iter()
            .map(|t| (t.width, t.side_usage_pct))
            .collect();
        assert_eq!(usage, [(32, 40.0), (64, 30.0), (128, 20.0)]);
        assert!(r.table1.iter().all(|t| t.rouge_l.keys().eq(["xsum"])));
    }

    #[test]
    fn paired_rows_align_examples_by_id() {
        let spa = rec(
            "xsum",
            "spa",
            &["a", "b", "c", "d"],
            &[30.0, 20.0, 40.0, 10.0],
        );
        // The base's file lists the same examples in another order, plus one SPA lacks.
        let base = rec(
            "xsum",
            "base",
            &["d", "c", "b", "a", "e"],
            &[9.0, 38.0, 19.0, 28.0, 99.0],
        );
        let p = paired(&[spa.clone(), base], &[Task::Xsum, Task::Coqa]);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].a.as_str(), p[0].b.as_str()), ("spa", "base"));
        assert_eq!(p[0].n, 4);
        assert!((p[0].mean_diff - 1.5).abs() < 1e-12, "{:?}", p[0]);
        assert!(p[0].ci95.0 >= 1.0 && p[0].ci95.1 <= 2.0, "{:?}", p[0]);
        // Rows carry the interval and the number of test examples.
        let r = row("spa", &[&spa]);
        assert_eq!(r.n_test["xsum"], 4);
        let (lo, hi) = r.rouge_l_ci95["xsum"];
        assert!(lo <= 25.0 && 25.0 <= hi && lo >= 10.0 && hi <= 40.0);
    }
}
