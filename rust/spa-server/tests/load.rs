//! Load: N concurrent clients (each its own key) on loopback TLS for a bounded time against a
//! server with a small KV bound. Each client creates a session, prefills a prompt, then accepts
//! every draft round after round; an evicted session (410) is re-created and re-prefilled.
//! Checked: no 5xx (a panicking handler answers 500), the accounted KV bytes never exceed the
//! bound, evictions happened, every client completed rounds (no starvation: the run goes on
//! after its duration until each client has one, for at most 10x the duration), bounded p99.
//!
//! `small_load` runs in CI (16 clients, 8 s). `load_figures` (ignored) prints the figures of
//! docs/reliability.md: `cargo test -p spa-server --release --test load -- --ignored --nocapture`
//! (`SPA_LOAD_CLIENTS=1,32,128`, `SPA_LOAD_SECS=20`, `SPA_LOAD_KV_MB=64` override).

mod common;

use common::{step_body, text};
use spa_protocol::{decode_frame, FrameKind, Limits, StepResponse};
use spa_server::{AppState, Keys, ServerConfig};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const K: u32 = 4;
/// A session is deleted and replaced after this many positions.
const SESSION_POSITIONS: usize = 96;

#[derive(Debug, Default)]
struct Report {
    clients: usize,
    secs: f64,
    steps: usize,
    tokens: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    statuses: BTreeMap<u16, usize>,
    min_steps_per_client: usize,
    max_kv_bytes: usize,
    kv_budget: usize,
    evictions: u64,
    reprefills: usize,
    rss_mb: f64,
    peak_rss_mb: f64,
}

