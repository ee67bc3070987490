//! `spa serve` and `spa chat` (and the pieces `spa demo` shares with them).

use crate::assets;
use anyhow::{bail, Context, Result};
use spa_model::{
    BaseKernel, BaseModel, DeviceAssets, DownProjection, GateMode, PersonalVocab, QuantMode,
    SidePlugin,
};
use spa_runtime::{
    Client, ClientConfig, DeviceModel, GenerationStats, Mode, RuntimeParams, SpaSession,
};
use spa_server::{tls, AppState, Keys, ServerConfig};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub addr: SocketAddr,
    /// GGUF base model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// File with API keys, one per line (or set SPA_API_KEYS=key1,key2).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Generate a self-signed dev certificate into this directory (dev-cert.pem, dev-key.pem).
    #[arg(long)]
    pub dev_cert: Option<PathBuf>,
    /// Serve plain HTTP (development only; never in production).
    #[arg(long)]
    pub insecure_dev: bool,
    /// Side width the shared projection produces (multiple of 32).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Projection: "pca" (published PCA, cached in $SPA_HOME/projections), "random:SEED", or a file.
    #[arg(long, default_value = "pca")]
    pub projection: String,
    /// Global KV-cache budget in MiB (LRU eviction above it).
    #[arg(long, default_value_t = 2048)]
    pub kv_budget_mb: usize,
    /// Most live sessions per key. A key identifies an app, not a user: at the cap the key's
    /// least-recently-used idle session is reclaimed (its device re-prefills); 429 with
    /// Retry-After only when all of them are in a step. Size it for the app's concurrent chats.
    #[arg(long, default_value_t = 64)]
    pub max_sessions_per_key: usize,
    /// Seconds a session may stay unused before it expires (its device re-prefills on its next
    /// turn); 0 keeps sessions until deleted, reclaimed or evicted.
    #[arg(long, default_value_t = 300)]
    pub session_idle_s: u64,
    /// Largest K (drafts per round) a client may ask for.
    #[arg(long, default_value_t = 64)]
    pub max_draft: usize,
    /// Most positions (prompt tokens + K) in one round.
    #[arg(long, default_value_t = 4096)]
    pub max_positions_per_round: usize,
    /// Largest request frame in KiB (413 beyond).
    #[arg(long, default_value_t = 16384)]
    pub max_frame_kib: usize,
    /// Seconds a connection may take to send a request's headers (and its first request).
    #[arg(long, default_value_t = 10)]
    pub header_timeout_s: u64,
    /// Seconds a request may take to send its body (408 beyond).
    #[arg(long, default_value_t = 30)]
    pub body_timeout_s: u64,
    /// Device pack published at GET /v1/device-pack (the SDK downloads it instead of holding
    /// the base GGUF): its head quantization, q8 or q4, or "none". Built once from the GGUF and
    /// cached in $SPA_HOME/projections.
    #[arg(long, default_value = "q8")]
    pub device_pack: String,
    /// Base engine of the steps: `candle` (our kernels; batch-invariant, so a re-prefilled
    /// session continues with exactly the same tokens) or `llamacpp` (llama.cpp, faster, not
    /// batch-invariant; in builds with `--features llamacpp`; docs/serving.md).
    #[arg(long, default_value = spa_server::DEFAULT_ENGINE)]
    pub engine: String,
    /// Layers of the llama.cpp engine on the GPU (builds with `--features cuda`, `metal` or
    /// `vulkan`; -1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub gpu_layers: i32,
}

/// The TLS certificate to serve with: `--tls-cert/--tls-key`, or a dev certificate written to
/// `--dev-cert DIR`. Without either, the server refuses to start unless `--insecure-dev` asks
/// for plain HTTP (`Ok(None)`).
pub fn tls_choice(args: &ServeArgs) -> Result<Option<tls::CertPair>> {
    Ok(
        match (&args.tls_cert, &args.tls_key, &args.dev_cert, args.insecure_dev) {
            (Some(c), Some(k), _, _) => {
                Some(tls::read_pem_files(c, k).map_err(anyhow::Error::msg)?)
            }
            (_, _, Some(dir), _) => {
                let p = tls::write_dev_cert(dir).map_err(anyhow::Error::msg)?;
                eprintln!(
                    "dev certificate written to {}/dev-cert.pem (trust it on the client)",
                    dir.display()
                );
                Some(p)
            }
            (_, _, _, true) => {
                log::warn!("serving plain HTTP (--insecure-dev): never expose this port");
                None
            }
            _ => bail!(
                "TLS is required: pass --tls-cert/--tls-key, or --dev-cert DIR; --insecure-dev for plain HTTP"
            ),
        },
    )
}

