//! `spa bench model`: speed and size figures of the base and the device components, measured
//! in one run. With `--json` the last line of stdout is one JSON object.

use crate::assets;
use anyhow::Result;
use serde_json::json;
use spa_model::{
    argmax, top_k, BaseKernel, BaseModel, DeviceHead, DownProjection, PersonalVocab, QuantMode,
    SideNetwork, SidePlugin,
};
use std::path::PathBuf;
use std::time::Instant;

/// Benchmark text (public-domain style English prose).
pub const TEXT: &str = "The sea was calm that morning, and the old harbour lay quiet under a pale sky. \
Fishermen mended their nets along the stone wall while gulls circled above the masts. \
A small boat drifted past the lighthouse, its sail folded, its captain asleep at the tiller. \
In the town, bakers opened their shutters and the smell of bread spread through the narrow streets. \
Children ran down to the water to count the ships that had come in during the night. \
There were eleven of them, some with torn sails, some heavy with salt and cod from the northern banks. \
The harbour master walked slowly along the quay, writing each name in his black book, \
as his father had done before him and his grandfather before that. \
When the bell of the church rang nine, the market began, and the quiet morning was over.";

#[derive(clap::Args)]
pub struct ModelBenchArgs {
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Decode tokens to time.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Side width.
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Timed repetitions of the small kernels.
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// Server base engines to time with taps on (comma separated; default: every engine of
    /// this build, candle and, with `--features llamacpp`, llamacpp).
    #[arg(long, value_delimiter = ',')]
    engine: Vec<String>,
    /// Layers of the llama.cpp engine on the GPU (GPU builds; -1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    gpu_layers: i32,
}

/// Prefill (`text`, one call) and greedy decode (`n` one-token calls after `prompt`) speed in
/// tokens/s of a server engine, every layer's taps and the final state captured, as a step of
/// the server runs them.
fn engine_speed(
    engine: &dyn spa_server::BaseEngine,
    base: &BaseModel,
    text: &[u32],
    prompt: &[u32],
    n: usize,
) -> Result<(f64, f64)> {
    let next = |mut out: spa_server::EngineOutput| -> Result<u32> {
        Ok(argmax(&out.take_last_logits(base)?).unwrap_or(0) as u32)
    };
    let fwd = |t: &[u32], s: &mut Box<dyn spa_server::Sequence>| engine.forward(t, s.as_mut());
    // Warm-up (first-call allocations), then prefill.
    fwd(&text[..8.min(text.len())], &mut engine.new_sequence()?)?;
    let mut s = engine.new_sequence()?;
    // Prefill up to the first token's logits, as a server step needs them.
    let t = Instant::now();
    next(fwd(text, &mut s)?)?;
    let prefill = text.len() as f64 / t.elapsed().as_secs_f64();
    drop(s);
    let mut s = engine.new_sequence()?;
    let mut tok = next(fwd(prompt, &mut s)?)?;
    let t = Instant::now();
    for _ in 0..n {
        tok = next(fwd(&[tok], &mut s)?)?;
    }
    Ok((prefill, n as f64 / t.elapsed().as_secs_f64()))
}

fn time_us(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / reps as f64)
}

