//! The one public error type of the bindings, mapped once from the internal errors.

use spa_runtime::RuntimeError;

/// Every failure the bindings report (Kotlin: `SpaMobileException`, Swift: `SpaMobileError`).
///
/// Messages describe what failed (a status, a file role, a limit) and never contain prompt,
/// generated or personal text.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
pub enum SpaMobileError {
    /// The server refused the API key.
    #[error("unauthorized: the server refused the API key")]
    Unauthorized,
    /// The server could not be reached (connect, timeout, reset, 5xx) after all retries.
    #[error("network error: {reason}")]
    Network {
        /// What failed.
        reason: String,
    },
    /// The server answered with an error or a response that made no sense.
    #[error("server error: {reason}")]
    Server {
        /// What failed.
        reason: String,
    },
    /// The server serves another base model or projection than the device's weights.
    #[error("incompatible server: {reason}")]
    Incompatible {
        /// What differs.
        reason: String,
    },
    /// Local model failure (model file, side network, tokenizer).
    #[error("model error: {reason}")]
    Model {
        /// What failed.
        reason: String,
    },
    /// Invalid configuration or parameters.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Reading or writing files in app storage failed.
    #[error("storage error: {reason}")]
    Storage {
        /// What failed.
        reason: String,
    },
    /// An app callback threw; the operation was stopped.
    #[error("callback failed: {reason}")]
    Callback {
        /// Which callback.
        reason: String,
    },
    /// A bug inside the library (a caught panic); the operation was abandoned.
    #[error("internal error: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
}

/// Result alias of the bindings.
pub type Result<T> = std::result::Result<T, SpaMobileError>;

impl From<RuntimeError> for SpaMobileError {
    fn from(e: RuntimeError) -> Self {
        use SpaMobileError as E;
        match e {
            RuntimeError::Unauthorized => E::Unauthorized,
            RuntimeError::Cancelled => E::Cancelled,
            RuntimeError::Transport { .. } => E::Network {
                reason: e.to_string(),
            },
            RuntimeError::NotFound
            | RuntimeError::SessionGone
            | RuntimeError::PositionAhead
            | RuntimeError::Limit(_)
            | RuntimeError::BadRequest(_)
            | RuntimeError::Protocol(_) => E::Server {
                reason: e.to_string(),
            },
            RuntimeError::Incompatible(m) => E::Incompatible { reason: m },
            RuntimeError::Model(m) => E::Model { reason: m },
            RuntimeError::Config(m) => E::InvalidConfig { reason: m },
        }
    }
}

impl From<spa_train::TrainError> for SpaMobileError {
    fn from(e: spa_train::TrainError) -> Self {
        match e {
            spa_train::TrainError::Model(e) => e.into(),
            spa_train::TrainError::Runtime(e) => e.into(),
            spa_train::TrainError::Cancelled => SpaMobileError::Cancelled,
            spa_train::TrainError::Data(m) | spa_train::TrainError::Config(m) => {
                SpaMobileError::InvalidConfig { reason: m }
            }
            spa_train::TrainError::Tensor(m) => SpaMobileError::Model { reason: m },
            e @ (spa_train::TrainError::Cache { .. } | spa_train::TrainError::Io { .. }) => {
                SpaMobileError::Storage {
                    reason: e.to_string(),
                }
            }
        }
    }
}

impl From<spa_model::SpaError> for SpaMobileError {
    fn from(e: spa_model::SpaError) -> Self {
        RuntimeError::from(e).into()
    }
}

/// A foreign callback threw something other than a `SpaMobileError`. The foreign message is
/// logged at debug level only (it may contain app data) and not carried.
impl From<uniffi::UnexpectedUniFFICallbackError> for SpaMobileError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        log::debug!("callback threw: {}", e.reason);
        SpaMobileError::Callback {
            reason: "a listener method threw an exception".into(),
        }
    }
}

impl SpaMobileError {
    pub(crate) fn storage(what: &str, e: &std::io::Error) -> Self {
        SpaMobileError::Storage {
            reason: format!("{what}: {}", e.kind()),
        }
    }
}
