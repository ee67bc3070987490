//! Next-word suggestions (the keyboard use case): the words a suggestion strip shows for the
//! text before the cursor.
//!
//! One stateless `POST /v1/features` round trip per context: the device sends the token ids of
//! the text before the cursor (the last 129-256 tokens of a long text, see
//! [`words::context_start`]); the server runs the frozen base over them and returns the base's
//! final normed hidden state at the last position (int8, like a draft state) plus the tapped
//! states of the positions the device has not seen yet. The device runs the personal side
//! network and gate over the taps and scores the **whole vocabulary** with the LM head it holds:
//! base logits `head · h`, side logits `head · h + head · up(s)` (the head is linear, so the
//! server never needs the side network and the device never needs the base), ranked by the
//! gate's mixture `g · P_side + (1 - g) · P_base` (the distribution SPA training fits), and
//! optionally interpolated with the user's word cache ([`words::WordCache`]).
//!
//! A [`Suggester`] keeps the last context's ranking and side states: a typed letter only filters
//! the ranking (no request), and a new word sends only the new positions' taps back. The
//! ranking is [`words::RankedWords`], the same code the keystroke-savings metric of `spa-train`
//! runs. Only token ids of text the user typed leave the device.

use crate::device::DeviceModel;
use crate::error::{Result, RuntimeError};
use crate::words::{self, RankedWords, WordCache, WordVocab};
use crate::Client;
use spa_model::{GateMode, SideCache, SideStep};
use spa_protocol::{decode_tensor, FeaturesRequest, Limits};
use std::sync::{Arc, RwLock};

/// Most context tokens sent (the latest ones; the server's limit is 512).
pub const SUGGEST_MAX_CONTEXT: usize = words::CONTEXT_MAX;

/// Suggestions for one cursor position.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggestions {
    /// Whole words, best first, each starting with the partly typed word.
    pub words: Vec<String>,
    /// The partly typed word they complete ("" at a word boundary).
    pub partial: String,
    /// The personal side path dominates the ranking (the gate's probability is above the
    /// network's gate threshold, 0.5 unless training chose another).
    pub side: bool,
    /// The gate's probability of the side path.
    pub p_side: f32,
    /// Context tokens the server saw.
    pub context_tokens: usize,
    /// Whether this call asked the server (false: the last context's ranking was re-filtered).
    pub requested: bool,
}

/// Splits the text before the cursor into the finished context and the partly typed word: the
/// trailing run of letters and apostrophes (empty after a space or punctuation).
///
/// ```
/// use spa_runtime::suggest::split_partial;
/// assert_eq!(split_partial("I love New Yo"), ("I love New", "Yo"));
/// assert_eq!(split_partial("I love "), ("I love", ""));
/// assert_eq!(split_partial("Hello,"), ("Hello,", ""));
/// ```
pub fn split_partial(text: &str) -> (&str, &str) {
    let cut = text
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word_char(*c))
        .last()
        .map(|(i, _)| i)
        .unwrap_or(text.len());
    (text[..cut].trim_end(), &text[cut..])
}

fn is_word_char(c: char) -> bool {
    c.is_alphabetic() || c == '\''
}

/// The suggestion strip of one device model: caches the last context's ranking (re-filtered
/// for every typed letter without a request) and its side states (a longer context sends only
/// its new positions' taps), and holds the user's optional word cache.
#[derive(Debug)]
pub struct Suggester {
    vocab: Arc<WordVocab>,
    cache: RwLock<Option<Arc<WordCache>>>,
    last: tokio::sync::Mutex<Option<Last>>,
}

#[derive(Debug)]
struct Last {
    /// Address of the device model the state belongs to.
    device: usize,
    window: Vec<u32>,
    prev: Option<String>,
    /// Side states over `window` (when the gate uses the side path).
    side: Option<SideCache>,
    step: Option<SideStep>,
    ranked: Arc<RankedWords>,
    cache_id: usize,
}

