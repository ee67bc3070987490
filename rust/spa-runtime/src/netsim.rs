//! Network emulation: a loopback TCP proxy adding one-way delay, a bandwidth limit and
//! injected faults between a device runtime and a base server (feature `netsim`).
//!
//! `tc netem` is not available on the machines this project is built and tested on (no
//! `CAP_NET_ADMIN`), so this proxy is how round-trip time is emulated, in the resilience tests
//! and later by the CLI (`--rtt`). Put it between the client and the server:
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use spa_runtime::netsim::{NetConfig, Proxy};
//! use std::time::Duration;
//! let proxy = Proxy::start(server, NetConfig::rtt(Duration::from_millis(80))).await?;
//! // Connect the client to proxy.url() ("https://127.0.0.1:PORT") instead of the server.
//! # let _ = proxy.url();
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Bytes pass through untouched (TLS included): the client connects to `127.0.0.1:PORT` and
//! verifies the server's certificate for `127.0.0.1`, as it would directly.
//!
//! * **Delay** is a delay line, per direction: a chunk read at `t` is written at `t + delay`
//!   while later chunks keep being read, so throughput is not serialized; RTT = 2 x delay.
//! * **Bandwidth** (bytes/s, per direction) adds serialization time: a chunk of `n` bytes
//!   occupies the link for `n / bandwidth` seconds after the previous one, then the delay.
//! * **Faults** hit *responses*. The proxy cannot read HTTP inside TLS, so a response is
//!   recognised heuristically: a *burst* is the server-to-client bytes of one connection
//!   between two client-to-server chunks, and a burst counts as a response once it reaches
//!   [`NetConfig::min_response_bytes`] (default 4096: TLS handshake flights, HTTP/2 control
//!   frames, session creation and error answers stay below; draft steps are far above).
//!   Responses are numbered from 1 over all connections of the proxy, in the order the
//!   proxy sees them. The chunk that crosses the threshold is the point where the server has
//!   computed and sent the response: a [`Fault`] then drops, resets, truncates, stalls
//!   (before or mid-body) or duplicates it.
//!   Which responses are hit comes from an explicit schedule or a seeded RNG ([`FaultPlan`]).
//!
//! Everything is bounded: upstream connects time out, a stall lasts its given duration, and
//! every task (listener, connections, pumps) ends on [`Proxy::shutdown`] or when the
//! [`Proxy`] is dropped. Limits: one request in flight per connection is assumed (HTTP/2
//! multiplexing of concurrent requests on one connection blurs the response count), and
//! timing granularity is the tokio timer's (about 1 ms).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

/// What happens to a response picked for a fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Close both sides (FIN) without forwarding the triggering chunk or anything after it:
    /// the server computed the response, the client never receives it.
    Drop,
    /// Like [`Fault::Drop`] but the client side is reset (RST) instead of closed.
    Reset,
    /// Forward the first half of the triggering chunk, then close both sides (FIN): the
    /// client sees a response cut mid-body.
    Truncate,
    /// Hold the response for this long before delivering it (and everything after it on that
    /// connection); a client with a shorter timeout gives up and retries.
    Stall(Duration),
    /// Forward the first half of the triggering chunk, then hold the rest of the response (and
    /// everything after it on that connection) for this long: a body that stops mid-way.
    StallMidBody(Duration),
    /// Forward the triggering chunk twice: the client receives a duplicated piece of the
    /// response. Inside TLS this is a replayed record, which the client's TLS layer rejects
    /// (record authentication fails), so the request fails as a transport error; over plain
    /// HTTP it corrupts the body or the framing.
    Duplicate,
}

/// Which responses get a fault.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum FaultPlan {
    /// No faults.
    #[default]
    None,
    /// `(n, fault)`: the n-th response (1-based, over all connections) gets `fault`.
    Schedule(Vec<(u64, Fault)>),
    /// Each response gets a fault with `probability`, drawn uniformly from `faults`, from an
    /// RNG seeded with `seed`, at most `max_faults` times (`None`: unbounded).
    Random {
        /// RNG seed.
        seed: u64,
        /// Probability per response, in [0, 1].
        probability: f64,
        /// Faults to draw from (none: no faults).
        faults: Vec<Fault>,
        /// Most faults injected.
        max_faults: Option<u64>,
    },
}

