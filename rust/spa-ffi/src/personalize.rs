//! On-device personalization: trains the personal side network on the user's texts (base
//! features come from the server; weights, gradients and loss stay on the device) and keeps the
//! weights in app storage.

use crate::client::SpaClient;
use crate::error::{Result, SpaMobileError};
use crate::{call, runtime};
use spa_model::SidePlugin;
use spa_runtime::{Client, DeviceModel};
use spa_train::personalize::{
    personalize, NextWordMetrics, PersonalizeConfig, RemoteFeatures, ShipDecision, UserTexts,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// File name of the personal weights inside the storage directory.
pub const WEIGHTS_FILE: &str = "personal.safetensors";
/// File name of the personal word cache inside the storage directory.
pub const WORDS_FILE: &str = "personal-words.txt";

/// Settings of a personalization run.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct PersonalizeOptions {
    /// Training steps (more: better fit, longer run; >= 1).
    #[uniffi(default = 200)]
    pub steps: u32,
    /// Most training sequences of 64 tokens used (bounds time and memory; >= 4).
    #[uniffi(default = 400)]
    pub max_chunks: u32,
    /// Seed (same texts and seed: same weights).
    #[uniffi(default = 0)]
    pub seed: u64,
    /// Also learn the personal word cache (the user's words and word pairs, interpolated with
    /// the model's suggestions) and consider it, alone and with the side network.
    #[uniffi(default = true)]
    pub word_cache: bool,
    /// Keep the trained side network even when it does not beat the base on the user's own
    /// validation text (for comparisons; a keyboard leaves this off, so that personalizing
    /// never makes suggestions worse).
    #[uniffi(default = false)]
    pub force_side_network: bool,
    /// Score the before/after report and the choice of what ships as the suggestion strip
    /// ranks, words of two tokens included (8 server continuations per word start of the
    /// held-out and validation text); off: one-token words only, several times less work for
    /// the server.
    #[uniffi(default = true)]
    pub word_continuations: bool,
}

/// What a personalization run keeps for the suggestion strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum PersonalModel {
    /// Nothing personal: the base model alone did best on the user's validation text.
    Base,
    /// The base with the user's word cache.
    WordCache,
    /// The personal side network and gate.
    SideNetwork,
    /// The personal side network with the word cache.
    SideNetworkWithWordCache,
}

impl PersonalModel {
    const ALL: [(PersonalModel, &'static str); 4] = [
        (PersonalModel::Base, "base"),
        (PersonalModel::WordCache, "cache"),
        (PersonalModel::SideNetwork, "spa"),
        (PersonalModel::SideNetworkWithWordCache, "spa_cache"),
    ];

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(m, _)| *m)
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("base", |(_, n)| n)
    }

    fn uses_side_network(self) -> bool {
        matches!(self, Self::SideNetwork | Self::SideNetworkWithWordCache)
    }

    fn uses_word_cache(self) -> bool {
        matches!(self, Self::WordCache | Self::SideNetworkWithWordCache)
    }
}

/// One candidate of the shipping decision.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct CandidateQuality {
    /// The candidate.
    pub model: PersonalModel,
    /// Keystroke savings (%) on the user's validation text (the end of the training texts,
    /// never trained on), which decides what ships.
    pub validation_keystroke_savings: f64,
    /// Quality on the held-out texts.
    pub held_out: NextWordQuality,
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
    /// Where the weights are kept (pass it as `SpaConfig.personal_weights_path`); the file
    /// exists only when `shipped` uses the side network.
    pub weights_path: String,
    /// What was kept: the candidate with the best keystroke savings on the user's validation
    /// text (the simpler one on ties). The storage directory now holds exactly its files.
    pub shipped: PersonalModel,
    /// The kept candidate on the held-out texts.
    pub shipped_quality: NextWordQuality,
    /// Its keystroke savings minus the base's on the held-out texts (points)...
    pub gain_points: f64,
    /// ... and that gain's paired 95% bootstrap interval over held-out words.
    pub gain_ci95_low: f64,
    /// Upper end of the interval.
    pub gain_ci95_high: f64,
    /// Words of the validation text the decision read.
    pub validation_words: u32,
    /// Every candidate considered.
    pub candidates: Vec<CandidateQuality>,
    /// Where the word cache is kept (pass it as `SpaConfig.personal_words_path`); the file
    /// exists only when `shipped` uses the word cache.
    pub words_path: String,
    /// Wall time of the whole run (features, training, measurements), seconds.
    pub seconds: f64,
    /// Peak resident memory of the app's process so far, bytes (Linux and Android; `None`
    /// elsewhere).
    pub peak_rss_bytes: Option<u64>,
}

/// Receives a personalization run's progress (on a library thread). Throwing stops the run with
/// `SpaMobileError::Callback`; nothing is saved then.
#[uniffi::export(callback_interface)]
pub trait PersonalizeListener: Send + Sync {
    /// After each training step.
    fn on_progress(&self, progress: TrainProgress) -> Result<()>;
}

/// Trains personal weights and manages them in an app-storage directory. One run at a time.
#[derive(Debug, uniffi::Object)]
pub struct Personalizer {
    client: Client,
    /// The client's device model: its quantized head and tokenizer (no second copy is loaded).
    device: Arc<DeviceModel>,
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
            device: self.device.clone(),
            start: self.plugin.clone(),
            n_taps: self.n_taps,
            width: self.manifest.side_width as usize,
            dir,
            cancel: Arc::new(AtomicBool::new(false)),
            running: tokio::sync::Mutex::new(()),
        }
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

