//! Client, conversation and generation objects: newtypes over `spa_runtime`'s types.

use crate::config::{
    ChatMessage, GenerateParams, GenerationStats, ModelManifest, Reply, Role, Suggestions,
};
use crate::error::{Result, SpaMobileError};
use crate::personalize::Personalizer;
use crate::{call, configure_threads, run_task, runtime, SpaConfig};
use spa_model::{DeviceAssets, GateMode, PersonalVocab, SidePlugin};
use spa_runtime::{Client, ClientConfig, DeviceModel, Mode, SpaSession, Suggester, WordCache};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Receives a generation's output. Methods are called on a library thread, in order:
/// `on_token` for each piece of text, then exactly one of `on_done` or `on_error`.
///
/// If `on_token` throws, the generation stops and ends with `SpaMobileError::Callback`
/// (`on_error` is then called with it). Exceptions thrown by `on_done` or `on_error` are
/// logged and ignored. Nothing thrown here can crash the process.
#[uniffi::export(callback_interface)]
pub trait GenerationListener: Send + Sync {
    /// New text (one or more tokens once they form complete characters).
    fn on_token(&self, text: String) -> Result<()>;
    /// The generation finished.
    fn on_done(&self, stats: GenerationStats) -> Result<()>;
    /// The generation failed or was cancelled.
    fn on_error(&self, error: SpaMobileError) -> Result<()>;
}

/// Receives the progress of the device pack's download during `connect_with_progress` (on a
/// library thread). Throwing stops the connect with `SpaMobileError::Callback`; the bytes
/// already downloaded are kept and the next connect resumes from them.
#[uniffi::export(callback_interface)]
pub trait ConnectListener: Send + Sync {
    /// `done` of `total` bytes of the device pack are on the device (called once with
    /// `done == total` when the pack was already there).
    fn on_download(&self, done: u64, total: u64) -> Result<()>;
}

/// Connects to the server: fetches its manifest, loads the device half (tokenizer and LM head
/// from the device pack, downloaded once into `device_pack_dir`, or from the base GGUF at
/// `model_path`; personal side weights or an untrained side network for this server) and
/// checks that both sides match.
#[uniffi::export]
pub async fn connect(config: SpaConfig) -> Result<Arc<SpaClient>> {
    run_task(async move { SpaClient::connect(config, None).await.map(Arc::new) }).await
}

/// [`connect`], reporting the device pack's download to `listener`.
#[uniffi::export]
pub async fn connect_with_progress(
    config: SpaConfig,
    listener: Box<dyn ConnectListener>,
) -> Result<Arc<SpaClient>> {
    run_task(async move {
        SpaClient::connect(config, Some(listener))
            .await
            .map(Arc::new)
    })
    .await
}

/// A connection to one base server plus the device model. Cheap to share between
/// conversations.
#[derive(Debug, uniffi::Object)]
pub struct SpaClient {
    pub(crate) client: Client,
    pub(crate) device: Arc<DeviceModel>,
    /// The suggestion strip (keeps the last context's ranking: typed letters re-rank without a
    /// request).
    suggester: Arc<Suggester>,
    pub(crate) manifest: ModelManifest,
    /// The side weights the device model was built from (start of personalization).
    pub(crate) plugin: Arc<SidePlugin>,
    pub(crate) n_taps: usize,
    personalized: bool,
}