/// Link settings of a [`Proxy`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// One-way delay, applied in both directions (RTT = 2 x delay).
    pub delay: Duration,
    /// Bandwidth limit per direction in bytes/s (`None`: unlimited).
    pub bandwidth: Option<u64>,
    /// Fault injection.
    pub faults: FaultPlan,
    /// Bytes a server burst must reach to count as a response (see module docs).
    pub min_response_bytes: usize,
    /// Timeout of each connection to the upstream server.
    pub connect_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            bandwidth: None,
            faults: FaultPlan::None,
            min_response_bytes: 4096,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl NetConfig {
    /// A link with round-trip time `rtt` (one-way delay `rtt / 2`), no limit, no faults.
    pub fn rtt(rtt: Duration) -> Self {
        Self {
            delay: rtt / 2,
            ..Self::default()
        }
    }
}

/// Counters of a [`Proxy`] (all connections).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Upstream connections that failed (the client connection was then reset).
    pub connect_failures: AtomicU64,
    /// Bytes delivered to the server.
    pub bytes_up: AtomicU64,
    /// Bytes delivered to the client.
    pub bytes_down: AtomicU64,
    /// Responses recognised (see module docs).
    pub responses: AtomicU64,
    /// [`Fault::Drop`] injected.
    pub drops: AtomicU64,
    /// [`Fault::Reset`] injected.
    pub resets: AtomicU64,
    /// [`Fault::Truncate`] injected.
    pub truncations: AtomicU64,
    /// [`Fault::Stall`] injected.
    pub stalls: AtomicU64,
    /// [`Fault::StallMidBody`] injected.
    pub mid_body_stalls: AtomicU64,
    /// [`Fault::Duplicate`] injected.
    pub duplicates: AtomicU64,
}

impl ProxyStats {
    /// Faults injected so far, all kinds.
    pub fn faults(&self) -> u64 {
        self.drops.load(Relaxed)
            + self.resets.load(Relaxed)
            + self.truncations.load(Relaxed)
            + self.stalls.load(Relaxed)
            + self.mid_body_stalls.load(Relaxed)
            + self.duplicates.load(Relaxed)
    }
}

/// Chunks read per direction that may wait in the delay line (backpressure beyond).
const QUEUE: usize = 64;
/// Largest chunk read at once.
const MAX_CHUNK: usize = 16 * 1024;

struct Shared {
    cfg: NetConfig,
    upstream: Mutex<SocketAddr>,
    stats: Arc<ProxyStats>,
    rng: Mutex<Option<StdRng>>,
    stop: watch::Receiver<bool>,
    epoch: watch::Sender<u64>,
}

impl Shared {
    /// Counts one response and returns its fault, if any.
    fn next_response(&self) -> Option<Fault> {
        let n = self.stats.responses.fetch_add(1, Relaxed) + 1;
        let fault = match &self.cfg.faults {
            FaultPlan::None => None,
            FaultPlan::Schedule(s) => s.iter().find(|(k, _)| *k == n).map(|(_, f)| *f),
            FaultPlan::Random {
                probability,
                faults,
                max_faults,
                ..
            } => {
                let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
                let rng = rng.as_mut()?;
                let hit = rng.random_bool(probability.clamp(0.0, 1.0));
                let room = max_faults.is_none_or(|m| self.stats.faults() < m);
                (hit && room && !faults.is_empty())
                    .then(|| faults[rng.random_range(0..faults.len())])
            }
        };
        let counter = match fault? {
            Fault::Drop => &self.stats.drops,
            Fault::Reset => &self.stats.resets,
            Fault::Truncate => &self.stats.truncations,
            Fault::Stall(_) => &self.stats.stalls,
            Fault::StallMidBody(_) => &self.stats.mid_body_stalls,
            Fault::Duplicate => &self.stats.duplicates,
        };
        counter.fetch_add(1, Relaxed);
        log::debug!("netsim: response {n} gets {fault:?}");
        fault
    }
}