/// What ships: the decision's choice, or with `force_side_network` the better (on validation)
/// of the side network alone and with the cache.
fn shipped_model(d: &ShipDecision, force_side_network: bool) -> Result<PersonalModel> {
    let internal = |m: String| SpaMobileError::Internal { reason: m };
    if !force_side_network {
        return PersonalModel::from_name(&d.shipped)
            .ok_or_else(|| internal(format!("unknown candidate {}", d.shipped)));
    }
    let v = |n: &str| d.validation_savings.get(n).copied();
    match (v("spa"), v("spa_cache")) {
        (Some(a), Some(b)) if b > a => Ok(PersonalModel::SideNetworkWithWordCache),
        (Some(_), _) => Ok(PersonalModel::SideNetwork),
        _ => Err(internal("the side network was not measured".into())),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SpaMobileError::storage("removing an old personal file", &e)),
    }
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
        if options.steps == 0 || options.max_chunks < 4 {
            return Err(SpaMobileError::InvalidConfig {
                reason: "personalization needs steps >= 1 and max_chunks >= 4".into(),
            });
        }
        let _one = self.running.lock().await;
        self.cancel.store(false, Ordering::Relaxed);
        let _guard = CancelOnDrop(self.cancel.clone());
        let client = self.client.clone();
        let device = self.device.clone();
        let start = self.start.clone();
        let (n_taps, width) = (self.n_taps, self.width);
        let path = self.dir.join(WEIGHTS_FILE);
        let words_path = self.dir.join(WORDS_FILE);
        let cancel = self.cancel.clone();
        let task = runtime().spawn_blocking(move || -> Result<PersonalizationReport> {
            let t0 = std::time::Instant::now();
            let mut plugin = (*start).clone();
            let mut src = RemoteFeatures {
                client: &client,
                handle: runtime().handle().clone(),
                n_taps,
                width,
            };
            let cfg = PersonalizeConfig {
                steps: options.steps as usize,
                max_chunks: options.max_chunks as usize,
                seed: options.seed,
                word_cache: options.word_cache,
                word_continuations: options.word_continuations,
                ..Default::default()
            };
            let mut callback_error = None;
            let r = personalize(
                &mut plugin,
                &device.head,
                &device.tokenizer,
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
            let decision = report
                .decision
                .as_ref()
                .ok_or_else(|| SpaMobileError::Internal {
                    reason: "the run made no shipping decision".into(),
                })?;
            let shipped = shipped_model(decision, options.force_side_network)?;
            // The directory ends up holding exactly what ships.
            if shipped.uses_side_network() {
                save_atomic(&plugin, &path)?;
            } else {
                remove_if_present(&path)?;
            }
            match (&report.word_cache, shipped.uses_word_cache()) {
                (Some(wc), true) => {
                    std::fs::create_dir_all(words_path.parent().unwrap_or(Path::new(".")))
                        .map_err(|e| {
                            SpaMobileError::storage("creating the storage directory", &e)
                        })?;
                    wc.save(&words_path).map_err(|e| SpaMobileError::Storage {
                        reason: e.to_string(),
                    })?
                }
                _ => remove_if_present(&words_path)?,
            }
            let quality =
                |m: PersonalModel| decision.held_out.get(m.name()).map(NextWordQuality::from);
            let candidates = PersonalModel::ALL
                .iter()
                .filter_map(|&(m, name)| {
                    Some(CandidateQuality {
                        model: m,
                        validation_keystroke_savings: *decision.validation_savings.get(name)?,
                        held_out: quality(m)?,
                    })
                })
                .collect();
            let (gain_points, (gain_ci95_low, gain_ci95_high)) =
                if shipped.name() == decision.shipped {
                    (decision.gain_points, decision.ci95_minus_base)
                } else {
                    // Forced: the gain is measured, its interval is not.
                    let g = decision.held_out[shipped.name()].keystroke_savings
                        - report.before.keystroke_savings;
                    (g, (f64::NAN, f64::NAN))
                };
            Ok(PersonalizationReport {
                before: (&report.before).into(),
                after: (&report.after).into(),
                steps: report.train.steps as u32,
                train_tokens: report.train_tokens as u32,
                weights_path: path.to_string_lossy().into_owned(),
                shipped,
                shipped_quality: quality(shipped).unwrap_or_else(|| (&report.before).into()),
                gain_points,
                gain_ci95_low,
                gain_ci95_high,
                validation_words: decision.validation_words as u32,
                candidates,
                words_path: words_path.to_string_lossy().into_owned(),
                seconds: t0.elapsed().as_secs_f64(),
                peak_rss_bytes: report.peak_rss_bytes,
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

    /// Where the word cache is kept (`<storage dir>/personal-words.txt`).
    pub fn words_path(&self) -> String {
        self.dir.join(WORDS_FILE).to_string_lossy().into_owned()
    }

    /// Whether a word cache is saved.
    pub fn has_saved_words(&self) -> bool {
        self.dir.join(WORDS_FILE).is_file()
    }

    /// Deletes the saved personal weights and word cache (no error when there are none).
    /// Clients connected with them keep them until they are closed.
    pub fn delete_weights(&self) -> Result<()> {
        remove_if_present(&self.dir.join(WEIGHTS_FILE))?;
        remove_if_present(&self.dir.join(WORDS_FILE))
    }
}
