//! # spa-server
//!
//! The cloud half of SPA: an HTTPS (rustls; HTTP/2 and HTTP/1.1) server holding the frozen
//! base model. Devices create a session, then send steps: the absolute position they have
//! accepted up to plus new tokens; the server truncates its KV cache there, appends, drafts K
//! tokens greedily and answers in one response with per-position projected taps, final hidden
//! state, draft token and top-k candidates (docs/protocol.md).
//!
//! Endpoints: `GET /healthz`, `GET /metrics`, `GET /v1/model`, `POST /v1/sessions`,
//! `DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/step`, `POST /v1/sessions/{id}/layer`.

#![warn(missing_docs)]

pub mod auth;
pub mod batch;
pub mod device_pack;
pub mod engine;
pub mod features;
pub mod metrics;
pub mod sessions;
pub mod tls;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use spa_model::{argmax, BaseModel, DownProjection};
use spa_protocol::{
    decode_frame, decode_tensor, encode_f16, encode_frame, CreateSessionRequest,
    CreateSessionResponse, ErrorCode, ErrorFrame, FrameKind, LayerRequest, LayerResponse, Limits,
    Manifest, StepRequest, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use auth::Keys;
pub use engine::{run_step, run_step_with, StepError};
pub use sessions::{Lookup, Session, Sessions};

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
    /// The frozen base.
    pub base: Arc<BaseModel>,
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
    /// Builds the state and the manifest.
    pub fn new(base: Arc<BaseModel>, proj: Arc<DownProjection>, config: ServerConfig) -> Self {
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
            batcher: batch::Batcher::start(base.clone(), 32),
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

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An error answer: HTTP status + typed error frame.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    frame: ErrorFrame,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            frame: ErrorFrame::new(code, msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-protobuf".parse().expect("static header"),
        );
        if self.frame.retry_after_ms > 0 {
            let secs = self.frame.retry_after_ms.div_ceil(1000).to_string();
            if let Ok(v) = secs.parse() {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        (
            self.status,
            headers,
            encode_frame(FrameKind::Error, &self.frame),
        )
            .into_response()
    }
}

fn proto(kind: FrameKind, msg: &impl prost::Message, st: &AppState) -> Response {
    let body = encode_frame(kind, msg);
    st.metrics.bytes_out.fetch_add(body.len() as u64, Relaxed);
    ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

pub(crate) fn auth(st: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    let h = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    st.config.keys.check(h).ok_or_else(|| {
        st.metrics.unauthorized.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or invalid API key",
        )
    })
}

fn bad_frame(e: spa_protocol::ProtocolError) -> ApiError {
    let code = match e {
        spa_protocol::ProtocolError::TooLarge { .. } | spa_protocol::ProtocolError::Limit(_) => {
            ErrorCode::Limit
        }
        _ => ErrorCode::BadRequest,
    };
    let status = if code == ErrorCode::Limit {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, code, e.to_string())
}

fn session(st: &AppState, id: &str, owner: usize) -> Result<Arc<Mutex<Session>>, ApiError> {
    match st.sessions().get(id, owner) {
        Lookup::Found(s) => Ok(s),
        Lookup::Gone => Err(ApiError::new(
            StatusCode::GONE,
            ErrorCode::SessionGone,
            "session was evicted; create a new one and re-prefill",
        )),
        Lookup::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such session",
        )),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_h(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let (n, bytes, ended) = {
        let s = st.sessions();
        (s.len(), s.total_bytes(), s.ended)
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(n, bytes, &ended),
    )
}

async fn model_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth(&st, &headers)?;
    Ok(proto(FrameKind::Manifest, &st.manifest, &st))
}

async fn create_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let req: CreateSessionRequest =
        decode_frame(&body, FrameKind::CreateSessionRequest, &st.config.limits)
            .map_err(bad_frame)?;
    let mut s = st.sessions();
    s.expire_idle();
    // At the key's cap its least-recently-used idle session makes room (its device gets 410
    // and re-prefills). Only when every session of the key is in a step is this overload.
    if !s.make_room(owner, st.config.max_sessions_per_key) {
        drop(s);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Limit,
            "every session of this key is busy; retry later",
        );
        e.frame.retry_after_ms = 1000;
        st.metrics.limited.fetch_add(1, Relaxed);
        return Err(e);
    }
    let id = s.create(
        owner,
        Session {
            cache: st.base.new_cache(),
            mode: req.mode,
            layer_state: None,
        },
    );
    drop(s);
    Ok(proto(
        FrameKind::CreateSessionResponse,
        &CreateSessionResponse { session_id: id },
        &st,
    ))
}

