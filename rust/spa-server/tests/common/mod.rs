//! Shared harness of the spa-server integration tests: the real SmolLM2 base, a real HTTPS
//! server on loopback with a dev certificate, a reqwest client trusting it, and frame helpers.
#![allow(dead_code)]

use spa_model::{BaseModel, DownProjection};
use spa_protocol::{decode_frame, encode_frame, ErrorFrame, FrameKind, Limits, StepRequest};
use spa_server::{tls, AppState, Keys, RunningServer, ServerConfig};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const KEY: &str = "sk-test-alpha-7f3e9c1d";
pub const OTHER_KEY: &str = "sk-test-beta-2a8b4c6e";

pub struct World {
    pub base: Arc<BaseModel>,
    pub proj: Arc<DownProjection>,
    pub cert: tls::CertPair,
}

pub fn model_path() -> PathBuf {
    let p = std::env::var("SPA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| spa_model::paths::model_file(spa_model::paths::MODEL_FILE));
    assert!(
        p.exists(),
        "model not found at {}: run scripts/fetch-assets.sh model",
        p.display()
    );
    p
}

pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let base = Arc::new(BaseModel::load(model_path()).expect("load base"));
        let taps: Vec<usize> = (0..base.config().n_layers).collect();
        let proj = Arc::new(DownProjection::random(&base, 64, &taps, 11).unwrap());
        World {
            base,
            proj,
            cert: tls::dev_cert().unwrap(),
        }
    })
}

pub fn config() -> ServerConfig {
    ServerConfig {
        keys: Keys::new(&[KEY, OTHER_KEY]),
        ..ServerConfig::default()
    }
}

/// The base engine the servers of these tests run: `$SPA_ENGINE` (`candle`, the default, or
/// `llamacpp` in a build with `--features llamacpp`), one instance per test process.
pub fn engine() -> Arc<dyn spa_server::BaseEngine> {
    static E: OnceLock<Arc<dyn spa_server::BaseEngine>> = OnceLock::new();
    E.get_or_init(|| {
        // 512 MiB of KV cache for every server of the process (the llama.cpp engine allocates
        // it up front).
        spa_server::engine_from_env(&world().base, 512 << 20).expect("SPA_ENGINE")
    })
    .clone()
}

/// Bytes a session of [`engine`] holds after `positions` positions: the unit of these tests' KV
/// budgets, since the engines count differently (candle: f32 K and V grown in steps of at least
/// 64 positions; llama.cpp: f16 K and V per position).
pub fn session_bytes(positions: usize) -> usize {
    let e = engine();
    let mut s = e.new_sequence().expect("a sequence");
    let tokens = vec![1u32; positions];
    e.forward_batch(&mut [(tokens.as_slice(), s.as_mut())])
        .expect("forward");
    s.capacity_bytes()
}

/// Starts a server over TLS (or plain HTTP when `tls` is false) on [`engine`].
pub async fn start(cfg: ServerConfig, tls: bool) -> (RunningServer, Arc<AppState>) {
    let w = world();
    let state = Arc::new(AppState::with_engine(
        w.base.clone(),
        w.proj.clone(),
        engine(),
        cfg,
    ));
    let srv = spa_server::start(
        state.clone(),
        "127.0.0.1:0".parse().unwrap(),
        tls.then_some(&w.cert),
    )
    .await
    .unwrap();
    (srv, state)
}

pub fn rustls_client_config() -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(world().cert.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A reqwest client trusting the dev certificate.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls_client_config())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub fn text(text: &str) -> Vec<u32> {
    world().base.tokenizer().encode(text).unwrap()
}

pub fn step_body(position: u64, tokens: Vec<u32>, draft: u32) -> Vec<u8> {
    encode_frame(
        FrameKind::StepRequest,
        &StepRequest {
            position,
            tokens,
            draft,
            ..Default::default()
        },
    )
}

/// POST /v1/sessions with `key`; returns the status and, on success, the session id.
pub async fn create(http: &reqwest::Client, url: &str, key: &str) -> (u16, Option<String>) {
    let body = encode_frame(
        FrameKind::CreateSessionRequest,
        &spa_protocol::CreateSessionRequest { mode: 0 },
    );
    let r = http
        .post(format!("{url}/v1/sessions"))
        .bearer_auth(key)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let b = r.bytes().await.unwrap();
    let id = (status == 200).then(|| {
        decode_frame::<spa_protocol::CreateSessionResponse>(
            &b,
            FrameKind::CreateSessionResponse,
            &Limits::default(),
        )
        .unwrap()
        .session_id
    });
    (status, id)
}

/// Decodes an error body.
pub fn error_frame(b: &[u8]) -> ErrorFrame {
    decode_frame(b, FrameKind::Error, &Limits::default()).expect("typed error frame")
}
