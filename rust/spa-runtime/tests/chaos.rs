//! Seeded randomized fault injection: at least 200 generations of the real device runtime
//! against the real TLS server through the `netsim` proxy, which drops, resets, truncates,
//! delays, stalls mid-body or duplicates responses at random (seeded, so a failure replays).
//!
//! Every generation must either complete with exactly the tokens of a clean run, or fail with
//! a typed error once its retry budget is spent; in both cases the tokens streamed to the app
//! are a prefix of the clean run's (never a duplicated, lost or wrong token) and the session
//! history is consistent.
//!
//! The server also ends sessions under the devices' feet: an idle TTL shorter than the stall
//! faults expires sessions mid-generation, and a sibling install of each key (an "intruder"
//! creating sessions straight at the server) keeps the key at its cap of 2, so idle sessions
//! are reclaimed. Devices see 410 and re-prefill; the token checks above still hold. Half of the
//! generations end with `reset()`, half by dropping the session (its delete runs in the
//! background).
//!
//! `SPA_CHAOS_SEED` and `SPA_CHAOS_GENERATIONS` override the seed and the count.

mod common;

use spa_model::GateMode;
use spa_runtime::netsim::{Fault, FaultPlan, NetConfig, Proxy};
use spa_runtime::{Client, ClientConfig, Mode, RuntimeError, RuntimeParams, SpaSession};
use spa_server::{Keys, ServerConfig};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPTS: [&str; 4] = [
    "The fisherman pulled in his nets and",
    "Our train was late again, so we",
    "In the middle of the forest there was",
    "She opened the old letter and read",
];
const MAX_TOKENS: usize = 6;
const K: u32 = 3;
/// Concurrent clients, each with its own proxy (its own seeded fault sequence) and key.
const LANES: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(4);
/// Idle TTL: shorter than a 300 ms stall, so stalled rounds find their session expired.
const IDLE_TTL: Duration = Duration::from_millis(250);
/// Sessions per key: the lane's own plus one of the intruder's.
const CAP: usize = 2;
/// How often each key's intruder creates a session.
const INTRUDER_EVERY: Duration = Duration::from_millis(150);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn params() -> RuntimeParams {
    RuntimeParams {
        max_tokens: MAX_TOKENS,
        draft: K,
        ..Default::default()
    }
}

fn client(url: &str, key: &str, attempts: u32) -> Client {
    let mut c = ClientConfig::new(url, key);
    c.extra_root_pem = Some(common::world().cert.cert_pem.clone());
    c.timeout = TIMEOUT;
    c.max_attempts = attempts;
    c.backoff = Duration::from_millis(20);
    Client::new(c).unwrap()
}

fn faults() -> Vec<Fault> {
    let quick = [
        Fault::Drop,
        Fault::Reset,
        Fault::Truncate,
        // A delay the client waits out.
        Fault::Stall(Duration::from_millis(300)),
        Fault::StallMidBody(Duration::from_millis(300)),
        Fault::Duplicate,
    ];
    // Drawn uniformly from this list: each quick fault twice as often as the slow one, a body
    // that stops mid-way for longer than the client's timeout (it costs a whole timeout).
    let mut v: Vec<Fault> = quick.iter().chain(quick.iter()).copied().collect();
    v.push(Fault::StallMidBody(TIMEOUT + Duration::from_secs(1)));
    v
}

#[derive(Debug, Default)]
struct Tally {
    completed: usize,
    failed: BTreeMap<String, usize>,
    reprefills: usize,
}