impl Suggester {
    /// A strip for `device` (the word list of its tokenizer is built once per process).
    pub fn new(device: &DeviceModel) -> Self {
        Self {
            vocab: WordVocab::shared(&device.tokenizer, &device.base_identity),
            cache: RwLock::new(None),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The whole words of the device's vocabulary.
    pub fn vocab(&self) -> &Arc<WordVocab> {
        &self.vocab
    }

    /// Uses `cache` (the user's words, interpolated with the model) from now on; `None` turns
    /// it off.
    pub fn set_cache(&self, cache: Option<Arc<WordCache>>) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = cache;
    }

    /// The word cache in use.
    pub fn cache(&self) -> Option<Arc<WordCache>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Up to `count` next-word suggestions for `text` (the text before the cursor), from
    /// `device` (always the same device model for one suggester).
    ///
    /// Errors are those of the features request (network, key, limits) and of a malformed
    /// answer ([`RuntimeError::Protocol`]); an empty text asks for the first word of a document.
    pub async fn suggest(
        &self,
        client: &Client,
        device: &DeviceModel,
        text: &str,
        count: usize,
    ) -> Result<Suggestions> {
        let (context, partial) = split_partial(text);
        let tok = &device.tokenizer;
        let ids = tok
            .encode_fragment(context)
            .map_err(|e| RuntimeError::Model(e.to_string()))?;
        let window = words::context_window(tok, &ids);
        let prev = words::prev_word(context).map(str::to_string);
        let cache = self.cache();
        let cache_id = cache.as_ref().map_or(0, |c| Arc::as_ptr(c) as usize);
        let dev_id = device as *const DeviceModel as usize;
        let mut last = self.last.lock().await;
        let reuse = last.as_ref().is_some_and(|l| {
            l.device == dev_id && l.window == window && l.prev == prev && l.cache_id == cache_id
        });
        if !reuse {
            let prior = last.take().filter(|l| l.device == dev_id);
            *last = Some(
                self.rank_context(client, device, window, prev, cache, cache_id, prior)
                    .await?,
            );
        }
        let l = last
            .as_ref()
            .ok_or_else(|| RuntimeError::Protocol("no ranking".into()))?;
        let p_side = l.step.as_ref().map_or(0.0, |s| s.p_side);
        Ok(Suggestions {
            words: l.ranked.top(partial, count),
            partial: partial.to_string(),
            side: l.step.is_some()
                && device
                    .gate
                    .use_side(p_side, device.side.config().gate_threshold),
            p_side,
            context_tokens: l.window.len(),
            requested: !reuse,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn rank_context(
        &self,
        client: &Client,
        device: &DeviceModel,
        window: Vec<u32>,
        prev: Option<String>,
        cache: Option<Arc<WordCache>>,
        cache_id: usize,
        prior: Option<Last>,
    ) -> Result<Last> {
        let n = window.len();
        let use_side = device.gate != GateMode::AlwaysBase;
        // Side states of the shared prefix with the last context are kept; the server sends
        // taps only for the positions after it (at least the last one).
        let (mut side, from) = match prior.and_then(|p| p.side.map(|s| (s, p.window))) {
            Some((mut sc, old)) if use_side => {
                let common = old
                    .iter()
                    .zip(&window)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(n - 1);
                sc.truncate(common);
                (Some(sc), common)
            }
            _ if use_side => (Some(device.side.new_cache()), 0),
            _ => (None, n - 1),
        };
        let resp = client
            .features_with(&FeaturesRequest {
                tokens: window.clone(),
                top_k: 0,
                hidden_positions: vec![(n - 1) as u32],
                taps_from: from as u32,
                continuations: words::CONTINUATIONS as u32,
                continuation_positions: vec![(n - 1) as u32],
            })
            .await?;
        let limits = Limits::default();
        let cfg = device.side.config();
        let n_taps = cfg.taps.len();
        let hidden = decode_tensor(
            resp.hidden
                .as_ref()
                .ok_or_else(|| RuntimeError::Protocol("features answer without hidden".into()))?,
            &limits,
        )?;
        if hidden.rows != 1 || hidden.cols != cfg.base_hidden {
            return Err(RuntimeError::Protocol(
                "features answer: hidden state of the wrong shape".into(),
            ));
        }
        let mut step = None;
        if let Some(sc) = side.as_mut() {
            let taps = decode_tensor(
                resp.taps
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Protocol("features answer without taps".into()))?,
                &limits,
            )?;
            if taps.rows != (n - from) * n_taps || taps.cols != cfg.width || sc.len() != from {
                return Err(RuntimeError::Protocol(format!(
                    "features answer: taps of the wrong shape for {} new positions",
                    n - from
                )));
            }
            let zeros = vec![0f32; cfg.base_hidden];
            for p in 0..n - from {
                let z: Vec<Vec<f32>> = (0..n_taps)
                    .map(|t| taps.row(p * n_taps + t).to_vec())
                    .collect();
                step = Some(device.side.step(&z, &zeros, sc)?);
            }
        }
        let probs = words::next_token_probs(device, hidden.row(0), step.as_ref())?;
        let conts = words::decode_continuations(
            device,
            &self.vocab,
            &resp.cont_ids,
            resp.cont_hidden.as_ref(),
            words::CONTINUATIONS,
        )?;
        let ranked = RankedWords::new(
            &probs,
            &conts,
            &self.vocab,
            cache.as_deref(),
            prev.as_deref(),
        );
        Ok(Last {
            device: device as *const DeviceModel as usize,
            window,
            prev,
            side,
            step,
            ranked: Arc::new(ranked),
            cache_id,
        })
    }
}

/// Up to `count` next-word suggestions for `text` (the text before the cursor): one
/// [`Suggester::suggest`] without a word cache or a kept state.
pub async fn suggest(
    client: &Client,
    device: &DeviceModel,
    text: &str,
    count: usize,
) -> Result<Suggestions> {
    Suggester::new(device)
        .suggest(client, device, text, count)
        .await
}

#[cfg(test)]
mod tests {
    use super::split_partial;

    #[test]
    fn partial_word_split() {
        assert_eq!(split_partial(""), ("", ""));
        assert_eq!(split_partial("Yo"), ("", "Yo"));
        assert_eq!(split_partial("it's ok"), ("it's", "ok"));
        assert_eq!(split_partial("don'"), ("", "don'"));
        assert_eq!(split_partial("end.  "), ("end.", ""));
        assert_eq!(split_partial("naïve café"), ("naïve", "café"));
        assert_eq!(split_partial("x 42"), ("x 42", ""));
    }
}
