//! Trainer tests on the real base and real text (Moby Dick, from `scripts/fetch-assets.sh
//! personal`): the differentiable graph equals the device's side network, training lowers
//! validation loss, resume continues bit for bit, the usage cost moves side usage, stale caches
//! are rejected, the gate threshold sweep spans base to side, the gate trains alone on a frozen
//! LST network.

use spa_model::{BaseModel, DownProjection, QuantMode, SideConfig, SideNetwork, SideWeights};
use spa_train::features::{self, FeatureSet, SeqFeatures, SeqSpec};
use spa_train::sidegrad::{make_batch, SideGraph, SideInput};
use spa_train::train::{self, Method, TrainConfig};
use spa_train::TrainError;
use std::sync::OnceLock;

fn base() -> &'static BaseModel {
    static M: OnceLock<BaseModel> = OnceLock::new();
    M.get_or_init(|| {
        let p = spa_model::paths::model_file(spa_model::paths::MODEL_FILE);
        assert!(
            p.exists(),
            "run `scripts/fetch-assets.sh model` first ({})",
            p.display()
        );
        BaseModel::load(p).expect("base")
    })
}

const TAPS: [usize; 6] = [0, 5, 11, 17, 23, 29];
const WIDTH: usize = 32;

fn proj() -> &'static DownProjection {
    static P: OnceLock<DownProjection> = OnceLock::new();
    P.get_or_init(|| DownProjection::random(base(), WIDTH, &TAPS, 7).expect("projection"))
}

/// Moby Dick chunks of `len` tokens: (train, val) from chapters 1-3 and chapter 4.
fn data() -> &'static (Vec<SeqFeatures>, Vec<SeqFeatures>) {
    static D: OnceLock<(Vec<SeqFeatures>, Vec<SeqFeatures>)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = spa_model::paths::spa_home().join("data/personal/moby-dick");
        assert!(dir.exists(), "run `scripts/fetch-assets.sh personal` first");
        let tok = base().tokenizer();
        let chunks = |files: &[&str], n: usize| -> Vec<SeqSpec> {
            let mut ids = Vec::new();
            for f in files {
                let t = std::fs::read_to_string(dir.join(f)).expect("chapter");
                ids.extend(tok.encode(&t).expect("encode"));
            }
            ids.chunks_exact(64)
                .take(n)
                .map(|c| SeqSpec {
                    tokens: c.to_vec(),
                    loss_start: 1,
                })
                .collect()
        };
        let tr = chunks(&["chapter_1.txt", "chapter_2.txt", "chapter_3.txt"], 24);
        let va = chunks(&["chapter_4.txt"], 8);
        let t = features::compute(base(), &[proj()], 16, &tr, "train", true).expect("features");
        let v = features::compute(base(), &[proj()], 16, &va, "val", true).expect("features");
        (t[0].seqs.clone(), v[0].seqs.clone())
    })
}

fn side_config() -> SideConfig {
    let mut c = SideConfig::new(576, 30, WIDTH);
    c.taps = TAPS.to_vec();
    c
}

fn graph(method: Method, up_scale: f32) -> SideGraph {
    let w = SideWeights::init(side_config(), 3, up_scale).expect("init");
    SideGraph::new(
        &w,
        method.input(),
        base().head_weight_f32().expect("head"),
        3,
    )
    .expect("graph")
}

