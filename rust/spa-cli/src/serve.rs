//! `spa serve`, `spa demo` and `spa chat`.

use crate::assets;
use anyhow::{bail, Context, Result};
use spa_model::{
    BaseKernel, BaseModel, DeviceAssets, DownProjection, GateMode, PersonalVocab, QuantMode,
    SideConfig, SidePlugin,
};
use spa_runtime::{Client, ClientConfig, DeviceModel, Mode, RuntimeParams, SpaSession};
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
    /// Most sessions per key.
    #[arg(long, default_value_t = 64)]
    pub max_sessions_per_key: usize,
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

pub async fn serve(args: ServeArgs) -> Result<()> {
    let keys = keys_from(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key, &args.dev_cert, args.insecure_dev) {
        (Some(c), Some(k), _, _) => Some(tls::read_pem_files(c, k).map_err(anyhow::Error::msg)?),
        (_, _, Some(dir), _) => {
            let p = tls::write_dev_cert(dir).map_err(anyhow::Error::msg)?;
            eprintln!("dev certificate written to {}/dev-cert.pem (trust it on the client)", dir.display());
            Some(p)
        }
        (_, _, _, true) => None,
        _ => bail!("TLS is required: pass --tls-cert/--tls-key, or --dev-cert DIR; --insecure-dev for plain HTTP"),
    };
    let (base, proj) = load_server_parts(args.model.as_deref(), args.width, &args.projection)?;
    let cfg = ServerConfig {
        keys,
        kv_budget_bytes: args.kv_budget_mb << 20,
        max_sessions_per_key: args.max_sessions_per_key,
        ..ServerConfig::default()
    };
    let state = Arc::new(AppState::new(base, proj, cfg));
    let srv = spa_server::start(state, args.addr, tls.as_ref())
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("spa serve: listening on {}", srv.url());
    tokio::signal::ctrl_c().await?;
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
    /// GGUF of the base (the device reads only the tokenizer and LM head rows from it).
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
    let assets = DeviceAssets::load(assets::model_path(model)?)?;
    let plugin = match side {
        Some(p) => SidePlugin::load(p)?,
        None => {
            let mut cfg = SideConfig::new(
                manifest.hidden as usize,
                manifest.layers as usize,
                manifest.side_width as usize,
            );
            cfg.taps = manifest.taps.iter().map(|&t| t as usize).collect();
            SidePlugin::init_for(
                &manifest.base_identity,
                manifest.layers as usize,
                cfg,
                &manifest.projection_fingerprint,
                1,
                0.0,
            )?
        }
    };
    let dev = DeviceModel::new(
        &assets,
        &plugin,
        quant,
        GateMode::Learned,
        PersonalVocab::default(),
    )?;
    dev.check_manifest(&manifest)?;
    Ok(dev)
}

async fn answer(
    session: &mut SpaSession,
    dev: &DeviceModel,
    text: &str,
    params: &RuntimeParams,
) -> Result<()> {
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
        "  [{} tokens, {} rounds ({:.2}/token), side usage {:.0}%, net {:.0} ms, on-device {:.0} ms, server {:.0} ms, {:.1} KiB down]",
        st.tokens,
        st.rounds,
        st.rounds_per_token(),
        100.0 * st.side_usage(),
        st.t_net.as_secs_f64() * 1e3,
        st.t_device.as_secs_f64() * 1e3,
        st.t_pretrained.as_secs_f64() * 1e3,
        st.bytes_down as f64 / 1024.0
    );
    Ok(())
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

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Messages to send (default: three sample questions).
    pub messages: Vec<String>,
    /// GGUF base model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Drafts per round.
    #[arg(long, default_value_t = 8)]
    pub k: u32,
    /// Max new tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Projection: pca (default) or random:SEED (faster start).
    #[arg(long, default_value = "pca")]
    pub projection: String,
}

pub async fn demo(a: DemoArgs) -> Result<()> {
    eprintln!(
        "spa demo: loading the base model and starting a local HTTPS server (dev certificate)..."
    );
    let (base, proj) = load_server_parts(a.model.as_deref(), 64, &a.projection)?;
    let key: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let cert = tls::dev_cert().map_err(anyhow::Error::msg)?;
    let state = Arc::new(AppState::new(
        base,
        proj,
        ServerConfig {
            keys: Keys::new(std::slice::from_ref(&key)),
            ..ServerConfig::default()
        },
    ));
    let srv = spa_server::start(state, "127.0.0.1:0".parse()?, Some(&cert))
        .await
        .map_err(anyhow::Error::msg)?;
    let mut cfg = ClientConfig::new(srv.url(), key);
    cfg.extra_root_pem = Some(cert.cert_pem.clone());
    let client = Client::new(cfg)?;
    let dev = Arc::new(device_for(&client, a.model.as_deref(), None, QuantMode::Q8).await?);
    eprintln!(
        "server {} up; device: side width {} over {} taps (q8), untrained side network\n",
        srv.url(),
        dev.side.config().width,
        dev.side.config().taps.len()
    );
    let messages = if a.messages.is_empty() {
        vec![
            "What is the capital of France?".to_string(),
            "Write one sentence about the sea.".to_string(),
            "Give me three tips for learning a new language.".to_string(),
        ]
    } else {
        a.messages
    };
    let params = RuntimeParams {
        max_tokens: a.max_tokens,
        draft: a.k,
        stop_tokens: dev.tokenizer.eos_ids().to_vec(),
        ..Default::default()
    };
    for m in messages {
        println!("user> {m}");
        print!("assistant> ");
        let mut session = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
        answer(&mut session, &dev, &m, &params).await?;
        session.reset().await;
        println!();
    }
    srv.shutdown().await;
    Ok(())
}
