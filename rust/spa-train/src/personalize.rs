//! On-device personalization (the keyboard use case): train the side network + gate on one
//! user's text and measure next-word suggestions on their held-out text.
//!
//! The base features of the user's text come from a [`FeatureSource`]: in-process (CLI, eval)
//! or the base server (`spa_runtime::Client::features`, used by the mobile SDK). The side
//! weights, the gradients and the loss never leave the device; the server sees token ids, as it
//! does when the same text is typed and completed.
//!
//! Metrics on held-out text are those of the SDK's suggestion strip, by its own code
//! ([`spa_runtime::words`]): at every position the whole-vocabulary next-token distribution
//! from the base's final hidden state (context of up to 256 tokens, 129-256 once the text is
//! longer: [`spa_runtime::words::context_start`]), with a side network the gate's mixture
//! `g · P_side + (1 - g) · P_base`, optionally interpolated with the user's word cache:
//! - next-word top-1 / top-3: at each word start, is the actual word the first / among the first
//!   three suggestions;
//! - keystroke savings: the user types a word letter by letter and taps a suggestion as soon as
//!   the word is among the top three suggestions matching the typed prefix (a tap costs one key
//!   and inserts the word and its space); savings = keys saved / keys without suggestions;
//! - perplexity over the whole vocabulary.
//!
//! The personal word cache ([`spa_runtime::WordCache`]) is learned from the training text; its
//! weight is tuned on the end of that text ([`split_tail`], [`tune_cache_weight`]).

use crate::error::{Result, TrainError};
use crate::features::{SeqFeatures, SeqSpec};
use crate::sidegrad::SideGraph;
use crate::train::{self, Method, Progress, TrainConfig, TrainReport};
use serde::{Deserialize, Serialize};
use spa_model::{GateMode, SidePlugin, SpaTokenizer};
use spa_runtime::{DeviceModel, WordCache, WordVocab};
use std::collections::BTreeMap;

/// Settings of a personalization run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonalizeConfig {
    /// Training steps (default 200).
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per training sequence.
    pub chunk_tokens: usize,
    /// Base candidates per position (the server's top-k).
    pub top_k: usize,
    /// Usage cost of the gate.
    pub usage_cost: f64,
    /// Seed.
    pub seed: u64,
    /// Cap on training sequences (device memory / time budget).
    pub max_chunks: usize,
    /// Build the personal word cache and measure it (base + cache, personalized + cache).
    pub word_cache: bool,
    /// Most words of the end of the training text the cache's weight is tuned on.
    pub cache_tuning_words: usize,
    /// Train the side network only where the next token starts a word (the positions the
    /// suggestion strip is scored at) instead of at every position.
    #[serde(default)]
    pub word_start_loss: bool,
    /// Sequences per forward/backward pass ([`TrainConfig::micro_batch`]; 0: the whole
    /// batch). The default 2 runs a step of 8 as four passes with the same update, so that
    /// training holds a quarter of the autograd graph (device memory).
    #[serde(default)]
    pub micro_batch: usize,
    /// Score the before/after report and the shipping decision as the strip ranks: with the
    /// base's word continuations (8 per held-out word start, 8 tokens of server compute each
    /// time); off: one-token words only, several times less server work.
    #[serde(default = "default_true")]
    pub word_continuations: bool,
}

fn default_true() -> bool {
    true
}

impl Default for PersonalizeConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            lr: 1e-3,
            batch: 8,
            chunk_tokens: 64,
            top_k: 32,
            usage_cost: 0.02,
            seed: 0,
            max_chunks: 400,
            word_cache: true,
            cache_tuning_words: CACHE_TUNING_WORDS,
            word_start_loss: false,
            micro_batch: 1,
            word_continuations: true,
        }
    }
}

/// Next-word suggestion quality.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NextWordMetrics {
    /// Words evaluated.
    pub words: usize,
    /// Top-1 accuracy (%).
    pub top1: f64,
    /// Top-3 accuracy (%).
    pub top3: f64,
    /// Keystroke savings (%).
    pub keystroke_savings: f64,
    /// Perplexity over the whole vocabulary.
    pub perplexity: f64,
    /// Positions where the side path was used (%), 0 for the base.
    pub side_usage: f64,
}

/// The personal word cache of a run: its interpolation weight and what it did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheReport {
    /// The tuned weight λ (0: the cache did not help on the tuning text).
    pub weight: f32,
    /// Words of the end of the training text the weight was tuned on.
    pub tuning_words: usize,
    /// Distinct words in the cache.
    pub distinct_words: usize,
    /// The base with the cache, on the held-out text.
    pub base_cache: NextWordMetrics,
    /// The personalized side network with the cache, on the held-out text.
    pub spa_cache: NextWordMetrics,
}

/// What a personalization run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersonalizeReport {
    /// Base only, on the held-out text.
    pub before: NextWordMetrics,
    /// Personalized, on the held-out text.
    pub after: NextWordMetrics,
    /// Training run.
    pub train: TrainReport,
    /// Training tokens used.
    pub train_tokens: usize,
    /// Peak resident memory of this process in bytes (Linux `VmHWM`), when known.
    pub peak_rss_bytes: Option<u64>,
    /// The personal word cache, when one was built.
    pub cache: Option<CacheReport>,
    /// What ships (the best of base, cache, personalized and both on the user's own validation
    /// text), when the run had that text (a [`CacheInput`]).
    #[serde(default)]
    pub decision: Option<ShipDecision>,
    /// The word cache learned on the whole training text, with its tuned weight (what an app
    /// saves when the decision ships a cache).
    #[serde(skip)]
    pub word_cache: Option<WordCache>,
}

/// The candidates a personalization run chooses from, in the order that wins ties (the
/// simpler one ships when two save the same keystrokes).
pub const CANDIDATES: [&str; 4] = ["base", "cache", "spa", "spa_cache"];

/// Which suggestion model ships to the user, and what it does on the held-out text.
///
/// Every candidate is scored by keystroke savings on the end of the user's training text
/// ([`split_tail`], the text the word cache's weight is tuned on; the side network never
/// trains on it when [`personalize`] split it off), and the best ships: "base" (the base
/// alone), "cache" (base + word cache), "spa" (personal side network + gate) or "spa_cache".
/// A personalization that does not beat the base on the user's own text never ships.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShipDecision {
    /// "base" | "cache" | "spa" | "spa_cache".
    pub shipped: String,
    /// Words of the validation text the decision read.
    pub validation_words: usize,
    /// Keystroke savings (%) of each candidate on the validation text.
    pub validation_savings: BTreeMap<String, f64>,
    /// Held-out metrics of each candidate.
    pub held_out: BTreeMap<String, NextWordMetrics>,
    /// Keystroke savings of what ships minus the base's on the held-out text (points).
    pub gain_points: f64,
    /// Its paired 95% bootstrap interval over held-out words (1,000 resamples; each resample's
    /// difference is divided by the whole text's keystrokes).
    pub ci95_minus_base: (f64, f64),
}

