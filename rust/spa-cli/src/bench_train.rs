//! `spa bench train`: the cost of training a side network, measured in one run on real task
//! data: the base's batch-invariant prefill (what the server runs), the offline feature pass
//! (base forward with matrix attention + projection + top-k shortlist, what `spa train` and
//! `spa eval` run once per example) and the training step (side network + gate forward and
//! backward over a batch of cached features, AdamW update).

use crate::{assets, train_cmd};
use anyhow::{Context, Result};
use serde_json::json;
use spa_model::{BaseModel, SidePlugin};
use spa_train::data::{self, Split, Task};
use spa_train::features;
use spa_train::sidegrad::SideGraph;
use spa_train::train::{self, Method, TrainConfig};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// Task whose training examples are used.
    #[arg(long, default_value = "xsum")]
    task: String,
    /// Examples featurized (and trained on).
    #[arg(long, default_value_t = 24)]
    examples: usize,
    /// Examples run through the batch-invariant prefill (the slow reference).
    #[arg(long, default_value_t = 4)]
    prefill_examples: usize,
    /// Training steps timed (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Side width.
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Print JSON as the last line.
    #[arg(long)]
    json: bool,
    /// GGUF base model.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// CPU seconds used by this process so far (all threads; from /proc/self/stat, 0 elsewhere):
/// next to wall time it tells whether a figure was taken on a busy machine.
fn cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

pub fn train_bench(a: TrainBenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.examples >= a.batch && a.steps > 0 && a.batch > 0,
        "need --examples >= --batch and --steps > 0"
    );
    let task = Task::parse(&a.task)?;
    let model = assets::model_path(a.model.as_deref())?;
    let base = BaseModel::load(&model).with_context(|| format!("loading {}", model.display()))?;
    let proj = train_cmd::projection(&base, a.width)?;
    let all = data::load_task(&assets::spa_home(), task, 200)?;
    let tok = base.tokenizer();
    let specs = train_cmd::task_specs(tok, &data::take_split(&all, Split::Train, a.examples))?;
    let tokens: usize = specs.iter().map(|s| s.tokens.len()).sum();

    // The server's prefill: batch-invariant attention, one sequence at a time.
    let n_pre = a.prefill_examples.clamp(1, specs.len());
    let (t, c0) = (Instant::now(), cpu_s());
    let mut pre_tokens = 0;
    for s in &specs[..n_pre] {
        let mut cache = base.new_cache();
        base.forward(&s.tokens, &mut cache)?;
        pre_tokens += s.tokens.len();
    }
    let base_prefill_tok_s = pre_tokens as f64 / t.elapsed().as_secs_f64();
    let prefill_cpu_ms_per_tok = (cpu_s() - c0) * 1e3 / pre_tokens as f64;

    // The offline feature pass over every example.
    let (t, c0) = (Instant::now(), cpu_s());
    let sets = features::compute(&base, &[&proj], 32, &specs, "feature pass", true)?;
    let feature_s = t.elapsed().as_secs_f64();
    let feature_cpu_ms_per_tok = (cpu_s() - c0) * 1e3 / tokens as f64;
    let feature_tokens_per_s = tokens as f64 / feature_s;

    // Training steps: SPA (gate included), no validation inside the timed steps.
    let plugin = SidePlugin::init(&base, &proj, 0, 0.0)?;
    let graph = SideGraph::new(
        &plugin.weights,
        Method::Spa.input(),
        base.head_weight_f32()?,
        0,
    )?;
    let cfg = TrainConfig {
        max_steps: a.steps + 1,
        eval_every: a.steps + 10,
        batch: a.batch,
        patience: 1_000,
        ..Default::default()
    };
    let seqs = &sets[0].seqs;
    let mut stamps = Vec::with_capacity(a.steps + 1);
    train::train(&graph, seqs, &seqs[..a.batch], &cfg, None, &mut |_| {
        stamps.push((Instant::now(), cpu_s()));
        true
    })?;
    let step_cpu_ms = match (stamps.first(), stamps.last()) {
        (Some(f), Some(l)) if stamps.len() > 1 => (l.1 - f.1) * 1e3 / (stamps.len() - 1) as f64,
        _ => f64::NAN,
    };
    let steps_ms: Vec<f64> = stamps
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3)
        .collect();
    let step_ms = median(steps_ms);
    let positions_per_step = a.batch as f64 * tokens as f64 / specs.len() as f64;
    let positions_per_s = positions_per_step / (step_ms / 1e3);
    let threads = crate::bench::rayon_threads();
    println!(
        "task {} ({} examples, {:.0} tokens each on average), {threads} threads",
        task.name(),
        specs.len(),
        tokens as f64 / specs.len() as f64
    );
    println!("base prefill (batch-invariant, server) {base_prefill_tok_s:>8.1} tok/s  (cpu {prefill_cpu_ms_per_tok:.1} ms/tok)");
    println!(
        "feature pass (fast forward)            {feature_tokens_per_s:>8.1} tok/s  ({:.2}x the prefill; cpu {feature_cpu_ms_per_tok:.1} ms/tok)",
        feature_tokens_per_s / base_prefill_tok_s
    );
    println!(
        "training step (batch {}, SPA)           {step_ms:>8.1} ms    ({positions_per_step:.0} positions, {positions_per_s:.0} positions/s; cpu {step_cpu_ms:.0} ms/step)",
        a.batch
    );
    if a.json {
        println!(
            "{}",
            json!({
                "task": task.name(),
                "examples": specs.len(),
                "batch": a.batch,
                "threads": threads,
                "step_ms": step_ms,
                "positions_per_step": positions_per_step,
                "positions_per_s": positions_per_s,
                "feature_tokens_per_s": feature_tokens_per_s,
                "base_prefill_tok_s": base_prefill_tok_s,
                "cpu_ms": {
                    "prefill_per_token": prefill_cpu_ms_per_tok,
                    "feature_pass_per_token": feature_cpu_ms_per_tok,
                    "step": step_cpu_ms,
                },
            })
        );
    }
    Ok(())
}
