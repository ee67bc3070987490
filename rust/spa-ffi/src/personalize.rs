//! On-device personalization: trains the personal side network on the user's texts (base
//! features come from the server; weights, gradients and loss stay on the device) and keeps the
//! weights in app storage.

use crate::client::SpaClient;
use crate::error::{Result, SpaMobileError};
use crate::{call, runtime};
use spa_model::{DeviceAssets, SidePlugin};
use spa_runtime::Client;
use spa_train::features::{SeqFeatures, SeqSpec};
use spa_train::personalize::{
    from_wire, personalize, remote_window_features, FeatureSource, NextWordMetrics,
    PersonalizeConfig, UserTexts, WireTensor,
};
use spa_train::TrainError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// File name of the personal weights inside the storage directory.
pub const WEIGHTS_FILE: &str = "personal.safetensors";

/// Settings of a personalization run.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PersonalizeOptions {
    /// Training steps (more: better fit, longer run).
    #[uniffi(default = 200)]
    pub steps: u32,
    /// Most training sequences of 64 tokens used (bounds time and memory).
    #[uniffi(default = 400)]
    pub max_chunks: u32,
    /// Seed (same texts and seed: same weights).
    #[uniffi(default = 0)]
    pub seed: u64,
}

/// Progress of a run, reported after each training step.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TrainProgress {
    /// Steps done.
    pub step: u32,
    /// Step budget (training may stop earlier when validation stops improving).
    pub max_steps: u32,
    /// Training loss of this step.
    pub loss: f64,
    /// Latest validation loss.
    pub val_loss: Option<f64>,
}

/// Next-word suggestion quality on the held-out texts.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct NextWordQuality {
    /// Words evaluated.
    pub words: u32,
    /// The actual next word is the first suggestion (%).
    pub top1: f64,
    /// The actual next word is among the first three suggestions (%).
    pub top3: f64,
    /// Keystrokes saved by tapping suggestions (%).
    pub keystroke_savings: f64,
    /// Perplexity over the whole vocabulary.
    pub perplexity: f64,
    /// Positions where the personal side path was used (%).
    pub side_usage: f64,
}

impl From<&NextWordMetrics> for NextWordQuality {
    fn from(m: &NextWordMetrics) -> Self {
        Self {
            words: m.words as u32,
            top1: m.top1,
            top3: m.top3,
            keystroke_savings: m.keystroke_savings,
            perplexity: m.perplexity,
            side_usage: m.side_usage,
        }
    }
}

/// What a personalization run did.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PersonalizationReport {
    /// The base alone on the held-out texts.
    pub before: NextWordQuality,
    /// With the new personal weights.
    pub after: NextWordQuality,
    /// Steps trained.
    pub steps: u32,
    /// Training tokens used.
    pub train_tokens: u32,
    /// Where the weights were saved (pass it as `SpaConfig.personal_weights_path`).
    pub weights_path: String,
}

/// Receives a personalization run's progress (on a library thread). Throwing stops the run with
/// `SpaMobileError::Callback`; nothing is saved then.
#[uniffi::export(callback_interface)]
pub trait PersonalizeListener: Send + Sync {
    /// After each training step.
    fn on_progress(&self, progress: TrainProgress) -> Result<()>;
}

impl From<TrainError> for SpaMobileError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Model(e) => e.into(),
            TrainError::Runtime(e) => e.into(),
            TrainError::Cancelled => SpaMobileError::Cancelled,
            TrainError::Data(m) | TrainError::Config(m) => {
                SpaMobileError::InvalidConfig { reason: m }
            }
            TrainError::Tensor(m) => SpaMobileError::Model { reason: m },
            e @ (TrainError::Cache { .. } | TrainError::Io { .. }) => SpaMobileError::Storage {
                reason: e.to_string(),
            },
        }
    }
}

/// Trains personal weights and manages them in an app-storage directory. One run at a time.
#[derive(Debug, uniffi::Object)]
pub struct Personalizer {
    client: Client,
    model_path: String,
    start: Arc<SidePlugin>,
    n_taps: usize,
    width: usize,
    dir: PathBuf,
    cancel: Arc<AtomicBool>,
    running: tokio::sync::Mutex<()>,
}

impl SpaClient {
    pub(crate) fn new_personalizer(&self, dir: PathBuf) -> Personalizer {
        Personalizer {
            client: self.client.clone(),
            model_path: self.model_path.clone(),
            start: self.plugin.clone(),
            n_taps: self.n_taps,
            width: self.manifest.side_width as usize,
            dir,
            cancel: Arc::new(AtomicBool::new(false)),
            running: tokio::sync::Mutex::new(()),
        }
    }
}

/// Base features from the server (`POST /v1/features`), keeping its errors typed.
struct ServerFeatures<'a> {
    client: &'a Client,
    n_taps: usize,
    width: usize,
}