async fn delete_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let owner = auth(&st, &headers)?;
    if st.sessions().delete(&id, owner) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such session",
        ))
    }
}

async fn step_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let counted = |e| {
        let e = bad_frame(e);
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            st.metrics.limited.fetch_add(1, Relaxed);
        }
        e
    };
    let req: StepRequest =
        decode_frame(&body, FrameKind::StepRequest, &st.config.limits).map_err(counted)?;
    req.validate(&st.config.limits).map_err(counted)?;
    let sess = session(&st, &id, owner)?;
    let st2 = st.clone();
    let t0 = Instant::now();
    let (res, bytes) = tokio::task::spawn_blocking(move || {
        let mut s = sess.lock().unwrap_or_else(|p| p.into_inner());
        // Forward passes go through the batching engine, so concurrent sessions share them.
        let lane = if st2.config.batch_lane_per_key {
            owner
        } else {
            0
        };
        let fwd = |t: &[u32], c: &mut spa_model::KvCache| st2.batcher.forward(lane, t, c);
        let r = run_step_with(
            &st2.base,
            &st2.proj,
            &mut s.cache,
            &req,
            st2.config.top_k,
            &fwd,
        )
        .map(|r| (r, req.tokens.len()));
        (r, s.cache.capacity_bytes())
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })?;
    {
        let mut s = st.sessions();
        s.set_bytes(&id, bytes);
        s.evict_to(st.config.kv_budget_bytes, &id);
    }
    st.metrics.observe_step(t0.elapsed().as_micros() as u64);
    match res {
        Ok((resp, n_in)) => {
            st.metrics.rounds.fetch_add(1, Relaxed);
            st.metrics.tokens_in.fetch_add(n_in as u64, Relaxed);
            st.metrics.drafts_out.fetch_add(
                resp.states.iter().filter(|s| s.is_draft).count() as u64,
                Relaxed,
            );
            Ok(proto(FrameKind::StepResponse, &resp, &st))
        }
        Err(StepError::PositionAhead { requested, held }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::PositionAhead,
            format!("position {requested} is ahead of the session ({held} held); re-prefill"),
        )),
        Err(StepError::Model(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        )),
        Err(StepError::Request(e)) => Err(bad_frame(e)),
    }
}

