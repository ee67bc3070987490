//! Generation phase: the base alone and every trained ladder method generate greedily on the
//! test examples (ladder methods with exactly the device runtime's rule, from one prefill per
//! example and width); generations are scored with ROUGE-L and their traces give rounds per
//! token, side usage, overrides, bytes and device time: one [`RunRecord`] per method (Table 3's
//! rows, Table 1's test figures).

use super::features::{TaskData, Tok};
use super::ladder::Ladder;
use super::runs::{data_hash, ProtocolRecord, RunRecord, RUNS_VERSION};
use super::tables::Tally;
use super::{speculative_rounds, EvalOptions, Setup};
use crate::data::Task;
use crate::error::Result;
use crate::features;
use crate::train::Method;
use serde_json::json;
use spa_model::{argmax, top_k, BaseModel, CandleTensor, DownProjection, ForwardMode, KvCache};
use spa_protocol::{position_state, HeadState, Limits, PositionState, TapBits};
use std::collections::BTreeMap;
use std::time::Instant;

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

/// The base's state after a prompt: its KV cache, the projected taps of every prompt position
/// (`[n_taps * width]` each), and the last one's hidden state and logits.
struct Prefill {
    cache: KvCache,
    taps: Vec<Vec<f32>>,
    last_hidden: Vec<f32>,
    last_logits: Vec<f32>,
}

/// A task's test generations.
struct Generated {
    /// ROUGE-L F1 (x100) per test example, by row name ("base" and every ladder).
    scores: BTreeMap<String, Vec<f64>>,
    /// Traces per test example, by ladder name.
    traces: BTreeMap<String, Vec<GenTrace>>,
    /// Generation wall time (s) by row name.
    seconds: BTreeMap<String, f64>,
    /// Base compute per generated token (s), one per test generation of the base alone.
    base_s_tok: Vec<f64>,
    /// New tokens per generation.
    max_new: usize,
}

fn tensor_rows(t: &CandleTensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2()?)
}

/// The wire state of `pos` as the server sends it: `taps` (`[n_taps * width]`) encoded with
/// `bits` and, at the last position (`last`: hidden state, logits, top-k), the greedy draft.
fn state_for(
    proj: &DownProjection,
    taps: &[f32],
    pos: usize,
    bits: TapBits,
    last: Option<(&[f32], &[f32], usize)>,
) -> PositionState {
    let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
    let Some((hidden, logits, k)) = last else {
        return position_state(pos as u64, taps, n_taps, width, bits, None);
    };
    let ids = top_k(logits, k);
    let lv: Vec<f32> = ids.iter().map(|&i| logits[i as usize]).collect();
    let head = HeadState {
        hidden,
        topk_ids: &ids,
        topk_logits: &lv,
        draft_token: argmax(logits).unwrap_or(0) as u32,
    };
    position_state(pos as u64, taps, n_taps, width, bits, Some(head))
}