fn s_reprefills<E>(r: &Result<(Vec<u32>, spa_runtime::GenerationStats), E>) -> usize {
    r.as_ref().map_or(0, |(_, st)| st.reprefills)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_never_duplicate_or_lose_tokens() {
    let seed: u64 = env_or("SPA_CHAOS_SEED", 0x5eed_c4a0);
    let generations: usize = env_or("SPA_CHAOS_GENERATIONS", 200);
    let t_start = Instant::now();
    let keys: Vec<String> = (0..LANES).map(|i| format!("chaos-key-{i}")).collect();
    let (srv, state) = common::start_server(ServerConfig {
        keys: Keys::new(&keys),
        session_idle_ttl: Some(IDLE_TTL),
        max_sessions_per_key: CAP,
        ..ServerConfig::default()
    })
    .await;
    // Clean runs, straight to the server.
    let mut cases = Vec::new();
    for p in PROMPTS {
        let prompt = common::world().base.tokenizer().encode(p).unwrap();
        let dev = Arc::new(common::device(GateMode::Learned, &prompt));
        let mut s = SpaSession::new(common::client(&srv.url(), &keys[0]), dev.clone(), Mode::Spa);
        let (clean, _) = s
            .generate(&prompt, &params(), None, |_| true)
            .await
            .unwrap();
        assert_eq!(clean.len(), MAX_TOKENS);
        s.reset().await;
        cases.push((prompt, dev, clean));
    }
    let cases = Arc::new(cases);
    let clean_rounds = state.metrics.rounds.load(Relaxed);
    let stop_intruders = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let intruders: Vec<_> = keys
        .iter()
        .map(|k| {
            let (c, stop) = (common::client(&srv.url(), k), stop_intruders.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Relaxed) {
                    c.create_session(Mode::Spa).await.expect("intruder create");
                    n += 1;
                    tokio::time::sleep(INTRUDER_EVERY).await;
                }
                n
            })
        })
        .collect();
    eprintln!("chaos: seed {seed:#x}, {generations} generations over {LANES} lanes");
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let proxy = Proxy::start(
            srv.addr,
            NetConfig {
                delay: Duration::from_millis(2),
                faults: FaultPlan::Random {
                    seed: seed ^ (lane as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    probability: 0.3,
                    faults: faults(),
                    max_faults: None,
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Retry budgets of 2, 3 and 4 attempts: small budgets make typed failures happen.
        let attempts = 2 + (lane % 3) as u32;
        let c = client(&proxy.url(), &keys[lane], attempts);
        let cases = cases.clone();
        let n = generations / LANES + usize::from(lane < generations % LANES);
        lanes.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for g in 0..n {
                let (prompt, dev, clean) = &cases[(g + lane) % cases.len()];
                let mut s = SpaSession::new(c.clone(), dev.clone(), Mode::Spa);
                let mut streamed = Vec::new();
                let r = tokio::time::timeout(
                    Duration::from_secs(300),
                    s.generate(prompt, &params(), None, |t| {
                        streamed.push(t);
                        true
                    }),
                )
                .await
                .unwrap_or_else(|_| panic!("lane {lane} generation {g} hung"));
                // Whatever happened, the app never saw a duplicated, lost or wrong token.
                assert!(
                    clean.starts_with(&streamed),
                    "lane {lane} gen {g}: streamed {streamed:?} is not a prefix of {clean:?}"
                );
                tally.reprefills += s_reprefills(&r);
                match r {
                    Ok((tokens, stats)) => {
                        assert_eq!(&tokens, clean, "lane {lane} gen {g}: tokens differ");
                        assert_eq!(streamed, tokens);
                        assert_eq!(stats.tokens, MAX_TOKENS);
                        let mut h = prompt.clone();
                        h.extend_from_slice(clean);
                        assert_eq!(s.history(), &h[..]);
                        tally.completed += 1;
                    }
                    Err(e) => {
                        // Typed, and only after the retry budget was spent.
                        let kind = match &e {
                            RuntimeError::Transport { attempts: a, .. } => {
                                assert_eq!(*a, attempts, "lane {lane} gen {g}: {e}");
                                "transport"
                            }
                            RuntimeError::Protocol(_) => "protocol",
                            RuntimeError::SessionGone => "session-gone",
                            other => panic!("lane {lane} gen {g}: unexpected error {other:?}"),
                        };
                        assert!(s.history().is_empty(), "a failed turn left history behind");
                        *tally.failed.entry(kind.to_string()).or_default() += 1;
                    }
                }
                if g % 2 == 0 {
                    s.reset().await;
                } // else: dropped here, its delete runs in the background
            }
            (tally, proxy, attempts)
        }));
    }
    let (mut completed, mut failed, mut total) = (0, BTreeMap::<String, usize>::new(), 0);
    let mut reprefills = 0;
    let mut kinds = [0u64; 7];
    let mut responses = 0;
    for l in lanes {
        let (tally, proxy, attempts) = l.await.expect("lane panicked");
        let st = &proxy.stats;
        eprintln!(
            "  lane (attempts {attempts}): {} completed, failed {:?}; responses {}, faults {} \
             (drop {}, reset {}, truncate {}, stall {}, mid-body stall {}, duplicate {})",
            tally.completed,
            tally.failed,
            st.responses.load(Relaxed),
            st.faults(),
            st.drops.load(Relaxed),
            st.resets.load(Relaxed),
            st.truncations.load(Relaxed),
            st.stalls.load(Relaxed),
            st.mid_body_stalls.load(Relaxed),
            st.duplicates.load(Relaxed),
        );
        for (i, c) in [
            &st.drops,
            &st.resets,
            &st.truncations,
            &st.stalls,
            &st.mid_body_stalls,
            &st.duplicates,
        ]
        .iter()
        .enumerate()
        {
            kinds[i] += c.load(Relaxed);
        }
        kinds[6] += st.faults();
        responses += st.responses.load(Relaxed);
        completed += tally.completed;
        reprefills += tally.reprefills;
        total += tally.completed + tally.failed.values().sum::<usize>();
        for (k, v) in tally.failed {
            *failed.entry(k).or_default() += v;
        }
        proxy.shutdown().await;
    }
    let wall = t_start.elapsed();
    eprintln!(
        "chaos: {total} generations, {completed} identical to the clean run, failed (typed) \
         {failed:?}; {} faults in {responses} responses; server rounds {} (clean {clean_rounds}); \
         {wall:.1?}",
        kinds[6],
        state.metrics.rounds.load(Relaxed),
    );
    assert_eq!(total, generations);
    for (i, name) in [
        "drop",
        "reset",
        "truncate",
        "stall",
        "mid-body stall",
        "duplicate",
    ]
    .iter()
    .enumerate()
    {
        assert!(kinds[i] > 0, "no {name} fault was injected");
    }
    // The faults must bite without making the test vacuous.
    assert!(
        kinds[6] * 10 >= responses,
        "too few faults: {} in {responses}",
        kinds[6]
    );
    assert!(
        completed * 2 >= total,
        "fewer than half completed: {completed}/{total}"
    );
    stop_intruders.store(true, Relaxed);
    let mut intruder_sessions = 0;
    for i in intruders {
        intruder_sessions += i.await.expect("intruder panicked");
    }
    let ended = state.sessions.lock().unwrap().ended;
    eprintln!(
        "chaos: {intruder_sessions} intruder sessions; sessions ended {ended:?}; \
         {reprefills} re-prefills in completed generations"
    );
    // The server ended sessions under the devices, and they recovered.
    assert!(ended.expired > 0, "no session expired");
    assert!(ended.reclaimed > 0, "no session was reclaimed at the cap");
    assert!(reprefills > 0, "no completed generation re-prefilled");
    // Lost deletes (a delete is best effort, never retried) and the intruders' sessions: the
    // idle TTL collects them all.
    tokio::time::sleep(IDLE_TTL * 4).await;
    let left = state.sessions.lock().unwrap().len();
    assert_eq!(left, 0, "{left} sessions outlived the idle TTL");
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Scale-out: two server processes behind a hashing proxy; one is killed mid-generation.