impl SpaClient {
    async fn connect(
        config: SpaConfig,
        listener: Option<Box<dyn ConnectListener>>,
    ) -> Result<Self> {
        configure_threads(config.threads);
        if config.max_attempts == 0 {
            return Err(SpaMobileError::InvalidConfig {
                reason: "max_attempts must be >= 1".into(),
            });
        }
        let mut cc = ClientConfig::new(&config.server_url, &config.api_key);
        cc.extra_root_pem = config.ca_cert_pem.clone();
        cc.timeout = Duration::from_millis(config.timeout_ms.max(1));
        cc.max_attempts = config.max_attempts;
        let client = Client::new(cc)?;
        let m = client.manifest().await?;
        let manifest = ModelManifest {
            protocol_version: m.protocol_version,
            base_identity: m.base_identity.clone(),
            layers: m.layers,
            hidden: m.hidden,
            side_width: m.side_width,
            projection_fingerprint: m.projection_fingerprint.clone(),
            vocab: m.vocab,
            context: m.context,
            max_draft: m.max_draft,
        };
        let source = match (&config.model_path, &config.device_pack_dir) {
            (Some(p), _) => BaseSource::Gguf(p.clone()),
            (None, Some(dir)) => {
                let mut failed = None;
                let mut reported: Option<u64> = None;
                let r = client
                    .device_pack(&m, Path::new(dir), &mut |done, total| {
                        // At most ~200 calls: every 0.5% of the pack, and the last byte.
                        let step = (total / 200).max(1);
                        let due = reported.is_none_or(|r| done >= r + step || done == total);
                        if due && reported != Some(done) && failed.is_none() {
                            reported = Some(done);
                            if let Some(l) = &listener {
                                if let Err(e) = call(|| l.on_download(done, total)) {
                                    failed = Some(e);
                                }
                            }
                        }
                    })
                    .await;
                if let Some(e) = failed {
                    return Err(e);
                }
                BaseSource::Pack(r?)
            }
            (None, None) => {
                return Err(SpaMobileError::InvalidConfig {
                    reason: "set model_path (a bundled base GGUF) or device_pack_dir (where the \
                             server's device pack is kept)"
                        .into(),
                })
            }
        };
        let cfg = config.clone();
        let pm = m.clone();
        let n_taps = m.taps.len();
        let (device, plugin, personalized) =
            tokio::task::spawn_blocking(move || load_device(&cfg, &source, &pm))
                .await
                .map_err(|_| SpaMobileError::Internal {
                    reason: "loading the device model panicked".into(),
                })??;
        device.check_manifest(&m)?;
        log::info!(
            "connected: side width {} over {} taps",
            device.side.config().width,
            device.side.config().taps.len()
        );
        let suggester = Arc::new(Suggester::new(&device));
        let device = Arc::new(device);
        if let Some(path) = config.personal_words_path.clone() {
            let (s, d) = (suggester.clone(), device.clone());
            tokio::task::spawn_blocking(move || load_words(&s, &d, Path::new(&path)))
                .await
                .map_err(|_| SpaMobileError::Internal {
                    reason: "loading the word cache panicked".into(),
                })??;
        }
        Ok(Self {
            client,
            suggester,
            device,
            manifest,
            plugin: Arc::new(plugin),
            n_taps,
            personalized,
        })
    }
}

/// Loads the user's word cache into the strip (a missing file: none, as for the weights).
fn load_words(suggester: &Suggester, device: &DeviceModel, path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let cache = WordCache::load(path, suggester.vocab(), &device.tokenizer)?;
    log::info!("word cache: {} distinct words", cache.len());
    suggester.set_cache(Some(Arc::new(cache)));
    Ok(())
}

/// Where the device's tokenizer and head come from.
enum BaseSource {
    /// A base GGUF on the device.
    Gguf(String),
    /// A downloaded device pack (verified by its sha256 when it was fetched or found).
    Pack(std::path::PathBuf),
}

fn load_device(
    cfg: &SpaConfig,
    source: &BaseSource,
    m: &spa_runtime::Manifest,
) -> Result<(DeviceModel, SidePlugin, bool)> {
    let (plugin, personalized) = match cfg.personal_weights_path.as_deref().map(Path::new) {
        Some(p) if p.is_file() => (SidePlugin::load(p)?, true),
        _ => (spa_runtime::untrained_plugin(m)?, false),
    };
    let device = match source {
        BaseSource::Gguf(path) => DeviceModel::new(
            &DeviceAssets::load(path)?,
            &plugin,
            cfg.quantization.into(),
            GateMode::Learned,
            PersonalVocab::default(),
        )?,
        BaseSource::Pack(path) => DeviceModel::from_pack_file(
            path,
            m,
            &plugin,
            cfg.quantization.into(),
            GateMode::Learned,
            PersonalVocab::default(),
        )?,
    };
    Ok((device, plugin, personalized))
}

