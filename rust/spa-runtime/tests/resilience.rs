//! Resilience over loopback TLS: authentication and ownership, lost/reset/truncated/stalled
//! responses (retried idempotently by position), eviction and server restarts (transparent
//! re-prefill). Every faulty run must produce exactly the tokens of a clean run. The network
//! faults and RTT come from the `netsim` proxy; its own behaviour (delay line, bandwidth,
//! faults, shutdown) is checked first against a plain TCP echo server.

mod common;

use spa_model::GateMode;
use spa_protocol::StepRequest;
use spa_runtime::netsim::{Fault, FaultPlan, NetConfig, Proxy};
use spa_runtime::{
    Client, ClientConfig, DeviceModel, GenerationStats, Mode, RuntimeError, RuntimeParams,
    SpaSession, WireSampling,
};
use spa_server::{AppState, ServerConfig};
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const K: u32 = 4;
const MAX_TOKENS: usize = 20;
const PROMPT_A: &str = "The old harbour was quiet that morning, and";
const PROMPT_B: &str = "My grandmother kept a small garden behind the house where";
/// Bound of any single network wait or generation in these tests.
const WAIT: Duration = Duration::from_secs(120);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

fn tokens(text: &str) -> Vec<u32> {
    common::world().base.tokenizer().encode(text).unwrap()
}

fn params() -> RuntimeParams {
    RuntimeParams {
        max_tokens: MAX_TOKENS,
        draft: K,
        ..Default::default()
    }
}

fn device(prompt: &[u32]) -> Arc<DeviceModel> {
    Arc::new(common::device(GateMode::Learned, prompt))
}

/// A client with explicit retry settings.
fn client(url: &str, key: &str, timeout: Duration, attempts: u32) -> Client {
    let mut c = ClientConfig::new(url, key);
    c.extra_root_pem = Some(common::world().cert.cert_pem.clone());
    c.timeout = timeout;
    c.max_attempts = attempts;
    c.backoff = Duration::from_millis(50);
    Client::new(c).unwrap()
}

struct Run {
    tokens: Vec<u32>,
    streamed: Vec<u32>,
    stats: GenerationStats,
}

/// Generates `prompt` on `session`, checking that the streamed tokens, the returned tokens and
/// the session history agree (no duplicates, nothing lost).
async fn run(session: &mut SpaSession, prompt: &[u32]) -> Run {
    run_with(session, prompt, &params()).await
}

async fn run_with(session: &mut SpaSession, prompt: &[u32], params: &RuntimeParams) -> Run {
    let before = session.history().to_vec();
    let mut streamed = Vec::new();
    let (tokens, stats) = bounded(
        "generation",
        session.generate(prompt, params, None, |t| {
            streamed.push(t);
            true
        }),
    )
    .await
    .expect("generation failed");
    assert_eq!(streamed, tokens, "streamed tokens differ from the result");
    assert_eq!(stats.tokens, tokens.len());
    let mut hist = before;
    hist.extend_from_slice(prompt);
    hist.extend_from_slice(&tokens);
    assert_eq!(
        session.history(),
        &hist[..],
        "history has duplicates or gaps"
    );
    Run {
        tokens,
        streamed,
        stats,
    }
}

/// The tokens and statistics of a clean run (own server, no proxy, no faults).
async fn clean_run(prompt: &[u32], dev: &Arc<DeviceModel>) -> Run {
    clean_run_with(prompt, dev, &params()).await
}

async fn clean_run_with(prompt: &[u32], dev: &Arc<DeviceModel>, params: &RuntimeParams) -> Run {
    let (srv, state) = common::start_server(common::server_config()).await;
    let mut s = SpaSession::new(
        common::client(&srv.url(), common::KEY),
        dev.clone(),
        Mode::Spa,
    );
    let r = run_with(&mut s, prompt, params).await;
    assert_eq!(r.tokens.len(), MAX_TOKENS);
    assert_eq!(state.metrics.rounds.load(Relaxed), r.stats.rounds as u64);
    assert_eq!(r.stats.reprefills, 0);
    bounded("server shutdown", srv.shutdown()).await;
    r
}

fn server_rounds(state: &AppState) -> u64 {
    state.metrics.rounds.load(Relaxed)
}

