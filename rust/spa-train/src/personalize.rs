//! On-device personalization (the keyboard use case): train the side network + gate on one
//! user's text and measure next-word suggestions on their held-out text.
//!
//! The base features of the user's text come from a [`FeatureSource`]: in-process (CLI, eval)
//! or the base server (`spa_runtime::Client::features`, used by the mobile SDK). The side
//! weights, the gradients and the loss never leave the device; the server sees token ids, as it
//! does when the same text is typed and completed.
//!
//! Metrics on held-out text, over the shortlist the device scores (the base's top-k per position,
//! the target is never added):
//! - next-word top-1 / top-3: at each word start, is the actual word the first / among the first
//!   three whole-word suggestions (a word the tokenizer splits into several tokens counts as a
//!   miss for both models);
//! - keystroke savings: the user types a word letter by letter and taps a suggestion as soon as
//!   the word is among the top three suggestions matching the typed prefix (a tap costs one key
//!   and inserts the word and its space); savings = keys saved / keys without suggestions;
//! - perplexity over the shortlist (target included).
//!
//! With a side network, suggestions rank the gate's mixture `g · P_side + (1 - g) · P_base` over
//! the shortlist: the distribution SPA training fits. (Generation must pick one path per token for
//! the round protocol; a suggestion strip need not, and the hard choice ranked worse.) This is
//! the rule of `spa_runtime::suggest`, so the measured savings are what the SDK's strip gives.

use crate::error::{Result, TrainError};
use crate::features::{SeqFeatures, SeqSpec};
use crate::sidegrad::{make_batch, SideGraph, SideInput};
use crate::train::{self, Method, Progress, TrainConfig, TrainReport};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use spa_model::{SidePlugin, SpaTokenizer};
use std::collections::HashMap;

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
    /// Perplexity over the shortlist.
    pub perplexity: f64,
    /// Positions where the side path was used (%), 0 for the base.
    pub side_usage: f64,
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
}

/// Provides base features for token sequences (the base runs elsewhere).
pub trait FeatureSource {
    /// Features of each sequence with `top_k` candidates per position.
    fn features(&mut self, specs: &[SeqSpec], top_k: usize) -> Result<Vec<SeqFeatures>>;
}

/// Features from a base model in this process.
#[derive(Debug)]
pub struct LocalFeatures<'a> {
    /// The base.
    pub base: &'a spa_model::BaseModel,
    /// The shared projection.
    pub proj: &'a spa_model::DownProjection,
    /// Hide progress bars.
    pub quiet: bool,
}

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
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct WordTable {
    text: HashMap<u32, Option<String>>,
}

impl WordTable {
    /// The word a token stands for when it is a whole word with a leading space.
    fn word(&mut self, tok: &SpaTokenizer, id: u32) -> Option<String> {
        self.text
            .entry(id)
            .or_insert_with(|| tok.whole_word(id))
            .clone()
    }
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

/// Next-word metrics of the base (`graph = None`) or of the gated side network on `feats`.
pub fn next_word_metrics(
    tok: &SpaTokenizer,
    graph: Option<&SideGraph>,
    feats: &[SeqFeatures],
) -> Result<NextWordMetrics> {
    next_word_trace(tok, graph, feats, &mut |_| {})
}

/// [`next_word_metrics`], also reporting every word to `on_word` (the keyboard demo).
pub fn next_word_trace(
    tok: &SpaTokenizer,
    graph: Option<&SideGraph>,
    feats: &[SeqFeatures],
    on_word: &mut dyn FnMut(&WordEvent),
) -> Result<NextWordMetrics> {
    let mut table = WordTable {
        text: HashMap::new(),
    };
    let (mut words, mut top1, mut top3, mut keys, mut saved) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut nll, mut npos, mut side_n) = (0f64, 0usize, 0usize);
    for chunk in feats.chunks(8) {
        let refs: Vec<&SeqFeatures> = chunk.iter().collect();
        let (scores, p_side) = match graph {
            Some(g) => {
                let c = &g.config;
                let emb = (g.input == SideInput::Embeddings).then(|| g.head().clone());
                let b = make_batch(&refs, c.taps.len(), c.width, emb.as_ref())?;
                let (s, p) = g.scores(&b)?;
                (Some(s), p)
            }
            None => (None, Vec::new()),
        };
        let mut row = 0;
        for s in refs {
            let c = s.cand_logits.len() / s.n_loss().max(1);
            let k = c - 1; // the last slot is the target (or a pad): not a suggestion
            for j in 0..s.n_loss() {
                let base_row = &s.cand_logits[j * c..(j + 1) * c];
                // The suggestion distribution: the gate's mixture of the side path and the base
                // (the distribution SPA training fits), or the base alone.
                let probs = match (&scores, graph) {
                    (Some(sc), Some(_)) => {
                        let g = p_side[row];
                        if g > 0.5 {
                            side_n += 1;
                        }
                        spa_model::gate_mixture(g, &sc[row], base_row)
                    }
                    _ => spa_model::softmax(base_row),
                };
                row += 1;
                // Perplexity over the shortlist.
                nll -= (probs[s.target_idx[j] as usize].max(1e-30) as f64).ln();
                npos += 1;
                // Word-start positions only.
                let next = s.tokens[s.loss_start + j];
                let Ok(next_text) = tok.decode(&[next]) else {
                    continue;
                };
                let Some(first) = next_text.strip_prefix(' ') else {
                    continue;
                };
                if !first.chars().next().is_some_and(char::is_alphabetic) {
                    continue;
                }
                // The whole word: this token plus continuation tokens without a leading space.
                let mut word = first.to_string();
                let mut whole = true;
                for &t in &s.tokens[s.loss_start + j + 1..] {
                    let tt = tok.decode(&[t]).unwrap_or_default();
                    if tt.starts_with(' ') || !tt.chars().next().is_some_and(char::is_alphabetic) {
                        break;
                    }
                    word.push_str(&tt);
                    whole = false;
                }
                if s.loss_start + j + 1 == s.tokens.len() && whole {
                    // Word at the very end of a chunk: its continuation is unknown; skip.
                    continue;
                }
                let word_len = word.chars().count();
                words += 1;
                keys += word_len + 1;
                let mut ranked: Vec<(f32, u32)> =
                    (0..k).map(|i| (probs[i], s.cand_ids[j * c + i])).collect();
                ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
                let cands: Vec<String> = ranked
                    .iter()
                    .filter_map(|&(_, id)| table.word(tok, id))
                    .collect();
                if whole {
                    if cands.first() == Some(&word) {
                        top1 += 1;
                    }
                    if cands.iter().take(3).any(|w| w == &word) {
                        top3 += 1;
                    }
                }
                let mut cost = word_len + 1;
                if whole {
                    for typed in 0..word_len {
                        let prefix: String = word.chars().take(typed).collect();
                        let shown: Vec<&String> = cands
                            .iter()
                            .filter(|w| w.starts_with(&prefix))
                            .take(3)
                            .collect();
                        if shown.iter().any(|w| **w == word) {
                            cost = typed + 1;
                            break;
                        }
                    }
                }
                saved += word_len + 1 - cost;
                on_word(&WordEvent {
                    word: word.clone(),
                    suggestions: cands.iter().take(3).cloned().collect(),
                    keys: cost,
                    keys_without: word_len + 1,
                });
            }
        }
    }
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

/// The user's text: earlier writing to learn from, later writing to measure on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserTexts {
    /// Training text.
    pub train: Vec<String>,
    /// Held-out text (never trained on).
    pub held_out: Vec<String>,
}

