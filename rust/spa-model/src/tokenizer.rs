//! Tokenizer built from GGUF metadata (no tokenizer.json ships with the model packages).
//!
//! * `tokenizer.ggml.model == "gpt2"` (SmolLM2): byte-level BPE from `tokens` + `merges`, digits
//!   split individually, as in SmolLM2's original tokenizer.
//! * `tokenizer.ggml.model == "llama"` (Gemma-3, SentencePiece): SentencePiece *BPE* over the
//!   `tokens` + `scores`, as llama.cpp runs it ([`Spm`]): control and user-defined tokens are
//!   split out of the raw text first (longest first), spaces become `▁`, then adjacent symbols
//!   (UTF-8 characters) are merged greedily by the score of the merged token (highest first,
//!   leftmost on ties), and symbols that are not tokens fall back to `<0xXX>` byte tokens.
//!
//! Tokens with GGUF token type 3 (control) or 4 (user-defined) are treated as special tokens
//! so chat markers such as `<|im_start|>` or `<start_of_turn>` encode to one id.
//!
//! [`SpaTokenizer::encode`] prepends BOS when the GGUF says `tokenizer.ggml.add_bos_token =
//! true` (Gemma-3; SmolLM2 says false), [`SpaTokenizer::encode_fragment`] never does.

use crate::error::{Result, SpaError};
use candle_core::quantized::gguf_file::{Content, Value};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

#[derive(Clone)]
enum Backend {
    /// Byte-level BPE from the `tokenizers` crate (GGUF `gpt2` model).
    Hf(Box<Tokenizer>),
    /// SentencePiece BPE by score (GGUF `llama` model).
    Spm(Box<Spm>),
}

/// A text tokenizer plus the model's special token ids.
#[derive(Clone)]
pub struct SpaTokenizer {
    inner: Backend,
    vocab: usize,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    chat_markers: Option<(String, String)>,
}

impl std::fmt::Debug for SpaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaTokenizer")
            .field("vocab", &self.vocab)
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> SpaError {
    SpaError::Tokenizer(e.to_string())
}

fn strings(c: &Content, key: &str) -> Result<Vec<String>> {
    match c.metadata.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(SpaError::Tokenizer(format!("`{key}` holds a non-string"))),
            })
            .collect(),
        _ => Err(SpaError::Tokenizer(format!("missing `{key}`"))),
    }
}