/// A candidate of [`decide`]: (validation metrics, held-out metrics, held-out (keys saved,
/// keys without the strip) per word).
pub type Candidate = (NextWordMetrics, NextWordMetrics, Vec<(usize, usize)>);

/// [`strip_metrics`] plus each word's (keys saved, keys without the strip), for paired
/// bootstraps over words.
pub fn strip_metrics_per_word(
    device: &spa_runtime::DeviceModel,
    vocab: &spa_runtime::WordVocab,
    cache: Option<&spa_runtime::WordCache>,
    docs: &[StripDoc],
) -> Result<(NextWordMetrics, Vec<(usize, usize)>)> {
    let mut per_word = Vec::new();
    let m = strip_metrics(device, vocab, cache, docs, &mut |e| {
        per_word.push((e.keys_without - e.keys, e.keys_without));
    })?;
    Ok((m, per_word))
}

/// The shipping decision from each candidate's (validation metrics, held-out per-word keys):
/// the best validation keystroke savings ships (ties: the earlier of [`CANDIDATES`]); its
/// held-out gain over the base comes with a paired bootstrap interval over words.
pub fn decide(candidates: &BTreeMap<String, Candidate>) -> Result<ShipDecision> {
    let base = candidates
        .get("base")
        .ok_or_else(|| TrainError::Data("the shipping decision needs the base".into()))?;
    let mut best: Option<(&str, f64)> = None;
    for name in CANDIDATES {
        if let Some((val, _, _)) = candidates.get(name) {
            if best.is_none_or(|(_, b)| val.keystroke_savings > b) {
                best = Some((name, val.keystroke_savings));
            }
        }
    }
    let shipped = best.map(|b| b.0).unwrap_or("base");
    let (_, held, words) = &candidates[shipped];
    if words.len() != base.2.len() {
        return Err(TrainError::Data(format!(
            "candidates scored different held-out words ({} vs {})",
            words.len(),
            base.2.len()
        )));
    }
    let keys: usize = base.2.iter().map(|w| w.1).sum();
    let n = words.len() as f64;
    let scale = 100.0 * n / keys.max(1) as f64;
    let a: Vec<f64> = words.iter().map(|w| w.0 as f64 * scale).collect();
    let b: Vec<f64> = base.2.iter().map(|w| w.0 as f64 * scale).collect();
    let d = crate::stats::paired_bootstrap(
        &a,
        &b,
        crate::stats::RESAMPLES,
        crate::stats::SEED,
        crate::stats::LEVEL,
    )?;
    Ok(ShipDecision {
        shipped: shipped.to_string(),
        validation_words: base.0.words,
        validation_savings: candidates
            .iter()
            .map(|(k, v)| (k.clone(), v.0.keystroke_savings))
            .collect(),
        held_out: candidates
            .iter()
            .map(|(k, v)| (k.clone(), v.1.clone()))
            .collect(),
        gain_points: held.keystroke_savings - base.1.keystroke_savings,
        ci95_minus_base: d.ci,
    })
}

/// A tensor as on the wire (int8 rows with f16 scales, or f16).
pub type WireTensor = spa_protocol::Tensor;

/// Provides base features for token sequences (the base runs elsewhere).
pub trait FeatureSource {
    /// Features of each sequence with `top_k` candidates per position.
    fn features(&mut self, specs: &[SeqSpec], top_k: usize) -> Result<Vec<SeqFeatures>>;
    /// Features of one suggestion-strip window (taps when `req.with_taps`, hidden states and
    /// word continuations at the requested positions), encoded as on the wire.
    fn window(&mut self, req: &WindowRequest<'_>) -> Result<WindowFeatures>;
}

/// What the strip asks of the base for one window (see [`FeatureSource::window`]).
#[derive(Debug, Clone, Copy)]
pub struct WindowRequest<'a> {
    /// Token ids sent.
    pub tokens: &'a [u32],
    /// Positions whose final normed hidden state is wanted.
    pub hidden_positions: &'a [u32],
    /// Positions to extend by the base's [`spa_runtime::words::CONTINUATIONS`] most likely
    /// word-start tokens (the word starts of the window's targets).
    pub continuation_positions: &'a [u32],
    /// Taps of every position too (a side network is to run).
    pub with_taps: bool,
}

/// The base features of one strip window, as the server sends them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowFeatures {
    /// Projected taps of every position (`[len * n_taps, width]`), when asked.
    pub taps: Option<spa_protocol::Tensor>,
    /// Final normed hidden states at the hidden positions (`[positions, hidden]`).
    pub hidden: spa_protocol::Tensor,
    /// The word-start tokens each continuation position was extended by (`[positions * c]`).
    pub cont_ids: Vec<u32>,
    /// The final normed hidden state after each of `cont_ids` (`[positions * c, hidden]`).
    pub cont_hidden: Option<spa_protocol::Tensor>,
}

/// The [`StripDoc`]s of `texts` with features from `source`.
pub fn strip_docs(
    source: &mut dyn FeatureSource,
    tok: &SpaTokenizer,
    texts: &[String],
    with_taps: bool,
    continuations: bool,
) -> Result<Vec<StripDoc>> {
    strip_docs_with(tok, texts, with_taps, continuations, &mut |r| {
        source.window(r)
    })
}

#[cfg(feature = "host")]
/// Features from a base model in this process.
#[derive(Debug)]
pub struct LocalFeatures<'a> {
    /// The base.
    pub base: &'a spa_model::BaseModel,
    /// The shared projection.
    pub proj: &'a spa_model::DownProjection,
    /// Hide progress bars.
    pub quiet: bool,
    /// Forward mode of the suggestion strip's windows: `BatchInvariant` gives exactly the
    /// server's features, `Fast` the same up to float rounding, several times faster (the
    /// training sequences always use the fast pass).
    pub window_mode: spa_model::ForwardMode,
}

#[cfg(feature = "host")]
impl FeatureSource for LocalFeatures<'_> {
    fn features(&mut self, specs: &[SeqSpec], top_k: usize) -> Result<Vec<SeqFeatures>> {
        let mut sets = crate::features::compute(
            self.base,
            &[self.proj],
            top_k,
            specs,
            "features",
            self.quiet,
        )?;
        Ok(sets.pop().map(|s| s.seqs).unwrap_or_default())
    }

    fn window(&mut self, req: &WindowRequest<'_>) -> Result<WindowFeatures> {
        local_window_features(self.base, Some(self.proj), req, false, self.window_mode)
    }
}

