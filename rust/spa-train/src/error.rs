//! Typed errors of training and evaluation. Messages never contain training text.

/// Errors of spa-train.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An error of the core (model files, shapes, side weights).
    #[error(transparent)]
    Model(#[from] spa_model::SpaError),
    /// A tensor operation failed (shape bug or out of memory).
    #[error("tensor error: {0}")]
    Tensor(String),
    /// Task or personal data missing or malformed.
    #[error("data: {0}")]
    Data(String),
    /// Bad configuration (learning rate, sizes, unknown method).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A feature cache or checkpoint is unreadable, stale or for another base/projection.
    #[error("cache {path}: {reason}")]
    Cache {
        /// File.
        path: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// File system error.
    #[error("io error on {path}: {reason}")]
    Io {
        /// File.
        path: std::path::PathBuf,
        /// OS error.
        reason: String,
    },
    /// The device runtime or the base server failed.
    #[error("runtime: {0}")]
    Runtime(#[from] spa_runtime::RuntimeError),
    /// The caller cancelled (progress callback returned false).
    #[error("cancelled")]
    Cancelled,
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Tensor(e.to_string())
    }
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, TrainError>;
