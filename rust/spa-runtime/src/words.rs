//! Next-word ranking over the whole vocabulary: the one ranking rule of the suggestion strip
//! ([`crate::suggest`]) and of the keystroke-savings metric (`spa_train::personalize`).
//!
//! - [`next_token_probs`]: the next-token distribution at one position over the whole
//!   vocabulary. The base's logits are `head · h` (`h` = the base's final normed hidden state,
//!   sent by the server); with a side state the side path's logits are
//!   `head · h + head · up(s)` and the two are mixed by the gate.
//! - [`RankedWords`]: every whole word (a token with a leading space and letters only) ranked by
//!   that distribution, plus the words of two tokens the base continues (the server extends
//!   the context by each of its [`CONTINUATIONS`] most likely word-start tokens and sends the
//!   hidden state after it; the device's head gives the second token, see [`Continuation`]),
//!   optionally interpolated with the user's [`WordCache`] (which also brings the user's
//!   longer words); [`RankedWords::top`] filters by the typed prefix without asking the server
//!   again, [`RankedWords::keys_to_enter`] is the keystroke rule.
//! - [`context_start`]: how much context the strip sends (up to [`CONTEXT_MAX`] tokens).

use crate::device::DeviceModel;
use crate::error::{Result, RuntimeError};
use spa_model::{GateMode, SideStep, SpaTokenizer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Most context tokens before the cursor that the strip sends.
pub const CONTEXT_MAX: usize = 256;
/// The context window moves in steps of this many tokens, so a long text keeps between
/// `CONTEXT_MAX - CONTEXT_STEP + 1` and `CONTEXT_MAX` tokens of context.
pub const CONTEXT_STEP: usize = 128;
/// Base candidates per position whose logits the side path moves (the shortlist the side
/// network trains on and the speculative rounds score: the base's top 32).
pub const SIDE_SHORTLIST: usize = 32;
/// Suggestions a strip shows (the keystroke rule's strip width).
pub const STRIP: usize = 3;

/// First context token kept when `n` tokens precede the cursor: 0 up to [`CONTEXT_MAX`], then a
/// multiple of [`CONTEXT_STEP`] leaving 129-256 tokens. The window only moves every 128 tokens,
/// so consecutive requests share their context (and the device its side states).
///
/// ```
/// use spa_runtime::words::context_start;
/// assert_eq!(context_start(10), 0);
/// assert_eq!(context_start(256), 0);
/// assert_eq!(context_start(257), 128);
/// assert_eq!(context_start(384), 128);
/// assert_eq!(context_start(385), 256);
/// ```
pub fn context_start(n: usize) -> usize {
    if n <= CONTEXT_MAX {
        0
    } else {
        (n - (CONTEXT_MAX - CONTEXT_STEP + 1)) / CONTEXT_STEP * CONTEXT_STEP
    }
}

/// The tokens the strip sends for the text `ids` before the cursor (the text's own ids, no
/// BOS): the window of [`context_start`], with the document-start token in front when the
/// window starts the text and the tokenizer adds BOS (or the text is empty).
pub fn context_window(tok: &SpaTokenizer, ids: &[u32]) -> Vec<u32> {
    let a = context_start(ids.len());
    let mut out = Vec::with_capacity(ids.len() - a + 1);
    if a == 0 && (ids.is_empty() || tok.add_bos()) {
        out.push(start_token(tok));
    }
    out.extend_from_slice(&ids[a..]);
    out
}

/// The token that starts a document: BOS when the model has one, else its end-of-text id (what
/// separates documents in training).
pub fn start_token(tok: &SpaTokenizer) -> u32 {
    tok.bos()
        .or_else(|| tok.eos_ids().first().copied())
        .unwrap_or(0)
}

/// The whole words of a vocabulary: token id -> word (leading space stripped), built once per
/// tokenizer ([`WordVocab::shared`]), and the word pieces that can follow a word's first token.
#[derive(Debug)]
pub struct WordVocab {
    /// (token id, word) of every whole-word token, by id.
    words: Vec<(u32, Arc<str>)>,
    /// Word -> index into `words`.
    index: HashMap<Arc<str>, usize>,
    /// Token id -> index into `words`.
    by_id: HashMap<u32, usize>,
    /// (token id, text) of every word piece: letters only, no leading space (the second token
    /// of a word such as " Pres" + "ident").
    pieces: Vec<(u32, Arc<str>)>,
    /// Per token id: it continues the word before it (starts with a letter or an apostrophe,
    /// no space). Empty for a vocabulary built from words alone.
    continues: Vec<bool>,
}

impl WordVocab {
    /// Decodes every token of `tok` once (about 0.1 s for 49k tokens).
    pub fn new(tok: &SpaTokenizer) -> Self {
        let n = tok.vocab_size();
        let (mut words, mut pieces, mut continues) = (Vec::new(), Vec::new(), vec![false; n]);
        for id in 0..n as u32 {
            if let Some(w) = tok.whole_word(id) {
                words.push((id, w));
                continue;
            }
            let Ok(text) = tok.decode(&[id]) else {
                continue;
            };
            if text.starts_with(|c: char| c.is_alphabetic() || c == '\'') {
                continues[id as usize] = true;
                if text.chars().all(char::is_alphabetic) {
                    pieces.push((id, text));
                }
            }
        }
        let mut v = Self::from_words(words);
        v.pieces = pieces.into_iter().map(|(id, t)| (id, t.into())).collect();
        v.continues = continues;
        v
    }

    /// A vocabulary of the given (token id, word) pairs (the first id of a repeated word wins),
    /// without word pieces.
    pub fn from_words(pairs: impl IntoIterator<Item = (u32, String)>) -> Self {
        let mut words = Vec::new();
        let mut index = HashMap::new();
        let mut by_id = HashMap::new();
        for (id, w) in pairs {
            let w: Arc<str> = w.into();
            if !index.contains_key(&w) {
                index.insert(w.clone(), words.len());
                by_id.insert(id, words.len());
                words.push((id, w));
            }
        }
        Self {
            words,
            index,
            by_id,
            pieces: Vec::new(),
            continues: Vec::new(),
        }
    }

    /// [`WordVocab::from_words`] with word pieces: (token id, text) of tokens that continue a
    /// word (letters only, no leading space).
    pub fn with_pieces(
        words: impl IntoIterator<Item = (u32, String)>,
        pieces: impl IntoIterator<Item = (u32, String)>,
    ) -> Self {
        let mut v = Self::from_words(words);
        v.pieces = pieces.into_iter().map(|(id, t)| (id, t.into())).collect();
        let n = v
            .pieces
            .iter()
            .map(|p| p.0 as usize + 1)
            .chain(v.words.iter().map(|w| w.0 as usize + 1))
            .max()
            .unwrap_or(0);
        v.continues = vec![false; n];
        for &(id, _) in &v.pieces {
            v.continues[id as usize] = true;
        }
        v
    }

    /// The vocabulary of `tok`, built once per process and tokenizer (keyed by `key`, e.g. the
    /// base identity).
    pub fn shared(tok: &SpaTokenizer, key: &str) -> Arc<Self> {
        static ALL: OnceLock<Mutex<HashMap<String, Arc<WordVocab>>>> = OnceLock::new();
        let all = ALL.get_or_init(Default::default);
        let mut g = all.lock().unwrap_or_else(|e| e.into_inner());
        g.entry(key.to_string())
            .or_insert_with(|| Arc::new(Self::new(tok)))
            .clone()
    }

    /// Number of whole-word tokens.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when the vocabulary has no whole-word token.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The token id of a one-token word.
    pub fn token_of(&self, word: &str) -> Option<u32> {
        self.index.get(word).map(|&i| self.words[i].0)
    }
}

/// The next-token distribution over the whole vocabulary at one position, by the device's
/// rule: base logits `head · base_hidden`; with `side` (a side step run with a zero base
/// hidden, so `side.hidden = up(s)`), the side path redistributes the base's probability mass
/// of its top [`SIDE_SHORTLIST`] tokens (and the personal vocabulary) by the side logits
/// `head · base_hidden + head · up(s)` over that shortlist, the distribution the side network
/// is trained on; the rest of the vocabulary keeps the base's probabilities. The two are mixed
/// by the gate (`g · P_side + (1 - g) · P_base`), or the side path is used alone for
/// [`GateMode::AlwaysSide`]. Costs one full-head product (1.7 ms at q8 for SmolLM2 on a
/// laptop core) and a 32-row one for the side.
pub fn next_token_probs(
    device: &DeviceModel,
    base_hidden: &[f32],
    side: Option<&SideStep>,
) -> Result<Vec<f32>> {
    let base = device.head.full(base_hidden)?;
    if base.iter().any(|x| !x.is_finite()) {
        return Err(RuntimeError::Protocol("non-finite base logits".into()));
    }
    let p_base = spa_model::softmax(&base);
    // The side path's distribution: what it was trained on is the next token's distribution
    // *within* the base's top-k shortlist (as in the speculative rounds); the shortlist's
    // total mass and the rest of the vocabulary stay the base's. (The training loss does not
    // see a shift of all shortlist logits, so letting the side logits set the shortlist's mass
    // over the whole vocabulary inflated it and squeezed every other word.)
    let side_probs = |s: &SideStep| -> Result<Vec<f32>> {
        let cands = device
            .personal
            .candidates(&spa_model::top_k(&base, SIDE_SHORTLIST));
        let delta = device.head.shortlist(&cands, &s.hidden)?;
        let logits: Vec<f32> = cands
            .iter()
            .zip(&delta)
            .map(|(&c, d)| base[c as usize] + d)
            .collect();
        let within = spa_model::softmax(&logits);
        let mass: f32 = cands.iter().map(|&c| p_base[c as usize]).sum();
        let mut out = p_base.clone();
        for (&c, w) in cands.iter().zip(within) {
            out[c as usize] = mass * w;
        }
        Ok(out)
    };
    Ok(match (device.gate, side) {
        (GateMode::AlwaysBase, _) | (_, None) => p_base,
        (GateMode::AlwaysSide, Some(s)) => side_probs(s)?,
        (GateMode::Learned, Some(s)) => {
            let g = s.p_side;
            side_probs(s)?
                .iter()
                .zip(&p_base)
                .map(|(ps, pb)| g * ps + (1.0 - g) * pb)
                .collect()
        }
    })
}

/// Continuations asked of the server per strip position (`/v1/features` `continuations`): its
/// most likely word-start tokens there, each extended by one token.
pub const CONTINUATIONS: usize = 8;
/// Word pieces kept per continuation (the most likely second tokens).
pub const CONTINUATION_PIECES: usize = 16;

/// What the base says after one word-start token `first` (a server continuation): the
/// probability that the word ends there, and its most likely second tokens. The strip then
/// ranks `first` alone by `P(first) · ends` and the two-token words `first + piece` by
/// `P(first) · P(piece | first)` (the word is taken to end after the piece).
#[derive(Debug, Clone, PartialEq)]
pub struct Continuation {
    /// The word-start token extended.
    pub first: u32,
    /// P(the next token does not continue the word | first).
    pub ends: f32,
    /// The [`CONTINUATION_PIECES`] most likely word pieces after `first`, with their
    /// probabilities, most likely first.
    pub pieces: Vec<(u32, f32)>,
}

/// The [`Continuation`] of `first` from the base's final normed hidden state after it (sent
/// by the server): the base's distribution by the device's head, without the side path (the
/// side network has not seen the continuation token). One full-head product.
pub fn continuation(
    device: &DeviceModel,
    vocab: &WordVocab,
    first: u32,
    hidden_after: &[f32],
) -> Result<Continuation> {
    let logits = device.head.full(hidden_after)?;
    if logits.iter().any(|x| !x.is_finite()) {
        return Err(RuntimeError::Protocol(
            "non-finite continuation logits".into(),
        ));
    }
    let p = spa_model::softmax(&logits);
    let goes_on: f32 = p
        .iter()
        .zip(&vocab.continues)
        .filter(|(_, &c)| c)
        .map(|(p, _)| p)
        .sum();
    let mut pieces: Vec<(u32, f32)> = vocab
        .pieces
        .iter()
        .map(|&(id, _)| (id, p.get(id as usize).copied().unwrap_or(0.0)))
        .collect();
    let keep = CONTINUATION_PIECES.min(pieces.len());
    if keep > 0 {
        pieces.select_nth_unstable_by(keep - 1, |a, b| b.1.total_cmp(&a.1));
    }
    // A new vector of `keep` entries: the truncated one would keep the whole vocabulary's
    // capacity (~160 KB per continuation, 1.3 MB per word start of a held-out text).
    let mut top = pieces[..keep].to_vec();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Continuation {
        first,
        ends: (1.0 - goes_on).clamp(0.0, 1.0),
        pieces: top,
    })
}

