//! `spa bench rounds` and `spa bench serve`: the real server and device runtime on loopback.
//! RTT is emulated by the delaying TCP proxy of `spa_runtime::netsim` (tc netem is not
//! available on these machines); every latency figure printed says so.

use crate::serve::load_server_parts;
use anyhow::Result;
use serde_json::json;
use spa_model::{DeviceAssets, GateMode, PersonalVocab, QuantMode, SideConfig, SidePlugin};
use spa_runtime::layer_split::{self, LoraAdapters};
use spa_runtime::netsim::{NetConfig, Proxy};
use spa_runtime::{
    Client, ClientConfig, DeviceModel, GenerationStats, Mode, RuntimeParams, SpaSession,
};
use spa_server::{tls, AppState, Keys, ServerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

#[derive(clap::Args)]
pub struct RoundsArgs {
    /// Print one JSON object per RTT as the last line(s).
    #[arg(long)]
    json: bool,
    /// Tokens to generate per mode.
    #[arg(long, default_value_t = 50)]
    tokens: usize,
    /// Emulated round-trip times in ms (comma separated).
    #[arg(long, default_value = "50", value_delimiter = ',')]
    rtt_ms: Vec<u64>,
    /// Draft sizes for the spa mode.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    k: Vec<u32>,
    /// Tokens measured in layer-split mode (its total for `--tokens` is scaled from these).
    #[arg(long, default_value_t = 6)]
    layer_split_tokens: usize,
    /// GGUF base model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Projection (pca, random:SEED, or a file).
    #[arg(long, default_value = "pca")]
    projection: String,
}

struct Bench {
    assets: DeviceAssets,
    manifest: spa_protocol::Manifest,
    url_root: String,
    cert: tls::CertPair,
    key: String,
}

impl Bench {
    fn client(&self, url: &str) -> Result<Client> {
        let mut c = ClientConfig::new(url, &self.key);
        c.extra_root_pem = Some(self.cert.cert_pem.clone());
        Ok(Client::new(c)?)
    }

    fn device(&self, gate: GateMode, up_scale: f32) -> Result<Arc<DeviceModel>> {
        let m = &self.manifest;
        let mut cfg = SideConfig::new(m.hidden as usize, m.layers as usize, m.side_width as usize);
        cfg.taps = m.taps.iter().map(|&t| t as usize).collect();
        let plugin = SidePlugin::init_for(
            &m.base_identity,
            m.layers as usize,
            cfg,
            &m.projection_fingerprint,
            3,
            up_scale,
        )?;
        let personal =
            PersonalVocab::from_tokens([self.assets.tokenizer.encode(PROMPT)?.as_slice()], 64);
        Ok(Arc::new(DeviceModel::new(
            &self.assets,
            &plugin,
            QuantMode::Q8,
            gate,
            personal,
        )?))
    }
}

/// Starts the server on a loopback port with a dev certificate and one bench key, and reads
/// what the device needs (tokenizer + head from the GGUF, the manifest).
async fn start_local(
    base: Arc<spa_model::BaseModel>,
    proj: Arc<spa_model::DownProjection>,
    max_sessions_per_key: usize,
    engine: &str,
    gpu_layers: i32,
) -> Result<(spa_server::RunningServer, Bench)> {
    let key = "bench-key".to_string();
    let cert = tls::dev_cert().map_err(anyhow::Error::msg)?;
    let assets = DeviceAssets::load(base.path())?;
    let cfg = ServerConfig {
        keys: Keys::new(std::slice::from_ref(&key)),
        max_sessions_per_key,
        ..ServerConfig::default()
    };
    let engine = spa_server::engine_with(engine, &base, cfg.kv_budget_bytes, gpu_layers)?;
    let state = Arc::new(AppState::with_engine(base, proj, engine, cfg));
    let srv = spa_server::start(state, "127.0.0.1:0".parse()?, Some(&cert))
        .await
        .map_err(anyhow::Error::msg)?;
    let mut b = Bench {
        assets,
        manifest: Default::default(),
        url_root: srv.url(),
        cert,
        key,
    };
    b.manifest = b.client(&b.url_root)?.manifest().await?;
    Ok((srv, b))
}

fn row(mode: &str, k: u32, st: &GenerationStats, tokens: usize, scale: f64) -> serde_json::Value {
    let t = st.tokens.max(1) as f64;
    json!({
        "mode": mode,
        "k": k,
        "tokens_measured": st.tokens,
        "rounds_per_token": st.rounds_per_token(),
        "bytes_down_per_token": st.bytes_down as f64 / t,
        "bytes_up_per_token": st.bytes_up as f64 / t,
        "device_ms_per_token": st.t_device.as_secs_f64() * 1e3 / t,
        "server_ms_per_token": st.t_pretrained.as_secs_f64() * 1e3 / t,
        "net_ms_per_token": st.t_net.as_secs_f64() * 1e3 / t,
        "side_usage": st.side_usage(),
        "override_rate": st.override_rate(),
        "total_s": st.t_total.as_secs_f64() * scale,
        "total_s_extrapolated": scale != 1.0,
        "tokens": tokens,
    })
}

async fn spa_run(
    b: &Bench,
    url: &str,
    dev: Arc<DeviceModel>,
    mode: Mode,
    k: u32,
    tokens: usize,
) -> Result<GenerationStats> {
    let mut s = SpaSession::new(b.client(url)?, dev.clone(), mode);
    let prompt = dev.tokenizer.encode(&dev.tokenizer.chat_prompt(PROMPT))?;
    let params = RuntimeParams {
        max_tokens: tokens,
        draft: k,
        ..Default::default()
    };
    let (_, st) = s.generate(&prompt, &params, None, |_| true).await?;
    s.reset().await;
    Ok(st)
}

pub async fn rounds(a: RoundsArgs) -> Result<()> {
    let (base, proj) = load_server_parts(a.model.as_deref(), 64, &a.projection)?;
    let (srv, b) = start_local(base, proj, 64, "candle", 0).await?;
    let untrained = b.device(GateMode::Learned, 0.0)?;
    let side_random = b.device(GateMode::AlwaysSide, 1.0)?;
    let mut outputs = Vec::new();
    for &rtt in &a.rtt_ms {
        let proxy = Proxy::start(srv.addr, NetConfig::rtt(Duration::from_millis(rtt))).await?;
        let url = proxy.url();
        let mut modes = Vec::new();
        for &k in &a.k {
            let st = spa_run(&b, &url, untrained.clone(), Mode::Spa, k, a.tokens).await?;
            modes.push(row("spa", k, &st, a.tokens, 1.0));
        }
        let kmax = a.k.iter().copied().max().unwrap_or(16);
        let st = spa_run(&b, &url, side_random.clone(), Mode::Spa, kmax, a.tokens).await?;
        let mut r = row("spa", kmax, &st, a.tokens, 1.0);
        r["variant"] = json!("gate always side, random side network");
        modes.push(r);
        let st = spa_run(&b, &url, side_random.clone(), Mode::Lst, 1, a.tokens).await?;
        modes.push(row("lst", 1, &st, a.tokens, 1.0));
        let cfg = &b.manifest;
        let lora = LoraAdapters::random(cfg.layers as usize, cfg.hidden as usize, 8, 1);
        let client = b.client(&url)?;
        let prompt = b
            .assets
            .tokenizer
            .encode(&b.assets.tokenizer.chat_prompt(PROMPT))?;
        let t = Instant::now();
        let (_, st) = layer_split::generate(&client, &prompt, a.layer_split_tokens, &lora).await?;
        let _ = t;
        let scale = a.tokens as f64 / a.layer_split_tokens.max(1) as f64;
        modes.push(row("layer-split", 0, &st, a.tokens, scale));
        proxy.shutdown().await;
        eprintln!(
            "\nRTT {rtt} ms (emulated by a delaying TCP proxy on loopback), {} tokens:",
            a.tokens
        );
        eprintln!(
            "{:<12} {:>3} {:>10} {:>12} {:>10} {:>10} {:>9}",
            "mode", "K", "rounds/tok", "down B/tok", "up B/tok", "dev ms/tok", "total s"
        );
        for m in &modes {
            eprintln!(
                "{:<12} {:>3} {:>10.3} {:>12.0} {:>10.0} {:>10.2} {:>9.2}{}",
                m["mode"].as_str().unwrap_or(""),
                m["k"],
                m["rounds_per_token"].as_f64().unwrap_or(0.0),
                m["bytes_down_per_token"].as_f64().unwrap_or(0.0),
                m["bytes_up_per_token"].as_f64().unwrap_or(0.0),
                m["device_ms_per_token"].as_f64().unwrap_or(0.0),
                m["total_s"].as_f64().unwrap_or(0.0),
                if m.get("variant").is_some() {
                    "  (always side)"
                } else if m["total_s_extrapolated"] == json!(true) {
                    "  (extrapolated)"
                } else {
                    ""
                }
            );
        }
        outputs.push(json!({"rtt_ms": rtt, "tokens": a.tokens, "rtt_emulation": "delaying TCP proxy on loopback", "modes": modes}));
    }
    srv.shutdown().await;
    for o in outputs {
        if a.json {
            println!("{o}");
        } else {
            println!("{}", serde_json::to_string_pretty(&o)?);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// Concurrent sessions to test (comma separated).
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Tokens per session.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Drafts per round.
    #[arg(long, default_value_t = 4)]
    k: u32,
    /// Print JSON as the last line.
    #[arg(long)]
    json: bool,
    /// GGUF base model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Base kernels of the candle engine: f32 (f32 activations, default) or int8 (llama.cpp
    /// numerics).
    #[arg(long, default_value = "f32")]
    kernel: String,
    /// Base engines to measure, one server each (comma separated; default: every engine of
    /// this build, candle and, with `--features llamacpp`, llamacpp).
    #[arg(long, value_delimiter = ',')]
    engine: Vec<String>,
    /// Also time llama-cpp-python's single-stream decode of the same GGUF (if installed).
    #[arg(long)]
    llamacpp_python: bool,
    /// Layers of the llama.cpp engine on the GPU (GPU builds; -1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    gpu_layers: i32,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The `p` quantile of `v` (sorts it; 0 when empty).
pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub async fn serve(a: ServeBenchArgs) -> Result<()> {
    let kernel = match a.kernel.as_str() {
        "int8" => spa_model::BaseKernel::Int8Activations,
        _ => spa_model::BaseKernel::F32Activations,
    };
    let (base, proj) =
        crate::serve::load_server_parts_with(a.model.as_deref(), 64, "random:1", kernel)?;
    let engines: Vec<String> = if a.engine.is_empty() {
        spa_server::ENGINES.iter().map(|s| s.to_string()).collect()
    } else {
        a.engine.clone()
    };
    let mut results = Vec::new();
    for engine in &engines {
        let (srv, b) = start_local(base.clone(), proj.clone(), 1024, engine, a.gpu_layers).await?;
        results.extend(serve_sessions(&a, &b, engine).await?);
        srv.shutdown().await;
    }
    let mut j = json!({"k": a.k, "kernel": a.kernel, "tokens_per_session": a.tokens, "results": results, "note": "loopback, no RTT; step latency = mean per round per session; RSS of the whole process (server and clients)"});
    if a.llamacpp_python {
        let path = base.path().to_path_buf();
        if let Some(x) = crate::bench::llamacpp_decode_tok_s(&path, 64) {
            j["llamacpp_python_decode_tok_s"] = json!(x);
            for r in j["results"].as_array_mut().into_iter().flatten() {
                let tps = r["tokens_per_s"].as_f64().unwrap_or(0.0);
                r["vs_llamacpp_python_single"] = json!(tps / x);
            }
        }
    }
    if a.json {
        println!("{j}");
    } else {
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(())
}

/// Runs each session count of `a` against the server of `b`.
async fn serve_sessions(
    a: &ServeBenchArgs,
    b: &Bench,
    engine: &str,
) -> Result<Vec<serde_json::Value>> {
    let dev = b.device(GateMode::AlwaysBase, 0.0)?;
    let mut results = Vec::new();
    let mut single = None;
    for &n in &a.sessions {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let client = b.client(&b.url_root)?;
            let dev = dev.clone();
            let (tokens, k) = (a.tokens, a.k);
            tasks.push(tokio::spawn(async move {
                let mut s = SpaSession::new(client, dev.clone(), Mode::Spa);
                let prompt = dev.tokenizer.encode(&format!("Session {i}: {PROMPT}"))?;
                let params = RuntimeParams {
                    max_tokens: tokens,
                    draft: k,
                    ..Default::default()
                };
                let (_, st) = s.generate(&prompt, &params, None, |_| true).await?;
                s.reset().await;
                anyhow::Ok(st)
            }));
        }
        let mut lat = Vec::new();
        let mut toks = 0usize;
        for t in tasks {
            let st = t.await??;
            toks += st.tokens;
            let per_round = (st.t_total.as_secs_f64() * 1e3) / st.rounds.max(1) as f64;
            lat.push(per_round);
        }
        let wall = t0.elapsed().as_secs_f64();
        let tps = toks as f64 / wall;
        single.get_or_insert(tps);
        let r = json!({
            "engine": engine,
            "sessions": n,
            "tokens_per_s": tps,
            "speedup_vs_first": tps / single.unwrap_or(tps),
            "p50_step_ms": pct(&mut lat.clone(), 0.5),
            "p99_step_ms": pct(&mut lat, 0.99),
            "server_rss_mb": rss_bytes() as f64 / 1048576.0,
        });
        eprintln!("{r}");
        results.push(r);
    }
    Ok(results)
}