pub(crate) fn llamacpp_decode_tok_s(model: &std::path::Path, tokens: usize) -> Option<f64> {
    // Greedy decode through llama-cpp-python (2 threads), timed from the first streamed token
    // to the last, so prompt processing is excluded as in our decode figure.
    let script = format!(
        "import time,sys\nfrom llama_cpp import Llama\nm=Llama(model_path=sys.argv[1],n_threads=2,n_ctx=512,verbose=False)\n\
ts=[]\nfor c in m.create_completion('The capital of France is',max_tokens={tokens},temperature=0.0,top_k=1,stream=True):\n    ts.append(time.time())\n\
print((len(ts)-1)/(ts[-1]-ts[0]))\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(model)
        .output()
        .ok()?;
    if !out.status.success() {
        log::info!(
            "llama.cpp not available: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Greedy decode speed (tokens/s) of `n` tokens after `prompt`, LM head included.
fn decode_speed(base: &BaseModel, prompt: &[u32], n: usize) -> Result<f64> {
    let mut c = base.new_cache();
    let o = base.forward(prompt, &mut c)?;
    let mut next = argmax(&base.last_logits(&o.hidden)?).unwrap_or(0) as u32;
    let t = Instant::now();
    for _ in 0..n {
        let o = base.forward(&[next], &mut c)?;
        next = argmax(&base.last_logits(&o.hidden)?).unwrap_or(0) as u32;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

pub fn model(a: ModelBenchArgs) -> Result<()> {
    let path = assets::model_path(a.model.as_deref())?;
    let base = BaseModel::load(&path)?;
    let cfg = base.config().clone();
    let tok = base.tokenizer();
    let text_ids = tok.encode(TEXT)?;

    // Base prefill: the whole text at once.
    let n_prefill = text_ids.len().min(256);
    let t = Instant::now();
    let mut cache = base.new_cache();
    let out = base.forward(&text_ids[..n_prefill], &mut cache)?;
    let prefill_tok_s = n_prefill as f64 / t.elapsed().as_secs_f64();

    let prompt = tok.encode("The capital of France is")?;
    let decode_tok_s = decode_speed(&base, &prompt, a.tokens)?;
    eprintln!("base: prefill {prefill_tok_s:.1} tok/s ({n_prefill} tokens), decode {decode_tok_s:.1} tok/s");
    // The same with llama.cpp's numerics (8-bit activations).
    let base_i8 = BaseModel::load_with(&path, BaseKernel::Int8Activations)?;
    let t = Instant::now();
    base_i8.forward(&text_ids[..n_prefill], &mut base_i8.new_cache())?;
    let prefill_i8 = n_prefill as f64 / t.elapsed().as_secs_f64();
    let decode_i8 = decode_speed(&base_i8, &prompt, a.tokens)?;
    drop(base_i8);
    eprintln!(
        "base (int8 activations): prefill {prefill_i8:.1} tok/s, decode {decode_i8:.1} tok/s"
    );

    // Side network (width, all taps) at each quantization, stepping at a context of 64 positions.
    let taps: Vec<usize> = (0..cfg.n_layers).collect();
    let proj = DownProjection::random(&base, a.width, &taps, 1)?;
    let plugin = SidePlugin::init(&base, &proj, 7, 0.1)?;
    let z = proj.apply_taps(&out.taps)?;
    let hidden: Vec<Vec<f32>> = out.hidden.to_vec2()?;
    let ctx = 64.min(z.len() - 1);
    let mut side_us = Vec::new();
    let mut sides = Vec::new();
    for mode in [QuantMode::F32, QuantMode::Q8, QuantMode::Q4] {
        let side = SideNetwork::new(&plugin.weights, mode, base.max_positions())?;
        let mut sc = side.new_cache();
        for p in 0..ctx {
            side.step(&z[p], &hidden[p], &mut sc)?;
        }
        let us = time_us(a.reps, || {
            side.step(&z[ctx], &hidden[ctx], &mut sc)?;
            sc.truncate(ctx);
            Ok(())
        })?;
        side_us.push(us);
        sides.push(side);
    }
    let mut head_us = Vec::new();
    let mut heads = Vec::new();
    for mode in [QuantMode::F32, QuantMode::Q8, QuantMode::Q4] {
        let head = DeviceHead::from_base(&base, mode)?;
        let h = &hidden[0];
        head_us.push(time_us(a.reps.min(50), || {
            head.full(h)?;
            Ok(())
        })?);
        heads.push(head);
    }
    let head_q8 = &heads[1];
    let base_logits: Vec<Vec<f32>> = base.logits(&out.hidden)?.to_vec2()?;
    let personal = PersonalVocab::from_tokens([text_ids.as_slice()], 64);
    let cands128 = personal.candidates(&top_k(&base_logits[0], 64));
    let shortlist_us = time_us(a.reps, || {
        head_q8.shortlist(&cands128[..cands128.len().min(128)], &hidden[0])?;
        Ok(())
    })?;
    // Shortlist agreement on the side path (q8 side + q8 head) over every position of the text.
    let side_q8 = &sides[1];
    let mut sc = side_q8.new_cache();
    let (mut agree, mut total) = (0usize, 0usize);
    for p in 0..z.len() {
        let step = side_q8.step(&z[p], &hidden[p], &mut sc)?;
        let cands = personal.candidates(&top_k(&base_logits[p], 64));
        let short = head_q8.shortlist_argmax(&cands, &step.hidden)?;
        let full = argmax(&head_q8.full(&step.hidden)?).map(|i| i as u32);
        agree += (short == full) as usize;
        total += 1;
    }
    let agreement = agree as f64 / total as f64;
    let side_cfg = side_q8.config();
    let side_macs = side_cfg.macs_per_position(ctx);
    let ratio = side_macs as f64 / cfg.layer_macs_per_token() as f64;
    let device_q4 = sides[2].bytes() + heads[2].bytes();
    let llamacpp = llamacpp_decode_tok_s(&path, a.tokens);
    // The server's engines, taps on.
    let engines: Vec<String> = if a.engine.is_empty() {
        spa_server::ENGINES.iter().map(|s| s.to_string()).collect()
    } else {
        a.engine.clone()
    };
    let shared = std::sync::Arc::new(base);
    let mut engine_rows = Vec::new();
    let mut runs: Vec<(String, std::sync::Arc<dyn spa_server::BaseEngine>)> = Vec::new();
    for name in &engines {
        let e = spa_server::engine_with(name, &shared, 256 << 20, a.gpu_layers)?;
        runs.push((name.clone(), e));
        // The llama.cpp engine with the logits from the base's head over its final norm (the
        // graph stopped there, `LlamaCppConfig::llama_head: false`), against the default
        // (llama.cpp's own head) in the same run.
        #[cfg(feature = "llamacpp")]
        if name == "llamacpp" {
            use spa_server::llamacpp::{LlamaCppConfig, LlamaCppEngine};
            let cfg = LlamaCppConfig {
                n_gpu_layers: a.gpu_layers,
                llama_head: false,
                ..LlamaCppConfig::for_budget(shared.config(), 256 << 20)
            };
            let e = LlamaCppEngine::load(shared.path(), shared.config(), &cfg)?;
            runs.push(("llamacpp-base-head".into(), std::sync::Arc::new(e)));
        }
    }
    for (name, e) in &runs {
        let (pf, dc) = engine_speed(
            e.as_ref(),
            &shared,
            &text_ids[..n_prefill],
            &prompt,
            a.tokens,
        )?;
        eprintln!("engine {name} (taps on): prefill {pf:.1} tok/s, decode {dc:.1} tok/s");
        let mut r = json!({"engine": name, "prefill_tok_s": pf, "decode_tok_s": dc});
        if let Some(x) = llamacpp {
            r["decode_vs_llamacpp_python"] = json!(dc / x);
        }
        engine_rows.push(r);
    }
    eprintln!(
        "side step (width {}, {} taps, ctx {ctx}): f32 {:.0} us, q8 {:.0} us, q4 {:.0} us",
        a.width,
        taps.len(),
        side_us[0],
        side_us[1],
        side_us[2]
    );
    eprintln!(
        "full head: f32 {:.0} us, q8 {:.0} us, q4 {:.0} us; shortlist ({} cands, q8) {:.1} us; agreement {:.4} over {total} positions",
        head_us[0],
        head_us[1],
        head_us[2],
        cands128.len().min(128),
        shortlist_us,
        agreement
    );
    eprintln!(
        "side/base FLOPs {:.4}; device weights at q4 {:.1} MB; llama.cpp decode {}",
        ratio,
        device_q4 as f64 / 1e6,
        llamacpp
            .map(|x| format!("{x:.1} tok/s"))
            .unwrap_or_else(|| "not installed".into())
    );
    let mut j = json!({
        "model": path.file_name().map(|f| f.to_string_lossy().to_string()),
        "threads": rayon_threads(),
        "base_prefill_tok_s": prefill_tok_s,
        "base_decode_tok_s": decode_tok_s,
        "base_prefill_tok_s_int8act": prefill_i8,
        "base_decode_tok_s_int8act": decode_i8,
        "side_width": a.width,
        "side_taps": taps.len(),
        "side_step_us_f32": side_us[0],
        "side_step_us_q8": side_us[1],
        "side_step_us_q4": side_us[2],
        "head_us_f32": head_us[0],
        "head_us_q8": head_us[1],
        "head_us_q4": head_us[2],
        "shortlist_head_us_q8": shortlist_us,
        "shortlist_candidates": cands128.len().min(128),
        "shortlist_argmax_agreement": agreement,
        "shortlist_positions": total,
        "side_params": side_cfg.param_count(),
        "base_params": cfg.param_count(),
        "side_to_base_flops_ratio": ratio,
        "device_weights_bytes_q4": device_q4,
        "device_weights_bytes_q8": sides[1].bytes() + heads[1].bytes(),
    });
    j["engines"] = json!(engine_rows);
    if let Some(x) = llamacpp {
        j["llamacpp_decode_tok_s"] = json!(x);
        j["decode_vs_llamacpp"] = json!(decode_tok_s / x);
        j["decode_int8act_vs_llamacpp"] = json!(decode_i8 / x);
    }
    if a.json {
        println!("{j}");
    } else {
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(())
}

pub(crate) fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