const CHILD_ENV: &str = "SPA_CHAOS_CHILD_SERVER";

/// Not a test: the body of a server *process* started by `failover_between_two_server_processes`
/// (this test binary re-executed with `CHILD_ENV` set). Serves plain HTTP on a free loopback
/// port (TLS ends at the proxy, as at a Kubernetes ingress), prints the port, runs until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by failover_between_two_server_processes"]
async fn child_server_process() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let state = Arc::new(common::state(common::server_config()));
    let srv = spa_server::start(state, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    println!("SPA_CHILD_PORT={}", srv.addr.port());
    std::future::pending::<()>().await;
}

/// A server process; killed on drop.
struct ServerProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl ServerProcess {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_server_process",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            if let Some(p) = line.trim().strip_prefix("SPA_CHILD_PORT=") {
                let addr = format!("127.0.0.1:{p}").parse().unwrap();
                return Self {
                    child,
                    addr,
                    _stdout: out,
                };
            }
            line.clear();
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("server process exited before listening");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rendezvous (highest random weight) hash of `key` over `backends`: the choice an ingress
/// hashing a request header makes; when a backend goes away only its keys move.
fn pick(key: &str, backends: &[std::net::SocketAddr]) -> Option<std::net::SocketAddr> {
    use std::hash::{Hash, Hasher};
    backends.iter().copied().max_by_key(|b| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (key, b).hash(&mut h);
        h.finish()
    })
}