fn proc_status(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn one_client(
    i: usize,
    url: String,
    key: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    lat: Arc<Mutex<Vec<f64>>>,
    statuses: Arc<Mutex<BTreeMap<u16, usize>>>,
) -> (usize, usize, usize) {
    let h = common::http();
    let prompts = [
        "The market opened early and the traders",
        "Once upon a time a small robot",
        "The recipe calls for two eggs and",
        "Rain fell on the quiet village while",
    ];
    let prompt = text(prompts[i % prompts.len()]);
    let (mut steps, mut tokens, mut reprefills) = (0, 0, 0);
    let mut session: Option<String> = None;
    let mut history: Vec<u32> = Vec::new();
    let mut synced = 0usize;
    let count = |s: u16| *statuses.lock().unwrap().entry(s).or_default() += 1;
    while !stop.load(Relaxed) {
        let id = match &session {
            Some(id) => id.clone(),
            None => {
                let (st, id) = common::create(&h, &url, &key).await;
                count(st);
                let Some(id) = id else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if history.is_empty() || history.len() >= SESSION_POSITIONS {
                    history = prompt.clone();
                }
                synced = 0;
                session = Some(id.clone());
                id
            }
        };
        let body = step_body(synced as u64, history[synced..].to_vec(), K);
        let t0 = Instant::now();
        let r = h
            .post(format!("{url}/v1/sessions/{id}/step"))
            .bearer_auth(&key)
            .body(body)
            .send()
            .await;
        let Ok(r) = r else {
            count(0);
            continue;
        };
        let st = r.status().as_u16();
        let b = r.bytes().await.unwrap_or_default();
        count(st);
        match st {
            200 => {
                lat.lock().unwrap().push(t0.elapsed().as_secs_f64() * 1e3);
                let resp: StepResponse =
                    decode_frame(&b, FrameKind::StepResponse, &Limits::default()).unwrap();
                // Accept every draft: the drafts join the history; the last one is sent next.
                let drafts: Vec<u32> = resp
                    .states
                    .iter()
                    .filter(|s| s.is_draft)
                    .map(|s| s.draft_token)
                    .collect();
                steps += 1;
                if steps == 1 {
                    done.fetch_add(1, Relaxed);
                }
                tokens += drafts.len();
                history.extend_from_slice(&drafts);
                synced = history.len() - 1;
                if history.len() + K as usize >= SESSION_POSITIONS {
                    let _ = h
                        .delete(format!("{url}/v1/sessions/{id}"))
                        .bearer_auth(&key)
                        .send()
                        .await;
                    session = None;
                    history.clear();
                }
            }
            410 | 404 => {
                // Evicted: re-create and re-prefill the whole history.
                reprefills += 1;
                session = None;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    (steps, tokens, reprefills)
}

async fn load(clients: usize, secs: f64, kv_budget: usize) -> Report {
    let keys: Vec<String> = (0..clients).map(|i| format!("load-key-{i:03}")).collect();
    let (srv, state) = common::start(
        ServerConfig {
            keys: Keys::new(&keys),
            kv_budget_bytes: kv_budget,
            ..ServerConfig::default()
        },
        true,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(BTreeMap::new()));
    let max_kv = Arc::new(Mutex::new(0usize));
    // Samples until every client has returned (in-flight steps included).
    let joined = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (state, stop, max_kv): (Arc<AppState>, _, _) =
            (state.clone(), joined.clone(), max_kv.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let b = state.sessions.lock().unwrap().total_bytes();
                {
                    let mut m = max_kv.lock().unwrap();
                    *m = (*m).max(b);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let t0 = Instant::now();
    let tasks: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            tokio::spawn(one_client(
                i,
                srv.url(),
                k.clone(),
                stop.clone(),
                done.clone(),
                lat.clone(),
                statuses.clone(),
            ))
        })
        .collect();
    // Runs `secs`, and on until every client has completed a round (bounded: a client still
    // waiting after 10 x `secs` is starved and fails the check).
    while t0.elapsed().as_secs_f64() < secs
        || (done.load(Relaxed) < clients && t0.elapsed().as_secs_f64() < 10.0 * secs)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Relaxed);
    let mut per_client = Vec::new();
    let mut reprefills = 0;
    let mut tokens = 0;
    for t in tasks {
        let (s, tk, r) = t.await.expect("client task panicked");
        per_client.push(s);
        reprefills += r;
        tokens += tk;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    joined.store(true, Relaxed);
    monitor.await.unwrap();
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let r = Report {
        clients,
        secs: elapsed,
        steps: l.len(),
        tokens,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: l.last().copied().unwrap_or(0.0),
        statuses: statuses.lock().unwrap().clone(),
        min_steps_per_client: per_client.iter().copied().min().unwrap_or(0),
        max_kv_bytes: *max_kv.lock().unwrap(),
        kv_budget,
        evictions: state.sessions.lock().unwrap().ended.evicted,
        reprefills,
        rss_mb: proc_status("VmRSS:"),
        peak_rss_mb: proc_status("VmHWM:"),
    };
    srv.shutdown().await;
    r
}

fn check(r: &Report) {
    eprintln!("{r:?}");
    assert!(
        r.statuses.keys().all(|s| [200, 204, 404, 410].contains(s)),
        "unexpected statuses (5xx = a failing or panicking handler): {:?}",
        r.statuses
    );
    assert!(
        r.max_kv_bytes <= r.kv_budget,
        "KV bytes {} above the bound {}",
        r.max_kv_bytes,
        r.kv_budget
    );
    assert!(r.min_steps_per_client >= 1, "a client completed no round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_load() {
    // Eight 16-position sessions' worth for 16 clients, each holding at least its prompt and
    // K drafts (~12 positions) after its first step: 23.6 MB on the candle engine (which
    // allocates 64 positions at once), 2.9 MB on llama.cpp (f16 per position).
    let r = load(16, 8.0, 8 * common::session_bytes(16)).await;
    check(&r);
    assert!(r.evictions > 0, "the KV bound was never reached");
    assert!(r.reprefills > 0);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "figures for docs/reliability.md (minutes)"]
async fn load_figures() {
    let clients: Vec<usize> = std::env::var("SPA_LOAD_CLIENTS")
        .unwrap_or_else(|_| "1,32,128".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let secs: f64 = std::env::var("SPA_LOAD_SECS").map_or(20.0, |s| s.parse().unwrap());
    let kv_mb: usize = std::env::var("SPA_LOAD_KV_MB").map_or(64, |s| s.parse().unwrap());
    println!("| clients | steps | tokens/s | p50 ms | p99 ms | max ms | min steps/client | max KV MiB (bound) | evictions | re-prefills | RSS MiB (peak) | statuses |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for n in clients {
        let r = load(n, secs, kv_mb << 20).await;
        check(&r);
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {:.1} ({}) | {} | {} | {:.0} ({:.0}) | {:?} |",
            r.clients,
            r.steps,
            r.tokens as f64 / r.secs,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.min_steps_per_client,
            r.max_kv_bytes as f64 / (1 << 20) as f64,
            kv_mb,
            r.evictions,
            r.reprefills,
            r.rss_mb,
            r.peak_rss_mb,
            r.statuses
        );
    }
}