/// A running proxy: listens on `127.0.0.1:addr.port()`, forwards to the upstream server.
pub struct Proxy {
    /// Address clients connect to.
    pub addr: SocketAddr,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream())
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Proxy {
    /// Binds `127.0.0.1:0` and starts forwarding connections to `upstream`.
    pub async fn start(upstream: SocketAddr, cfg: NetConfig) -> io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let rng = match &cfg.faults {
            FaultPlan::Random { seed, .. } => Some(StdRng::seed_from_u64(*seed)),
            _ => None,
        };
        let stats = Arc::new(ProxyStats::default());
        let shared = Arc::new(Shared {
            cfg,
            upstream: Mutex::new(upstream),
            stats: stats.clone(),
            rng: Mutex::new(rng),
            stop: stop_rx,
            epoch: watch::channel(0).0,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            stats,
            shared,
            stop,
            task,
        })
    }

    /// `https://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The server new connections go to.
    pub fn upstream(&self) -> SocketAddr {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sends new connections to `upstream` (existing ones are left alone; see
    /// [`Proxy::disconnect_all`]).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = upstream;
    }

    /// Closes every open connection (both sides), as a network change would.
    pub fn disconnect_all(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Stops listening, closes every connection and waits for all tasks to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    let mut stop = sh.stop.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Also fires (Err) when the Proxy was dropped without shutdown.
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((c, _)) => {
                    sh.stats.connections.fetch_add(1, Relaxed);
                    conns.spawn(connection(c, sh.clone()));
                }
                Err(e) => {
                    log::warn!("netsim: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// How a pump ended: `Kill` ends the whole connection.
#[derive(Debug, PartialEq)]
enum End {
    Done,
    Kill,
}

#[derive(Debug)]
enum Item {
    Data(Instant, Vec<u8>),
    /// End of stream: forward a FIN.
    Eof(Instant),
    /// Injected fault: close (FIN, or RST when `rst`) and end the connection.
    Close(Instant, bool),
}

async fn connection(client: TcpStream, sh: Arc<Shared>) {
    let mut stop = sh.stop.clone();
    let mut epoch = sh.epoch.subscribe();
    let upstream = *sh.upstream.lock().unwrap_or_else(|p| p.into_inner());
    let server =
        match tokio::time::timeout(sh.cfg.connect_timeout, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            r => {
                log::debug!("netsim: upstream {upstream} unreachable: {r:?}");
                sh.stats.connect_failures.fetch_add(1, Relaxed);
                // Like a refused connection: reset the client.
                let _ = client.set_zero_linger();
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (up_tx, up_rx) = mpsc::channel(QUEUE);
    let (down_tx, down_rx) = mpsc::channel(QUEUE);
    // Client chunks seen so far: a change starts a new server burst.
    let client_chunks = Arc::new(AtomicU64::new(0));
    let mut pumps = JoinSet::new();
    pumps.spawn(read_pump(
        cr,
        up_tx,
        sh.clone(),
        client_chunks.clone(),
        false,
    ));
    pumps.spawn(write_pump(sw, up_rx, sh.clone(), false));
    pumps.spawn(read_pump(sr, down_tx, sh.clone(), client_chunks, true));
    pumps.spawn(write_pump(cw, down_rx, sh.clone(), true));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = epoch.changed() => return,
            r = pumps.join_next() => match r {
                None | Some(Ok(End::Kill)) | Some(Err(_)) => return,
                Some(Ok(End::Done)) => {}
            },
        }
    }
    // Returning drops `pumps`, which aborts the pumps and closes both sockets.
}

/// Reads one direction and queues chunks with their delivery time. `down`: server to client,
/// where responses are counted and faults injected.
async fn read_pump(
    mut r: OwnedReadHalf,
    tx: mpsc::Sender<Item>,
    sh: Arc<Shared>,
    client_chunks: Arc<AtomicU64>,
    down: bool,
) -> End {
    let cfg = &sh.cfg;
    let chunk = cfg.bandwidth.map_or(MAX_CHUNK, |b| {
        (b / 50).clamp(1024, MAX_CHUNK as u64) as usize
    });
    let mut buf = vec![0u8; chunk];
    let mut link_free = Instant::now();
    let (mut seen, mut burst, mut counted) = (u64::MAX, 0usize, false);
    let mut stall_until = Instant::now();
    loop {
        let n = r.read(&mut buf).await.unwrap_or(0);
        let now = Instant::now();
        if n == 0 {
            let _ = tx.send(Item::Eof(link_free.max(now) + cfg.delay)).await;
            return End::Done;
        }
        let sent = match cfg.bandwidth {
            Some(b) if b > 0 => {
                link_free = link_free.max(now) + Duration::from_secs_f64(n as f64 / b as f64);
                link_free
            }
            _ => now,
        };
        let mut at = (sent + cfg.delay).max(stall_until);
        if !down {
            client_chunks.fetch_add(1, Relaxed);
        } else {
            let c = client_chunks.load(Relaxed);
            if c != seen {
                (seen, burst, counted) = (c, 0, false);
            }
            burst += n;
            if !counted && burst >= cfg.min_response_bytes {
                counted = true;
                match sh.next_response() {
                    None => {}
                    Some(Fault::Drop) => {
                        let _ = tx.send(Item::Close(at, false)).await;
                        return End::Done;
                    }
                    Some(Fault::Reset) => {
                        let _ = tx.send(Item::Close(at, true)).await;
                        return End::Done;
                    }
                    Some(Fault::Truncate) => {
                        let _ = tx.send(Item::Data(at, buf[..n / 2].to_vec())).await;
                        let _ = tx.send(Item::Close(at, false)).await;
                        return End::Done;
                    }
                    Some(Fault::Stall(d)) => {
                        stall_until = now + d;
                        at = at.max(stall_until);
                    }
                    Some(Fault::StallMidBody(d)) => {
                        let half = n / 2;
                        if tx.send(Item::Data(at, buf[..half].to_vec())).await.is_err() {
                            return End::Done;
                        }
                        stall_until = now + d;
                        let later = at.max(stall_until);
                        if tx
                            .send(Item::Data(later, buf[half..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return End::Done;
                        }
                        continue;
                    }
                    Some(Fault::Duplicate) => {
                        // The first copy here, the second one below.
                        let first = tx.send(Item::Data(at, buf[..n].to_vec())).await;
                        if first.is_err() {
                            return End::Done;
                        }
                    }
                }
            }
        }
        if tx.send(Item::Data(at, buf[..n].to_vec())).await.is_err() {
            return End::Done;
        }
    }
}

/// Writes queued chunks at their delivery time.
async fn write_pump(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Item>,
    sh: Arc<Shared>,
    down: bool,
) -> End {
    let counter = if down {
        &sh.stats.bytes_down
    } else {
        &sh.stats.bytes_up
    };
    while let Some(item) = rx.recv().await {
        match item {
            Item::Data(at, bytes) => {
                sleep_until(at).await;
                if w.write_all(&bytes).await.is_err() {
                    return End::Kill;
                }
                counter.fetch_add(bytes.len() as u64, Relaxed);
            }
            Item::Eof(at) => {
                sleep_until(at).await;
                let _ = w.shutdown().await;
                return End::Done;
            }
            Item::Close(at, rst) => {
                sleep_until(at).await;
                if rst {
                    // No FIN first: the socket is closed with RST once the pumps are dropped.
                    let _ = w.as_ref().set_zero_linger();
                    w.forget();
                } else {
                    let _ = w.shutdown().await;
                }
                return End::Kill;
            }
        }
    }
    End::Done
}