#[test]
fn graph_matches_the_device_side_network() {
    let (tr, _) = data();
    let mut w = SideWeights::init(side_config(), 11, 1.0).expect("init");
    // Non-trivial gate and LST mixing so every term is exercised.
    for (i, v) in w
        .tensors
        .get_mut("gate.weight")
        .expect("gate")
        .data
        .iter_mut()
        .enumerate()
    {
        *v = ((i % 7) as f32 - 3.0) * 0.05;
    }
    for (i, v) in w
        .tensors
        .get_mut("alpha")
        .expect("alpha")
        .data
        .iter_mut()
        .enumerate()
    {
        *v = (i as f32 - 2.0) * 0.03;
    }
    let g = SideGraph::new(
        &w,
        SideInput::BaseTaps,
        base().head_weight_f32().unwrap(),
        1,
    )
    .unwrap();
    let seqs: Vec<&SeqFeatures> = tr.iter().take(2).collect();
    let batch = make_batch(&seqs, TAPS.len(), WIDTH, None).unwrap();
    // A mask keeps exactly the positions whose target it marks, with their candidate rows.
    let vocab = base().config().vocab;
    let mut keep = vec![false; vocab];
    let odd: Vec<u32> = seqs[0]
        .tokens
        .iter()
        .copied()
        .filter(|t| t % 2 == 1)
        .collect();
    for &t in &odd {
        keep[t as usize] = true;
    }
    let masked =
        spa_train::sidegrad::make_batch_masked(&seqs, TAPS.len(), WIDTH, None, Some(&keep))
            .unwrap();
    let expect: usize = seqs
        .iter()
        .map(|s| {
            s.tokens[s.loss_start..]
                .iter()
                .filter(|&&t| keep[t as usize])
                .count()
        })
        .sum();
    assert!(expect > 0 && expect < batch.n, "{expect} of {}", batch.n);
    assert_eq!(masked.n, expect);
    let (all_ids, kept_ids) = (
        batch.cand_ids.to_vec1::<u32>().unwrap(),
        masked.cand_ids.to_vec1::<u32>().unwrap(),
    );
    let c = all_ids.len() / batch.n;
    let all_pos = batch.loss_pos.to_vec1::<u32>().unwrap();
    let kept_pos = masked.loss_pos.to_vec1::<u32>().unwrap();
    for (k, p) in kept_pos.iter().enumerate() {
        let j = all_pos.iter().position(|q| q == p).unwrap();
        assert_eq!(kept_ids[k * c..(k + 1) * c], all_ids[j * c..(j + 1) * c]);
    }
    let states: Vec<Vec<Vec<f32>>> = g.states(&batch).unwrap().to_vec3().unwrap();
    let net = SideNetwork::new(&w, QuantMode::F32, 4096).unwrap();
    let mut max_err = 0f32;
    for (b, s) in seqs.iter().enumerate() {
        let z = s.taps_f32(WIDTH);
        let mut cache = net.new_cache();
        for t in 0..s.len() {
            let taps: Vec<Vec<f32>> = (0..TAPS.len())
                .map(|i| z[(t * TAPS.len() + i) * WIDTH..(t * TAPS.len() + i + 1) * WIDTH].to_vec())
                .collect();
            let step = net.step(&taps, &vec![0.0; 576], &mut cache).unwrap();
            for (a, e) in step.state.iter().zip(&states[b][t]) {
                max_err = max_err.max((a - e).abs());
            }
        }
    }
    assert!(
        max_err < 1e-3,
        "graph vs SideNetwork max abs diff {max_err}"
    );
    // Gate probabilities agree too.
    let h = g.heads(&batch).unwrap();
    let p: Vec<f32> = h
        .gate_logp
        .exp()
        .unwrap()
        .narrow(1, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut cache = net.new_cache();
    let s0 = seqs[0];
    let z = s0.taps_f32(WIDTH);
    for t in 0..s0.len() - 1 {
        let taps: Vec<Vec<f32>> = (0..TAPS.len())
            .map(|i| z[(t * TAPS.len() + i) * WIDTH..(t * TAPS.len() + i + 1) * WIDTH].to_vec())
            .collect();
        let step = net.step(&taps, &vec![0.0; 576], &mut cache).unwrap();
        assert!(
            (step.p_side - p[t]).abs() < 1e-3,
            "p_side at {t}: {} vs {}",
            step.p_side,
            p[t]
        );
    }
}

fn cfg(method: Method, steps: usize) -> TrainConfig {
    TrainConfig {
        method,
        lr: 1e-3,
        batch: 4,
        max_steps: steps,
        eval_every: 5,
        patience: 100,
        seed: 5,
        ..Default::default()
    }
}

#[test]
fn training_lowers_validation_loss_for_every_method() {
    let (tr, va) = data();
    for m in [Method::Spa, Method::Lst, Method::FullSeparation] {
        let g = graph(m, 0.0);
        let r = train::train(&g, tr, va, &cfg(m, 30), None, &mut |_| true).unwrap();
        assert!(
            r.best.loss < r.initial.loss - 0.01,
            "{m:?}: validation loss {} -> {}",
            r.initial.loss,
            r.best.loss
        );
        // The graph holds the best weights.
        let e = train::evaluate(&g, va, &cfg(m, 30)).unwrap();
        assert!(
            (e.loss - r.best.loss).abs() < 1e-4,
            "{} vs {}",
            e.loss,
            r.best.loss
        );
    }
}

#[test]
fn resume_after_interruption_continues_bit_for_bit() {
    let (tr, va) = data();
    let c = cfg(Method::Spa, 20);
    let full = graph(Method::Spa, 0.0);
    train::train(&full, tr, va, &c, None, &mut |_| true).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let g1 = graph(Method::Spa, 0.0);
    let err = train::train(&g1, tr, va, &c, Some(dir.path()), &mut |p| p.step < 10).unwrap_err();
    assert!(matches!(err, TrainError::Cancelled), "{err}");
    // A new process: fresh graph, same checkpoint directory.
    let g2 = graph(Method::Spa, 0.0);
    let r = train::train(&g2, tr, va, &c, Some(dir.path()), &mut |_| true).unwrap();
    assert_eq!(r.steps, 20);
    let (a, _) = full.to_weights().unwrap();
    let (b, _) = g2.to_weights().unwrap();
    assert_eq!(a, b, "resumed run differs from the uninterrupted one");
    // Another configuration must not silently reuse the checkpoint.
    let other = TrainConfig { lr: 5e-4, ..c };
    assert!(matches!(
        train::train(
            &graph(Method::Spa, 0.0),
            tr,
            va,
            &other,
            Some(dir.path()),
            &mut |_| true
        ),
        Err(TrainError::Cache { .. })
    ));
}

#[test]
fn usage_cost_moves_side_usage() {
    let (tr, va) = data();
    let run = |cost: f64| {
        let g = graph(Method::Spa, 0.0);
        let c = TrainConfig {
            usage_cost: cost,
            ..cfg(Method::Spa, 25)
        };
        let r = train::train(&g, tr, va, &c, None, &mut |_| true).unwrap();
        (
            r.initial.p_side_mean,
            train::evaluate(&g, va, &c).unwrap().p_side_mean,
        )
    };
    let (init, free) = run(0.0);
    let (_, dear) = run(3.0);
    // The CATE term pulls the gate toward the side path where it helps; the cost pushes it back.
    assert!(dear < init, "with cost 3.0 p_side {init} -> {dear}");
    assert!(
        free > dear + 0.01,
        "p_side with no cost {free}, with cost 3.0 {dear}"
    );
}

#[test]
fn caches_are_invalidated_when_projection_or_base_changes() {
    let specs = vec![SeqSpec {
        tokens: base()
            .tokenizer()
            .encode("The capital of France is Paris.")
            .unwrap(),
        loss_start: 2,
    }];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let sets =
        features::load_or_compute(base(), &[proj()], 8, &specs, &[&path], "t", true).unwrap();
    let key = features::cache_key(base(), proj(), 8, &specs);
    assert_eq!(FeatureSet::load(&path, &key).unwrap().seqs, sets[0].seqs);
    // Another projection: stale.
    let other = DownProjection::random(base(), WIDTH, &TAPS, 8).unwrap();
    let k2 = features::cache_key(base(), &other, 8, &specs);
    assert!(matches!(
        FeatureSet::load(&path, &k2),
        Err(TrainError::Cache { .. })
    ));
    // Another base identity: stale.
    let mut k3 = key.clone();
    k3.base = "0".repeat(64);
    assert!(matches!(
        FeatureSet::load(&path, &k3),
        Err(TrainError::Cache { .. })
    ));
    // load_or_compute recomputes for the new projection and overwrites.
    let s2 = features::load_or_compute(base(), &[&other], 8, &specs, &[&path], "t", true).unwrap();
    assert_eq!(FeatureSet::load(&path, &k2).unwrap().seqs, s2[0].seqs);
    assert_ne!(s2[0].seqs[0].taps, sets[0].seqs[0].taps);
    // A corrupt cache is an error, not a panic.
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(
        FeatureSet::load(&path, &key),
        Err(TrainError::Cache { .. })
    ));
}

