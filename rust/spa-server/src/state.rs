//! The server's settings ([`ServerConfig`]) and the state its handlers share ([`AppState`]).

use crate::base_engine::{BaseEngine, CandleEngine};
use crate::{batch, device_pack, metrics, Keys, Sessions};
use sha2::{Digest, Sha256};
use spa_model::{BaseModel, DownProjection};
use spa_protocol::{Limits, Manifest, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Accepted API keys.
    pub keys: Keys,
    /// Global bound on KV-cache bytes over all sessions (LRU eviction above it).
    pub kv_budget_bytes: usize,
    /// Most live sessions per key. At the cap, the key's least-recently-used idle session is
    /// reclaimed (its device gets 410 and re-prefills); 429 only when all of them are busy.
    /// Keys identify apps, not users: size it for the app's concurrent conversations.
    pub max_sessions_per_key: usize,
    /// A session unused this long expires (410 for its device, which re-prefills); `None`
    /// keeps sessions until deleted, reclaimed or evicted.
    pub session_idle_ttl: Option<Duration>,
    /// Default number of candidates per draft position.
    pub top_k: usize,
    /// Batch forward passes per API key, each key on its own engine lane (default), so one
    /// key's flood of steps cannot queue ahead of another key's; `false` puts every key in one
    /// shared queue (bigger batches, no fairness; kept for comparison in `spa bench fairness`).
    pub batch_lane_per_key: bool,
    /// Wire limits.
    pub limits: Limits,
    /// Longest wait for a request's headers on an HTTP/1.1 connection (slow-loris bound).
    pub header_timeout: Duration,
    /// Longest wait for a request's whole body once its headers arrived (408 beyond).
    pub body_timeout: Duration,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            keys: Keys::default(),
            kv_budget_bytes: 2 << 30,
            max_sessions_per_key: 64,
            session_idle_ttl: Some(Duration::from_secs(300)),
            top_k: 32,
            batch_lane_per_key: true,
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Shared state of a running server.
pub struct AppState {
    /// The frozen base (tokenizer, manifest, the layer-split baseline, `/v1/features`).
    pub base: Arc<BaseModel>,
    /// The engine that runs the steps' forward passes ([`CandleEngine`] over `base` unless
    /// [`AppState::with_engine`] chose another).
    pub engine: Arc<dyn BaseEngine>,
    /// The shared down-projection.
    pub proj: Arc<DownProjection>,
    /// Settings.
    pub config: ServerConfig,
    /// Session table.
    pub sessions: Mutex<Sessions>,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// Cross-session batching engine.
    pub batcher: batch::Batcher,
    /// The device pack served at `GET /v1/device-pack`, if any.
    pub device_pack: Option<device_pack::ServedPack>,
    manifest: Manifest,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl AppState {
    /// Builds the state and the manifest, with the candle engine over `base`.
    pub fn new(base: Arc<BaseModel>, proj: Arc<DownProjection>, config: ServerConfig) -> Self {
        let engine = Arc::new(CandleEngine::new(base.clone()));
        Self::with_engine(base, proj, engine, config)
    }

    /// [`AppState::new`] with the steps' forward passes on `engine` (which must run the same
    /// model as `base`: same GGUF file).
    pub fn with_engine(
        base: Arc<BaseModel>,
        proj: Arc<DownProjection>,
        engine: Arc<dyn BaseEngine>,
        config: ServerConfig,
    ) -> Self {
        let cfg = base.config();
        let pm = proj.meta();
        let mut tok_hash = Sha256::new();
        for id in 0..cfg.vocab as u32 {
            tok_hash.update(
                base.tokenizer()
                    .id_to_token(id)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            tok_hash.update([0]);
        }
        let tokenizer_hash: String = tok_hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let manifest = Manifest {
            protocol_version: PROTOCOL_VERSION,
            base_identity: base.identity().to_string(),
            layers: cfg.n_layers as u32,
            hidden: cfg.hidden as u32,
            taps: pm.taps.iter().map(|&t| t as u32).collect(),
            side_width: pm.width as u32,
            projection_version: pm.version,
            projection_fingerprint: proj.fingerprint().to_string(),
            vocab: cfg.vocab as u32,
            tokenizer_hash,
            context: base.max_positions() as u32,
            max_draft: config.limits.max_draft as u32,
            max_positions_per_round: config.limits.max_positions_per_round as u32,
            max_frame_bytes: config.limits.max_frame_bytes as u32,
            top_k: config.top_k as u32,
            device_pack_sha256: String::new(),
            device_pack_bytes: 0,
        };
        Self {
            batcher: batch::Batcher::start(base.clone(), engine.clone(), 32),
            engine,
            base,
            proj,
            sessions: Mutex::new(Sessions::with_idle_ttl(config.session_idle_ttl)),
            config,
            metrics: metrics::Metrics::default(),
            device_pack: None,
            manifest,
        }
    }

    /// Publishes `pack` (a device pack's bytes, [`spa_model::build_device_pack`]) at
    /// `GET /v1/device-pack`, its sha256 and size in the manifest.
    pub fn with_device_pack(mut self, pack: Vec<u8>) -> Self {
        let p = device_pack::ServedPack::new(pack);
        self.manifest.device_pack_sha256 = p.sha256.clone();
        self.manifest.device_pack_bytes = p.bytes.len() as u64;
        self.device_pack = Some(p);
        self
    }

    /// The model manifest served at `/v1/model`.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The session table, locked (a poisoned lock is recovered, not propagated).
    pub(crate) fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
