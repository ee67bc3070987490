//! What each fuzz target feeds its input to. Shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and by the regression test that replays the kept inputs
//! (`rust/spa-server/tests/fuzz_regressions.rs`), so both exercise the same decoders.
//!
//! Every function must return normally for every input: a decoder that panics, aborts,
//! overflows or allocates without bound is a bug. Errors are the expected outcome for garbage.

#![allow(dead_code)]

use prost::Message;
use spa_protocol::{
    decode_frame, decode_tensor, open_frame, CreateSessionRequest, CreateSessionResponse,
    ErrorFrame, FeaturesRequest, FeaturesResponse, FrameKind, LayerRequest, LayerResponse, Limits,
    Manifest, StepRequest, StepResponse, Tensor,
};
use std::path::{Path, PathBuf};

/// The fuzz targets, by name (directory names under `fuzz/corpus` and `fuzz/regressions`).
pub const TARGETS: [&str; 5] = ["frame", "tensor", "gguf", "side_weights", "tokenizer"];

/// Runs `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "frame" => frame(data),
        "tensor" => tensor(data),
        "gguf" => gguf(data),
        "side_weights" => side_weights(data),
        "tokenizer" => tokenizer(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

fn limits() -> Limits {
    // Smaller than the defaults so the fuzzer reaches the limit checks quickly.
    Limits {
        max_frame_bytes: 1 << 20,
        max_positions_per_round: 512,
        max_draft: 64,
        max_tensor_elems: 1 << 16,
    }
}

fn tensors(ts: impl IntoIterator<Item = Option<Tensor>>, l: &Limits) {
    for t in ts.into_iter().flatten() {
        if let Ok(d) = decode_tensor(&t, l) {
            assert_eq!(d.data.len(), d.rows * d.cols);
            assert!(d.data.iter().all(|x| x.is_finite()));
        }
    }
}

/// A frame as the server (requests) or the device (responses) receives it: envelope checks,
/// then the message of the frame's kind, its validation and every tensor inside it.
pub fn frame(data: &[u8]) {
    let l = limits();
    let Ok((kind, _)) = open_frame(data, &l) else {
        return;
    };
    let Ok(kind) = FrameKind::try_from(kind) else {
        return;
    };
    match kind {
        FrameKind::StepRequest => {
            if let Ok(r) = decode_frame::<StepRequest>(data, kind, &l) {
                let _ = r.validate(&l);
            }
        }
        FrameKind::StepResponse => {
            if let Ok(r) = decode_frame::<StepResponse>(data, kind, &l) {
                for s in r.states {
                    tensors([s.taps, s.hidden, s.topk_logits], &l);
                }
            }
        }
        FrameKind::LayerRequest => {
            if let Ok(r) = decode_frame::<LayerRequest>(data, kind, &l) {
                tensors([r.delta], &l);
            }
        }
        FrameKind::LayerResponse => {
            if let Ok(r) = decode_frame::<LayerResponse>(data, kind, &l) {
                tensors([r.activation], &l);
            }
        }
        FrameKind::FeaturesResponse => {
            if let Ok(r) = decode_frame::<FeaturesResponse>(data, kind, &l) {
                tensors([r.taps, r.hidden, r.cont_hidden], &l);
            }
        }
        FrameKind::FeaturesRequest => {
            let _ = decode_frame::<FeaturesRequest>(data, kind, &l);
        }
        FrameKind::Manifest => {
            let _ = decode_frame::<Manifest>(data, kind, &l);
        }
        FrameKind::CreateSessionRequest => {
            let _ = decode_frame::<CreateSessionRequest>(data, kind, &l);
        }
        FrameKind::CreateSessionResponse => {
            let _ = decode_frame::<CreateSessionResponse>(data, kind, &l);
        }
        FrameKind::Error => {
            let _ = decode_frame::<ErrorFrame>(data, kind, &l);
        }
        FrameKind::Unspecified => {}
    }
}

/// A wire tensor (protobuf `Tensor`) through the codec.
pub fn tensor(data: &[u8]) {
    if let Ok(t) = Tensor::decode(data) {
        tensors([Some(t)], &limits());
    }
}

/// A scratch file for the loaders that read from disk (tmpfs when available), unique per
/// process and thread.
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let p = dir.join(format!(
        "spa-fuzz-{}-{:?}-{name}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&p, data).expect("write scratch file");
    p
}

/// A GGUF file through the base-model loader (header, metadata, tokenizer, config, tensor
/// bounds, weights).
pub fn gguf(data: &[u8]) {
    let p = scratch("base.gguf", data);
    let _ = spa_model::BaseModel::load(&p);
    let _ = std::fs::remove_file(&p);
}

/// A side-weight file (safetensors + JSON side config) through the plugin loader, then the
/// config validation and a quantized side network build when it loads; the same bytes also go
/// through the projection loader.
pub fn side_weights(data: &[u8]) {
    let p = scratch("side.safetensors", data);
    if let Ok(plugin) = spa_model::SidePlugin::load(&p) {
        if plugin.weights.config.validate(30).is_ok() {
            let _ = spa_model::SideNetwork::new(&plugin.weights, spa_model::QuantMode::Q8, 64);
        }
    }
    let _ = spa_model::DownProjection::load(&p);
    let _ = std::fs::remove_file(&p);
}

/// The base model's tokenizer (from the real GGUF, `SPA_MODEL` or the default asset path).
pub fn base_tokenizer() -> &'static spa_model::SpaTokenizer {
    static T: std::sync::OnceLock<spa_model::SpaTokenizer> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let p = std::env::var("SPA_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|_| spa_model::paths::model_file(spa_model::paths::MODEL_FILE));
        spa_model::BaseModel::load(&p)
            .unwrap_or_else(|e| {
                panic!(
                    "the tokenizer target needs the base model at {}: {e}",
                    p.display()
                )
            })
            .tokenizer()
            .clone()
    })
}

/// Untrusted text and token ids through the tokenizer: encode (the bytes as lossy UTF-8),
/// decode of the ids read from the bytes (after the id check the runtime does), streaming
/// decode, and the chat template.
pub fn tokenizer(data: &[u8]) {
    let t = base_tokenizer();
    let text = String::from_utf8_lossy(data);
    if let Ok(ids) = t.encode(&text) {
        assert!(t.check_ids(&ids).is_ok());
        let _ = t.decode(&ids);
    }
    let _ = t.encode(&t.chat_prompt(&text));
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if t.check_ids(&ids).is_ok() {
        let _ = t.decode(&ids);
        let mut s = t.stream();
        for &id in &ids {
            let _ = s.push(id);
        }
    } else {
        // Out-of-vocabulary ids must be refused, never indexed.
        let _ = t.decode(&ids);
    }
}
