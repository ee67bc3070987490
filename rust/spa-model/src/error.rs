//! Typed errors of the core crate. Every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Errors raised by the SPA core. Messages never contain user text (prompts, training data).
#[derive(Debug, thiserror::Error)]
pub enum SpaError {
    /// A model or weight file does not exist or cannot be opened.
    #[error("file not found or unreadable: {path}: {reason}")]
    MissingFile {
        /// The path that was requested.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A GGUF file is malformed: bad magic, truncated, inconsistent header or tensor data.
    #[error("corrupt GGUF file {path}: {reason}")]
    CorruptGguf {
        /// The offending file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A safetensors file (side weights) is malformed or truncated.
    #[error("corrupt safetensors file {path}: {reason}")]
    CorruptSafetensors {
        /// The offending file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The model architecture or a required metadata key is not supported.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor has a shape other than the one the model needs.
    #[error("wrong shape for {name}: expected {expected:?}, got {got:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Expected dims.
        expected: Vec<usize>,
        /// Actual dims.
        got: Vec<usize>,
    },
    /// Side weights were trained for another base model or projection version.
    #[error("side weights were made for base {found} (projection v{found_projection}), this base is {expected} (projection v{expected_projection})")]
    MismatchedBase {
        /// Identity hash of the loaded base.
        expected: String,
        /// Identity hash recorded in the side weights.
        found: String,
        /// Projection version of the loaded base.
        expected_projection: u32,
        /// Projection version recorded in the side weights.
        found_projection: u32,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab})")]
    BadTokenId {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The sequence would exceed the context window.
    #[error("context overflow: {requested} positions requested, context window is {max}")]
    ContextOverflow {
        /// Positions that would be in the cache.
        requested: usize,
        /// Maximum positions.
        max: usize,
    },
    /// An invalid configuration value (side width not a multiple of 32, bad tap list...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// An I/O error while writing files.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// An error inside candle (tensor math). Indicates a bug or resource exhaustion.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result alias for the core crate.
pub type Result<T> = std::result::Result<T, SpaError>;

impl SpaError {
    /// A [`SpaError::CorruptGguf`] for `path`.
    pub fn gguf(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        SpaError::CorruptGguf {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
    /// A [`SpaError::CorruptSafetensors`] for `path`.
    pub fn safetensors(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        SpaError::CorruptSafetensors {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}