/// Splits texts into training sequences of `chunk` tokens (the last piece of a text is kept
/// when it has at least 8 tokens).
pub fn chunk_texts(tok: &SpaTokenizer, texts: &[String], chunk: usize) -> Result<Vec<SeqSpec>> {
    if chunk < 8 {
        return Err(TrainError::Config("chunk_tokens must be >= 8".into()));
    }
    let mut out = Vec::new();
    for t in texts {
        let ids = tok.encode(t)?;
        for c in ids.chunks(chunk) {
            if c.len() >= 8 {
                out.push(SeqSpec {
                    tokens: c.to_vec(),
                    loss_start: 1,
                });
            }
        }
    }
    Ok(out)
}

/// Resets the peak resident set size (Linux: writes 5 to /proc/self/clear_refs); returns
/// whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// A memory field of `/proc/self/status` (Linux; e.g. `"VmHWM:"`, `"RssAnon:"`) in bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One word of held-out text as the suggestion strip saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct WordEvent {
    /// The word the user wrote.
    pub word: String,
    /// The three suggestions shown before its first letter.
    pub suggestions: Vec<String>,
    /// Keys spent with suggestions (letters typed + one tap, or letters + space).
    pub keys: usize,
    /// Keys without suggestions (letters + space).
    pub keys_without: usize,
}

/// One document of text as the suggestion strip sees it: its tokens and, per context window
/// ([`spa_runtime::words::context_start`]), the base features the server sends for it.
#[derive(Debug, Clone, PartialEq)]
pub struct StripDoc {
    /// The document's token ids (no BOS).
    pub tokens: Vec<u32>,
    /// Context windows, in order; each target token is scored in exactly one.
    pub windows: Vec<StripWindow>,
}

/// One context window of a [`StripDoc`]: the strip sends `prefix + tokens[start..targets.end-1]`
/// for every target in `targets` (a prefix of it; the base is causal, so one pass serves all).
#[derive(Debug, Clone, PartialEq)]
pub struct StripWindow {
    /// First document token of the window.
    pub start: usize,
    /// The document-start token is sent in front (window at the text's start).
    pub prefix: Option<u32>,
    /// Document positions predicted from this window.
    pub targets: std::ops::Range<usize>,
    /// Projected taps of every window position (`[len * n_taps, width]`, int8 as on the wire),
    /// when a side network is to run.
    pub taps: Option<spa_protocol::Tensor>,
    /// The base's final normed hidden state before each target (`[targets, hidden]`).
    pub hidden: spa_protocol::Tensor,
    /// The targets where a word starts, in order: the base's word continuations were fetched
    /// before each.
    pub word_targets: Vec<usize>,
    /// Per word target, the word-start tokens the server extended the context by.
    pub cont_ids: Vec<u32>,
    /// The base's final normed hidden state after each of `cont_ids`.
    pub cont_hidden: Option<spa_protocol::Tensor>,
    /// The decoded continuations per word target: base-only, so computed once (by the head of
    /// the first device that scores the window; every candidate of a personalization shares
    /// that head) and reused by every candidate.
    decoded: std::sync::OnceLock<Vec<Vec<spa_runtime::words::Continuation>>>,
}

impl StripWindow {
    /// The token ids sent for this window.
    pub fn tokens(&self, doc: &[u32]) -> Vec<u32> {
        let mut t: Vec<u32> = self.prefix.into_iter().collect();
        t.extend_from_slice(&doc[self.start..self.targets.end - 1]);
        t
    }

    /// Window position whose hidden state predicts document position `j`.
    pub fn position_of(&self, j: usize) -> usize {
        j + usize::from(self.prefix.is_some()) - 1 - self.start
    }
}

/// The windows of a document of `n` tokens (no features yet): the strip's context rule
/// applied to every position.
pub fn strip_windows(
    tok: &SpaTokenizer,
    n: usize,
) -> Vec<(usize, Option<u32>, std::ops::Range<usize>)> {
    use spa_runtime::words::{context_start, start_token, CONTEXT_MAX, CONTEXT_STEP};
    let mut out = Vec::new();
    let mut a = 0;
    loop {
        let prefix = (a == 0 && tok.add_bos()).then(|| start_token(tok));
        let lo = if a == 0 {
            usize::from(prefix.is_none())
        } else {
            a + CONTEXT_MAX - CONTEXT_STEP + 1
        };
        let hi = (a + CONTEXT_MAX + 1).min(n);
        if lo >= hi {
            break;
        }
        debug_assert!((lo..hi).all(|j| context_start(j) == a));
        out.push((a, prefix, lo..hi));
        a += CONTEXT_STEP;
    }
    out
}

/// Most continuation positions asked in one features request of the strip's metric.
pub const CONT_POSITIONS_PER_REQUEST: usize = 48;

/// `a` with the rows of `b` after its own (int8 rows of the same width, as on the wire).
fn append_rows(
    a: Option<spa_protocol::Tensor>,
    b: Option<spa_protocol::Tensor>,
) -> Result<Option<spa_protocol::Tensor>> {
    match (a, b) {
        (a, None) => Ok(a),
        (None, b) => Ok(b),
        (Some(mut a), Some(b)) => {
            if a.encoding != b.encoding || a.shape.len() != 2 || a.shape[1..] != b.shape[1..] {
                return Err(TrainError::Data(
                    "features answers: continuation states of different shapes".into(),
                ));
            }
            a.shape[0] += b.shape[0];
            a.data.extend(b.data);
            a.scales.extend(b.scales);
            Ok(Some(a))
        }
    }
}

/// Fetches the features of one window.
pub type WindowFetch<'a> = dyn FnMut(&WindowRequest<'_>) -> Result<WindowFeatures> + 'a;