#[uniffi::export]
impl SpaClient {
    /// The server's manifest.
    pub fn manifest(&self) -> ModelManifest {
        self.manifest.clone()
    }

    /// Whether the device runs personal weights (`personal_weights_path` was loaded).
    pub fn is_personalized(&self) -> bool {
        self.personalized
    }

    /// Whether the suggestion strip uses the user's word cache (`personal_words_path` was
    /// loaded).
    pub fn uses_personal_words(&self) -> bool {
        self.suggester.cache().is_some()
    }

    /// Personalization with its weights kept in `storage_dir` (an app-private directory).
    pub fn personalizer(&self, storage_dir: String) -> Arc<Personalizer> {
        Arc::new(self.new_personalizer(storage_dir.into()))
    }

    /// Up to `count` next-word suggestions for `text`, the text before the cursor (a keyboard's
    /// suggestion strip). When `text` ends inside a word, the suggestions complete it. One
    /// stateless request to the server per context (the base's final hidden state for the
    /// context's token ids, up to 256 of them); the LM head scores the whole vocabulary here,
    /// with the personal side network and gate. Typing letters of a word re-ranks the last
    /// context's words without a request. Words of two tokens are suggested from the base's
    /// continuations (the server extends the context by its 8 most likely word starts), longer
    /// ones from the user's word cache.
    pub async fn suggest(&self, text: String, count: u32) -> Result<Suggestions> {
        if count == 0 || count > 16 {
            return Err(SpaMobileError::InvalidConfig {
                reason: "count must be in 1..=16".into(),
            });
        }
        let client = self.client.clone();
        let device = self.device.clone();
        let suggester = self.suggester.clone();
        run_task(async move {
            let s = suggester
                .suggest(&client, &device, &text, count as usize)
                .await?;
            Ok(Suggestions {
                words: s.words,
                partial: s.partial,
                personal: s.side,
            })
        })
        .await
    }