fn live_sessions(state: &AppState) -> usize {
    state.sessions.lock().unwrap().len()
}

// ---------------------------------------------------------------------------------------
// netsim itself, against a TCP echo server (no model).

async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Reads until EOF or error; returns the bytes and the error kind, if any.
async fn read_all(c: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match bounded("read", c.read(&mut buf)).await {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netsim_delay_line_does_not_serialize() {
    let (echo, task) = echo_server().await;
    let delay = Duration::from_millis(100);
    let proxy = Proxy::start(
        echo,
        NetConfig {
            delay,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = bounded("connect", TcpStream::connect(proxy.addr))
        .await
        .unwrap();
    c.set_nodelay(true).unwrap();
    let t0 = Instant::now();
    // 10 messages 20 ms apart; each echo takes one RTT (200 ms). A delay line answers the
    // last one about 200 ms after it was sent; sleeping before each read would take 2 s.
    let (mut r, mut w) = c.split();
    let writer = async {
        for i in 0..10u8 {
            w.write_all(&[i; 100]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let reader = async {
        let mut got = vec![0u8; 1000];
        let mut first = None;
        let mut n = 0;
        while n < got.len() {
            let k = r.read(&mut got[n..]).await.unwrap();
            assert!(k > 0, "early EOF");
            first.get_or_insert(t0.elapsed());
            n += k;
        }
        (first.unwrap(), t0.elapsed(), got)
    };
    let ((), (first, last, got)) = bounded("echo", async { tokio::join!(writer, reader) }).await;
    assert!(got
        .chunks(100)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    eprintln!("netsim delay line: first echo {first:?}, last echo {last:?}");
    assert!(first >= 2 * delay, "first echo after {first:?} < RTT");
    assert!(last >= 2 * delay + Duration::from_millis(180), "{last:?}");
    assert!(last < Duration::from_millis(1500), "serialized: {last:?}");
    assert_eq!(proxy.stats.bytes_up.load(Relaxed), 1000);
    assert_eq!(proxy.stats.bytes_down.load(Relaxed), 1000);
    bounded("proxy shutdown", proxy.shutdown()).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netsim_bandwidth_limit() {
    let (echo, task) = echo_server().await;
    let proxy = Proxy::start(
        echo,
        NetConfig {
            bandwidth: Some(200_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = bounded("connect", TcpStream::connect(proxy.addr))
        .await
        .unwrap();
    let data = vec![7u8; 100_000];
    let t0 = Instant::now();
    let (mut r, mut w) = c.split();
    let writer = async { w.write_all(&data).await.unwrap() };
    let reader = async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = bounded("echo", async { tokio::join!(writer, reader) }).await;
    let took = t0.elapsed();
    eprintln!("netsim bandwidth: 100 kB each way at 200 kB/s in {took:?}");
    assert_eq!(got, data);
    // 0.5 s up, pipelined with 0.5 s down: about 0.5 s plus one chunk.
    assert!(took >= Duration::from_millis(480), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    bounded("proxy shutdown", proxy.shutdown()).await;
    task.abort();
}

/// Sends 6000 bytes through a proxy whose first response (the echo, >= 4096 bytes) gets
/// `fault`; returns what came back, how the stream ended and when.
async fn echo_with_fault(echo: SocketAddr, fault: Fault) -> (Vec<u8>, Option<ErrorKind>, Duration) {
    let proxy = Proxy::start(
        echo,
        NetConfig {
            faults: FaultPlan::Schedule(vec![(1, fault)]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = bounded("connect", TcpStream::connect(proxy.addr))
        .await
        .unwrap();
    let t0 = Instant::now();
    c.write_all(&[1u8; 6000]).await.unwrap();
    c.shutdown().await.unwrap();
    let (got, end) = read_all(&mut c).await;
    let took = t0.elapsed();
    assert_eq!(proxy.stats.responses.load(Relaxed), 1);
    assert_eq!(proxy.stats.faults(), 1);
    bounded("proxy shutdown", proxy.shutdown()).await;
    (got, end, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netsim_faults() {
    let (echo, task) = echo_server().await;
    let (got, end, _) = echo_with_fault(echo, Fault::Drop).await;
    assert!(
        got.len() < 4096 && end.is_none(),
        "drop: {} {end:?}",
        got.len()
    );
    let (_, end, _) = echo_with_fault(echo, Fault::Reset).await;
    assert_eq!(end, Some(ErrorKind::ConnectionReset), "reset");
    let (got, end, _) = echo_with_fault(echo, Fault::Truncate).await;
    assert!(
        !got.is_empty() && got.len() < 6000 && end.is_none(),
        "truncate: {} {end:?}",
        got.len()
    );
    let stall = Duration::from_millis(300);
    let (got, end, took) = echo_with_fault(echo, Fault::Stall(stall)).await;
    assert_eq!((got.len(), end), (6000, None), "stall delivers everything");
    assert!(took >= stall, "stalled only {took:?}");
    task.abort();
}

/// Which fault each of 16 echoes got under a seeded random plan (0: none).
async fn random_fault_sequence(echo: SocketAddr, seed: u64) -> Vec<u8> {
    let proxy = Proxy::start(
        echo,
        NetConfig {
            faults: FaultPlan::Random {
                seed,
                probability: 0.5,
                faults: vec![Fault::Drop, Fault::Truncate],
                max_faults: Some(6),
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut seq = Vec::new();
    for _ in 0..16 {
        let (d0, t0) = (
            proxy.stats.drops.load(Relaxed),
            proxy.stats.truncations.load(Relaxed),
        );
        let mut c = bounded("connect", TcpStream::connect(proxy.addr))
            .await
            .unwrap();
        c.write_all(&[2u8; 6000]).await.unwrap();
        c.shutdown().await.unwrap();
        let (got, _) = read_all(&mut c).await;
        let kind = if proxy.stats.drops.load(Relaxed) > d0 {
            1
        } else if proxy.stats.truncations.load(Relaxed) > t0 {
            2
        } else {
            0
        };
        assert_eq!(
            got.len() == 6000,
            kind == 0,
            "fault {kind} but {} bytes",
            got.len()
        );
        seq.push(kind);
    }
    assert_eq!(proxy.stats.responses.load(Relaxed), 16);
    bounded("proxy shutdown", proxy.shutdown()).await;
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netsim_random_faults_are_seeded_and_bounded() {
    let (echo, task) = echo_server().await;
    let a = random_fault_sequence(echo, 42).await;
    let b = random_fault_sequence(echo, 42).await;
    let c = random_fault_sequence(echo, 43).await;
    eprintln!("netsim random faults: seed 42 {a:?}, seed 43 {c:?}");
    assert_eq!(a, b, "same seed, different faults");
    assert_ne!(a, c, "the seed has no effect");
    let n = a.iter().filter(|&&k| k != 0).count();
    assert!((1..=6).contains(&n), "{n} faults");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netsim_shutdown_closes_everything() {
    let (echo, task) = echo_server().await;
    let proxy = Proxy::start(echo, NetConfig::rtt(Duration::from_millis(10)))
        .await
        .unwrap();
    let addr = proxy.addr;
    let mut c = bounded("connect", TcpStream::connect(addr)).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    bounded("echo", c.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    // The connection is open and idle; shutdown must close it and stop listening.
    bounded("proxy shutdown", proxy.shutdown()).await;
    let (rest, _) = read_all(&mut c).await;
    assert!(rest.is_empty());
    let again = bounded("connect after shutdown", TcpStream::connect(addr)).await;
    assert!(again.is_err(), "still listening after shutdown");
    task.abort();
}

// ---------------------------------------------------------------------------------------
// Authentication and ownership.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_key_is_unauthorized_and_computes_nothing() {
    let (srv, state) = common::start_server(common::server_config()).await;
    let prompt = tokens(PROMPT_A);
    let dev = device(&prompt);
    for key in ["not-a-key", ""] {
        let mut s = SpaSession::new(client(&srv.url(), key, WAIT, 4), dev.clone(), Mode::Spa);
        let r = bounded("generate", s.generate(&prompt, &params(), None, |_| true)).await;
        assert_eq!(r.unwrap_err(), RuntimeError::Unauthorized, "key {key:?}");
        assert!(s.id().is_none());
    }
    // Raw HTTPS requests without any Authorization header.
    let http = raw_https();
    let url = srv.url();
    let no_auth = [
        http.get(format!("{url}/v1/model")),
        http.post(format!("{url}/v1/sessions")).body(vec![1, 2, 3]),
        http.post(format!("{url}/v1/sessions/0123456789abcdef/step"))
            .body(vec![1, 2, 3]),
        http.delete(format!("{url}/v1/sessions/0123456789abcdef")),
        http.post(format!("{url}/v1/sessions"))
            .header("authorization", format!("Basic {}", common::KEY)),
    ];
    for rb in no_auth {
        let resp = bounded("raw request", rb.send()).await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    }
    let health = bounded("healthz", http.get(format!("{url}/healthz")).send())
        .await
        .unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    assert_eq!(server_rounds(&state), 0, "a step was computed");
    assert_eq!(live_sessions(&state), 0, "a session was created");
    assert!(state.metrics.unauthorized.load(Relaxed) >= 7);
    bounded("server shutdown", srv.shutdown()).await;
}

/// A reqwest client trusting the dev certificate (HTTP/1.1, no API key).
fn raw_https() -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(common::world().cert.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_session_is_not_found() {
    let (srv, state) = common::start_server(common::server_config()).await;
    let owner = common::client(&srv.url(), common::KEY);
    let other = common::client(&srv.url(), common::OTHER_KEY);
    let id = bounded("create", owner.create_session(Mode::Spa))
        .await
        .unwrap();
    let req = StepRequest {
        position: 0,
        tokens: tokens(PROMPT_A),
        draft: K,
        ..Default::default()
    };
    let r = bounded("foreign step", other.step(&id, &req)).await;
    assert_eq!(r.unwrap_err(), RuntimeError::NotFound);
    let r = bounded("foreign delete", other.delete_session(&id)).await;
    assert_eq!(r.unwrap_err(), RuntimeError::NotFound);
    assert_eq!(server_rounds(&state), 0);
    assert_eq!(live_sessions(&state), 1, "the owner's session must survive");
    // The owner still uses and deletes it.
    let resp = bounded("owner step", owner.step(&id, &req)).await.unwrap();
    assert_eq!(resp.states.len(), req.tokens.len() + K as usize - 1);
    assert_eq!(server_rounds(&state), 1);
    bounded("owner delete", owner.delete_session(&id))
        .await
        .unwrap();
    assert_eq!(live_sessions(&state), 0);
    bounded("server shutdown", srv.shutdown()).await;
}

// ---------------------------------------------------------------------------------------
// Lost responses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_responses_are_retried_without_duplicates() {
    let prompt = tokens(PROMPT_A);
    let dev = device(&prompt);
    let clean = clean_run(&prompt, &dev).await;
    let (srv, state) = common::start_server(common::server_config()).await;
    let proxy = Proxy::start(
        srv.addr,
        NetConfig {
            faults: FaultPlan::Schedule(vec![(2, Fault::Drop), (5, Fault::Drop)]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut s = SpaSession::new(client(&proxy.url(), common::KEY, WAIT, 4), dev, Mode::Spa);
    let got = run(&mut s, &prompt).await;
    let drops = proxy.stats.drops.load(Relaxed);
    eprintln!(
        "dropped responses: {drops}, client rounds {}, server rounds {}, requests {}",
        got.stats.rounds,
        server_rounds(&state),
        proxy.stats.responses.load(Relaxed)
    );
    assert_eq!(drops, 2, "the schedule was not applied");
    assert_eq!(got.tokens, clean.tokens);
    assert_eq!(got.streamed, clean.tokens);
    // Same rounds as the clean run, each dropped one computed once more by the server.
    assert_eq!(got.stats.rounds, clean.stats.rounds);
    assert_eq!(got.stats.reprefills, 0);
    assert_eq!(server_rounds(&state), clean.stats.rounds as u64 + drops);
    assert_eq!(server_rounds(&state), proxy.stats.responses.load(Relaxed));
    assert_eq!(live_sessions(&state), 1);
    bounded("proxy shutdown", proxy.shutdown()).await;
    bounded("server shutdown", srv.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_truncated_and_stalled_responses_with_rtt() {
    let prompt = tokens(PROMPT_B);
    let dev = device(&prompt);
    let clean = clean_run(&prompt, &dev).await;
    let (srv, state) = common::start_server(common::server_config()).await;
    // Stall longer than the client's timeout, so the client gives up and retries.
    let request_timeout = Duration::from_secs(4);
    let proxy = Proxy::start(
        srv.addr,
        NetConfig {
            delay: Duration::from_millis(5),
            faults: FaultPlan::Schedule(vec![
                (1, Fault::Reset),
                (3, Fault::Truncate),
                (5, Fault::Stall(request_timeout + Duration::from_secs(2))),
            ]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut s = SpaSession::new(
        client(&proxy.url(), common::KEY, request_timeout, 6),
        dev,
        Mode::Spa,
    );
    let got = run(&mut s, &prompt).await;
    let st = &proxy.stats;
    eprintln!(
        "faults: resets {}, truncations {}, stalls {}; client rounds {}, server rounds {}, responses {}",
        st.resets.load(Relaxed),
        st.truncations.load(Relaxed),
        st.stalls.load(Relaxed),
        got.stats.rounds,
        server_rounds(&state),
        st.responses.load(Relaxed)
    );
    assert_eq!(st.faults(), 3, "the schedule was not applied");
    assert_eq!(got.tokens, clean.tokens);
    assert_eq!(got.stats.rounds, clean.stats.rounds);
    assert_eq!(got.stats.reprefills, 0);
    // Every computed step reached the proxy; at least one per fault was never used.
    assert_eq!(server_rounds(&state), st.responses.load(Relaxed));
    assert!(server_rounds(&state) >= clean.stats.rounds as u64 + 3);
    // 10 ms RTT per round at least.
    assert!(got.stats.t_net >= Duration::from_millis(10) * got.stats.rounds as u32);
    bounded("proxy shutdown", proxy.shutdown()).await;
    bounded("server shutdown", srv.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_is_emulated_and_tokens_unchanged() {
    let prompt = tokens(PROMPT_A);
    let dev = device(&prompt);
    let clean = clean_run(&prompt, &dev).await;
    let (srv, _state) = common::start_server(common::server_config()).await;
    let rtt = Duration::from_millis(80);
    let proxy = Proxy::start(srv.addr, NetConfig::rtt(rtt)).await.unwrap();
    let mut s = SpaSession::new(common::client(&proxy.url(), common::KEY), dev, Mode::Spa);
    let got = run(&mut s, &prompt).await;
    let per_round = got.stats.t_net / got.stats.rounds as u32;
    eprintln!(
        "rtt {rtt:?}: {} rounds, T_net per round {per_round:?} (clean {:?})",
        got.stats.rounds,
        clean.stats.t_net / clean.stats.rounds as u32
    );
    assert_eq!(got.tokens, clean.tokens);
    assert!(per_round >= rtt, "T_net per round {per_round:?} < RTT");
    // The first round also pays the TLS handshake (one more RTT).
    assert!(got.stats.t_total >= rtt * (got.stats.rounds as u32 + 1));
    bounded("proxy shutdown", proxy.shutdown()).await;
    bounded("server shutdown", srv.shutdown()).await;
}

// ---------------------------------------------------------------------------------------
// Eviction and restarts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_transparently_reprefilled() {
    let (pa, pb) = (tokens(PROMPT_A), tokens(PROMPT_B));
    let (da, db) = (device(&pa), device(&pb));
    let clean_a = clean_run(&pa, &da).await;
    let clean_b = clean_run(&pb, &db).await;
    // Any KV memory is over budget: each step evicts every other session.
    let (srv, state) = common::start_server(ServerConfig {
        kv_budget_bytes: 1,
        ..common::server_config()
    })
    .await;
    let mut a = SpaSession::new(common::client(&srv.url(), common::KEY), da, Mode::Spa);
    let mut b = SpaSession::new(common::client(&srv.url(), common::OTHER_KEY), db, Mode::Spa);
    let (ra, rb) = tokio::join!(run(&mut a, &pa), run(&mut b, &pb));
    let evictions = state.sessions.lock().unwrap().ended.evicted;
    eprintln!(
        "eviction: {evictions} evictions; reprefills a {} b {}; rounds a {} b {} (clean {} {})",
        ra.stats.reprefills,
        rb.stats.reprefills,
        ra.stats.rounds,
        rb.stats.rounds,
        clean_a.stats.rounds,
        clean_b.stats.rounds
    );
    assert!(evictions >= 1);
    assert!(ra.stats.reprefills + rb.stats.reprefills >= 1);
    // `run` checked that every token was streamed once and the history has no gap.
    if common::engine().batch_invariant() {
        assert_eq!(ra.tokens, clean_a.tokens);
        assert_eq!(rb.tokens, clean_b.tokens);
        // A re-prefill round decides the same draft positions as the round it replaces (the
        // request that found the session gone is not a round), so the round count is unchanged.
        assert_eq!(
            ra.stats.rounds + rb.stats.rounds,
            clean_a.stats.rounds + clean_b.stats.rounds
        );
    } else {
        // llama.cpp: two sessions side by side, each re-prefilled in one batch, are computed
        // by other kernels than a lone run's rounds (docs/serving.md, "Exactness"), so a near
        // tie can go the other way (CI's machine: after 17 tokens). Still SPA decoding: both
        // runs complete, each with as many tokens as asked unless its own text ended.
        for (r, clean) in [(&ra, &clean_a), (&rb, &clean_b)] {
            let same = r
                .tokens
                .iter()
                .zip(&clean.tokens)
                .take_while(|(a, b)| a == b);
            eprintln!(
                "  llama.cpp: {} of {} tokens as alone",
                same.count(),
                clean.tokens.len()
            );
            assert!(!r.tokens.is_empty() && r.tokens.len() <= params().max_tokens);
        }
    }
    bounded("server shutdown", srv.shutdown()).await;
}

/// Shuts the first server down after `after` streamed tokens (blocking the callback until it
/// is down), then starts a fresh one (empty session table) on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_on_same_port_is_transparent() {
    let prompt = tokens(PROMPT_A);
    let dev = device(&prompt);
    let clean = clean_run(&prompt, &dev).await;
    let (srv, state1) = common::start_server(common::server_config()).await;
    let (url, addr) = (srv.url(), srv.addr);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (down_tx, down_rx) = std::sync::mpsc::channel::<()>();
    let restarter = tokio::spawn(async move {
        go_rx.await.expect("restart signal");
        srv.shutdown().await;
        down_tx.send(()).unwrap();
        // Leave the port closed for a moment: the client sees refused connections.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let w = common::world();
        let state = Arc::new(common::state(common::server_config()));
        for attempt in 0.. {
            match spa_server::start(state.clone(), addr, Some(&w.cert)).await {
                Ok(s) => return (s, state),
                Err(e) if attempt < 50 => {
                    eprintln!("rebinding {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("could not rebind {addr}: {e}"),
            }
        }
        unreachable!()
    });
    let after = 6;
    let mut go = Some(go_tx);
    let mut streamed = Vec::new();
    // Backoff 50 ms doubling over 10 attempts covers several seconds of downtime.
    let mut s = SpaSession::new(client(&url, common::KEY, WAIT, 10), dev, Mode::Spa);
    let (got, stats) = bounded(
        "generation across a restart",
        s.generate(&prompt, &params(), None, |t| {
            streamed.push(t);
            if streamed.len() == after {
                go.take().unwrap().send(()).unwrap();
                tokio::task::block_in_place(|| {
                    down_rx
                        .recv_timeout(Duration::from_secs(30))
                        .expect("old server did not stop")
                });
            }
            true
        }),
    )
    .await
    .expect("generation failed across the restart");
    let (srv2, state2) = bounded("restart", restarter).await.unwrap();
    eprintln!(
        "restart: rounds {} (old server {}, new server {}), reprefills {}",
        stats.rounds,
        server_rounds(&state1),
        server_rounds(&state2),
        stats.reprefills
    );
    assert_eq!(got, clean.tokens);
    assert_eq!(streamed, clean.tokens);
    let mut hist = prompt.clone();
    hist.extend_from_slice(&got);
    assert_eq!(s.history(), &hist[..]);
    assert_eq!(stats.reprefills, 1);
    assert!(
        server_rounds(&state2) >= 1,
        "the new server computed nothing"
    );
    assert_eq!(
        server_rounds(&state1) + server_rounds(&state2),
        stats.rounds as u64
    );
    assert_eq!(live_sessions(&state2), 1);
    bounded("server shutdown", srv2.shutdown()).await;
}

/// The same through the proxy: the upstream is switched to a new server on another port
/// while 40 ms of RTT are emulated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_replaced_behind_proxy_is_transparent() {
    let prompt = tokens(PROMPT_B);
    let dev = device(&prompt);
    let clean = clean_run(&prompt, &dev).await;
    let (srv1, state1) = common::start_server(common::server_config()).await;
    let (srv2, state2) = common::start_server(common::server_config()).await;
    let proxy = Arc::new(
        Proxy::start(srv1.addr, NetConfig::rtt(Duration::from_millis(40)))
            .await
            .unwrap(),
    );
    let (p2, new_addr) = (proxy.clone(), srv2.addr);
    let mut n = 0;
    let mut s = SpaSession::new(client(&proxy.url(), common::KEY, WAIT, 4), dev, Mode::Spa);
    let (got, stats) = bounded(
        "generation across a server switch",
        s.generate(&prompt, &params(), None, |_| {
            n += 1;
            if n == 9 {
                p2.set_upstream(new_addr);
                p2.disconnect_all();
            }
            true
        }),
    )
    .await
    .unwrap();
    eprintln!(
        "switch: rounds {} (old {}, new {}), reprefills {}",
        stats.rounds,
        server_rounds(&state1),
        server_rounds(&state2),
        stats.reprefills
    );
    assert_eq!(got, clean.tokens);
    assert_eq!(stats.reprefills, 1);
    assert!(server_rounds(&state2) >= 1);
    assert_eq!(
        server_rounds(&state1) + server_rounds(&state2),
        stats.rounds as u64
    );
    drop(p2);
    let proxy = Arc::into_inner(proxy).unwrap();
    bounded("proxy shutdown", proxy.shutdown()).await;
    bounded("server shutdown", srv1.shutdown()).await;
    bounded("server shutdown", srv2.shutdown()).await;
}

/// Speculative sampling keys every draw by (seed, position): a sampled generation through
/// dropped responses and a server switch (re-prefill) gives the clean run's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_generation_survives_drops_and_reprefill() {
    let prompt = tokens(PROMPT_B);
    let dev = device(&prompt);
    let sampled = RuntimeParams {
        sampling: WireSampling {
            temperature: 0.9,
            top_p: 0.95,
            seed: 11,
        },
        ..params()
    };
    let clean = clean_run_with(&prompt, &dev, &sampled).await;
    let (srv1, state1) = common::start_server(common::server_config()).await;
    let (srv2, state2) = common::start_server(common::server_config()).await;
    let proxy = Arc::new(
        Proxy::start(
            srv1.addr,
            NetConfig {
                faults: FaultPlan::Schedule(vec![(2, Fault::Drop), (6, Fault::Drop)]),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let (p2, new_addr) = (proxy.clone(), srv2.addr);
    let mut n = 0;
    let mut s = SpaSession::new(client(&proxy.url(), common::KEY, WAIT, 4), dev, Mode::Spa);
    let mut streamed = Vec::new();
    let (got, stats) = bounded(
        "sampled generation",
        s.generate(&prompt, &sampled, None, |t| {
            streamed.push(t);
            n += 1;
            if n == 8 {
                p2.set_upstream(new_addr);
                p2.disconnect_all();
            }
            true
        }),
    )
    .await
    .unwrap();
    let drops = proxy.stats.drops.load(Relaxed);
    eprintln!(
        "sampled: {drops} drops, rounds {} (old {}, new {}), reprefills {}",
        stats.rounds,
        server_rounds(&state1),
        server_rounds(&state2),
        stats.reprefills
    );
    assert_eq!(got, clean.tokens);
    assert_eq!(streamed, clean.tokens);
    assert_eq!(drops, 2, "the schedule was not applied");
    assert_eq!(stats.reprefills, 1);
    assert_eq!(stats.rounds, clean.stats.rounds);
    assert_eq!(
        server_rounds(&state1) + server_rounds(&state2),
        stats.rounds as u64 + drops
    );
    drop(p2);
    let proxy = Arc::into_inner(proxy).unwrap();
    bounded("proxy shutdown", proxy.shutdown()).await;
    bounded("server shutdown", srv1.shutdown()).await;
    bounded("server shutdown", srv2.shutdown()).await;
}