#[test]
fn micro_batches_give_the_whole_batch_update() {
    // A step of 4 sequences as passes of 1 and of 3 (+1): the gradients are summed weighted by
    // loss positions, so the weights follow the whole-batch run (up to float rounding, which
    // Adam's normalized steps can magnify for near-zero gradients: a loose bound per weight,
    // a tight one on the validation loss). Also with a word-start mask (positions differ per
    // sequence).
    let (tr, va) = data();
    let keep: Vec<bool> = (0..49_152).map(|i| i % 3 != 0).collect();
    for mask in [None, Some(std::sync::Arc::new(keep))] {
        let c = TrainConfig {
            loss_targets: mask.clone(),
            ..cfg(Method::Spa, 8)
        };
        let whole = graph(Method::Spa, 0.0);
        let rw = train::train(&whole, tr, va, &c, None, &mut |_| true).unwrap();
        let (a, _) = whole.to_weights().unwrap();
        for mb in [1, 3] {
            let g = graph(Method::Spa, 0.0);
            let c2 = TrainConfig {
                micro_batch: mb,
                ..c.clone()
            };
            let r = train::train(&g, tr, va, &c2, None, &mut |_| true).unwrap();
            let (b, _) = g.to_weights().unwrap();
            let mut worst = 0f32;
            for (name, t) in &a.tensors {
                for (x, y) in t.data.iter().zip(&b.tensors[name].data) {
                    worst = worst.max((x - y).abs());
                }
            }
            assert!(worst < 2e-3, "micro-batch {mb}: weights differ by {worst}");
            assert!(
                (r.best.loss - rw.best.loss).abs() < 1e-3,
                "micro-batch {mb}: validation loss {} vs {}",
                r.best.loss,
                rw.best.loss
            );
            // Not the same as training on fewer sequences: a run with batch 1 differs.
            if mb == 1 && mask.is_none() {
                let small = graph(Method::Spa, 0.0);
                let c3 = TrainConfig {
                    batch: 1,
                    ..c.clone()
                };
                train::train(&small, tr, va, &c3, None, &mut |_| true).unwrap();
                let (s, _) = small.to_weights().unwrap();
                let mut diff = 0f32;
                for (name, t) in &a.tensors {
                    for (x, y) in t.data.iter().zip(&s.tensors[name].data) {
                        diff = diff.max((x - y).abs());
                    }
                }
                assert!(
                    diff > 10.0 * worst.max(1e-6),
                    "batch 1 {diff} vs micro {worst}"
                );
            }
        }
    }
}