/// The server settings the flags ask for.
pub fn server_config(args: &ServeArgs, keys: Keys) -> ServerConfig {
    ServerConfig {
        keys,
        kv_budget_bytes: args.kv_budget_mb << 20,
        max_sessions_per_key: args.max_sessions_per_key,
        session_idle_ttl: (args.session_idle_s > 0)
            .then(|| std::time::Duration::from_secs(args.session_idle_s)),
        limits: spa_protocol::Limits {
            max_frame_bytes: args.max_frame_kib << 10,
            max_positions_per_round: args.max_positions_per_round,
            max_draft: args.max_draft,
            ..spa_protocol::Limits::default()
        },
        header_timeout: std::time::Duration::from_secs(args.header_timeout_s),
        body_timeout: std::time::Duration::from_secs(args.body_timeout_s),
        ..ServerConfig::default()
    }
}

/// Loads the base and the projection the server publishes.
pub fn load_server_parts(
    model: Option<&Path>,
    width: usize,
    projection: &str,
) -> Result<(Arc<BaseModel>, Arc<DownProjection>)> {
    load_server_parts_with(model, width, projection, BaseKernel::default())
}

/// [`load_server_parts`] with a choice of base kernels.
pub fn load_server_parts_with(
    model: Option<&Path>,
    width: usize,
    projection: &str,
    kernel: BaseKernel,
) -> Result<(Arc<BaseModel>, Arc<DownProjection>)> {
    let path = assets::model_path(model)?;
    let base = BaseModel::load_with(&path, kernel)
        .with_context(|| format!("loading {}", path.display()))?;
    let taps: Vec<usize> = (0..base.config().n_layers).collect();
    let proj = if projection == "pca" {
        DownProjection::published(&base, width, &taps, &assets::spa_home().join("projections"))?
    } else if let Some(seed) = projection.strip_prefix("random:") {
        DownProjection::random(&base, width, &taps, seed.parse().context("random:SEED")?)?
    } else {
        DownProjection::load(Path::new(projection))?
    };
    Ok((Arc::new(base), Arc::new(proj)))
}

fn keys_from(args: &ServeArgs) -> Result<Keys> {
    let keys = match &args.keys_file {
        Some(f) => Keys::from_file(f).with_context(|| format!("reading {}", f.display()))?,
        None => {
            let env = std::env::var("SPA_API_KEYS").unwrap_or_default();
            Keys::new(&env.split(',').collect::<Vec<_>>())
        }
    };
    if keys.is_empty() {
        bail!("no API keys: pass --keys-file FILE or set SPA_API_KEYS=key1,key2");
    }
    Ok(keys)
}