/// A minimal L7 proxy for HTTP/1.1: reads each connection's first request head, hashes its
/// `Authorization` header over the live backends, then relays bytes both ways. A backend that
/// refuses the connection is dropped from the live set (as a failed readiness probe would).
struct HashingProxy {
    addr: std::net::SocketAddr,
    live: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HashingProxy {
    async fn start(backends: Vec<std::net::SocketAddr>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let live = Arc::new(std::sync::Mutex::new(backends));
        let live2 = live.clone();
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                tokio::spawn(Self::relay(c, live2.clone()));
            }
        });
        Self { addr, live, task }
    }

    async fn relay(
        mut c: tokio::net::TcpStream,
        live: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 << 10 {
                return;
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let key = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        loop {
            let candidates = live.lock().unwrap().clone();
            let Some(b) = pick(&key, &candidates) else {
                return;
            };
            match tokio::net::TcpStream::connect(b).await {
                Ok(mut s) => {
                    if s.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                    return;
                }
                Err(_) => live.lock().unwrap().retain(|x| *x != b),
            }
        }
    }
}

impl Drop for HashingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_between_two_server_processes() {
    let prompt = common::world()
        .base
        .tokenizer()
        .encode("The caravan crossed the desert at night because")
        .unwrap();
    let dev = Arc::new(common::device(GateMode::Learned, &prompt));
    let p = RuntimeParams {
        max_tokens: 16,
        draft: K,
        ..Default::default()
    };
    // Clean run: one in-process TLS server, no proxy.
    let (srv, _) = common::start_server(common::server_config()).await;
    let mut s = SpaSession::new(
        common::client(&srv.url(), common::KEY),
        dev.clone(),
        Mode::Spa,
    );
    let (clean, clean_stats) = s.generate(&prompt, &p, None, |_| true).await.unwrap();
    srv.shutdown().await;
    assert_eq!(clean.len(), p.max_tokens);
    assert!(
        clean_stats.rounds >= 3,
        "too few rounds to kill one mid-generation"
    );

    let (a, b) = (ServerProcess::start(), ServerProcess::start());
    let proxy = HashingProxy::start(vec![a.addr, b.addr]).await;
    let header = format!("Bearer {}", common::KEY);
    let home = pick(&header, &[a.addr, b.addr]).unwrap();
    let (mut home_proc, other) = if home == a.addr { (a, b) } else { (b, a) };
    let mut cfg = ClientConfig::new(format!("http://{}", proxy.addr), common::KEY);
    cfg.allow_http = true;
    cfg.timeout = Duration::from_secs(60);
    cfg.backoff = Duration::from_millis(50);
    let mut s = SpaSession::new(Client::new(cfg).unwrap(), dev, Mode::Spa);
    let mut streamed = Vec::new();
    let mut killed_after = None;
    let (got, stats) = tokio::time::timeout(
        Duration::from_secs(300),
        s.generate(&prompt, &p, None, |t| {
            streamed.push(t);
            if streamed.len() == 5 {
                // The process holding the session dies between two rounds (SIGKILL).
                home_proc.child.kill().unwrap();
                home_proc.child.wait().unwrap();
                killed_after = Some(streamed.len());
            }
            true
        }),
    )
    .await
    .expect("generation hung")
    .expect("generation failed after failover");
    eprintln!(
        "failover: killed {} after {killed_after:?} tokens; finished on {}; {} rounds, {} re-prefills; live backends {:?}",
        home_proc.addr,
        other.addr,
        stats.rounds,
        stats.reprefills,
        proxy.live.lock().unwrap()
    );
    assert_eq!(killed_after, Some(5));
    assert_eq!(got, clean, "tokens differ after failover");
    assert_eq!(streamed, clean);
    assert_eq!(
        stats.reprefills, 1,
        "the other process must re-prefill exactly once"
    );
    assert_eq!(*proxy.live.lock().unwrap(), vec![other.addr]);
}