#[test]
fn gate_only_trains_the_gate_of_a_frozen_lst_network() {
    // Two-stage SPA: LST trains the side network; then SPA's objective trains the gate alone.
    let (tr, va) = data();
    let lst = graph(Method::Lst, 0.0);
    train::train(&lst, tr, va, &cfg(Method::Lst, 10), None, &mut |_| true).unwrap();
    let (side, _) = lst.to_weights().unwrap();
    let g = SideGraph::new(
        &side,
        Method::Spa.input(),
        base().head_weight_f32().expect("head"),
        3,
    )
    .unwrap();
    let c = TrainConfig {
        gate_only: true,
        ..cfg(Method::Spa, 10)
    };
    let r = train::train(&g, tr, va, &c, None, &mut |_| true).unwrap();
    assert!(
        r.best.loss < r.initial.loss,
        "gate training did not lower the mixture loss: {} -> {}",
        r.initial.loss,
        r.best.loss
    );
    let (after, _) = g.to_weights().unwrap();
    let (mut gate_moved, mut side_moved) = (0f32, 0f32);
    for (name, t) in &side.tensors {
        let d = t
            .data
            .iter()
            .zip(&after.tensors[name].data)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        if name.starts_with("gate.") {
            gate_moved = gate_moved.max(d);
        } else {
            side_moved = side_moved.max(d);
        }
    }
    assert_eq!(side_moved, 0.0, "the frozen side network changed");
    assert!(gate_moved > 1e-3, "the gate did not train ({gate_moved})");
    // Only a gated method has a gate to train alone.
    let bad = TrainConfig {
        gate_only: true,
        ..cfg(Method::Lst, 2)
    };
    assert!(bad.validate().is_err());
    // Files of earlier runs keep their identity: the flag is absent when false.
    let json = serde_json::to_string(&cfg(Method::Spa, 2)).unwrap();
    assert!(!json.contains("gate_only"), "{json}");
    assert!(serde_json::to_string(&c)
        .unwrap()
        .contains("\"gate_only\":true"));
}