/// The [`Continuation`]s of one features answer (`cont_ids`, `cont_hidden`; `per_position`
/// asked at each of `positions` continuation positions), checked for shape: every position's,
/// in order (the strip asks at one position; the keystroke metric at every word start of a
/// window).
pub fn decode_continuation_rows(
    device: &DeviceModel,
    vocab: &WordVocab,
    ids: &[u32],
    hidden: Option<&spa_protocol::Tensor>,
    positions: usize,
    per_position: usize,
) -> Result<Vec<Vec<Continuation>>> {
    if per_position == 0 || (ids.is_empty() && hidden.is_none()) {
        // None asked, or a server from before continuations: one-token words only.
        return Ok(vec![Vec::new(); positions]);
    }
    let h = hidden.ok_or_else(|| {
        RuntimeError::Protocol("features answer without continuation states".into())
    })?;
    let h = spa_protocol::decode_tensor(h, &spa_protocol::Limits::default())?;
    let d = device.side.config().base_hidden;
    let vocab_n = device.tokenizer.vocab_size();
    if ids.len() != h.rows
        || h.cols != d
        || !ids.len().is_multiple_of(positions.max(1))
        || ids.len() > positions * per_position
        || ids.iter().any(|&t| t as usize >= vocab_n)
    {
        return Err(RuntimeError::Protocol(
            "features answer: continuations of the wrong shape".into(),
        ));
    }
    let c = ids.len() / positions.max(1);
    (0..positions)
        .map(|p| {
            (p * c..(p + 1) * c)
                .map(|i| continuation(device, vocab, ids[i], h.row(i)))
                .collect()
        })
        .collect()
}

