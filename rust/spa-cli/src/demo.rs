//! `spa demo`: the whole product in one process. A local HTTPS server runs the frozen base; the
//! device runtime runs a side network that was really trained, on a task where the base alone
//! is weak: one-sentence summaries of BBC articles (XSum). Each article is answered twice, by
//! the base alone (the gate forced to the base path) and by SPA (the trained gate decides per
//! position), so a new user sees what the plugin changes and at what cost in rounds.
//!
//! The plugin is trained on the first run from this machine's own feature cache (a few
//! minutes on two cores) and cached under `$SPA_HOME/work/demo/`; `--plugin FILE` runs any
//! plugin instead (e.g. one from `spa train`).

use crate::assets;
use crate::serve::{answer, device_with, load_server_parts};
use crate::train_cmd::task_specs;
use anyhow::{bail, Context, Result};
use spa_model::{BaseModel, DownProjection, GateMode, QuantMode, SidePlugin};
use spa_runtime::{Client, ClientConfig, Mode, RuntimeParams, SpaSession};
use spa_server::{tls, AppState, Keys, ServerConfig};
use spa_train::data::{self, Split, Task};
use spa_train::features;
use spa_train::sidegrad::SideGraph;
use spa_train::train::{self, Method, TrainConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// The demo plugin's recipe. Any change makes a new cache file name, so an old plugin is never
/// reused for a new recipe.
#[derive(Debug, Clone, Copy)]
struct Recipe {
    /// Articles are cut to this many words (short prompts: quick training and answers).
    words: usize,
    /// Training examples (XSum train split, file order).
    train: usize,
    /// Validation examples (XSum validation split): early stopping and the reported loss.
    val: usize,
    /// Step budget (batch 8).
    steps: usize,
    /// Seed of the initial weights and the batch order.
    seed: u64,
}

const RECIPE: Recipe = Recipe {
    words: 120,
    train: 96,
    val: 8,
    steps: 60,
    seed: 0,
};

/// Side width of the demo (the server's projection width).
const WIDTH: usize = 64;

/// XSum test-split articles answered when no message is given.
const DEFAULT_ARTICLES: usize = 2;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Messages to send (default: two held-out XSum articles to summarize).
    pub messages: Vec<String>,
    /// Side plugin to run (safetensors from `spa train`); default: the demo's XSum plugin,
    /// trained on first use and cached.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Train the demo plugin again even when a cached one exists.
    #[arg(long)]
    pub retrain: bool,
    /// GGUF base model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Drafts per round.
    #[arg(long, default_value_t = 8)]
    pub k: u32,
    /// Max new tokens per answer.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Projection: pca (default, the published one) or random:SEED.
    #[arg(long, default_value = "pca")]
    pub projection: String,
}

fn recipe_tag(r: &Recipe, proj: &DownProjection) -> String {
    let fp: String = proj.fingerprint().chars().take(12).collect();
    format!(
        "xsum-w{WIDTH}-words{}-n{}-v{}-s{}-seed{}-{fp}",
        r.words, r.train, r.val, r.steps, r.seed
    )
}

