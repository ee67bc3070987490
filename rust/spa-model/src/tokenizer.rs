//! Tokenizer built from GGUF metadata (no tokenizer.json ships with the model packages).
//!
//! * `tokenizer.ggml.model == "gpt2"` (SmolLM2): byte-level BPE from `tokens` + `merges`, digits
//!   split individually, as in SmolLM2's original tokenizer.
//! * `tokenizer.ggml.model == "llama"` (Gemma-3, SentencePiece): a unigram model over the
//!   `tokens` + `scores` with byte fallback and `▁` for spaces.
//!
//! Tokens with GGUF token type 3 (control) or 4 (user-defined) are registered as special tokens
//! so chat markers such as `<|im_start|>` encode to one id.

use crate::error::{Result, SpaError};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

/// A text tokenizer plus the model's special token ids.
#[derive(Clone)]
pub struct SpaTokenizer {
    inner: Tokenizer,
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat_markers: Option<(String, String)>,
}

impl std::fmt::Debug for SpaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaTokenizer")
            .field("vocab", &self.vocab)
            .field("bos", &self.bos)
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
        let mut inner = match model.as_str() {
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
                t
            }
            "llama" => {
                let scores: Vec<f64> = match c.metadata.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => {
                        a.iter().map(|v| v.to_f32().unwrap_or(0.0) as f64).collect()
                    }
                    _ => vec![0.0; tokens.len()],
                };
                let unk = u32_opt(c, "tokenizer.ggml.unknown_token_id").map(|x| x as usize);
                let vocab: Vec<(String, f64)> = tokens.iter().cloned().zip(scores).collect();
                let uni = Unigram::from(vocab, unk, true).map_err(tok_err)?;
                let mut t = Tokenizer::new(uni);
                t.with_normalizer(Some(Replace::new(" ", "▁").map_err(tok_err)?));
                t.with_decoder(Some(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                ])));
                t
            }
            other => {
                return Err(SpaError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}`"
                )))
            }
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let bos = u32_opt(c, "tokenizer.ggml.bos_token_id");
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
            eos,
            chat_markers,
        })
    }

    /// Encodes text to token ids (no BOS is added; special-token markers in the text are honoured).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes token ids to text. Fails with [`SpaError::BadTokenId`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.inner.decode(ids, false).map_err(tok_err)
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
        self.inner.id_to_token(id)
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
