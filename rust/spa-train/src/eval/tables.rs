//! Tables phase: what the per-task phases accumulate ([`Tally`]) becomes Tables 1-3 and the
//! [`Results`] (Table 2 from the latency model, Table 3 in the report's order, notes, timings).

use super::{mean, EvalOptions, LatencyRow, MethodRow, Results, Setup, SizeRow};
use crate::data::Task;
use std::collections::BTreeMap;
use std::time::Instant;

/// Figures accumulated over the tasks by the per-task phases.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Rows of Table 3 by method name.
    pub(super) rows: BTreeMap<String, MethodRow>,
    /// Table 1 (one row per width of the profile's `table1_widths`).
    pub(super) table1: Vec<SizeRow>,
    /// SPA's (side-path uses, generations) per generated position.
    pub(super) by_pos: Vec<(usize, usize)>,
    /// Inputs of the protocol measurement (one per task).
    pub(super) protocol_inputs: Vec<super::ProtocolInput>,
    /// Base compute per generated token (s), one per test generation.
    pub(super) base_s_tok: Vec<f64>,
    /// Bytes per generated token by ladder method, one per task.
    pub(super) bytes_tok: BTreeMap<String, Vec<f64>>,
    /// Wall time per phase (s).
    pub(super) timings: BTreeMap<String, f64>,
}

/// Builds Table 2 from the latency model, orders Table 3 and assembles the [`Results`];
/// `t_all` is the start of the run (for `total_s`).
pub(super) fn assemble(setup: &Setup, opts: &EvalOptions, tally: Tally, t_all: Instant) -> Results {
    let p = &opts.profile;
    let base = &setup.base;
    let Tally {
        mut rows,
        table1,
        by_pos,
        protocol_inputs,
        base_s_tok,
        bytes_tok,
        mut timings,
    } = tally;
    let mut notes = vec![
        "ROUGE-L F1 x100, rouge-score tokenization with Porter stemming (tests/rouge.rs checks the package's outputs).".to_string(),
        "CNN/DM and SciQ are not in any registry package: WikiLingua (en) and SQuAD-shifts (new_wiki) stand in for them.".to_string(),
        format!("Greedy decoding for every method (the paper uses beam search); at most {} new tokens for summaries and 24 for QA.", Task::Xsum.max_new_tokens()),
        format!("Ladder methods: q8 side network and head, int8 wire tensors, base top-{} shortlist, exactly the device runtime's rule.", p.top_k),
    ];
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
    Results {
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
    }
}