/// The demo plugin: loaded from the cache when it was made for this base and projection,
/// else trained (SPA, XSum) and cached.
fn demo_plugin(base: &BaseModel, proj: &DownProjection, retrain: bool) -> Result<SidePlugin> {
    let home = assets::spa_home();
    let dir = home.join("work/demo");
    let tag = recipe_tag(&RECIPE, proj);
    let path = dir.join(format!("{tag}.safetensors"));
    if !retrain && path.exists() {
        match SidePlugin::load(&path) {
            Ok(p) if p.meta.base == base.identity() && p.meta.projection == proj.fingerprint() => {
                eprintln!("demo plugin: {} (cached)", path.display());
                return Ok(p);
            }
            Ok(_) => log::info!("demo plugin at {} is for another base", path.display()),
            Err(e) => log::warn!(
                "demo plugin at {} unreadable ({e}); retraining",
                path.display()
            ),
        }
    }
    let r = RECIPE;
    eprintln!(
        "demo plugin: training SPA on {} XSum articles ({} steps); cached for later runs",
        r.train, r.steps
    );
    let t0 = Instant::now();
    let all = data::load_task(&home, Task::Xsum, r.words)?;
    let tok = base.tokenizer();
    let tr = task_specs(tok, &data::take_split(&all, Split::Train, r.train))?;
    let va = task_specs(tok, &data::take_split(&all, Split::Val, r.val))?;
    let cache = home.join("work/cache");
    let p_tr = cache.join(format!("demo-train-{tag}.safetensors"));
    let p_va = cache.join(format!("demo-val-{tag}.safetensors"));
    let ftr = features::load_or_compute(base, &[proj], 32, &tr, &[&p_tr], "features", false)?;
    let fva = features::load_or_compute(base, &[proj], 32, &va, &[&p_va], "val features", false)?;
    let t_feat = t0.elapsed().as_secs_f64();
    let mut plugin = SidePlugin::init(base, proj, r.seed, 0.0)?;
    let graph = SideGraph::new(
        &plugin.weights,
        Method::Spa.input(),
        base.head_weight_f32()?,
        r.seed,
    )?;
    let cfg = TrainConfig {
        method: Method::Spa,
        max_steps: r.steps,
        eval_every: 10,
        seed: r.seed,
        ..Default::default()
    };
    let pb = features::progress(r.steps as u64, "training", false);
    let rep = train::train(&graph, &ftr[0].seqs, &fva[0].seqs, &cfg, None, &mut |p| {
        pb.set_position(p.step as u64);
        true
    })?;
    pb.finish_and_clear();
    plugin.weights = graph.to_weights()?.0;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    plugin.save(&path)?;
    eprintln!(
        "demo plugin: validation loss {:.3} -> {:.3} in {} steps; side usage {:.0}%, overrides {:.0}%; \
         {:.0} s ({:.0} s features, {:.0} s training); saved {}",
        rep.initial.loss,
        rep.best.loss,
        rep.steps,
        100.0 * rep.best.side_usage,
        100.0 * rep.best.override_rate,
        t0.elapsed().as_secs_f64(),
        t_feat,
        rep.seconds,
        path.display()
    );
    Ok(plugin)
}

/// Shortens a long prompt for display (first and last words).
fn shown(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() <= 40 {
        return text.to_string();
    }
    format!(
        "{} [... {} words ...] {}",
        words[..24].join(" "),
        words.len() - 32,
        words[words.len() - 8..].join(" ")
    )
}

pub async fn demo(a: DemoArgs) -> Result<()> {
    eprintln!(
        "spa demo: loading the base model and starting a local HTTPS server (dev certificate)..."
    );
    let (base, proj) = load_server_parts(a.model.as_deref(), WIDTH, &a.projection)?;
    let plugin = match &a.plugin {
        Some(p) => {
            SidePlugin::load(p).with_context(|| format!("loading plugin {}", p.display()))?
        }
        None => demo_plugin(&base, &proj, a.retrain)?,
    };
    let (messages, summaries) = if a.messages.is_empty() {
        let all = data::load_task(&assets::spa_home(), Task::Xsum, RECIPE.words)?;
        let test = data::take_split(&all, Split::Test, DEFAULT_ARTICLES);
        if test.is_empty() {
            bail!("no XSum test articles (fetch them with `scripts/fetch-assets.sh data`)");
        }
        (
            test.iter().map(|e| e.prompt.clone()).collect::<Vec<_>>(),
            test.iter().map(|e| Some(e.reference.clone())).collect(),
        )
    } else {
        (a.messages.clone(), vec![None; a.messages.len()])
    };
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
    let manifest = client.manifest().await?;
    let model = a.model.as_deref();
    let spa = Arc::new(device_with(
        &manifest,
        model,
        &plugin,
        QuantMode::Q8,
        GateMode::Learned,
    )?);
    let base_only = Arc::new(device_with(
        &manifest,
        model,
        &plugin,
        QuantMode::Q8,
        GateMode::AlwaysBase,
    )?);
    eprintln!(
        "server {} up; device: side width {} over {} taps (q8); each prompt answered by the base \
         alone, then by SPA\n",
        srv.url(),
        spa.side.config().width,
        spa.side.config().taps.len()
    );
    let params = RuntimeParams {
        max_tokens: a.max_tokens,
        draft: a.k,
        stop_tokens: spa.tokenizer.eos_ids().to_vec(),
        ..Default::default()
    };
    for (m, reference) in messages.iter().zip(summaries) {
        println!("user> {}", shown(m));
        if let Some(r) = reference {
            println!("(reference summary: {r})");
        }
        for (label, dev) in [("base", &base_only), ("spa ", &spa)] {
            print!("{label}> ");
            let mut session = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
            answer(&mut session, dev, m, &params).await?;
            session.reset().await;
        }
        println!();
    }
    srv.shutdown().await;
    Ok(())
}
