//! Replays every kept fuzz input through the same decoders the cargo-fuzz targets drive
//! (`fuzz/src/harness.rs`): the seed corpus (`fuzz/corpus/<target>/`) and every input that
//! once crashed a target (`fuzz/regressions/<target>/`). Runs in the normal `cargo test`, on
//! stable, without cargo-fuzz.
//!
//! `write_seed_corpus` (ignored) regenerates the seeds:
//! `cargo test -p spa-server --test fuzz_regressions -- --ignored write_seed_corpus`.

#[path = "../../../fuzz/src/harness.rs"]
mod harness;

use prost::Message;
use spa_protocol::*;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn kept_fuzz_inputs_are_handled() {
    let mut failures = Vec::new();
    for t in harness::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(t));
        let regressions = files(&fuzz_dir().join("regressions").join(t));
        assert!(!corpus.is_empty(), "no seed corpus for {t}");
        for f in corpus.iter().chain(&regressions) {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| harness::run(t, &data));
            if r.is_err() {
                failures.push(f.display().to_string());
            }
        }
        eprintln!(
            "{t}: {} corpus + {} regression inputs",
            corpus.len(),
            regressions.len()
        );
    }
    assert!(failures.is_empty(), "inputs that panic: {failures:#?}");
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let d = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

#[test]
#[ignore = "regenerates fuzz/corpus seeds"]
fn write_seed_corpus() {
    let taps = encode_i8_rows(&[0.5, -1.0, 0.25, 2.0, 0.0, -0.75], 2, 3);
    let f16 = encode_f16(&[1.0, -2.0, 0.5, 3.25], 2, 2);
    write("tensor", "i8", &taps.encode_to_vec());
    write("tensor", "f16", &f16.encode_to_vec());
    let state = |p: u64, draft: bool| PositionState {
        position: p,
        taps: Some(taps.clone()),
        hidden: Some(f16.clone()),
        draft_token: 42,
        topk_ids: vec![1, 2, 3],
        topk_logits: Some(encode_f16(&[3.0, 2.0, 1.0], 1, 3)),
        is_draft: draft,
    };
    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "step_request",
            encode_frame(
                FrameKind::StepRequest,
                &StepRequest {
                    position: 3,
                    tokens: vec![504, 3575, 42],
                    draft: 4,
                    top_k: 8,
                    temperature: 0.7,
                    top_p: 0.9,
                    seed: 7,
                    tap_bits: 4,
                },
            ),
        ),
        (
            "step_response",
            encode_frame(
                FrameKind::StepResponse,
                &StepResponse {
                    states: vec![state(3, false), state(4, true)],
                    compute_us: 1000,
                    cache_len: 5,
                },
            ),
        ),
        (
            "layer_request",
            encode_frame(
                FrameKind::LayerRequest,
                &LayerRequest {
                    position: 1,
                    token: 9,
                    layer: 2,
                    delta: Some(f16.clone()),
                },
            ),
        ),
        (
            "layer_response",
            encode_frame(
                FrameKind::LayerResponse,
                &LayerResponse {
                    activation: Some(f16.clone()),
                    layer: 2,
                    done: false,
                    next_token: 0,
                    compute_us: 10,
                },
            ),
        ),
        (
            "manifest",
            encode_frame(
                FrameKind::Manifest,
                &Manifest {
                    protocol_version: 1,
                    base_identity: "abc".into(),
                    taps: vec![0, 1, 2],
                    ..Default::default()
                },
            ),
        ),
        (
            "create",
            encode_frame(
                FrameKind::CreateSessionRequest,
                &CreateSessionRequest { mode: 1 },
            ),
        ),
        (
            "created",
            encode_frame(
                FrameKind::CreateSessionResponse,
                &CreateSessionResponse {
                    session_id: "0123456789abcdef0123456789abcdef".into(),
                },
            ),
        ),
        (
            "error",
            encode_frame(
                FrameKind::Error,
                &ErrorFrame::new(ErrorCode::Limit, "too many"),
            ),
        ),
        (
            "features_request",
            encode_frame(
                FrameKind::FeaturesRequest,
                &FeaturesRequest {
                    tokens: vec![1, 2, 3],
                    top_k: 4,
                    ..Default::default()
                },
            ),
        ),
        (
            "features_response",
            encode_frame(
                FrameKind::FeaturesResponse,
                &FeaturesResponse {
                    taps: Some(taps.clone()),
                    ..Default::default()
                },
            ),
        ),
    ];
    for (name, bytes) in frames {
        write("frame", name, &bytes);
    }
    // GGUF: prefixes of the real model file (its header and the start of its metadata).
    let model = std::fs::read(
        std::env::var("SPA_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|_| spa_model::paths::model_file(spa_model::paths::MODEL_FILE)),
    )
    .unwrap();
    write("gguf", "prefix-256", &model[..256]);
    write("gguf", "prefix-4k", &model[..4096]);
    // Side weights: a tiny real plugin file (2 taps, width 32).
    let mut cfg = spa_model::SideConfig::new(64, 30, 32);
    cfg.taps = vec![0, 1];
    let plugin = spa_model::SidePlugin::init_for("base-id", 30, cfg, "proj-fp", 1, 1.0).unwrap();
    let p = std::env::temp_dir().join(format!("spa-seed-side-{}.safetensors", std::process::id()));
    plugin.save(&p).unwrap();
    write("side_weights", "tiny_plugin", &std::fs::read(&p).unwrap());
    std::fs::remove_file(&p).unwrap();
    // Tokenizer: text and little-endian id arrays.
    for (i, s) in [
        "Hello, world! The capital of France is Paris.",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "naïve café – 東京 🚀 \u{0}\u{7f}",
        "    indented\tcode();\n\n\n",
    ]
    .iter()
    .enumerate()
    {
        write("tokenizer", &format!("text-{i}"), s.as_bytes());
    }
    let ids: Vec<u8> = [504u32, 3575, 0, 1, 2, 49151]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write("tokenizer", "ids", &ids);
}
