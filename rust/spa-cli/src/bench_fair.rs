//! `spa bench fairness`: does one key's flood of steps slow another key down? Key B runs
//! rounds one after another (the latency an app user feels); key A floods with `--flood`
//! concurrent sessions. B's step latency is measured alone, then under the flood with the
//! server's per-key batching lanes (the default) and with one shared queue (the old engine),
//! all in one run on loopback TLS (no emulated RTT: latencies are server compute + queueing).

use crate::serve::load_server_parts;
use anyhow::Result;
use serde_json::json;
use spa_protocol::StepRequest;
use spa_runtime::{Client, ClientConfig};
use spa_server::{tls, AppState, Keys, ServerConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct FairnessArgs {
    /// Concurrent flooding sessions of key A.
    #[arg(long, default_value_t = 32)]
    flood: usize,
    /// Rounds key B measures in each phase.
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Drafts per round (both keys).
    #[arg(long, default_value_t = 4)]
    k: u32,
    /// Print JSON as the last line.
    #[arg(long)]
    json: bool,
    /// GGUF base model.
    #[arg(long)]
    model: Option<PathBuf>,
}

const KEY_A: &str = "flooding-app";
const KEY_B: &str = "other-app";
/// A session restarts after this many positions (keeps the context, and step cost, steady).
const SESSION_POSITIONS: usize = 160;

/// One session stepping round after round, accepting every draft.
struct Stepper {
    client: Client,
    id: Option<String>,
    history: Vec<u32>,
    synced: usize,
    prompt: Vec<u32>,
    k: u32,
}

impl Stepper {
    fn new(client: Client, prompt: Vec<u32>, k: u32) -> Self {
        Self {
            client,
            id: None,
            history: Vec::new(),
            synced: 0,
            prompt,
            k,
        }
    }

    /// One round; returns its wall time in ms.
    async fn round(&mut self) -> Result<f64> {
        if self.id.is_none() || self.history.len() > SESSION_POSITIONS {
            if let Some(id) = self.id.take() {
                let _ = self.client.delete_session(&id).await;
            }
            self.id = Some(self.client.create_session(spa_protocol::Mode::Spa).await?);
            self.history = self.prompt.clone();
            self.synced = 0;
        }
        let id = self.id.clone().unwrap_or_default();
        let req = StepRequest {
            position: self.synced as u64,
            tokens: self.history[self.synced..].to_vec(),
            draft: self.k,
            ..Default::default()
        };
        let t0 = Instant::now();
        let resp = self.client.step(&id, &req).await?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.history.extend(
            resp.states
                .iter()
                .filter(|s| s.is_draft)
                .map(|s| s.draft_token),
        );
        self.synced = self.history.len() - 1;
        Ok(ms)
    }
}

/// The `p` quantile of latencies `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    crate::bench_net::pct(&mut v.to_vec(), p)
}

/// Key B's round latencies (ms) with `flood` sessions of key A stepping meanwhile, and key A's
/// rounds per second.
async fn phase(
    state: Arc<AppState>,
    cert: &tls::CertPair,
    flood: usize,
    a: &FairnessArgs,
    prompt: &[u32],
) -> Result<(Vec<f64>, f64)> {
    let srv = spa_server::start(state, "127.0.0.1:0".parse()?, Some(cert))
        .await
        .map_err(anyhow::Error::msg)?;
    let client = |key: &str| -> Result<Client> {
        let mut c = ClientConfig::new(srv.url(), key);
        c.extra_root_pem = Some(cert.cert_pem.clone());
        Ok(Client::new(c)?)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let a_rounds = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for _ in 0..flood {
        let mut s = Stepper::new(client(KEY_A)?, prompt.to_vec(), a.k);
        let (stop, n) = (stop.clone(), a_rounds.clone());
        flooders.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                s.round().await?;
                n.fetch_add(1, Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    // Let the flood fill the engine before measuring.
    if flood > 0 {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let (t0, n0) = (Instant::now(), a_rounds.load(Relaxed));
    let mut b = Stepper::new(client(KEY_B)?, prompt.to_vec(), a.k);
    b.round().await?; // prefill, not measured
    let mut lat = Vec::with_capacity(a.rounds);
    for _ in 0..a.rounds {
        lat.push(b.round().await?);
    }
    let a_rps = (a_rounds.load(Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for f in flooders {
        f.await??;
    }
    srv.shutdown().await;
    Ok((lat, a_rps))
}

pub async fn fairness(a: FairnessArgs) -> Result<()> {
    let (base, proj) = load_server_parts(a.model.as_deref(), 64, "random:1")?;
    let cert = tls::dev_cert().map_err(anyhow::Error::msg)?;
    let prompt = base
        .tokenizer()
        .encode("The committee met on Tuesday to discuss the harbour's new budget, and")?;
    let state = |per_key: bool| {
        Arc::new(AppState::new(
            base.clone(),
            proj.clone(),
            ServerConfig {
                keys: Keys::new(&[KEY_A, KEY_B]),
                max_sessions_per_key: a.flood + 8,
                batch_lane_per_key: per_key,
                ..ServerConfig::default()
            },
        ))
    };
    eprintln!("key B alone ...");
    let (alone, _) = phase(state(true), &cert, 0, &a, &prompt).await?;
    let mut rows = Vec::new();
    for (name, per_key) in [("per_key_lanes", true), ("shared_queue", false)] {
        eprintln!(
            "key B while key A floods with {} sessions ({name}) ...",
            a.flood
        );
        let (lat, a_rps) = phase(state(per_key), &cert, a.flood, &a, &prompt).await?;
        let r = json!({
            "engine": name,
            "b_p50_ms": pct(&lat, 0.5),
            "b_p99_ms": pct(&lat, 0.99),
            "b_p99_vs_alone": pct(&lat, 0.99) / pct(&alone, 0.99).max(1e-9),
            "a_rounds_per_s": a_rps,
        });
        eprintln!("{r}");
        rows.push(r);
    }
    let j = json!({
        "k": a.k,
        "flood_sessions": a.flood,
        "b_rounds": a.rounds,
        "b_alone_p50_ms": pct(&alone, 0.5),
        "b_alone_p99_ms": pct(&alone, 0.99),
        "under_flood": rows,
        "note": "loopback TLS, no emulated RTT; one round = prompt/correction + K drafts",
    });
    if a.json {
        println!("{j}");
    } else {
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(())
}
