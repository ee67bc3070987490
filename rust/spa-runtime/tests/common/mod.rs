//! Test harness: the real SmolLM2 base, a real HTTPS server on loopback with a dev certificate,
//! and a device model with a random (non-trivial) side network.
#![allow(dead_code)]

use spa_model::{
    BaseModel, DeviceHead, DownProjection, GateMode, PersonalVocab, QuantMode, SideNetwork,
    SidePlugin,
};
use spa_runtime::{Client, ClientConfig, DeviceModel};
use spa_server::{tls, AppState, Keys, RunningServer, ServerConfig};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub const KEY: &str = "test-key-1";
pub const OTHER_KEY: &str = "test-key-2";

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

pub struct World {
    pub base: Arc<BaseModel>,
    pub proj: Arc<DownProjection>,
    pub plugin: SidePlugin,
    pub cert: tls::CertPair,
}

pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let base = Arc::new(BaseModel::load(model_path()).expect("load base"));
        let taps: Vec<usize> = (0..base.config().n_layers).collect();
        let proj = Arc::new(DownProjection::random(&base, 64, &taps, 11).unwrap());
        let mut plugin = SidePlugin::init(&base, &proj, 5, 2.0).unwrap();
        // A gate that picks the side path at some positions and not others.
        let g = plugin.weights.tensors.get_mut("gate.weight").unwrap();
        for (i, v) in g.data.iter_mut().enumerate() {
            *v = ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 3.0;
        }
        World {
            base,
            proj,
            plugin,
            cert: tls::dev_cert().unwrap(),
        }
    })
}

pub fn device(gate: GateMode, personal_from: &[u32]) -> DeviceModel {
    let w = world();
    DeviceModel {
        side: SideNetwork::new(&w.plugin.weights, QuantMode::Q8, w.base.max_positions()).unwrap(),
        head: DeviceHead::from_base(&w.base, QuantMode::Q8).unwrap(),
        personal: PersonalVocab::from_tokens([personal_from], 32),
        gate,
        tokenizer: w.base.tokenizer().clone(),
        base_identity: w.base.identity().to_string(),
        projection: w.proj.fingerprint().to_string(),
    }
}

pub fn server_config() -> ServerConfig {
    ServerConfig {
        keys: Keys::new(&[KEY, OTHER_KEY]),
        ..ServerConfig::default()
    }
}

/// The base engine the servers of these tests run: `$SPA_ENGINE` (`candle`, the default, or
/// `llamacpp` when built with `--features spa-server/llamacpp`), one instance per process.
pub fn engine() -> Arc<dyn spa_server::BaseEngine> {
    static E: OnceLock<Arc<dyn spa_server::BaseEngine>> = OnceLock::new();
    E.get_or_init(|| {
        // 512 MiB of KV cache for every server of the process (the llama.cpp engine allocates
        // it up front).
        spa_server::engine_from_env(&world().base, 512 << 20).expect("SPA_ENGINE")
    })
    .clone()
}

/// The local reference on the servers' engine ([`engine`]): plain token-by-token SPA decoding
/// whose base forward passes run on a sequence of that engine, so that rounds through a server
/// on llama.cpp are compared with llama.cpp's numerics, and rounds on candle with candle's (the
/// same as `spa_runtime::reference::generate_local_with` over the in-process base).
pub fn local(
    dev: &DeviceModel,
    prompt: &[u32],
    max_tokens: usize,
    bits: spa_runtime::TapBits,
) -> Vec<u32> {
    let w = world();
    let e = engine();
    let mut seq = e.new_sequence().unwrap();
    let forward = |tokens: &[u32]| -> spa_model::Result<(spa_model::BaseOutput, Vec<f32>)> {
        let mut o = e.forward(tokens, &mut *seq)?;
        let logits = o.take_last_logits(&w.base)?;
        Ok((o.base, logits))
    };
    spa_runtime::reference::generate_local_on(
        forward,
        &w.proj,
        dev,
        prompt,
        max_tokens,
        32,
        &[],
        bits,
    )
    .unwrap()
}

/// A server state over the test world on [`engine`].
pub fn state(cfg: ServerConfig) -> AppState {
    let w = world();
    AppState::with_engine(w.base.clone(), w.proj.clone(), engine(), cfg)
}

pub async fn start_server(cfg: ServerConfig) -> (RunningServer, Arc<AppState>) {
    let w = world();
    let state = Arc::new(state(cfg));
    let srv = spa_server::start(state.clone(), "127.0.0.1:0".parse().unwrap(), Some(&w.cert))
        .await
        .unwrap();
    (srv, state)
}

pub fn client(url: &str, key: &str) -> Client {
    let mut c = ClientConfig::new(url, key);
    c.extra_root_pem = Some(world().cert.cert_pem.clone());
    Client::new(c).unwrap()
}