fn u32_opt(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn bool_opt(c: &Content, key: &str) -> Option<bool> {
    c.metadata.get(key).and_then(|v| v.to_bool().ok())
}

impl SpaTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let tokens = strings(c, "tokenizer.ggml.tokens")?;
        let model = match c.metadata.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(SpaError::Tokenizer("missing tokenizer.ggml.model".into())),
        };
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let inner = match model.as_str() {
            "gpt2" => {
                let merges = strings(c, "tokenizer.ggml.merges")?;
                let mut vocab = Vocab::default();
                for (i, t) in tokens.iter().enumerate() {
                    vocab.insert(t.clone(), i as u32);
                }
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| SpaError::Tokenizer("malformed merge".into()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(tok_err)?;
                let mut t = Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
                ])));
                t.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
                let specials: Vec<AddedToken> = tokens
                    .iter()
                    .zip(types.iter())
                    .filter(|(_, ty)| **ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED)
                    .map(|(t, _)| AddedToken::from(t.clone(), true))
                    .collect();
                t.add_special_tokens(&specials);
                Backend::Hf(Box::new(t))
            }
            "llama" => {
                let scores: Vec<f32> = match c.metadata.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let add_space_prefix =
                    bool_opt(c, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let unk = u32_opt(c, "tokenizer.ggml.unknown_token_id");
                Backend::Spm(Box::new(Spm::new(
                    tokens.clone(),
                    scores,
                    types,
                    add_space_prefix,
                    unk,
                )?))
            }
            other => {
                return Err(SpaError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}`"
                )))
            }
        };
        let bos =
            u32_opt(c, "tokenizer.ggml.bos_token_id").filter(|&b| (b as usize) < tokens.len());
        // llama.cpp's default when the key is missing: BOS for SentencePiece, none for gpt2 BPE.
        let add_bos = bos.is_some()
            && bool_opt(c, "tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
        let mut eos: Vec<u32> = u32_opt(c, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        let find = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as u32);
        for extra in ["<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>"] {
            if let Some(id) = find(extra) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let chat_markers = if find("<|im_start|>").is_some() {
            Some(("<|im_start|>".to_string(), "<|im_end|>".to_string()))
        } else if find("<start_of_turn>").is_some() {
            Some(("<start_of_turn>".to_string(), "<end_of_turn>".to_string()))
        } else {
            None
        };
        Ok(Self {
            inner,
            vocab: tokens.len(),
            bos,
            add_bos,
            eos,
            chat_markers,
        })
    }

    /// Encodes the start of a sequence: BOS first when the model wants one
    /// ([`Self::add_bos`]: Gemma-3 yes, SmolLM2 no), then the text. Special-token markers in the
    /// text are honoured.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode_fragment(text)?);
        Ok(ids)
    }

    /// Encodes text that continues a sequence: never adds BOS (special-token markers in the
    /// text are honoured).
    pub fn encode_fragment(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(t) => {
                let enc = t.encode_fast(text, false).map_err(tok_err)?;
                Ok(enc.get_ids().to_vec())
            }
            Backend::Spm(s) => Ok(s.encode(text)),
        }
    }

    /// Whether [`Self::encode`] prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Decodes token ids to text. Fails with [`SpaError::BadTokenId`] for ids outside the
    /// vocabulary. SentencePiece control tokens (BOS, `<start_of_turn>`, ...) decode to nothing,
    /// as in llama.cpp; the gpt2 tokenizer keeps their text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        match &self.inner {
            Backend::Hf(t) => t.decode(ids, false).map_err(tok_err),
            Backend::Spm(s) => Ok(s.decode(ids)),
        }
    }

    /// The word token `id` stands for when it is a whole word with a leading space, letters and
    /// apostrophes only (`" Paris"` -> `"Paris"`); `None` for punctuation, word pieces and ids
    /// outside the vocabulary. The unit of next-word suggestions.
    pub fn whole_word(&self, id: u32) -> Option<String> {
        let s = self.decode(&[id]).ok()?;
        let w = s.strip_prefix(' ')?;
        (!w.is_empty() && w.chars().all(|c| c.is_alphabetic() || c == '\'')).then(|| w.to_string())
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab) {
            Some(&id) => Err(SpaError::BadTokenId {
                id,
                vocab: self.vocab,
            }),
            None => Ok(()),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end a generation (EOS and end-of-turn markers).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The text of one token id (raw vocabulary entry decoded), for debugging and shortlists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(s) => s.tokens.get(id as usize).cloned(),
        }
    }

    /// Formats a single-turn chat prompt with the model's chat markers (ChatML for SmolLM2,
    /// turns for Gemma). Falls back to the raw text for models without markers.
    pub fn chat_prompt(&self, user: &str) -> String {
        match &self.chat_markers {
            Some((start, end)) if start == "<|im_start|>" => {
                format!("{start}user\n{user}{end}\n{start}assistant\n")
            }
            Some((start, end)) => format!("{start}user\n{user}{end}\n{start}model\n"),
            None => user.to_string(),
        }
    }

    /// The next user turn of a conversation whose model turn just ended: the model's end of
    /// turn marker (a stop token, never kept in the history's ids), then a new user turn
    /// ([`SpaTokenizer::chat_prompt`]). The first turn is `chat_prompt` alone.
    pub fn chat_turn(&self, user: &str, first: bool) -> String {
        if first {
            return self.chat_prompt(user);
        }
        let marker = match &self.chat_markers {
            Some((_, end)) => end.as_str(),
            None => "",
        };
        format!("{marker}\n{}", self.chat_prompt(user))
    }

    /// A streaming decoder that yields text only once it forms complete UTF-8.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }
}

/// Incremental detokenizer: push ids, get the newly completed text.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tok: &'a SpaTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl TokenStream<'_> {
    /// Adds one id; returns text that became complete (may be empty while a multi-byte
    /// character is split across tokens).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

/// SentencePiece BPE encoder over GGUF `tokens` + `scores` (what llama.cpp does for the
/// `llama` tokenizer model).
#[derive(Clone)]
pub(crate) struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    index: HashMap<String, u32>,
    /// Id of `<0xXX>` for each byte (byte fallback).
    byte_ids: Vec<Option<u32>>,
    /// Control and user-defined tokens, longest first (split out of raw text before BPE).
    specials: Vec<u32>,
    add_space_prefix: bool,
    unk: Option<u32>,
}

/// A merge candidate: two adjacent symbols whose concatenation is a token.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// One symbol of the merge loop: a byte range of the escaped text, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Spm {
    fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        add_space_prefix: bool,
        unk: Option<u32>,
    ) -> Result<Self> {
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(SpaError::Tokenizer(format!(
                "{} tokens but {} scores and {} token types",
                tokens.len(),
                scores.len(),
                types.len()
            )));
        }
        let mut index = HashMap::with_capacity(tokens.len());
        let mut byte_ids = vec![None; 256];
        for (i, t) in tokens.iter().enumerate() {
            index.insert(t.clone(), i as u32);
            if types[i] == TYPE_BYTE {
                if let Some(b) = parse_byte_token(t) {
                    byte_ids[b as usize] = Some(i as u32);
                }
            }
        }
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                let ty = types[i as usize];
                (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && !tokens[i as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&i| (std::cmp::Reverse(tokens[i as usize].len()), i));
        Ok(Self {
            tokens,
            scores,
            types,
            index,
            byte_ids,
            specials,
            add_space_prefix,
            unk,
        })
    }

    /// Splits raw text into pieces of text and special-token ids (each special, longest first,
    /// is cut out of the remaining text pieces wherever it occurs).
    fn partition<'a>(&self, text: &'a str) -> Vec<std::result::Result<&'a str, u32>> {
        let mut present = [false; 256];
        for &b in text.as_bytes() {
            present[b as usize] = true;
        }
        let mut frags: Vec<std::result::Result<&'a str, u32>> = vec![Ok(text)];
        for &id in &self.specials {
            let s = self.tokens[id as usize].as_str();
            if !present[s.as_bytes()[0] as usize] {
                continue;
            }
            if !frags.iter().any(|f| matches!(f, Ok(t) if t.contains(s))) {
                continue;
            }
            let mut out = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Ok(t) if t.contains(s) => {
                        for (k, part) in t.split(s).enumerate() {
                            if k > 0 {
                                out.push(Err(id));
                            }
                            if !part.is_empty() {
                                out.push(Ok(part));
                            }
                        }
                    }
                    other => out.push(other),
                }
            }
            frags = out;
        }
        frags
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Err(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Ok(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.bpe(&s.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Greedy score-ordered BPE over the characters of `text` (spaces already escaped).
    fn bpe(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (start, ch) in text.char_indices() {
            let i = syms.len();
            syms.push(Sym {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        match syms.last_mut() {
            Some(last) => last.next = None,
            None => return,
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let (a, b) = (syms[l], syms[r]);
                let piece = &text[a.start..a.start + a.len + b.len];
                if let Some(&id) = self.index.get(piece) {
                    heap.push(Bigram {
                        score: self.scores[id as usize],
                        left: l,
                        right: r,
                        size: piece.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale candidate: one side was merged since it was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            try_add(&mut heap, &syms, syms[bg.left].prev, Some(bg.left));
            try_add(&mut heap, &syms, Some(bg.left), syms[bg.left].next);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        if let Some(id) = self.byte_ids[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let (t, ty) = (&self.tokens[id as usize], self.types[id as usize]);
            match ty {
                TYPE_CONTROL => {}
                TYPE_BYTE => match parse_byte_token(t) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(t.as_bytes()),
                },
                _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