/// Trains `plugin` in place on `texts.train` (SPA: side + gate) and reports next-word quality
/// before and after on `texts.held_out`. `head` is the frozen tied head `[vocab, hidden]` (the
/// device's `DeviceAssets::head`). `progress` returning `false` cancels; the plugin is only
/// replaced when training finishes.
pub fn personalize(
    plugin: &mut SidePlugin,
    head: &Tensor,
    tok: &SpaTokenizer,
    source: &mut dyn FeatureSource,
    texts: &UserTexts,
    cfg: &PersonalizeConfig,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<PersonalizeReport> {
    let mut specs = chunk_texts(tok, &texts.train, cfg.chunk_tokens)?;
    specs.truncate(cfg.max_chunks);
    if specs.len() < 4 {
        return Err(TrainError::Data(format!(
            "need at least 4 chunks of {} tokens of text to personalize, got {}",
            cfg.chunk_tokens,
            specs.len()
        )));
    }
    let mut held = chunk_texts(tok, &texts.held_out, cfg.chunk_tokens)?;
    held.truncate(cfg.max_chunks / 2 + 1);
    let feats = source.features(&specs, cfg.top_k)?;
    let held_feats = source.features(&held, cfg.top_k)?;
    personalize_features(plugin, head, tok, &feats, &held_feats, cfg, progress)
}

/// [`personalize`] on features already fetched (`feats` from the training text, `held_feats`
/// from the held-out text), e.g. after the base was unloaded to measure device-scale memory.
pub fn personalize_features(
    plugin: &mut SidePlugin,
    head: &Tensor,
    tok: &SpaTokenizer,
    feats: &[SeqFeatures],
    held_feats: &[SeqFeatures],
    cfg: &PersonalizeConfig,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<PersonalizeReport> {
    if feats.len() < 4 || held_feats.is_empty() {
        return Err(TrainError::Data(
            "need at least 4 training and 1 held-out sequence".into(),
        ));
    }
    // The last tenth of the training text validates (early stopping).
    let n_val = (feats.len() / 10).max(1);
    let (tr, va) = feats.split_at(feats.len() - n_val);
    let graph = SideGraph::new(&plugin.weights, SideInput::BaseTaps, head.clone(), cfg.seed)?;
    let before = next_word_metrics(tok, None, held_feats)?;
    let tcfg = TrainConfig {
        method: Method::Spa,
        lr: cfg.lr,
        batch: cfg.batch,
        max_steps: cfg.steps,
        eval_every: (cfg.steps / 8).max(5),
        patience: 3,
        seed: cfg.seed,
        usage_cost: cfg.usage_cost,
        ..Default::default()
    };
    let report = train::train(&graph, tr, va, &tcfg, None, progress)?;
    let after = next_word_metrics(tok, Some(&graph), held_feats)?;
    let (w, _) = graph.to_weights()?;
    plugin.weights = w;
    Ok(PersonalizeReport {
        before,
        after,
        train: report,
        train_tokens: tr.iter().map(|s| s.len()).sum(),
        peak_rss_bytes: peak_rss_bytes(),
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
    let rows = n * n_taps;
    if t.encoding != spa_protocol::TensorEncoding::I8RowF16Scale as i32
        || t.shape != [rows as u32, width as u32]
        || t.data.len() != rows * width
        || t.scales.len() != rows * 2
    {
        return Err(bad("taps of the wrong shape or encoding"));
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
        taps: t.data.iter().map(|&b| b as i8).collect(),
        scales: t
            .scales
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
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
                    .map_err(|e| TrainError::Data(format!("base server: {e}")))?;
                from_wire(&s.tokens, &resp, self.n_taps, self.width, top_k)
            })
            .collect()
    }
}
