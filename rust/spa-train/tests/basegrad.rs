//! Gradient-through-the-base baselines on the real SmolLM2-135M GGUF: the differentiable f32
//! base agrees with `spa_model::BaseModel`; LoRA / Adapter / full integration start exactly at
//! the base; a few AdamW steps on a tiny real-text slice lower the validation loss; trained
//! weights survive a save/load round trip; KV-cached greedy decoding equals the no-cache
//! argmax rollout. Skipped (with a message) when the model file is absent.

use spa_model::BaseModel;
use spa_train::basegrad::{BaseGradMethod, BaseGradModel, BaseGradTrainConfig, TrainProgress};
use spa_train::TrainError;
use std::path::PathBuf;

fn model_path() -> Option<PathBuf> {
    let p = spa_model::paths::model_file(spa_model::paths::MODEL_FILE);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: base model {} absent; run `scripts/fetch-assets.sh model`",
            p.display()
        );
        None
    }
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// Short question/answer pairs (real facts) in one fixed answer format the base does not
/// know: "<answer>. Source: encyclopedia." Train and validation share the format, not the facts.
const QA: [(&str, &str); 14] = [
    ("What is the capital of Italy?", "Rome"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    (
        "What is the boiling point of water at sea level?",
        "100 degrees Celsius",
    ),
    (
        "Which ocean lies between Africa and Australia?",
        "The Indian Ocean",
    ),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ("How many continents are there?", "Seven"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Pride and Prejudice?", "Jane Austen"),
    ("What is the capital of Japan?", "Tokyo"),
    // validation
    ("What is the capital of Spain?", "Madrid"),
    ("Which planet is known as the Red Planet?", "Mars"),
    (
        "Who wrote the play Romeo and Juliet?",
        "William Shakespeare",
    ),
    ("What is the freezing point of water?", "0 degrees Celsius"),
];

type Examples = Vec<(Vec<u32>, usize)>;

fn qa_data(m: &BaseGradModel) -> (Examples, Examples) {
    let tok = m.tokenizer();
    let ex: Vec<(Vec<u32>, usize)> = QA
        .iter()
        .map(|(q, a)| {
            let mut ids = tok
                .encode(&format!("Question: {q}\nAnswer:"))
                .expect("encode");
            let start = ids.len();
            ids.extend(
                tok.encode(&format!(" {a}. Source: encyclopedia."))
                    .expect("encode"),
            );
            (ids, start)
        })
        .collect();
    (ex[..10].to_vec(), ex[10..].to_vec())
}

fn argmax_rows(logits: &candle_core::Tensor) -> Vec<u32> {
    logits
        .argmax(candle_core::D::Minus1)
        .and_then(|t| t.to_vec1::<u32>())
        .expect("argmax")
}

#[test]
fn f32_base_matches_base_model_logits() {
    let Some(path) = model_path() else { return };
    let base = BaseModel::load(&path).expect("base");
    let m = BaseGradModel::new(&path, BaseGradMethod::Lora { rank: 4 }, 1).expect("model");
    assert_eq!(m.identity(), base.identity());
    let ids = base
        .tokenizer()
        .encode("Once upon a time, there was a little girl who lived by the sea. The capital of France is")
        .expect("encode");
    let mut cache = base.new_cache();
    let out = base.forward(&ids, &mut cache).expect("forward");
    let want = base.logits(&out.hidden).expect("logits");
    let got = m.base_logits(&ids).expect("logits");
    assert_eq!(got.dims(), want.dims());
    let d = max_abs_diff(&got, &want);
    eprintln!(
        "max |logit diff| vs BaseModel over {} positions: {d}",
        ids.len()
    );
    assert!(d < 0.05, "f32 base differs from BaseModel by {d}");
    assert_eq!(argmax_rows(&got), argmax_rows(&want));
    // Known good output of the base (DESIGN.md section 4).
    let paris = base.tokenizer().encode(" Paris").expect("encode");
    assert_eq!(argmax_rows(&got).last(), paris.first());
    // Counts the README/report quote.
    let spa = spa_model::SideConfig::new(576, 30, 64).param_count();
    eprintln!(
        "params: base {}, SPA side w64 {}, lora r4 {}",
        m.base_params(),
        spa,
        m.trainable_params()
    );
    assert_eq!(m.base_params(), base.config().param_count());
}

/// The whole life cycle of one method on the real model (one load per method keeps the
/// test file well under the time budget).
fn life_cycle(method: BaseGradMethod) {
    let Some(path) = model_path() else { return };
    let mut m = BaseGradModel::new(&path, method, 11).expect("model");
    assert_eq!(m.trainable_params(), method.param_count(m.config()));
    let (train, val) = qa_data(&m);
    let probe = &val[0].0;

    // Zero-initialised output weights: exactly the base.
    let (a, b) = (
        m.logits(probe).expect("logits"),
        m.base_logits(probe).expect("logits"),
    );
    assert_eq!(
        max_abs_diff(&a, &b),
        0.0,
        "{method:?} at init must equal the base"
    );

    // A few steps lower the validation loss.
    let cfg = BaseGradTrainConfig {
        batch_size: 5,
        lr: 3e-3,
        weight_decay: 0.0,
        max_steps: 3,
        eval_every: 2,
        patience: 0,
        seed: 3,
        max_len: 64,
    };
    let mut seen = Vec::new();
    let report = m
        .train(&train, &val, &cfg, &mut |p: TrainProgress| {
            seen.push(p.step)
        })
        .expect("train");
    eprintln!(
        "{}: {} params, val {:.4} -> {:.4} (step {}), {:.2} s/step (batch 5 x ~25 tokens), history {:?}",
        method.name(),
        report.trainable_params,
        report.initial_val_loss,
        report.best_val_loss,
        report.best_step,
        report.seconds_per_step,
        report.history
    );
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(report.history.len(), 3, "validations at steps 0, 2 and 3");
    assert!(
        report.best_val_loss < report.initial_val_loss - 0.05,
        "{method:?}: validation loss did not drop: {report:?}"
    );
    let now = m.evaluate(&val, 4, 64).expect("eval");
    assert!(
        (now - report.best_val_loss).abs() < 1e-4,
        "best weights not restored"
    );
    let trained = m.logits(probe).expect("logits");
    assert!(
        max_abs_diff(&trained, &b) > 1e-3,
        "training changed nothing"
    );

    // Save / load round trip into a differently seeded model.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("w.safetensors");
    m.save(&file).expect("save");
    let mut fresh = BaseGradModel::new(&path, method, 99).expect("model");
    fresh.load(&file).expect("load");
    assert_eq!(
        max_abs_diff(&fresh.logits(probe).expect("logits"), &trained),
        0.0
    );
    drop(fresh);

    // KV-cached greedy decoding == argmax rollout without a cache.
    let prompt = &val[1].0[..val[1].1];
    let got = m.generate_greedy(prompt, 6, &[]).expect("generate");
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let l = m.logits(&seq).expect("logits");
        let next = *argmax_rows(&l).last().expect("row");
        seq.push(next);
    }
    assert_eq!(
        got,
        seq[prompt.len()..].to_vec(),
        "{method:?}: cache changes greedy output"
    );
    // Stop tokens end generation before they are emitted.
    if let Some(k) = (1..got.len()).find(|&k| !got[..k].contains(&got[k])) {
        let stopped = m.generate_greedy(prompt, 6, &got[k..=k]).expect("generate");
        assert_eq!(stopped, got[..k].to_vec());
    }
    eprintln!(
        "{} continuation: {:?}",
        method.name(),
        m.tokenizer().decode(&got).unwrap_or_default()
    );
}

#[test]
fn lora_life_cycle() {
    life_cycle(BaseGradMethod::Lora { rank: 4 });
}

#[test]
fn adapter_life_cycle() {
    life_cycle(BaseGradMethod::Adapter { bottleneck: 18 });
}

#[test]
fn full_integration_life_cycle() {
    life_cycle(BaseGradMethod::FullIntegration { width: 64 });
}

#[test]
fn bad_inputs_are_typed_errors() {
    let Some(path) = model_path() else { return };
    let m = BaseGradModel::new(&path, BaseGradMethod::Adapter { bottleneck: 4 }, 0).expect("model");
    // Target start must leave a context token and a target token.
    for ex in [(vec![1u32, 2, 3], 0usize), (vec![1, 2, 3], 3)] {
        assert!(matches!(m.loss(&[ex]), Err(TrainError::Data(_))));
    }
    assert!(matches!(
        m.loss(&[(vec![1, u32::MAX], 1)]),
        Err(TrainError::Data(_))
    ));
    // Weights of another method are refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("w.safetensors");
    m.save(&file).expect("save");
    let mut other =
        BaseGradModel::new(&path, BaseGradMethod::Adapter { bottleneck: 5 }, 0).expect("model");
    assert!(matches!(other.load(&file), Err(TrainError::Cache { .. })));
    assert!(matches!(
        BaseGradModel::new(&path, BaseGradMethod::Lora { rank: 0 }, 0),
        Err(TrainError::Config(_))
    ));
}

#[test]
fn budget_matching_picks_comparable_sizes() {
    let Some(path) = model_path() else { return };
    let base = BaseModel::load(&path).expect("base");
    let cfg = base.config();
    let spa = spa_model::SideConfig::new(cfg.hidden, cfg.n_layers, 64).param_count();
    let [lora, adapter, full] = BaseGradMethod::matched(cfg, spa, 64);
    eprintln!(
        "budget {spa}: {lora:?} = {}, {adapter:?} = {}, {full:?} = {}",
        lora.param_count(cfg),
        adapter.param_count(cfg),
        full.param_count(cfg)
    );
    assert_eq!(lora, BaseGradMethod::Lora { rank: 4 });
    assert_eq!(adapter, BaseGradMethod::Adapter { bottleneck: 18 });
    for m in [lora, adapter, full] {
        let n = m.param_count(cfg) as f64;
        assert!((n / spa as f64 - 1.0).abs() < 0.1, "{m:?}: {n} vs {spa}");
    }
}

/// Timing of one optimizer step at the reduced profile (batch 8 x 128 tokens, 64
/// target tokens each). Run: `cargo test --release -p spa-train --test basegrad -- --ignored
/// --nocapture step_timing`.
#[test]
#[ignore = "timing only (minutes per method on 2 cores)"]
fn step_timing() {
    let Some(path) = model_path() else { return };
    let methods = [
        BaseGradMethod::Lora { rank: 4 },
        BaseGradMethod::Adapter { bottleneck: 18 },
        BaseGradMethod::FullIntegration { width: 64 },
    ];
    for method in methods {
        let m = BaseGradModel::new(&path, method, 0).expect("model");
        let batch: Vec<(Vec<u32>, usize)> = (0..8u32)
            .map(|b| {
                (
                    (0..128u32).map(|i| 100 + (i * 7 + b * 13) % 5000).collect(),
                    64,
                )
            })
            .collect();
        let vars: Vec<candle_core::Var> = m.vars().into_iter().map(|(_, v)| v).collect();
        let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(
            vars,
            candle_nn::ParamsAdamW::default(),
        )
        .expect("opt");
        let mut fwd = 0f64;
        let mut all = 0f64;
        let steps = 2;
        for s in 0..=steps {
            let t0 = std::time::Instant::now();
            let loss = m.loss(&batch).expect("loss");
            let t1 = t0.elapsed().as_secs_f64();
            candle_nn::Optimizer::backward_step(&mut opt, &loss).expect("step");
            if s > 0 {
                // first step is warm-up
                fwd += t1;
                all += t0.elapsed().as_secs_f64();
            }
        }
        let t0 = std::time::Instant::now();
        m.evaluate(&batch, 8, 0).expect("eval");
        let eval = t0.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} params; step (batch 8 x 128) {:.2} s (forward {:.2} s), no-grad eval {:.2} s",
            method.name(),
            m.trainable_params(),
            all / steps as f64,
            fwd / steps as f64,
            eval
        );
    }
}