/// [`decode_continuation_rows`] of an answer for one continuation position.
pub fn decode_continuations(
    device: &DeviceModel,
    vocab: &WordVocab,
    ids: &[u32],
    hidden: Option<&spa_protocol::Tensor>,
    per_position: usize,
) -> Result<Vec<Continuation>> {
    Ok(
        decode_continuation_rows(device, vocab, ids, hidden, 1, per_position)?
            .pop()
            .unwrap_or_default(),
    )
}

/// Whole words ranked for one context, best first. Build once per context
/// ([`RankedWords::new`]); every typed letter then only filters ([`RankedWords::top`]).
#[derive(Debug, Clone, Default)]
pub struct RankedWords {
    items: Vec<(f32, Arc<str>)>,
}

impl RankedWords {
    /// Ranks every whole word by `probs` (a distribution over the vocabulary, from
    /// [`next_token_probs`]) and the two-token words of `conts` (see [`Continuation`]); with a
    /// cache, by `(1 - λ) P_model(w) + λ P_cache(w | prev)` ([`WordCache::weight`] = λ), where
    /// the cache's words of several tokens that no continuation gives get the model
    /// probability of their first token shared among the user's words that start with it.
    pub fn new(
        probs: &[f32],
        conts: &[Continuation],
        vocab: &WordVocab,
        cache: Option<&WordCache>,
        prev: Option<&str>,
    ) -> Self {
        Self::with_weight(
            probs,
            conts,
            vocab,
            cache,
            cache.map_or(0.0, |c| c.weight),
            prev,
        )
    }