/// The [`StripDoc`]s of `texts` (one per text), with features from `fetch`: hidden states
/// before every target and, with `continuations`, the base's word continuations before every
/// word start.
pub fn strip_docs_with(
    tok: &SpaTokenizer,
    texts: &[String],
    with_taps: bool,
    continuations: bool,
    fetch: &mut WindowFetch<'_>,
) -> Result<Vec<StripDoc>> {
    let mut docs = Vec::new();
    for t in texts {
        let tokens = tok.encode_fragment(t)?;
        let pieces: Vec<String> = tokens
            .iter()
            .map(|&t| tok.decode(&[t]))
            .collect::<spa_model::Result<_>>()?;
        let mut windows = Vec::new();
        for (start, prefix, targets) in strip_windows(tok, tokens.len()) {
            let mut w = StripWindow {
                start,
                prefix,
                targets: targets.clone(),
                taps: None,
                hidden: Default::default(),
                word_targets: targets
                    .clone()
                    .filter(|&j| continuations && word_at(&pieces, j).is_some())
                    .collect(),
                cont_ids: Vec::new(),
                cont_hidden: None,
                decoded: Default::default(),
            };
            let pos: Vec<u32> = targets.clone().map(|j| w.position_of(j) as u32).collect();
            let cont_pos: Vec<u32> = w
                .word_targets
                .iter()
                .map(|&j| w.position_of(j) as u32)
                .collect();
            // The continuations of a window cost 8 tokens of base compute per word start, so
            // they are asked CONT_POSITIONS_PER_REQUEST positions at a time (every request
            // stays well under the client's timeout; each repeats the window's pass).
            let sent = w.tokens(&tokens);
            let mut chunks = cont_pos.chunks(CONT_POSITIONS_PER_REQUEST);
            let f = fetch(&WindowRequest {
                tokens: &sent,
                hidden_positions: &pos,
                continuation_positions: chunks.next().unwrap_or(&[]),
                with_taps,
            })?;
            w.taps = f.taps;
            w.hidden = f.hidden;
            w.cont_ids = f.cont_ids;
            w.cont_hidden = f.cont_hidden;
            for chunk in chunks {
                let more = fetch(&WindowRequest {
                    tokens: &sent,
                    hidden_positions: &[],
                    continuation_positions: chunk,
                    with_taps: false,
                })?;
                w.cont_ids.extend(more.cont_ids);
                w.cont_hidden = append_rows(w.cont_hidden.take(), more.cont_hidden)?;
            }
            windows.push(w);
        }
        docs.push(StripDoc { tokens, windows });
    }
    Ok(docs)
}

#[cfg(feature = "host")]
/// Features of one window from a base in this process, encoded exactly as the server encodes
/// them (`f16_hidden`: the hidden states as f16 instead of int8, to measure what int8 costs;
/// `mode`: the server's [`spa_model::ForwardMode::BatchInvariant`] pass, or the faster one
/// equal up to float rounding; the continuations always use the server's pass).
pub fn local_window_features(
    base: &spa_model::BaseModel,
    proj: Option<&spa_model::DownProjection>,
    req: &WindowRequest<'_>,
    f16_hidden: bool,
    mode: spa_model::ForwardMode,
) -> Result<WindowFeatures> {
    let mut cache = base.new_cache();
    let out = base.forward_with(req.tokens, &mut cache, mode)?;
    let taps = if let Some(proj) = proj.filter(|_| req.with_taps) {
        let z = proj.apply_taps(&out.taps)?;
        let (n_taps, width) = (proj.meta().taps.len(), proj.meta().width);
        let flat: Vec<f32> = z.iter().flatten().flatten().copied().collect();
        Some(spa_protocol::encode_i8_rows(
            &flat,
            req.tokens.len() * n_taps,
            width,
        ))
    } else {
        None
    };
    let all: Vec<Vec<f32>> = out.hidden.to_vec2()?;
    let d = all.first().map_or(0, Vec::len);
    let mut rows = Vec::with_capacity(req.hidden_positions.len() * d);
    for &p in req.hidden_positions {
        rows.extend_from_slice(
            all.get(p as usize)
                .ok_or_else(|| TrainError::Data("hidden position out of range".into()))?,
        );
    }
    let n = req.hidden_positions.len();
    let hidden = if f16_hidden {
        spa_protocol::encode_f16(&rows, n, d)
    } else {
        spa_protocol::encode_i8_rows(&rows, n, d)
    };
    let (mut cont_ids, mut cont_hidden) = (Vec::new(), None);
    if !req.continuation_positions.is_empty() {
        let (ids, states) = base.word_continuations(
            &cache,
            &all,
            req.continuation_positions,
            spa_runtime::words::CONTINUATIONS,
        )?;
        cont_hidden = Some(spa_protocol::encode_i8_rows(&states, ids.len(), d));
        cont_ids = ids;
    }
    Ok(WindowFeatures {
        taps,
        hidden,
        cont_ids,
        cont_hidden,
    })
}

/// Features of one window from the base server (`POST /v1/features` with hidden positions and
/// continuations, no candidate lists), checked for shape.
pub fn remote_window_features(
    client: &spa_runtime::Client,
    handle: &tokio::runtime::Handle,
    req: &WindowRequest<'_>,
) -> Result<WindowFeatures> {
    let n = req.tokens.len();
    let resp = handle.block_on(client.features_with(&spa_protocol::FeaturesRequest {
        tokens: req.tokens.to_vec(),
        top_k: 0,
        hidden_positions: req.hidden_positions.to_vec(),
        taps_from: if req.with_taps { 0 } else { (n - 1) as u32 },
        continuations: spa_runtime::words::CONTINUATIONS as u32,
        continuation_positions: req.continuation_positions.to_vec(),
    }))?;
    let hidden = match resp.hidden {
        Some(h) => h,
        None if req.hidden_positions.is_empty() => Default::default(),
        None => {
            return Err(TrainError::Data(
                "features answer without hidden states".into(),
            ))
        }
    };
    if !req.hidden_positions.is_empty()
        && hidden.shape.first() != Some(&(req.hidden_positions.len() as u32))
    {
        return Err(TrainError::Data(
            "features answer: hidden states of the wrong shape".into(),
        ));
    }
    let taps = if req.with_taps {
        let t = resp
            .taps
            .ok_or_else(|| TrainError::Data("features answer without taps".into()))?;
        if t.shape.len() != 2 || !(t.shape[0] as usize).is_multiple_of(n) {
            return Err(TrainError::Data(
                "features answer: taps of the wrong shape".into(),
            ));
        }
        Some(t)
    } else {
        None
    };
    Ok(WindowFeatures {
        taps,
        hidden,
        cont_ids: resp.cont_ids,
        cont_hidden: resp.cont_hidden,
    })
}

/// The word that starts at document position `j` (a token with a leading space and a letter,
/// then continuation tokens that start with a letter and no space), or `None` when `j` starts
/// no word. `texts` holds every token decoded alone.
fn word_at(texts: &[String], j: usize) -> Option<String> {
    let first = texts[j].strip_prefix(' ')?;
    if !first.chars().next().is_some_and(char::is_alphabetic) {
        return None;
    }
    let mut word = first.to_string();
    for tt in &texts[j + 1..] {
        if tt.starts_with(' ') || !tt.chars().next().is_some_and(char::is_alphabetic) {
            break;
        }
        word.push_str(tt);
    }
    // The project's word: its leading letters (a word token may end in an apostrophe).
    let end = word
        .char_indices()
        .find(|(_, c)| !c.is_alphabetic())
        .map_or(word.len(), |(i, _)| i);
    word.truncate(end);
    (!word.is_empty()).then_some(word)
}

/// What the strip computed at one word start of held-out text.
struct WordSample {
    word: String,
    prev: Option<String>,
    probs: Vec<f32>,
    conts: Vec<spa_runtime::words::Continuation>,
}

/// What [`run_strip`] computed at one target: its probability, the gate's probability, and
/// the word sample when a word starts there.
type PositionOut = (f32, Option<f32>, Option<WordSample>);