/// The device pack of the base at `model` for the projection `fingerprint`: read from
/// `$SPA_HOME/projections` when it was built before (for the same base, projection and
/// quantization), else built from the GGUF and written there atomically.
pub fn device_pack(
    model: Option<&Path>,
    identity: &str,
    fingerprint: &str,
    quant: QuantMode,
) -> Result<Vec<u8>> {
    let q = match quant {
        QuantMode::Q4 => "q4",
        QuantMode::Q8 => "q8",
        QuantMode::F32 => bail!("a device pack's head is q8 or q4"),
    };
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    let dir = assets::spa_home().join("projections");
    let path = dir.join(format!(
        // v2: the head at an aligned offset (mapped in place by the device).
        "device-pack-{}-{}-{q}-v2.spapack",
        &identity[..identity.len().min(16)],
        safe(fingerprint)
    ));
    if let Ok(bytes) = std::fs::read(&path) {
        // Checked like a download: a damaged cache is rebuilt, never served.
        match spa_model::DevicePack::load(&path) {
            Ok(p) if p.identity == identity && p.projection == fingerprint => return Ok(bytes),
            _ => log::warn!("device pack cache {} unusable; rebuilding", path.display()),
        }
    }
    let gguf = spa_model::GgufFile::read(assets::model_path(model)?)?;
    let bytes = spa_model::build_device_pack(&gguf, fingerprint, quant)?;
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".device-pack-{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(bytes)
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let keys = keys_from(&args)?;
    let tls = tls_choice(&args)?;
    let (base, proj) = load_server_parts(args.model.as_deref(), args.width, &args.projection)?;
    let cfg = server_config(&args, keys);
    let pack = match args.device_pack.as_str() {
        "none" => None,
        q => Some(device_pack(
            args.model.as_deref(),
            base.identity(),
            proj.fingerprint(),
            QuantMode::parse(q)?,
        )?),
    };
    let engine =
        spa_server::engine_with(&args.engine, &base, cfg.kv_budget_bytes, args.gpu_layers)?;
    eprintln!("spa serve: base engine {}", engine.name());
    let mut state = AppState::with_engine(base, proj, engine, cfg);
    if let Some(pack) = pack {
        eprintln!("spa serve: device pack {} bytes", pack.len());
        state = state.with_device_pack(pack);
    }
    let state = Arc::new(state);
    let srv = spa_server::start(state, args.addr, tls.as_ref())
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("spa serve: listening on {}", srv.url());
    // Ctrl-C, or SIGTERM (what Kubernetes sends before stopping a pod).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    eprintln!("shutting down");
    srv.shutdown().await;
    Ok(())
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Server URL.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    pub url: String,
    /// API key (or SPA_API_KEY).
    #[arg(long, env = "SPA_API_KEY")]
    pub key: String,
    /// Extra trusted CA / self-signed server certificate (PEM), e.g. the dev certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// GGUF of the base (the device reads only the tokenizer and LM head rows from it);
    /// default: the server's device pack, downloaded once into $SPA_HOME/device-packs.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Personal side weights (safetensors); default: an untrained side network.
    #[arg(long)]
    pub side: Option<PathBuf>,
    /// Drafts per round.
    #[arg(long, default_value_t = 8)]
    pub k: u32,
    /// Max new tokens per answer.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Device quantization: f32, q8, q4.
    #[arg(long, default_value = "q8")]
    pub quant: String,
    /// Sampling temperature (0: greedy). Drafts are sampled on the server and accepted on the
    /// device with the speculative-sampling rule.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus (top-p) when sampling.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Builds the device model for a server: its manifest decides the side shape.
pub async fn device_for(
    client: &Client,
    model: Option<&Path>,
    side: Option<&Path>,
    quant: QuantMode,
) -> Result<DeviceModel> {
    let manifest = client.manifest().await?;
    let plugin = match side {
        Some(p) => SidePlugin::load(p)?,
        None => untrained_plugin(&manifest)?,
    };
    if model.is_none() && !manifest.device_pack_sha256.is_empty() {
        // What the phone does: no base file, the server's device pack (downloaded once).
        let dir = assets::spa_home().join("device-packs");
        let pb = spa_train::features::progress(manifest.device_pack_bytes, "device pack", false);
        let dev = pack_device(client, &manifest, &plugin, quant, &dir, &mut |done, _| {
            pb.set_position(done)
        })
        .await?;
        pb.finish_and_clear();
        return Ok(dev);
    }
    device_with(&manifest, model, &plugin, quant, GateMode::Learned)
}

/// The device model from the server's device pack (fetched into `dir`, or the verified copy
/// already there), checked against the server's manifest `manifest`.
pub async fn pack_device(
    client: &Client,
    manifest: &spa_protocol::Manifest,
    plugin: &SidePlugin,
    quant: QuantMode,
    dir: &Path,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<DeviceModel> {
    let path = client.device_pack(manifest, dir, progress).await?;
    Ok(DeviceModel::from_pack_file(
        &path,
        manifest,
        plugin,
        quant,
        GateMode::Learned,
        PersonalVocab::default(),
    )?)
}

/// An untrained side network shaped by a server's manifest.
pub fn untrained_plugin(manifest: &spa_protocol::Manifest) -> Result<SidePlugin> {
    Ok(spa_runtime::untrained_plugin(manifest)?)
}

/// The device model for `plugin` with gate rule `gate`, checked against the server's manifest.
pub fn device_with(
    manifest: &spa_protocol::Manifest,
    model: Option<&Path>,
    plugin: &SidePlugin,
    quant: QuantMode,
    gate: GateMode,
) -> Result<DeviceModel> {
    let assets = DeviceAssets::load(assets::model_path(model)?)?;
    let dev = DeviceModel::new(&assets, plugin, quant, gate, PersonalVocab::default())?;
    dev.check_manifest(manifest)?;
    Ok(dev)
}

pub(crate) async fn answer(
    session: &mut SpaSession,
    dev: &DeviceModel,
    text: &str,
    params: &RuntimeParams,
) -> Result<GenerationStats> {
    let prompt = dev.tokenizer.encode(&dev.tokenizer.chat_prompt(text))?;
    let mut stream = dev.tokenizer.stream();
    let mut out = std::io::stdout().lock();
    let (_, st) = session
        .generate(&prompt, params, None, |t| {
            if let Ok(s) = stream.push(t) {
                let _ = write!(out, "{s}");
                let _ = out.flush();
            }
            true
        })
        .await?;
    writeln!(out)?;
    eprintln!(
        "  [{} tokens, {} rounds ({:.2}/token), side usage {:.0}%, {} overrides, net {:.0} ms, on-device {:.0} ms, server {:.0} ms, {:.1} KiB down]",
        st.tokens,
        st.rounds,
        st.rounds_per_token(),
        100.0 * st.side_usage(),
        st.overrides,
        st.t_net.as_secs_f64() * 1e3,
        st.t_device.as_secs_f64() * 1e3,
        st.t_pretrained.as_secs_f64() * 1e3,
        st.bytes_down as f64 / 1024.0
    );
    Ok(st)
}

pub async fn chat(a: ChatArgs) -> Result<()> {
    let mut cfg = ClientConfig::new(&a.url, &a.key);
    if let Some(ca) = &a.ca_cert {
        cfg.extra_root_pem =
            Some(std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    cfg.allow_http = a.url.starts_with("http://");
    let client = Client::new(cfg)?;
    let dev = Arc::new(
        device_for(
            &client,
            a.model.as_deref(),
            a.side.as_deref(),
            QuantMode::parse(&a.quant)?,
        )
        .await?,
    );
    let params = RuntimeParams {
        max_tokens: a.max_tokens,
        draft: a.k,
        stop_tokens: dev.tokenizer.eos_ids().to_vec(),
        ..Default::default()
    };
    eprintln!(
        "connected to {} — type a message, empty line to quit",
        a.url
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        // Each message is answered in a fresh session (single-turn chat template).
        let mut session = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
        answer(&mut session, &dev, line.trim(), &params).await?;
        session.reset().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("spa").chain(extra.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn tls_is_required_unless_insecure_dev() {
        let e = tls_choice(&args(&[])).unwrap_err().to_string();
        assert!(e.contains("TLS is required"), "{e}");
        assert!(tls_choice(&args(&["--insecure-dev"])).unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("spa-serve-test-{}", std::process::id()));
        let pair = tls_choice(&args(&["--dev-cert", dir.to_str().unwrap()])).unwrap();
        assert!(pair.is_some() && dir.join("dev-cert.pem").exists());
        // A certificate wins over --insecure-dev.
        let both = args(&["--dev-cert", dir.to_str().unwrap(), "--insecure-dev"]);
        assert!(tls_choice(&both).unwrap().is_some());
        // --tls-cert without --tls-key is refused by the parser.
        assert!(Cli::try_parse_from(["spa", "--tls-cert", "c.pem"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn limit_and_timeout_flags_reach_the_server() {
        let a = args(&[
            "--max-draft",
            "8",
            "--max-positions-per-round",
            "256",
            "--max-frame-kib",
            "512",
            "--max-sessions-per-key",
            "3",
            "--kv-budget-mb",
            "100",
            "--header-timeout-s",
            "4",
            "--body-timeout-s",
            "6",
            "--session-idle-s",
            "90",
        ]);
        let c = server_config(&a, Keys::new(&["k"]));
        assert_eq!(c.session_idle_ttl, Some(std::time::Duration::from_secs(90)));
        let forever = server_config(&args(&["--session-idle-s", "0"]), Keys::new(&["k"]));
        assert_eq!(forever.session_idle_ttl, None);
        assert_eq!(
            server_config(&args(&[]), Keys::new(&["k"])).session_idle_ttl,
            Some(std::time::Duration::from_secs(300)),
            "default: five minutes"
        );
        assert_eq!(c.limits.max_draft, 8);
        assert_eq!(c.limits.max_positions_per_round, 256);
        assert_eq!(c.limits.max_frame_bytes, 512 << 10);
        assert_eq!(c.max_sessions_per_key, 3);
        assert_eq!(c.kv_budget_bytes, 100 << 20);
        assert_eq!(c.header_timeout, std::time::Duration::from_secs(4));
        assert_eq!(c.body_timeout, std::time::Duration::from_secs(6));
    }

    /// deploy/k8s/spa-serve.yaml starts `spa` with flags this parser must accept, and gives the
    /// container more memory than the KV bound it configures.
    #[test]
    fn kubernetes_manifest_matches_the_flags() {
        let yaml = include_str!("../../../deploy/k8s/spa-serve.yaml");
        let line = yaml
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("args: "))
            .expect("args line");
        let argv: Vec<String> = serde_json::from_str(line).expect("args is a JSON-style list");
        assert_eq!(argv[0], "serve");
        let a =
            Cli::try_parse_from(std::iter::once("spa").chain(argv[1..].iter().map(String::as_str)))
                .expect("flags of the manifest");
        assert!(
            a.serve.tls_cert.is_some() && !a.serve.insecure_dev,
            "the pod must serve TLS"
        );
        let limit_gi: usize = yaml
            .lines()
            .find_map(|l| l.trim().strip_prefix("limits: {cpu: \"2\", memory: "))
            .and_then(|r| r.strip_suffix("Gi}"))
            .expect("memory limit")
            .parse()
            .unwrap();
        // Model and runtime take ~0.7 GiB next to the KV bound (docs/reliability.md).
        assert!(
            (limit_gi << 10) >= a.serve.kv_budget_mb + 700,
            "memory limit {limit_gi} GiB below KV bound {} MiB + 700 MiB",
            a.serve.kv_budget_mb
        );
    }
}