    /// [`RankedWords::new`] with the cache interpolated at weight `lam` instead of its own.
    pub fn with_weight(
        probs: &[f32],
        conts: &[Continuation],
        vocab: &WordVocab,
        cache: Option<&WordCache>,
        lam: f32,
        prev: Option<&str>,
    ) -> Self {
        let lam = if cache.is_some() {
            lam.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut items: Vec<(f32, Arc<str>)> = vocab
            .words
            .iter()
            .map(|(id, w)| {
                (
                    (1.0 - lam) * probs.get(*id as usize).copied().unwrap_or(0.0),
                    w.clone(),
                )
            })
            .collect();
        // Two-token words: `first` alone keeps the mass of its ending there, `first + piece`
        // gets P(first) P(piece | first). Words built here, by text -> index in `items`.
        let mut built: HashMap<Arc<str>, usize> = HashMap::new();
        let piece_text: HashMap<u32, &Arc<str>> =
            vocab.pieces.iter().map(|(id, t)| (*id, t)).collect();
        for c in conts {
            let Some(&wi) = vocab.by_id.get(&c.first) else {
                continue;
            };
            let p1 = (1.0 - lam) * probs.get(c.first as usize).copied().unwrap_or(0.0);
            items[wi].0 = p1 * c.ends;
            for &(piece, p2) in &c.pieces {
                let Some(text) = piece_text.get(&piece) else {
                    continue;
                };
                let word: Arc<str> = format!("{}{}", vocab.words[wi].1, text).into();
                match built.get(&word).or_else(|| vocab.index.get(&word)) {
                    Some(&i) => items[i].0 += p1 * p2,
                    None => {
                        built.insert(word.clone(), items.len());
                        items.push((p1 * p2, word));
                    }
                }
            }
        }
        if let Some(c) = cache.filter(|_| lam > 0.0) {
            for (wi, e) in c.entries.iter().enumerate() {
                let pc = lam * c.prob_index(prev, wi);
                match (e.single, built.get(&e.word)) {
                    (Some(i), _) | (None, Some(&i)) => items[i].0 += pc,
                    (None, None) => {
                        let pm = e
                            .first
                            .and_then(|t| probs.get(t as usize))
                            .map_or(0.0, |p| p * e.first_share);
                        items.push(((1.0 - lam) * pm + pc, e.word.clone()));
                    }
                }
            }
        }
        items.sort_by(|a, b| b.0.total_cmp(&a.0));
        Self { items }
    }

    /// The first `count` words starting with `prefix` (the partly typed word; "" for all).
    pub fn top(&self, prefix: &str, count: usize) -> Vec<String> {
        self.items
            .iter()
            .filter(|(_, w)| w.starts_with(prefix))
            .take(count)
            .map(|(_, w)| w.to_string())
            .collect()
    }

    /// Keys to enter `word` and the space after it with a strip of `strip` suggestions (the
    /// project's keystroke rule): the user types the word letter by letter and taps it as soon
    /// as it is among the first `strip` words matching what is typed (a tap is one key and
    /// inserts the word and its space); otherwise the word and a space are typed.
    pub fn keys_to_enter(&self, word: &str, strip: usize) -> usize {
        for (typed, (i, _)) in word.char_indices().enumerate() {
            let prefix = &word[..i];
            if self
                .items
                .iter()
                .filter(|(_, w)| w.starts_with(prefix))
                .take(strip)
                .any(|(_, w)| &**w == word)
            {
                return typed + 1;
            }
        }
        word.chars().count() + 1
    }
}

/// The word the user is about to follow: the last whitespace-separated piece of `context` when
/// it is letters only (after punctuation there is none). The bigram context of [`WordCache`].
///
/// ```
/// use spa_runtime::words::prev_word;
/// assert_eq!(prev_word("I love New"), Some("New"));
/// assert_eq!(prev_word("Thank you."), None);
/// assert_eq!(prev_word(""), None);
/// ```
pub fn prev_word(context: &str) -> Option<&str> {
    let last = context.trim_end().rsplit(char::is_whitespace).next()?;
    (!last.is_empty() && last.chars().all(char::is_alphabetic)).then_some(last)
}

/// The word a whitespace-separated piece starts with: its leading run of letters.
fn leading_word(piece: &str) -> Option<&str> {
    let end = piece
        .char_indices()
        .find(|(_, c)| !c.is_alphabetic())
        .map_or(piece.len(), |(i, _)| i);
    (end > 0).then(|| &piece[..end])
}

#[derive(Debug, Clone, PartialEq)]
struct CacheEntry {
    word: Arc<str>,
    count: u32,
    /// Index in the [`WordVocab`] when the word is one token.
    single: Option<usize>,
    /// First token of a word of several tokens, and this word's share of the user's words that
    /// start with that token.
    first: Option<u32>,
    first_share: f32,
}

/// The user's personal word cache: unigram and bigram counts of their words, interpolated with
/// the model's distribution with weight [`WordCache::weight`] (tuned on the end of the user's
/// own text by [`WeightTuner`]). The classic keyboard personalization; it stays on the device
/// and needs no server. Bigram estimate: `(c(prev, w) + κ P_uni(w)) / (c(prev) + κ)`.
///
/// [`WordCache::save`] / [`WordCache::load`] keep it in app storage as a small text file of the
/// counts (the user's words: keep it app-private); the tokens are resolved again on load.
#[derive(Debug, Clone, PartialEq)]
pub struct WordCache {
    entries: Vec<CacheEntry>,
    index: HashMap<Arc<str>, usize>,
    /// (prev index, word index) -> count.
    bigrams: HashMap<(usize, usize), u32>,
    /// prev index -> its count as a bigram context.
    follow: HashMap<usize, u32>,
    total: u64,
    /// Interpolation weight λ of the cache (0: the model alone).
    pub weight: f32,
    /// Back-off mass κ of the bigram estimate.
    pub kappa: f32,
}

/// First line of a saved [`WordCache`].
pub const CACHE_FORMAT: &str = "spa-word-cache 1";

/// The first token of ` word` (a word of several tokens starts with it).
fn first_token_of(tok: &SpaTokenizer, word: &str) -> Option<u32> {
    tok.encode_fragment(&format!(" {word}"))
        .ok()
        .and_then(|ids| ids.first().copied())
}

/// Default interpolation weight before tuning.
pub const DEFAULT_CACHE_WEIGHT: f32 = 0.1;

impl WordCache {
    /// Counts the words of `texts` (pieces between whitespace, their leading letters; a piece
    /// that is letters only is the next piece's bigram context). `vocab` and `tok` resolve the
    /// words to tokens.
    pub fn learn(texts: &[String], vocab: &WordVocab, tok: &SpaTokenizer) -> Self {
        Self::learn_with(texts, vocab, &|w| first_token_of(tok, w))
    }