/// Layer-split baseline: the device applies a personal adapter after every layer, so each layer
/// of each token is one round trip. `layer == 0` starts token `token` at `position`.
async fn layer_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let owner = auth(&st, &headers)?;
    st.metrics.bytes_in.fetch_add(body.len() as u64, Relaxed);
    let req: LayerRequest =
        decode_frame(&body, FrameKind::LayerRequest, &st.config.limits).map_err(bad_frame)?;
    let sess = session(&st, &id, owner)?;
    let st2 = st.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<LayerResponse, ApiError> {
        let t0 = Instant::now();
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, m);
        let mut s = sess.lock().unwrap_or_else(|p| p.into_inner());
        let base = &st2.base;
        let n_layers = base.config().n_layers as u32;
        let hidden = base.config().hidden;
        let pos = req.position as usize;
        let mut x: Vec<f32> = if req.layer == 0 {
            if pos > s.cache.len() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::PositionAhead,
                    "position ahead; re-prefill",
                ));
            }
            s.cache.truncate(pos);
            let e = base.embed(&[req.token]).map_err(|e| bad(e.to_string()))?;
            e.flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| bad(e.to_string()))?
        } else {
            match s.layer_state.take() {
                Some((p, l, x)) if p == req.position && l == req.layer => x,
                _ => return Err(bad("layer request out of order".into())),
            }
        };
        if let Some(d) = &req.delta {
            let d = decode_tensor(d, &st2.config.limits).map_err(|e| bad(e.to_string()))?;
            if d.data.len() != hidden {
                return Err(bad(format!(
                    "delta has {} values, expected {hidden}",
                    d.data.len()
                )));
            }
            x.iter_mut().zip(&d.data).for_each(|(a, b)| *a += b);
        }
        let t = candle_tensor(&x, hidden).map_err(|e| bad(e.to_string()))?;
        if req.layer >= n_layers {
            let h = base.final_norm(&t).map_err(|e| bad(e.to_string()))?;
            let logits = base.last_logits(&h).map_err(|e| bad(e.to_string()))?;
            return Ok(LayerResponse {
                activation: None,
                layer: req.layer,
                done: true,
                next_token: argmax(&logits).unwrap_or(0) as u32,
                compute_us: t0.elapsed().as_micros() as u64,
            });
        }
        let y = base
            .layer_forward(req.layer as usize, &t, pos, &mut s.cache)
            .map_err(|e| bad(e.to_string()))?;
        let yv: Vec<f32> = y
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| bad(e.to_string()))?;
        let act = encode_f16(&yv, 1, hidden);
        s.layer_state = Some((req.position, req.layer + 1, yv));
        Ok(LayerResponse {
            activation: Some(act),
            layer: req.layer,
            done: false,
            next_token: 0,
            compute_us: t0.elapsed().as_micros() as u64,
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })??;
    st.metrics.layer_rounds.fetch_add(1, Relaxed);
    Ok(proto(FrameKind::LayerResponse, &res, &st))
}

fn candle_tensor(x: &[f32], hidden: usize) -> spa_model::Result<spa_model::CandleTensor> {
    Ok(spa_model::CandleTensor::from_vec(
        x.to_vec(),
        (1, hidden),
        &spa_model::CandleDevice::Cpu,
    )?)
}

/// The HTTP routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_frame_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_h))
        .route("/v1/model", get(model_h))
        .route("/v1/sessions", post(create_h))
        .route("/v1/sessions/{id}", delete(delete_h))
        .route("/v1/sessions/{id}/step", post(step_h))
        .route("/v1/sessions/{id}/layer", post(layer_h))
        .route("/v1/features", post(features::features_h))
        .route("/v1/device-pack", get(device_pack::device_pack_h))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), body_guard))
        .with_state(state)
}

/// Reads every request body up front, bounded in size (`max_frame_bytes`, 413) and in time
/// (`body_timeout`, 408), so a client trickling its body (slow loris) or sending an endless one
/// holds no handler, session lock or compute. Declared lengths over the limit are refused
/// before anything is read.
async fn body_guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = st.config.limits.max_frame_bytes;
    let too_large = || {
        st.metrics.limited.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Limit,
            format!("request body exceeds {limit} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(st.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            st.metrics.body_timeouts.fetch_add(1, Relaxed);
            log::info!(
                "request body not received within {:?}; closing",
                st.config.body_timeout
            );
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                "request body not received in time",
            )
            .into_response();
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
        Ok(Err(e)) => {
            // Over the limit (chunked bodies have no declared length) or a broken stream.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "request body could not be read",
                )
                .into_response()
            }
        }
        Ok(Ok(bytes)) => {
            let (method, route, len) = (
                parts.method.clone(),
                route_of(parts.uri.path()),
                bytes.len(),
            );
            let t0 = std::time::Instant::now();
            let r = next
                .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await;
            log::info!(
                target: ACCESS_LOG,
                "{method} {route} {} body={len}B {}ms",
                r.status().as_u16(),
                t0.elapsed().as_millis()
            );
            r
        }
    }
}

/// Log target of the access log: one info line per request with a body read, `METHOD ROUTE
/// STATUS body=<bytes>B <ms>ms`, session ids replaced by `{id}` (never keys, ids or content).
/// `spa serve` shows it with `RUST_LOG=spa_server::access=info`.
pub const ACCESS_LOG: &str = "spa_server::access";