/// Prefills `prompt` once (the fast forward: the test prompts need no re-prefill equality with
/// the server, and it is several times faster on long prompts) and gives the base's state with
/// the projected taps of every prompt position for each of `projs` (one per side width; the KV
/// cache and logits are shared).
fn prefill(base: &BaseModel, projs: &[&DownProjection], prompt: &[u32]) -> Result<Vec<Prefill>> {
    let mut cache = base.new_cache();
    let o = base.forward_with(prompt, &mut cache, ForwardMode::Fast)?;
    let hidden = tensor_rows(&o.hidden)?;
    let last_hidden = hidden.last().cloned().unwrap_or_default();
    let last_logits = base.last_logits(&o.hidden)?;
    projs
        .iter()
        .map(|proj| {
            let taps = proj
                .apply_taps(&o.taps)?
                .into_iter()
                .map(|zp| zp.into_iter().flatten().collect())
                .collect();
            Ok(Prefill {
                cache: cache.fork()?,
                taps,
                last_hidden: last_hidden.clone(),
                last_logits: last_logits.clone(),
            })
        })
        .collect()
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

/// Generates with `lad` from the prefill of its width, the base running in-process.
fn ladder_generate(
    setup: &Setup,
    lad: &Ladder,
    prompt: &[u32],
    pre: &Prefill,
    max_new: usize,
    top: usize,
) -> Result<GenTrace> {
    let (base, emb) = (&setup.base, &setup.emb);
    let proj = setup.proj_of(lad.job.width);
    let limits = Limits::default();
    let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
    let bits = lad.job.tap_bits;
    let mut cache = pre.cache.fork()?;
    let mut side_cache = lad.device.side.new_cache();
    let mut tr = GenTrace::default();
    let stop = base.tokenizer().eos_ids().to_vec();
    // The taps the device gets at a position of `tok`: the base's, or full separation's input.
    let taps_of = |z: &[f32], tok: u32| -> Vec<f32> {
        match &lad.sep_in {
            Some(sep) => sep_taps(sep, &emb[tok as usize], n_taps, width)
                .into_iter()
                .flatten()
                .collect(),
            None => z.to_vec(),
        }
    };
    // Prompt positions: side cache only.
    let t0 = Instant::now();
    let mut decision = None;
    let n = pre.taps.len();
    let mut draft = 0;
    for (i, z) in pre.taps.iter().enumerate() {
        let last = (i + 1 == n).then_some((&pre.last_hidden[..], &pre.last_logits[..], top));
        let s = state_for(proj, &taps_of(z, prompt[i]), i, bits, last);
        draft = s.draft_token;
        tr.bytes += state_bytes(&s);
        decision = lad.device.process(&s, &mut side_cache, &limits)?;
    }
    tr.device_s += t0.elapsed().as_secs_f64();
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
        let z0: Vec<f32> = z[0].iter().flatten().copied().collect();
        let last = Some((&h[..], &logits[..], top));
        let s = state_for(proj, &taps_of(&z0, d.token), cache.len() - 1, bits, last);
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

/// Everything the base's result depends on.
pub(super) fn base_settings(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &TaskData,
) -> serde_json::Value {
    json!({
        "version": RUNS_VERSION,
        "kind": "base",
        "base": setup.base.identity(),
        "task": task.name(),
        "test": data_hash(&data.te),
        "max_new": task.max_new_tokens(),
        "draft": opts.profile.draft,
    })
}

/// Generates with every ladder of `ladders` (and the base alone when `base_settings` is given,
/// the settings of its run) on `task`'s test examples, scores the generations and returns one
/// run record per method.
pub(super) fn generate_and_score(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    data: &TaskData,
    ladders: &[Ladder],
    base_settings: Option<serde_json::Value>,
    tally: &mut Tally,
) -> Result<Vec<RunRecord>> {
    let gen = generate(
        setup,
        opts,
        task,
        &data.te,
        ladders,
        base_settings.is_some(),
        tally,
    )?;
    Ok(records(opts, task, &data.te, ladders, base_settings, gen))
}

/// Generates on the test examples: the base once (when `with_base`), each ladder method from
/// the same prefill.
fn generate(
    setup: &Setup,
    opts: &EvalOptions,
    task: Task,
    te: &[Tok],
    ladders: &[Ladder],
    with_base: bool,
    tally: &mut Tally,
) -> Result<Generated> {
    let p = &opts.profile;
    let base = &setup.base;
    let t_gen = Instant::now();
    let max_new = task.max_new_tokens();
    let mut scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut traces: BTreeMap<String, Vec<GenTrace>> = BTreeMap::new();
    let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
    let mut base_s_tok = Vec::new();
    let mut widths: Vec<usize> = ladders.iter().map(|l| l.job.width).collect();
    if with_base {
        widths.push(p.width);
    }
    widths.sort();
    widths.dedup();
    let pb = features::progress(
        te.len() as u64,
        &format!("{} test generations", task.name()),
        opts.quiet,
    );
    for t in te {
        let tp = Instant::now();
        let projs: Vec<&DownProjection> = widths.iter().map(|&w| setup.proj_of(w)).collect();
        let pre_by_w: BTreeMap<usize, Prefill> = widths
            .iter()
            .copied()
            .zip(prefill(base, &projs, &t.prompt)?)
            .collect();
        // The prefill is shared: its time is split evenly between the methods.
        let share = tp.elapsed().as_secs_f64() / (ladders.len() + with_base as usize).max(1) as f64;
        if with_base {
            // The base alone (greedy).
            let tb = Instant::now();
            let pre = &pre_by_w[&p.width];
            let mut cache = pre.cache.fork()?;
            let mut out = Vec::new();
            let mut logits = pre.last_logits.clone();
            let stop = base.tokenizer().eos_ids().to_vec();
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
            *seconds.entry("base".into()).or_default() += share + tb.elapsed().as_secs_f64();
        }
        for lad in ladders {
            let name = &lad.job.name;
            let tl = Instant::now();
            let tr = ladder_generate(
                setup,
                lad,
                &t.prompt,
                &pre_by_w[&lad.job.width],
                max_new,
                p.top_k,
            )?;
            let text = base.tokenizer().decode(&tr.tokens)?;
            scores
                .entry(name.clone())
                .or_default()
                .push(crate::rouge::rouge_l(&t.ex.reference, &text).f1 * 100.0);
            *seconds.entry(name.clone()).or_default() += share + tl.elapsed().as_secs_f64();
            traces.entry(name.clone()).or_default().push(tr);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    tally.timings.insert(
        format!("{}_generate_s", task.name()),
        t_gen.elapsed().as_secs_f64(),
    );
    Ok(Generated {
        scores,
        traces,
        seconds,
        base_s_tok,
        max_new,
    })
}

/// One run record per generated method: ROUGE-L per example, rounds, side usage, overrides,
/// bytes, device time, validation figures; SPA's side usage per position and protocol inputs.
fn records(
    opts: &EvalOptions,
    task: Task,
    te: &[Tok],
    ladders: &[Ladder],
    base_settings: Option<serde_json::Value>,
    mut gen: Generated,
) -> Vec<RunRecord> {
    let p = &opts.profile;
    let mut out = Vec::new();
    for lad in ladders {
        let name = &lad.job.name;
        let trs = gen.traces.remove(name).unwrap_or_default();
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
        let spec = spec_rounds as f64 / toks as f64;
        let mut r = RunRecord::new(
            task.name(),
            name,
            &p.name,
            lad.settings.clone(),
            te,
            gen.scores.remove(name).unwrap_or_default(),
        );
        r.width = Some(lad.job.width);
        r.seconds = lad.train_s + gen.seconds.get(name).copied().unwrap_or(0.0);
        r.rounds_per_token = if lad.job.method == Method::Lst {
            1.0
        } else {
            spec
        };
        r.rounds_per_token_speculative = Some(spec);
        r.side_usage_pct = 100.0 * side as f64 / decided as f64;
        r.override_pct = 100.0 * ov as f64 / decided as f64;
        r.bytes_per_token = Some(trs.iter().map(|t| t.bytes).sum::<usize>() as f64 / toks as f64);
        r.device_ms_per_token =
            Some(1e3 * trs.iter().map(|t| t.device_s).sum::<f64>() / toks as f64);
        r.trainable_params = lad.params;
        r.val_loss = Some(lad.val);
        r.val_curve = lad.val_curve.clone();
        if lad.job.method == Method::Spa {
            r.val_side_usage_pct = Some(lad.val_side_usage_pct);
        }
        if let Some((t, sweep)) = &lad.gate {
            r.gate_threshold = Some(*t);
            r.gate_sweep = sweep.clone();
        }
        if name == "spa" {
            for tr in &trs {
                for (i, s) in tr.side.iter().enumerate() {
                    if r.side_by_position.len() <= i {
                        r.side_by_position.push((0, 0));
                    }
                    r.side_by_position[i].0 += *s as usize;
                    r.side_by_position[i].1 += 1;
                }
            }
            let n = trs.len().min(3);
            let toks: usize = trs[..n].iter().map(|t| t.tokens.len().max(1)).sum();
            let rounds: usize = trs[..n]
                .iter()
                .map(|t| speculative_rounds(&t.overrides, p.draft))
                .sum();
            r.protocol = Some(ProtocolRecord {
                prompts: n,
                max_new: gen.max_new,
                simulated_rounds_per_token: rounds as f64 / toks.max(1) as f64,
            });
        }
        out.push(r);
    }
    if let Some(settings) = base_settings {
        let mut r = RunRecord::new(
            task.name(),
            "base",
            &p.name,
            settings,
            te,
            gen.scores.remove("base").unwrap_or_default(),
        );
        r.seconds = gen.seconds.get("base").copied().unwrap_or(0.0);
        r.rounds_per_token = 1.0 / p.draft as f64;
        r.base_s_per_token = std::mem::take(&mut gen.base_s_tok);
        r.note = "the frozen base alone (no adaptation)".into();
        out.push(r);
    }
    out
}