impl FeatureSource for ServerFeatures<'_> {
    fn features(&mut self, specs: &[SeqSpec], top_k: usize) -> spa_train::Result<Vec<SeqFeatures>> {
        specs
            .iter()
            .map(|s| {
                let resp = runtime()
                    .handle()
                    .block_on(self.client.features(&s.tokens, top_k as u32))
                    .map_err(TrainError::Runtime)?;
                from_wire(&s.tokens, &resp, self.n_taps, self.width, top_k)
            })
            .collect()
    }

    fn window(
        &mut self,
        tokens: &[u32],
        hidden_positions: &[u32],
        with_taps: bool,
    ) -> spa_train::Result<(Option<WireTensor>, WireTensor)> {
        remote_window_features(
            self.client,
            runtime().handle(),
            tokens,
            hidden_positions,
            with_taps,
        )
    }
}

/// Writes `plugin` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over the target (a crash leaves the old weights or the new ones, never a mix).
fn save_atomic(plugin: &SidePlugin, path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| SpaMobileError::storage("creating the storage directory", &e))?;
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp-{}", std::process::id()));
    plugin.save(&tmp)?;
    let synced = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    if let Err(e) = synced.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SpaMobileError::storage("writing the personal weights", &e));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

struct CancelOnDrop(Arc<AtomicBool>);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[uniffi::export]
impl Personalizer {
    /// Trains the personal side network on `texts` (the user's writing, at least ~300 tokens)
    /// starting from the client's current weights, measures next-word quality on `held_out`
    /// before and after, and saves the weights atomically to [`Personalizer::weights_path`].
    /// Cancel with [`Personalizer::cancel`] or by cancelling the calling coroutine/task (nothing
    /// is saved then). The texts never leave the device except as token ids sent to the base
    /// server, as when they are typed.
    pub async fn train(
        &self,
        texts: Vec<String>,
        held_out: Vec<String>,
        options: PersonalizeOptions,
        listener: Box<dyn PersonalizeListener>,
    ) -> Result<PersonalizationReport> {
        let _one = self.running.lock().await;
        self.cancel.store(false, Ordering::Relaxed);
        let _guard = CancelOnDrop(self.cancel.clone());
        let client = self.client.clone();
        let model_path = self.model_path.clone();
        let start = self.start.clone();
        let (n_taps, width) = (self.n_taps, self.width);
        let path = self.dir.join(WEIGHTS_FILE);
        let cancel = self.cancel.clone();
        let task = runtime().spawn_blocking(move || -> Result<PersonalizationReport> {
            let assets = DeviceAssets::load(&model_path)?;
            let mut plugin = (*start).clone();
            let mut src = ServerFeatures {
                client: &client,
                n_taps,
                width,
            };
            let cfg = PersonalizeConfig {
                steps: options.steps.max(1) as usize,
                max_chunks: options.max_chunks.max(4) as usize,
                seed: options.seed,
                // The SDK does not ship the word cache yet: building and scoring it would only
                // cost the user time.
                word_cache: false,
                ..Default::default()
            };
            let mut callback_error = None;
            let r = personalize(
                &mut plugin,
                &assets.head,
                &assets.tokenizer,
                &mut src,
                &UserTexts {
                    train: texts,
                    held_out,
                },
                &cfg,
                &mut |p| {
                    if cancel.load(Ordering::Relaxed) {
                        return false;
                    }
                    let tp = TrainProgress {
                        step: p.step as u32,
                        max_steps: p.max_steps as u32,
                        loss: p.loss,
                        val_loss: p.val_loss,
                    };
                    match call(|| listener.on_progress(tp)) {
                        Ok(()) => true,
                        Err(e) => {
                            callback_error = Some(e);
                            false
                        }
                    }
                },
            );
            if let Some(e) = callback_error {
                return Err(e);
            }
            let report = r?;
            if cancel.load(Ordering::Relaxed) {
                return Err(SpaMobileError::Cancelled);
            }
            save_atomic(&plugin, &path)?;
            Ok(PersonalizationReport {
                before: (&report.before).into(),
                after: (&report.after).into(),
                steps: report.train.steps as u32,
                train_tokens: report.train_tokens as u32,
                weights_path: path.to_string_lossy().into_owned(),
            })
        });
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => Err(SpaMobileError::Internal {
                reason: "personalization panicked".into(),
            }),
            Err(_) => Err(SpaMobileError::Cancelled),
        }
    }

    /// Stops a running [`Personalizer::train`] (it ends with `Cancelled`, nothing is saved).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Where the personal weights are kept (`<storage dir>/personal.safetensors`).
    pub fn weights_path(&self) -> String {
        self.dir.join(WEIGHTS_FILE).to_string_lossy().into_owned()
    }

    /// Whether personal weights are saved.
    pub fn has_saved_weights(&self) -> bool {
        self.dir.join(WEIGHTS_FILE).is_file()
    }

    /// Deletes the saved personal weights (no error when there are none). Clients connected
    /// with them keep them until they are closed.
    pub fn delete_weights(&self) -> Result<()> {
        match std::fs::remove_file(self.dir.join(WEIGHTS_FILE)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SpaMobileError::storage("deleting the personal weights", &e)),
        }
    }
}