    /// A new, empty conversation. Dropping it (Kotlin `close()` or garbage collection, Swift
    /// release) deletes its server session in the background, best effort; the drop never
    /// blocks or fails, and the server's idle expiry ends a session whose delete was lost.
    pub fn conversation(&self) -> Arc<Conversation> {
        // The session's drop deletes on the library runtime, whatever thread drops it.
        let _rt = runtime().enter();
        Arc::new(Conversation {
            device: self.device.clone(),
            session: Arc::new(tokio::sync::Mutex::new(SpaSession::new(
                self.client.clone(),
                self.device.clone(),
                Mode::Spa,
            ))),
            messages: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

/// A multi-turn chat with the server (history kept on both sides). One generation runs at a
/// time; a second one waits for the first.
#[derive(Debug, uniffi::Object)]
pub struct Conversation {
    device: Arc<DeviceModel>,
    session: Arc<tokio::sync::Mutex<SpaSession>>,
    messages: Arc<Mutex<Vec<ChatMessage>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[uniffi::export]
impl Conversation {
    /// Sends `prompt` and generates the answer, streaming text to `listener`. Dropping the
    /// returned handle (Kotlin `close()`, Swift release) cancels the generation.
    pub fn start(
        &self,
        prompt: String,
        params: GenerateParams,
        listener: Box<dyn GenerationListener>,
    ) -> Arc<Generation> {
        let cancel = Arc::new(AtomicBool::new(false));
        let device = self.device.clone();
        let session = self.session.clone();
        let messages = self.messages.clone();
        let flag = cancel.clone();
        let task = runtime().spawn(async move {
            let r = generate(
                &device, &session, &messages, &prompt, &params, &*listener, &flag,
            )
            .await;
            let notified = match &r {
                Ok(reply) => call(|| listener.on_done(reply.stats.clone())),
                Err(e) => call(|| listener.on_error(e.clone())),
            };
            if notified.is_err() {
                log::warn!("a final listener callback failed (ignored)");
            }
            r
        });
        Arc::new(Generation {
            cancel,
            state: tokio::sync::Mutex::new(State {
                task: Some(task),
                result: None,
            }),
        })
    }

    /// [`Conversation::start`] + [`Generation::finish`]: the answer once complete. Cancelling
    /// the calling coroutine / task cancels the generation.
    pub async fn generate(
        &self,
        prompt: String,
        params: GenerateParams,
        listener: Box<dyn GenerationListener>,
    ) -> Result<Reply> {
        // Dropped with this future: cancels the generation if the caller gives up.
        let g = self.start(prompt, params, listener);
        g.finish().await
    }

    /// The messages so far (failed or cancelled turns are not part of it).
    pub fn history(&self) -> Vec<ChatMessage> {
        lock(&self.messages).clone()
    }

    /// Forgets the conversation (waits for a running generation to end first).
    pub async fn reset(&self) {
        let session = self.session.clone();
        let messages = self.messages.clone();
        let _ = run_task(async move {
            session.lock().await.reset().await;
            lock(&messages).clear();
            Ok(())
        })
        .await;
    }
}

async fn generate(
    device: &DeviceModel,
    session: &tokio::sync::Mutex<SpaSession>,
    messages: &Mutex<Vec<ChatMessage>>,
    prompt: &str,
    params: &GenerateParams,
    listener: &dyn GenerationListener,
    cancel: &Arc<AtomicBool>,
) -> Result<Reply> {
    if params.draft_k == 0 || params.draft_k > 64 {
        return Err(SpaMobileError::InvalidConfig {
            reason: "draft_k must be in 1..=64".into(),
        });
    }
    let mut session = session.lock().await;
    let tok = &device.tokenizer;
    let first = session.history().is_empty();
    let turn = tok.chat_turn(prompt, first);
    let ids = if first {
        tok.encode(&turn)?
    } else {
        tok.encode_fragment(&turn)?
    };
    let mut stream = tok.stream();
    let mut callback_error = None;
    let rp = params.runtime(tok.eos_ids());
    let r = session
        .generate(&ids, &rp, Some(cancel.clone()), |t| {
            // After a cancel, stay quiet: the runtime stops at the end of this round.
            if cancel.load(Ordering::Relaxed) {
                return true;
            }
            match stream.push(t) {
                Ok(text) if text.is_empty() => {}
                Ok(text) => {
                    if let Err(e) = call(|| listener.on_token(text)) {
                        callback_error = Some(e);
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => log::warn!("undecodable token skipped: {e}"),
            }
            true
        })
        .await;
    if let Some(e) = callback_error {
        return Err(e);
    }
    let (tokens, stats) = r?;
    let text = tok.decode(&tokens)?;
    let mut m = lock(messages);
    m.push(ChatMessage {
        role: Role::User,
        text: prompt.to_string(),
    });
    m.push(ChatMessage {
        role: Role::Assistant,
        text: text.clone(),
    });
    Ok(Reply {
        text,
        stats: (&stats).into(),
    })
}

#[derive(Default)]
struct State {
    task: Option<tokio::task::JoinHandle<Result<Reply>>>,
    result: Option<Result<Reply>>,
}

/// A running generation. Dropping it cancels the generation.
#[derive(uniffi::Object)]
pub struct Generation {
    cancel: Arc<AtomicBool>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("cancelled", &self.cancel.load(Ordering::Relaxed))
            .finish()
    }
}

#[uniffi::export]
impl Generation {
    /// Asks the generation to stop: token delivery stops at once (at most a call already in
    /// flight completes) and the generation ends with `SpaMobileError::Cancelled` at the end of
    /// the current round; the turn is not added to the history.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the end: the reply, or the error `on_error` received. May be called again
    /// (same answer).
    pub async fn finish(&self) -> Result<Reply> {
        let mut st = self.state.lock().await;
        if let Some(task) = st.task.as_mut() {
            let r = match task.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(SpaMobileError::Internal {
                    reason: "generation panicked".into(),
                }),
                Err(_) => Err(SpaMobileError::Cancelled),
            };
            st.task = None;
            st.result = Some(r);
        }
        st.result.clone().unwrap_or(Err(SpaMobileError::Cancelled))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