    /// [`WordCache::learn`] with `first_token` giving the first token of a word of several
    /// tokens.
    pub fn learn_with(
        texts: &[String],
        vocab: &WordVocab,
        first_token: &dyn Fn(&str) -> Option<u32>,
    ) -> Self {
        let mut c = Self {
            entries: Vec::new(),
            index: HashMap::new(),
            bigrams: HashMap::new(),
            follow: HashMap::new(),
            total: 0,
            weight: DEFAULT_CACHE_WEIGHT,
            kappa: 2.0,
        };
        for t in texts {
            let mut prev: Option<usize> = None;
            for piece in t.split_whitespace() {
                let Some(w) = leading_word(piece) else {
                    prev = None;
                    continue;
                };
                let wi = match c.index.get(w) {
                    Some(&i) => i,
                    None => {
                        let word: Arc<str> = w.into();
                        c.index.insert(word.clone(), c.entries.len());
                        c.entries.push(CacheEntry {
                            word,
                            count: 0,
                            single: None,
                            first: None,
                            first_share: 0.0,
                        });
                        c.entries.len() - 1
                    }
                };
                c.entries[wi].count += 1;
                c.total += 1;
                if let Some(p) = prev {
                    *c.bigrams.entry((p, wi)).or_default() += 1;
                    *c.follow.entry(p).or_default() += 1;
                }
                prev = (w.len() == piece.len()).then_some(wi);
            }
        }
        c.resolve(vocab, first_token);
        log::debug!(
            "word cache: {} words, {} distinct, {} bigrams",
            c.total,
            c.entries.len(),
            c.bigrams.len()
        );
        c
    }

    /// Points one-token words into `vocab`; longer words keep their first token and their share
    /// of the user's words starting with it.
    fn resolve(&mut self, vocab: &WordVocab, first_token: &dyn Fn(&str) -> Option<u32>) {
        let mut by_first: HashMap<u32, u32> = HashMap::new();
        for e in &mut self.entries {
            match vocab.index.get(&e.word) {
                Some(&i) => {
                    e.single = Some(i);
                    *by_first.entry(vocab.words[i].0).or_default() += e.count;
                }
                None => {
                    e.first = first_token(&e.word);
                    if let Some(f) = e.first {
                        *by_first.entry(f).or_default() += e.count;
                    }
                }
            }
        }
        for e in &mut self.entries {
            if let Some(f) = e.first {
                e.first_share = e.count as f32 / by_first.get(&f).copied().unwrap_or(1) as f32;
            }
        }
    }