#[test]
fn gate_sweep_spans_base_to_side_and_agrees_with_evaluate() {
    let (_, va) = data();
    let mut w = SideWeights::init(side_config(), 7, 1.0).expect("init");
    // A gate whose side probability varies by position, so thresholds split the positions.
    for (i, v) in w
        .tensors
        .get_mut("gate.weight")
        .expect("gate")
        .data
        .iter_mut()
        .enumerate()
    {
        *v = ((i % 5) as f32 - 2.0) * 0.2;
    }
    let g = SideGraph::new(
        &w,
        SideInput::BaseTaps,
        base().head_weight_f32().unwrap(),
        1,
    )
    .unwrap();
    let c = cfg(Method::Spa, 1);
    let sweep = train::gate_sweep(&g, va, &c, &train::GATE_THRESHOLDS).unwrap();
    assert_eq!(sweep.len(), train::GATE_THRESHOLDS.len());
    // Threshold 1: never the side path, so top-1 accuracy is the base's, counted here directly
    // from the cached shortlists.
    let k = va[0].cand_logits.len() / va[0].target_idx.len();
    let (mut hits, mut n) = (0usize, 0usize);
    for s in va {
        for (row, &t) in s.cand_logits.chunks(k).zip(&s.target_idx) {
            hits += usize::from(row.iter().all(|&v| v <= row[t as usize]));
            n += 1;
        }
    }
    let never = sweep.last().unwrap();
    assert_eq!(never.side_usage, 0.0);
    assert!((never.accuracy - hits as f64 / n as f64).abs() < 1e-12);
    // Threshold 0: (almost) always the side path; usage falls as the threshold rises, and some
    // threshold in between splits the positions.
    assert!(sweep[0].side_usage > 0.99, "{:?}", sweep[0]);
    assert!(sweep.windows(2).all(|p| p[1].side_usage <= p[0].side_usage));
    assert!(sweep
        .iter()
        .any(|p| p.side_usage > 0.05 && p.side_usage < 0.95));
    // The random side path is worse than the base, so it must not be chosen everywhere.
    assert!(sweep[0].accuracy < never.accuracy, "{sweep:?}");
    // At 0.5 the emitted NLL and usage are what training's validation reports.
    let e = train::evaluate(&g, va, &c).unwrap();
    let half = sweep.iter().find(|p| p.threshold == 0.5).unwrap();
    assert!((half.nll - e.nll).abs() < 1e-3, "{} vs {}", half.nll, e.nll);
    assert!((half.side_usage - e.side_usage).abs() < 1e-9);
    // The choice is the most accurate threshold, the highest among equals.
    let (t, s2) = train::choose_gate_threshold(&g, va, &c).unwrap();
    assert_eq!(s2, sweep);
    let best = sweep.iter().map(|p| p.accuracy).fold(0.0, f64::max);
    let chosen = sweep.iter().find(|p| p.threshold == t).unwrap();
    assert_eq!(chosen.accuracy, best);
    assert!(sweep.iter().all(|p| p.threshold <= t || p.accuracy < best));
}