/// The route of `path` with session ids redacted (`/v1/sessions/{id}/step`); unknown paths are
/// reported as `other`, so nothing a client chose reaches the log.
fn route_of(path: &str) -> &'static str {
    let seg: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match seg.as_slice() {
        ["", "healthz"] => "/healthz",
        ["", "metrics"] => "/metrics",
        ["", "v1", "model"] => "/v1/model",
        ["", "v1", "features"] => "/v1/features",
        ["", "v1", "device-pack"] => "/v1/device-pack",
        ["", "v1", "sessions"] => "/v1/sessions",
        ["", "v1", "sessions", _] => "/v1/sessions/{id}",
        ["", "v1", "sessions", _, "step"] => "/v1/sessions/{id}/step",
        ["", "v1", "sessions", _, "layer"] => "/v1/sessions/{id}/layer",
        _ => "other",
    }
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Whether it speaks TLS.
    pub tls: bool,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    sweeper: Option<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Base URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stops accepting and closes connections.
    pub async fn shutdown(self) {
        if let Some(s) = &self.sweeper {
            s.abort();
        }
        self.handle.shutdown();
        let _ = self.task.await;
    }
}

/// Starts serving `state` on `addr` (port 0 picks a free port), with TLS when `tls` is given
/// (otherwise plain HTTP, which the CLI only allows with `--insecure-dev`).
pub async fn start(
    state: Arc<AppState>,
    addr: SocketAddr,
    tls: Option<&tls::CertPair>,
) -> Result<RunningServer, String> {
    let (header_timeout, handshake_timeout) =
        (state.config.header_timeout, state.config.handshake_timeout);
    let sweeper = state
        .config
        .session_idle_ttl
        .map(|_| Arc::downgrade(&state));
    let app = router(state);
    let handle = axum_server::Handle::new();
    let h2 = handle.clone();
    let is_tls = tls.is_some();
    let task = match tls {
        Some(pair) => {
            let cfg = axum_server::tls_rustls::RustlsConfig::from_config(tls::server_config(pair)?);
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(cfg)
                .handshake_timeout(handshake_timeout);
            let mut server = axum_server::bind(addr)
                .acceptor(acceptor)
                .first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(async move { server.handle(h2).serve(app.into_make_service()).await })
        }
        None => {
            let mut server = axum_server::bind(addr).first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(async move { server.handle(h2).serve(app.into_make_service()).await })
        }
    };
    let addr = handle
        .listening()
        .await
        .ok_or_else(|| format!("could not listen on {addr}"))?;
    let sweeper = sweeper.map(|st| tokio::spawn(sweep_idle_sessions(st)));
    log::info!(
        "spa-server listening on {addr} ({})",
        if is_tls {
            "https"
        } else {
            "http, insecure dev"
        }
    );
    Ok(RunningServer {
        addr,
        tls: is_tls,
        handle,
        task,
        sweeper,
    })
}

/// Expires idle sessions in the background (a lookup also expires them, so this only frees
/// memory of sessions nobody asks about), every quarter TTL and at most a second apart.
async fn sweep_idle_sessions(state: std::sync::Weak<AppState>) {
    let period = state
        .upgrade()
        .and_then(|s| s.config.session_idle_ttl)
        .map_or(Duration::from_secs(1), |t| {
            (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(st) = state.upgrade() else { return };
        let n = st.sessions().expire_idle();
        if n > 0 {
            log::info!("expired {n} idle sessions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn access_log_routes_redact_ids_and_unknown_paths() {
        assert_eq!(route_of("/v1/features"), "/v1/features");
        assert_eq!(route_of("/v1/sessions"), "/v1/sessions");
        assert_eq!(
            route_of("/v1/sessions/3f9a1c/step"),
            "/v1/sessions/{id}/step"
        );
        assert_eq!(
            route_of("/v1/sessions/3f9a1c/layer"),
            "/v1/sessions/{id}/layer"
        );
        assert_eq!(route_of("/v1/sessions/3f9a1c"), "/v1/sessions/{id}");
        assert_eq!(route_of("/v1/model/"), "/v1/model");
        assert_eq!(route_of("/secret-user-text"), "other");
        assert_eq!(route_of("/v1/sessions/a/b/c"), "other");
    }
}