    /// The counts and weights as text: a header line, then one `count word` line per word and
    /// one `prev word count` line (indices into the word lines) per bigram.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{CACHE_FORMAT}\nweight {} kappa {} words {} bigrams {}\n",
            self.weight,
            self.kappa,
            self.entries.len(),
            self.bigrams.len()
        );
        for e in &self.entries {
            out.push_str(&format!("{} {}\n", e.count, e.word));
        }
        let mut bigrams: Vec<_> = self.bigrams.iter().collect();
        bigrams.sort_unstable();
        for ((p, w), n) in bigrams {
            out.push_str(&format!("{p} {w} {n}\n"));
        }
        out
    }

    /// Reads [`WordCache::to_text`]'s text, resolving the words with `vocab` and `first_token`
    /// (see [`WordCache::learn_with`]). Every count, index and weight is checked: a damaged
    /// text is a [`RuntimeError::Model`], never a wrong cache.
    pub fn from_text(
        text: &str,
        vocab: &WordVocab,
        first_token: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Self> {
        let bad = |m: &str| RuntimeError::Model(format!("word cache file: {m}"));
        let mut lines = text.lines();
        if lines.next() != Some(CACHE_FORMAT) {
            return Err(bad("not a word cache (wrong header)"));
        }
        let head: Vec<&str> = lines
            .next()
            .ok_or_else(|| bad("truncated"))?
            .split(' ')
            .collect();
        let (weight, kappa, n_words, n_bigrams) = match head[..] {
            ["weight", w, "kappa", k, "words", n, "bigrams", b] => (
                w.parse::<f32>().map_err(|_| bad("weight"))?,
                k.parse::<f32>().map_err(|_| bad("kappa"))?,
                n.parse::<usize>().map_err(|_| bad("word count"))?,
                b.parse::<usize>().map_err(|_| bad("bigram count"))?,
            ),
            _ => return Err(bad("malformed header")),
        };
        if !((0.0..=1.0).contains(&weight) && kappa.is_finite() && kappa > 0.0) {
            return Err(bad("weight or kappa out of range"));
        }
        let mut c = Self {
            entries: Vec::with_capacity(n_words.min(1 << 20)),
            index: HashMap::new(),
            bigrams: HashMap::new(),
            follow: HashMap::new(),
            total: 0,
            weight,
            kappa,
        };
        for _ in 0..n_words {
            let line = lines.next().ok_or_else(|| bad("truncated word list"))?;
            let (n, w) = line
                .split_once(' ')
                .ok_or_else(|| bad("malformed word line"))?;
            let count = n.parse::<u32>().map_err(|_| bad("word count"))?;
            if count == 0 || leading_word(w) != Some(w) || c.index.contains_key(w) {
                return Err(bad("malformed or repeated word"));
            }
            let word: Arc<str> = w.into();
            c.index.insert(word.clone(), c.entries.len());
            c.entries.push(CacheEntry {
                word,
                count,
                single: None,
                first: None,
                first_share: 0.0,
            });
            c.total += count as u64;
        }
        for _ in 0..n_bigrams {
            let line = lines.next().ok_or_else(|| bad("truncated bigram list"))?;
            let f: Vec<&str> = line.split(' ').collect();
            let [p, w, n] = f[..] else {
                return Err(bad("malformed bigram line"));
            };
            let idx = |x: &str| {
                x.parse::<usize>()
                    .ok()
                    .filter(|&i| i < c.entries.len())
                    .ok_or_else(|| bad("bigram index out of range"))
            };
            let (p, w) = (idx(p)?, idx(w)?);
            let n = n.parse::<u32>().map_err(|_| bad("bigram count"))?;
            if n == 0 || c.bigrams.insert((p, w), n).is_some() {
                return Err(bad("zero or repeated bigram"));
            }
            *c.follow.entry(p).or_default() += n;
        }
        if lines.next().is_some() {
            return Err(bad("trailing data"));
        }
        c.resolve(vocab, first_token);
        Ok(c)
    }

    /// Writes the cache to `path` atomically (a temporary file beside it, synced, renamed).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let io = |e: std::io::Error| RuntimeError::Config(format!("saving the word cache: {e}"));
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let tmp = dir.join(format!(".words.tmp-{}", std::process::id()));
        let written = std::fs::write(&tmp, self.to_text())
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(())
    }

    /// Reads a cache [`WordCache::save`] wrote, resolving its words with `tok`.
    pub fn load(path: &std::path::Path, vocab: &WordVocab, tok: &SpaTokenizer) -> Result<Self> {
        let text = std::fs::read(path)
            .map_err(|e| RuntimeError::Config(format!("reading the word cache: {e}")))?;
        let text = std::str::from_utf8(&text)
            .map_err(|_| RuntimeError::Model("word cache file: not UTF-8".into()))?;
        Self::from_text(text, vocab, &|w| first_token_of(tok, w))
    }

    /// Distinct words.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no word was learned.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Words counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn prob_index(&self, prev: Option<&str>, wi: usize) -> f32 {
        let uni = self.entries[wi].count as f32 / self.total.max(1) as f32;
        let Some(pi) = prev.and_then(|p| self.index.get(p)).copied() else {
            return uni;
        };
        let Some(&ctx_n) = self.follow.get(&pi) else {
            return uni;
        };
        let c = self.bigrams.get(&(pi, wi)).copied().unwrap_or(0) as f32;
        (c + self.kappa * uni) / (ctx_n as f32 + self.kappa)
    }

    /// The cache's probability of `word` after `prev`.
    pub fn prob(&self, prev: Option<&str>, word: &str) -> f32 {
        self.index
            .get(word)
            .map_or(0.0, |&wi| self.prob_index(prev, wi))
    }
}