/// Runs the device's rule over every window of `docs`: the side network over the window's
/// taps (unless the gate is base-only), [`spa_runtime::words::next_token_probs`] at each
/// target. Calls `on_pos(target prob, p_side)` for every target and `on_word` for every word
/// start, in document order. Windows run in parallel.
fn run_strip(
    device: &spa_runtime::DeviceModel,
    docs: &[StripDoc],
    on_pos: &mut dyn FnMut(f32, Option<f32>),
    on_word: &mut dyn FnMut(WordSample) -> Result<()>,
) -> Result<()> {
    use rayon::prelude::*;
    use spa_model::GateMode;
    let tok = &device.tokenizer;
    let limits = spa_protocol::Limits::default();
    let use_side = device.gate != GateMode::AlwaysBase;
    for doc in docs {
        let texts: Vec<String> = doc
            .tokens
            .iter()
            .map(|&t| tok.decode(&[t]))
            .collect::<spa_model::Result<_>>()?;
        let vocab = spa_runtime::WordVocab::shared(tok, &device.base_identity);
        let per_window = |w: &StripWindow| -> Result<Vec<PositionOut>> {
            let hidden = spa_protocol::decode_tensor(&w.hidden, &limits)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let decoded = match w.decoded.get() {
                Some(d) => d,
                None => {
                    let d = spa_runtime::words::decode_continuation_rows(
                        device,
                        &vocab,
                        &w.cont_ids,
                        w.cont_hidden.as_ref(),
                        w.word_targets.len(),
                        spa_runtime::words::CONTINUATIONS,
                    )?;
                    w.decoded.get_or_init(|| d)
                }
            };
            let mut conts = decoded.iter();
            let mut word_targets = w.word_targets.iter().peekable();
            if hidden.rows != w.targets.len() {
                return Err(TrainError::Data(
                    "window hidden states of the wrong size".into(),
                ));
            }
            let mut steps: Vec<Option<spa_model::SideStep>> = vec![None; w.targets.len()];
            if use_side {
                let taps = spa_protocol::decode_tensor(
                    w.taps
                        .as_ref()
                        .ok_or_else(|| TrainError::Data("window without taps".into()))?,
                    &limits,
                )
                .map_err(|e| TrainError::Data(e.to_string()))?;
                let cfg = device.side.config();
                let n_taps = cfg.taps.len();
                let len = w.tokens(&doc.tokens).len();
                if taps.rows != len * n_taps || taps.cols != cfg.width {
                    return Err(TrainError::Data("window taps of the wrong shape".into()));
                }
                let first = w.position_of(w.targets.start);
                let zeros = vec![0f32; cfg.base_hidden];
                let mut cache = device.side.new_cache();
                for p in 0..len {
                    let z: Vec<Vec<f32>> = (0..n_taps)
                        .map(|t| taps.row(p * n_taps + t).to_vec())
                        .collect();
                    let st = device.side.step(&z, &zeros, &mut cache)?;
                    if p >= first {
                        steps[p - first] = Some(st);
                    }
                }
            }
            w.targets
                .clone()
                .enumerate()
                .map(|(i, j)| {
                    let probs = spa_runtime::words::next_token_probs(
                        device,
                        hidden.row(i),
                        steps[i].as_ref(),
                    )?;
                    let p_target = probs.get(doc.tokens[j] as usize).copied().unwrap_or(0.0);
                    let word_conts = if word_targets.next_if(|&&t| t == j).is_some() {
                        conts.next().cloned().unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let sample = match word_at(&texts, j) {
                        Some(word) => {
                            let ctx = tok.decode(&doc.tokens[j.saturating_sub(8)..j])?;
                            let prev = spa_runtime::words::prev_word(&ctx).map(str::to_string);
                            Some(WordSample {
                                word,
                                prev,
                                probs,
                                conts: word_conts,
                            })
                        }
                        None => None,
                    };
                    Ok((p_target, steps[i].as_ref().map(|s| s.p_side), sample))
                })
                .collect()
        };
        // Windows in parallel, one per thread at a time (each word keeps a full distribution
        // until it is scored: ~200 KB).
        for group in doc.windows.chunks(rayon::current_num_threads().max(1)) {
            let res: Vec<Result<Vec<_>>> = group.par_iter().map(per_window).collect();
            for r in res {
                for (p, g, sample) in r? {
                    on_pos(p, g);
                    if let Some(s) = sample {
                        on_word(s)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Next-word metrics of the suggestion strip on `docs`, by the SDK's own rule
/// ([`spa_runtime::words`]): the whole-vocabulary distribution of `device` (base only with
/// [`spa_model::GateMode::AlwaysBase`], else side network + gate), interpolated with `cache`
/// when given. Every word start is scored: top-1 / top-3 (the word is the first / among the
/// first three suggestions before its first letter) and keystroke savings
/// ([`spa_runtime::RankedWords::keys_to_enter`]); perplexity is over every position.
pub fn strip_metrics(
    device: &spa_runtime::DeviceModel,
    vocab: &spa_runtime::WordVocab,
    cache: Option<&spa_runtime::WordCache>,
    docs: &[StripDoc],
    on_word: &mut dyn FnMut(&WordEvent),
) -> Result<NextWordMetrics> {
    use spa_runtime::words::{RankedWords, STRIP};
    let (mut words, mut top1, mut top3, mut keys, mut saved) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut nll, mut npos, mut side_n) = (0f64, 0usize, 0usize);
    run_strip(
        device,
        docs,
        &mut |p, g| {
            nll -= (p.max(1e-30) as f64).ln();
            npos += 1;
            side_n += usize::from(g.is_some_and(|g| g > 0.5));
        },
        &mut |s| {
            let ranked = RankedWords::new(&s.probs, &s.conts, vocab, cache, s.prev.as_deref());
            let shown = ranked.top("", STRIP);
            let len = s.word.chars().count();
            let cost = ranked.keys_to_enter(&s.word, STRIP);
            words += 1;
            keys += len + 1;
            saved += len + 1 - cost;
            top1 += usize::from(shown.first() == Some(&s.word));
            top3 += usize::from(shown.contains(&s.word));
            on_word(&WordEvent {
                word: s.word,
                suggestions: shown,
                keys: cost,
                keys_without: len + 1,
            });
            Ok(())
        },
    )?;
    let pct = |a: usize, b: usize| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    Ok(NextWordMetrics {
        words,
        top1: pct(top1, words),
        top3: pct(top3, words),
        keystroke_savings: pct(saved, keys),
        perplexity: if npos == 0 {
            f64::NAN
        } else {
            (nll / npos as f64).exp()
        },
        side_usage: pct(side_n, npos),
    })
}

/// Tunes the weight of `cache` on `docs` (text of the user's that the cache was not learned
/// from) by the keystroke rule, with the model of `device`; returns the best weight, the
/// words scored and the keys per weight of [`spa_runtime::words::WEIGHT_GRID`].
pub fn tune_cache_weight(
    device: &spa_runtime::DeviceModel,
    vocab: &spa_runtime::WordVocab,
    cache: &spa_runtime::WordCache,
    docs: &[StripDoc],
) -> Result<(f32, usize, Vec<usize>)> {
    let mut tuner = spa_runtime::words::WeightTuner::default();
    run_strip(device, docs, &mut |_, _| {}, &mut |s| {
        tuner.observe(&s.probs, &s.conts, vocab, cache, s.prev.as_deref(), &s.word);
        Ok(())
    })?;
    let (w, keys) = tuner.best();
    Ok((w, tuner.words(), keys.to_vec()))
}

/// Splits the user's texts into (all but the end, the end): the end is the last `frac` of the
/// words, at most `max_words`, cut at whitespace (the cache's tuning text).
pub fn split_tail(texts: &[String], frac: f64, max_words: usize) -> (Vec<String>, Vec<String>) {
    let total: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    let mut want = ((total as f64 * frac) as usize).min(max_words);
    let mut head: Vec<String> = texts.to_vec();
    let mut tail: Vec<String> = Vec::new();
    while want > 0 {
        let Some(last) = head.pop() else { break };
        let n = last.split_whitespace().count();
        if n <= want {
            want -= n;
            tail.insert(0, last);
            continue;
        }
        // Cut this text `want` words before its end.
        let mut starts = Vec::new();
        let mut in_word = false;
        for (i, c) in last.char_indices() {
            if !c.is_whitespace() && !in_word {
                starts.push(i);
            }
            in_word = !c.is_whitespace();
        }
        let cut = starts[n - want];
        tail.insert(0, last[cut..].to_string());
        head.push(last[..cut].to_string());
        break;
    }
    (head, tail)
}

/// The user's text: earlier writing to learn from, later writing to measure on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserTexts {
    /// Training text.
    pub train: Vec<String>,
    /// Held-out text (never trained on).
    pub held_out: Vec<String>,
}

/// Most words of the end of the training text the word cache's weight is tuned on.
pub const CACHE_TUNING_WORDS: usize = 1500;

/// What the personal word cache is built from: all the training text, and its split into the
/// part the tuning cache learns from and the end it is tuned on (with the end's features).
#[derive(Debug, Clone)]
pub struct CacheInput {
    /// All the user's training text (the shipped cache learns it).
    pub train: Vec<String>,
    /// The training text without its end (the tuning cache learns it).
    pub head: Vec<String>,
    /// Features of the end of the training text ([`split_tail`]).
    pub tune_docs: Vec<StripDoc>,
}

impl CacheInput {
    /// Splits `train` (the end: a tenth, at most `max_words` words) and fetches the end's
    /// features from `source` (hidden states and taps: the personalized candidates are scored
    /// on it too; word continuations with `continuations`).
    pub fn fetch(
        source: &mut dyn FeatureSource,
        tok: &SpaTokenizer,
        train: &[String],
        max_words: usize,
        continuations: bool,
    ) -> Result<Self> {
        let (head, tail) = split_tail(train, 0.1, max_words);
        Ok(Self {
            train: train.to_vec(),
            head,
            tune_docs: strip_docs(source, tok, &tail, true, continuations)?,
        })
    }
}

/// Builds the user's word cache from `input` and tunes its weight with `device`'s model
/// (usually the base alone): learned on the head of the training text, tuned by the keystroke
/// rule on its end, then learned again on all of it. Returns the cache, the tuning cache (the
/// head's, with the tuned weight: it scores candidates on the validation text, where the
/// shipped cache has seen every word) and (tuning words, keys per weight of
/// [`spa_runtime::words::WEIGHT_GRID`]).
pub fn build_word_cache(
    device: &DeviceModel,
    vocab: &WordVocab,
    input: &CacheInput,
) -> Result<(WordCache, WordCache, usize, Vec<usize>)> {
    let tok = &device.tokenizer;
    let mut tuning = WordCache::learn(&input.head, vocab, tok);
    let (weight, words, keys) = tune_cache_weight(device, vocab, &tuning, &input.tune_docs)?;
    log::info!("word cache: weight {weight} tuned on {words} words (keys per weight {keys:?})");
    tuning.weight = weight;
    let mut cache = WordCache::learn(&input.train, vocab, tok);
    cache.weight = weight;
    Ok((cache, tuning, words, keys))
}

/// The device model of the suggestion strip for `plugin` with `gate` (q8 side network and
/// head, as the SDK builds it).
pub fn strip_device(
    plugin: &SidePlugin,
    head: &spa_model::DeviceHead,
    tok: &SpaTokenizer,
    gate: GateMode,
) -> Result<DeviceModel> {
    Ok(DeviceModel {
        side: spa_model::SideNetwork::new(
            &plugin.weights,
            spa_model::QuantMode::Q8,
            4 * spa_runtime::words::CONTEXT_MAX,
        )?,
        head: head.clone(),
        personal: Default::default(),
        gate,
        tokenizer: tok.clone(),
        base_identity: plugin.meta.base.clone(),
        projection: plugin.meta.projection.clone(),
    })
}

/// Trains `plugin` in place on `texts.train` without its end (SPA: side + gate) and reports
/// next-word quality of the suggestion strip before and after on `texts.held_out`, with and
/// without the personal word cache (`cfg.word_cache`), and which of them ships
/// ([`ShipDecision`], decided on the end of the training text). `head` is the device's
/// quantized head (the frozen tied head; training dequantizes only each batch's shortlist
/// rows, so no f32 copy of the head is held). `progress` returning `false`
/// cancels; the plugin is only replaced when training finishes.
pub fn personalize(
    plugin: &mut SidePlugin,
    head: &spa_model::DeviceHead,
    tok: &SpaTokenizer,
    source: &mut dyn FeatureSource,
    texts: &UserTexts,
    cfg: &PersonalizeConfig,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<PersonalizeReport> {
    // The end of the training text is the user's validation text (the word cache's weight
    // and the shipping decision): the side network never trains on it.
    let (head_texts, _) = split_tail(&texts.train, 0.1, cfg.cache_tuning_words);
    let mut specs = chunk_texts(tok, &head_texts, cfg.chunk_tokens)?;
    specs.truncate(cfg.max_chunks);
    if specs.len() < 4 {
        return Err(TrainError::Data(format!(
            "need at least 4 chunks of {} tokens of text to personalize, got {}",
            cfg.chunk_tokens,
            specs.len()
        )));
    }
    if texts.held_out.iter().all(|t| t.trim().is_empty()) {
        return Err(TrainError::Data("no held-out text".into()));
    }
    let feats = source.features(&specs, cfg.top_k)?;
    // Decoding the answers left freed buffers in the allocator's pools.
    spa_model::mem::release_free_heap();
    // The held-out and validation texts' features are fetched after training, so that the
    // app sees progress (and can cancel) as soon as the training features are in.
    personalize_inner(
        plugin,
        head,
        tok,
        std::borrow::Cow::Owned(feats),
        Measure::Fetch(source, texts),
        cfg,
        progress,
    )
}

/// Which tokens start a word (a space, then a letter): the targets the strip is scored on.
pub fn word_start_tokens(tok: &SpaTokenizer) -> Vec<bool> {
    (0..tok.vocab_size() as u32)
        .map(|id| {
            tok.decode(&[id]).is_ok_and(|t| {
                let mut c = t.chars();
                c.next() == Some(' ') && c.next().is_some_and(char::is_alphabetic)
            })
        })
        .collect()
}

/// Where the measurement phase gets its texts' features.
enum Measure<'a> {
    /// Already fetched: the held-out text's, and the cache input (`None`: no cache and no
    /// decision).
    Given(&'a [StripDoc], Option<&'a CacheInput>),
    /// Fetched from this source once training is done.
    Fetch(&'a mut dyn FeatureSource, &'a UserTexts),
}

/// [`personalize`] on features already fetched (`feats` from the training text without its
/// end, `held` the strip's features of the held-out text, `cache` the word cache's input and
/// the validation text of the shipping decision; `None`: no cache and no decision), e.g.
/// after the base was unloaded to measure device-scale memory.
#[allow(clippy::too_many_arguments)]
pub fn personalize_features(
    plugin: &mut SidePlugin,
    head: &spa_model::DeviceHead,
    tok: &SpaTokenizer,
    feats: &[SeqFeatures],
    held: &[StripDoc],
    cache: Option<&CacheInput>,
    cfg: &PersonalizeConfig,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<PersonalizeReport> {
    if held.iter().all(|d| d.windows.is_empty()) {
        return Err(TrainError::Data("no held-out text".into()));
    }
    personalize_inner(
        plugin,
        head,
        tok,
        std::borrow::Cow::Borrowed(feats),
        Measure::Given(held, cache),
        cfg,
        progress,
    )
}

fn personalize_inner(
    plugin: &mut SidePlugin,
    head: &spa_model::DeviceHead,
    tok: &SpaTokenizer,
    // Fetched here (owned: freed once training is done, before the measurement phase fetches
    // its own) or lent by the caller.
    feats: std::borrow::Cow<'_, [SeqFeatures]>,
    measure: Measure<'_>,
    cfg: &PersonalizeConfig,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<PersonalizeReport> {
    let all: &[SeqFeatures] = &feats;
    if all.len() < 4 {
        return Err(TrainError::Data(
            "need at least 4 training sequences".into(),
        ));
    }
    // The last tenth of the training text validates (early stopping).
    let n_val = (all.len() / 10).max(1);
    let (tr, va) = all.split_at(all.len() - n_val);
    let train_tokens: usize = tr.iter().map(|s| s.len()).sum();
    let dev_head = head.clone();
    let vocab = WordVocab::shared(tok, &plugin.meta.base);
    // Training first (the app sees progress, and can cancel, from the start), then every
    // candidate is measured.
    let graph = SideGraph::with_device_head(&plugin.weights, head, cfg.seed)?;
    let tcfg = TrainConfig {
        method: Method::Spa,
        lr: cfg.lr,
        batch: cfg.batch,
        max_steps: cfg.steps,
        eval_every: (cfg.steps / 8).max(5),
        patience: 3,
        seed: cfg.seed,
        usage_cost: cfg.usage_cost,
        loss_targets: cfg
            .word_start_loss
            .then(|| std::sync::Arc::new(word_start_tokens(tok))),
        micro_batch: cfg.micro_batch,
        ..Default::default()
    };
    let report = train::train(&graph, tr, va, &tcfg, None, progress)?;
    // The training features are not needed to measure: free them before the held-out and
    // validation texts' features arrive (device memory).
    drop(feats);
    spa_model::mem::release_free_heap();
    let (w, _) = graph.to_weights()?;
    let mut trained = plugin.clone();
    trained.weights = w;
    drop(graph);
    let (held_owned, cache_owned);
    let (held, cache) = match measure {
        Measure::Given(h, c) => (h, c),
        Measure::Fetch(source, texts) => {
            held_owned = strip_docs(source, tok, &texts.held_out, true, cfg.word_continuations)?;
            cache_owned = CacheInput::fetch(
                source,
                tok,
                &texts.train,
                cfg.cache_tuning_words,
                cfg.word_continuations,
            )?;
            (&held_owned[..], Some(&cache_owned))
        }
    };
    if held.iter().all(|d| d.windows.is_empty()) {
        return Err(TrainError::Data("no held-out text".into()));
    }
    let base_dev = strip_device(plugin, &dev_head, tok, GateMode::AlwaysBase)?;
    // Each candidate's (validation metrics, held-out metrics, held-out keys per word).
    let mut cands: BTreeMap<String, Candidate> = BTreeMap::new();
    // A candidate's held-out metrics; with a validation text, also its score there (with the
    // cache learned without that text) for the decision.
    let mut score = |name: &str,
                     dev: &DeviceModel,
                     caches: Option<(&WordCache, &WordCache)>|
     -> Result<NextWordMetrics> {
        let (m, per_word) = strip_metrics_per_word(dev, &vocab, caches.map(|c| c.0), held)?;
        if let Some(c) = cache {
            let val = strip_metrics(dev, &vocab, caches.map(|c| c.1), &c.tune_docs, &mut |_| {})?;
            cands.insert(name.into(), (val, m.clone(), per_word));
        }
        Ok(m)
    };
    let before = score("base", &base_dev, None)?;
    let built = match cache {
        Some(c) if cfg.word_cache => {
            let (wc, vc, words, _) = build_word_cache(&base_dev, &vocab, c)?;
            let m = score("cache", &base_dev, Some((&wc, &vc)))?;
            Some((wc, vc, words, m))
        }
        _ => None,
    };
    drop(base_dev);
    let spa_dev = strip_device(&trained, &dev_head, tok, GateMode::Learned)?;
    let after = score("spa", &spa_dev, None)?;
    let (cache_report, word_cache) = match built {
        Some((wc, vc, tuning_words, base_cache)) => (
            Some(CacheReport {
                weight: wc.weight,
                tuning_words,
                distinct_words: wc.len(),
                base_cache,
                spa_cache: score("spa_cache", &spa_dev, Some((&wc, &vc)))?,
            }),
            Some(wc),
        ),
        None => (None, None),
    };
    let decision = if cands.is_empty() {
        None
    } else {
        Some(decide(&cands)?)
    };
    *plugin = trained;
    Ok(PersonalizeReport {
        before,
        after,
        train: report,
        train_tokens,
        peak_rss_bytes: peak_rss_bytes(),
        cache: cache_report,
        decision,
        word_cache,
    })
}

/// Converts a server's features answer for `tokens` into [`SeqFeatures`], checking every size
/// (a malformed answer is an error, never a panic).
pub fn from_wire(
    tokens: &[u32],
    resp: &spa_protocol::FeaturesResponse,
    n_taps: usize,
    width: usize,
    top_k: usize,
) -> Result<SeqFeatures> {
    let bad = |m: &str| TrainError::Data(format!("features answer: {m}"));
    let n = tokens.len();
    let t = resp.taps.as_ref().ok_or_else(|| bad("no taps"))?;
    let (rows, cols, taps, scales) =
        spa_protocol::decode_i8_rows(t, &spa_protocol::Limits::default())
            .map_err(|e| bad(&format!("taps: {e}")))?;
    if rows != n * n_taps || cols != width {
        return Err(bad("taps of the wrong shape"));
    }
    let c = top_k + 1;
    if n < 2
        || resp.cand_ids.len() != (n - 1) * c
        || resp.cand_logits.len() != (n - 1) * c
        || resp.target_idx.len() != n - 1
        || resp.target_idx.iter().any(|&i| i as usize >= c)
        || resp.cand_logits.iter().any(|x| !x.is_finite())
    {
        return Err(bad("candidate lists of the wrong size"));
    }
    Ok(SeqFeatures {
        tokens: tokens.to_vec(),
        loss_start: 1,
        taps,
        scales,
        cand_ids: resp.cand_ids.clone(),
        cand_logits: resp.cand_logits.clone(),
        target_idx: resp.target_idx.clone(),
    })
}

/// Features from the base server over HTTPS (`POST /v1/features`), for the mobile SDK.
/// `features` blocks on `handle`: call it from a blocking thread (e.g. `spawn_blocking`),
/// never from inside an async task.
#[derive(Debug)]
pub struct RemoteFeatures<'a> {
    /// Connected client.
    pub client: &'a spa_runtime::Client,
    /// Runtime to run the requests on.
    pub handle: tokio::runtime::Handle,
    /// Tapped layers of the server's projection (from its manifest).
    pub n_taps: usize,
    /// Side width of the server's projection.
    pub width: usize,
}

impl FeatureSource for RemoteFeatures<'_> {
    fn features(&mut self, specs: &[SeqSpec], top_k: usize) -> Result<Vec<SeqFeatures>> {
        specs
            .iter()
            .map(|s| {
                let resp = self
                    .handle
                    .block_on(self.client.features(&s.tokens, top_k as u32))
                    .map_err(TrainError::Runtime)?;
                from_wire(&s.tokens, &resp, self.n_taps, self.width, top_k)
            })
            .collect()
    }

    fn window(&mut self, req: &WindowRequest<'_>) -> Result<WindowFeatures> {
        remote_window_features(self.client, &self.handle, req)
    }
}

#[cfg(test)]
mod tests {
    use super::{decide, split_tail, Candidate, NextWordMetrics};
    use std::collections::BTreeMap;

    fn cand(val_savings: f64, held_savings: f64, per_word: Vec<(usize, usize)>) -> Candidate {
        let m = |k: f64| NextWordMetrics {
            words: per_word.len(),
            keystroke_savings: k,
            ..Default::default()
        };
        (m(val_savings), m(held_savings), per_word)
    }

    #[test]
    fn the_best_on_validation_ships_with_its_held_out_gain() {
        // 100 held-out words of 5 keys each: the base saves 2 on every word (40%), the cache 3
        // on every word (60%), the side network 2 on half and 4 on the other half (60%).
        let base = vec![(2, 5); 100];
        let cache = vec![(3, 5); 100];
        let spa: Vec<(usize, usize)> = (0..100).map(|i| (2 + 2 * (i % 2), 5)).collect();
        let mut c = BTreeMap::new();
        c.insert("base".to_string(), cand(40.0, 40.0, base.clone()));
        c.insert("cache".to_string(), cand(45.0, 60.0, cache));
        c.insert("spa".to_string(), cand(44.0, 60.0, spa));
        let d = decide(&c).unwrap();
        assert_eq!(d.shipped, "cache");
        assert!((d.gain_points - 20.0).abs() < 1e-9);
        // Every word gains exactly 1 of 5 keys: the interval is a point at +20.
        assert!((d.ci95_minus_base.0 - 20.0).abs() < 1e-9);
        assert!((d.ci95_minus_base.1 - 20.0).abs() < 1e-9);
        assert_eq!(d.validation_savings["spa"], 44.0);
        // A tie on validation ships the simpler candidate; nothing beating the base ships it.
        c.insert("spa".to_string(), cand(45.0, 60.0, vec![(3, 5); 100]));
        assert_eq!(decide(&c).unwrap().shipped, "cache");
        c.insert("cache".to_string(), cand(39.0, 60.0, vec![(3, 5); 100]));
        c.insert("spa".to_string(), cand(40.0, 60.0, vec![(3, 5); 100]));
        let d = decide(&c).unwrap();
        assert_eq!(d.shipped, "base");
        assert_eq!(d.gain_points, 0.0);
        assert_eq!(d.ci95_minus_base, (0.0, 0.0));
        // The side network's per-word gains vary: the interval has width and holds the mean.
        c.insert(
            "spa".to_string(),
            cand(50.0, 60.0, (0..100).map(|i| (2 + 2 * (i % 2), 5)).collect()),
        );
        let d = decide(&c).unwrap();
        assert_eq!(d.shipped, "spa");
        let (lo, hi) = d.ci95_minus_base;
        assert!(
            lo < 20.0 && 20.0 < hi && lo > 10.0 && hi < 30.0,
            "{lo} {hi}"
        );
        // Different held-out words are an error, not a silent figure.
        c.insert("spa".to_string(), cand(50.0, 60.0, vec![(3, 5); 99]));
        assert!(decide(&c).is_err());
        c.remove("base");
        assert!(decide(&c).is_err());
    }

    #[test]
    fn tail_is_the_last_words() {
        let t = vec!["a b c".to_string(), "d  e\nf g h".to_string()];
        let (head, tail) = split_tail(&t, 0.5, 100);
        assert_eq!(tail, ["e\nf g h"]);
        assert_eq!(head, ["a b c", "d  "]);
        let (head, tail) = split_tail(&t, 1.0, 6);
        assert_eq!(tail, ["c", "d  e\nf g h"]);
        assert_eq!(head, ["a b "]);
        let (head, tail) = split_tail(&t, 0.0, 6);
        assert!(tail.is_empty() && head == t);
    }
}