/// Interpolation weights tried by [`WeightTuner`].
pub const WEIGHT_GRID: [f32; 7] = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5];

/// Tunes [`WordCache::weight`] by the keystroke rule: feed it every word of held-back text of
/// the user's own (with the model's distribution before it) and take [`WeightTuner::best`].
#[derive(Debug, Clone)]
pub struct WeightTuner {
    keys: Vec<usize>,
    words: usize,
}

impl Default for WeightTuner {
    fn default() -> Self {
        Self {
            keys: vec![0; WEIGHT_GRID.len()],
            words: 0,
        }
    }
}

impl WeightTuner {
    /// Scores one word under every weight of [`WEIGHT_GRID`].
    pub fn observe(
        &mut self,
        probs: &[f32],
        conts: &[Continuation],
        vocab: &WordVocab,
        cache: &WordCache,
        prev: Option<&str>,
        word: &str,
    ) {
        for (i, &w) in WEIGHT_GRID.iter().enumerate() {
            self.keys[i] += RankedWords::with_weight(probs, conts, vocab, Some(cache), w, prev)
                .keys_to_enter(word, STRIP);
        }
        self.words += 1;
    }

    /// Words observed.
    pub fn words(&self) -> usize {
        self.words
    }

    /// The weight with the fewest keys (the smaller weight on ties), and the keys it needed
    /// per weight of [`WEIGHT_GRID`].
    pub fn best(&self) -> (f32, &[usize]) {
        let i = (0..WEIGHT_GRID.len())
            .min_by_key(|&i| (self.keys[i], i))
            .unwrap_or(0);
        (WEIGHT_GRID[i], &self.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> WordVocab {
        WordVocab::from_words(
            [
                "the",
                "they",
                "then",
                "a",
                "United",
                "States",
                "Americans",
                "America",
            ]
            .iter()
            .enumerate()
            .map(|(i, w)| (i as u32, w.to_string())),
        )
    }

    #[test]
    fn ranking_filters_by_prefix_and_counts_keys() {
        let v = vocab();
        // Token 8 is no whole word; its mass is ignored.
        let probs = [0.30, 0.05, 0.04, 0.20, 0.10, 0.08, 0.02, 0.01, 0.20];
        let r = RankedWords::new(&probs, &[], &v, None, None);
        assert_eq!(r.top("", 3), ["the", "a", "United"]);
        assert_eq!(r.top("th", 2), ["the", "they"]);
        assert_eq!(r.top("Am", 5), ["Americans", "America"]);
        assert!(r.top("x", 3).is_empty());
        // Shown before the first letter: one tap.
        assert_eq!(r.keys_to_enter("the", STRIP), 1);
        // "then" shows once "t" is typed (the, they, then): 1 letter + tap.
        assert_eq!(r.keys_to_enter("then", STRIP), 2);
        // "America": "A" shows Americans, America: 1 letter + tap.
        assert_eq!(r.keys_to_enter("America", STRIP), 2);
        // An unknown word is typed in full, plus its space.
        assert_eq!(r.keys_to_enter("zebra", STRIP), 6);
    }

    #[test]
    fn continuations_rank_two_token_words_and_share_with_the_cache() {
        // Words: Pres (0), the (1), Fili (2); pieces: ident (3), buster (4).
        let v = WordVocab::with_pieces(
            [
                (0, "Pres".to_string()),
                (1, "the".into()),
                (2, "Fili".into()),
            ],
            [(3, "ident".to_string()), (4, "buster".into())],
        );
        let probs = [0.5, 0.3, 0.1, 0.0, 0.0];
        let conts = [Continuation {
            first: 0,
            ends: 0.1,
            pieces: vec![(3, 0.8), (4, 0.05)],
        }];
        let r = RankedWords::new(&probs, &conts, &v, None, None);
        // President 0.5 * 0.8, the 0.3, Fili 0.1, Pres 0.5 * 0.1, Presbuster 0.025.
        assert_eq!(
            r.top("", 5),
            ["President", "the", "Fili", "Pres", "Presbuster"]
        );
        assert_eq!(r.keys_to_enter("President", STRIP), 1);
        // Without continuations the two-token word is never shown and is typed in full.
        let plain = RankedWords::new(&probs, &[], &v, None, None);
        assert_eq!(plain.top("", 3), ["Pres", "the", "Fili"]);
        assert_eq!(plain.keys_to_enter("President", STRIP), 10);
        // An unknown first token or piece is skipped, not an error.
        let odd = [Continuation {
            first: 7,
            ends: 0.0,
            pieces: vec![(9, 1.0)],
        }];
        assert_eq!(
            RankedWords::new(&probs, &odd, &v, None, None).top("", 3),
            plain.top("", 3)
        );
        // A cache word that a continuation also gives is one entry: model + cache.
        let mut c =
            WordCache::learn_with(&["the President and the President".to_string()], &v, &|w| {
                (w == "President").then_some(0)
            });
        c.weight = 0.5;
        let r = RankedWords::new(&probs, &conts, &v, Some(&c), Some("the"));
        let all = r.top("", 10);
        assert_eq!(
            all.iter().filter(|w| *w == "President").count(),
            1,
            "{all:?}"
        );
        assert_eq!(all[0], "President");
    }

    #[test]
    fn word_cache_survives_a_round_trip_and_rejects_damage() {
        let v = vocab();
        let texts =
            vec!["the United States. The United States and the Filibuster again".to_string()];
        let first = |w: &str| (w == "Filibuster").then_some(8);
        let mut c = WordCache::learn_with(&texts, &v, &first);
        c.weight = 0.2;
        let text = c.to_text();
        let back = WordCache::from_text(&text, &v, &first).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            back.prob(Some("the"), "United"),
            c.prob(Some("the"), "United")
        );
        // Saved and loaded through a file (atomic write), with a real-file path.
        let dir = std::env::temp_dir().join(format!("spa-words-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("words.txt");
        c.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
        // Every kind of damage is an error.
        let lines: Vec<&str> = text.lines().collect();
        let damaged = [
            text.replacen("spa-word-cache 1", "spa-word-cache 2", 1),
            text.replacen("weight 0.2", "weight 7", 1),
            text.replacen("weight 0.2", "weight NaN", 1),
            lines[..lines.len() - 1].join("\n"),
            format!("{text}0 1 1\n"),
            text.replacen("\n2 United\n", "\n2 Uni ted\n", 1),
            text.replacen("\n2 United\n", "\n0 United\n", 1),
            text.replacen("\n2 United\n", "\n2 the\n", 1),
            {
                let mut l = lines.clone();
                let last = l.len() - 1;
                l[last] = "0 99 1";
                l.join("\n")
            },
            String::new(),
        ];
        for (i, d) in damaged.iter().enumerate() {
            assert!(
                matches!(
                    WordCache::from_text(d, &v, &first),
                    Err(RuntimeError::Model(_))
                ),
                "damage {i} accepted"
            );
        }
    }

    #[test]
    fn word_cache_interpolates_bigrams_and_brings_long_words() {
        let v = vocab();
        let texts = vec![
            "the United States. The United States and the Filibuster, the Filibuster again"
                .to_string(),
        ];
        // "Filibuster" is not one token: its first token is 8.
        let c = WordCache::learn_with(&texts, &v, &|w| (w == "Filibuster").then_some(8));
        assert_eq!(c.total(), 12);
        assert_eq!(c.len(), 7);
        // After "the": United once, Filibuster twice (of 3 bigrams), smoothed by unigrams.
        let p_fil = c.prob(Some("the"), "Filibuster");
        let p_uni = c.prob(None, "Filibuster");
        assert!((p_uni - 2.0 / 12.0).abs() < 1e-6);
        assert!((p_fil - (2.0 + 2.0 * p_uni) / (3.0 + 2.0)).abs() < 1e-6);
        // "States." ends a sentence: no bigram (States, The) was counted.
        let p_the = c.prob(None, "The");
        assert!((c.prob(Some("States"), "The") - 2.0 * p_the / 3.0).abs() < 1e-6);
        // The model alone never suggests the long word; with the cache it does, first after
        // "the", and the model's mass of its first token is shared with it.
        let probs = [0.30, 0.05, 0.04, 0.20, 0.10, 0.08, 0.02, 0.01, 0.20];
        let mut c = c;
        c.weight = 0.5;
        let r = RankedWords::new(&probs, &[], &v, Some(&c), Some("the"));
        assert_eq!(r.top("", 1), ["Filibuster"]);
        assert!(RankedWords::new(&probs, &[], &v, None, Some("the"))
            .top("F", 3)
            .is_empty());
        // Weight 0 is the model alone.
        let r0 = RankedWords::with_weight(&probs, &[], &v, Some(&c), 0.0, Some("the"));
        assert_eq!(
            r0.top("", 3),
            RankedWords::new(&probs, &[], &v, None, None).top("", 3)
        );
        // Tuning picks a positive weight when the cache's words are typed.
        let mut t = WeightTuner::default();
        for _ in 0..3 {
            t.observe(&probs, &[], &v, &c, Some("the"), "Filibuster");
        }
        assert!(t.best().0 > 0.0 && t.words() == 3);
    }
}
