//! Typed errors of the device runtime.

/// Errors surfaced to the app (messages never contain prompt or generated text).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
    /// The server refused the API key (401).
    #[error("unauthorized: the server refused the API key")]
    Unauthorized,
    /// The session does not exist for this key (404).
    #[error("session not found")]
    NotFound,
    /// The server evicted the session (410); handled internally by re-prefilling.
    #[error("session gone (evicted)")]
    SessionGone,
    /// The server holds fewer positions than the device (409); handled by re-prefilling.
    #[error("server session is behind the device")]
    PositionAhead,
    /// A server or wire limit (413/429).
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The request was malformed or invalid (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Network failure after all retries (connect, timeout, reset, 5xx).
    #[error("transport error after {attempts} attempts: {message}")]
    Transport {
        /// Attempts made.
        attempts: u32,
        /// Last error.
        message: String,
    },
    /// A response that could not be decoded or made no sense.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server is for another base/projection/tokenizer than the device's weights.
    #[error("incompatible server: {0}")]
    Incompatible(String),
    /// Local model error (side network, head, tokenizer).
    #[error("model error: {0}")]
    Model(String),
    /// The generation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Bad configuration (URL, certificate, parameters).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<spa_model::SpaError> for RuntimeError {
    fn from(e: spa_model::SpaError) -> Self {
        RuntimeError::Model(e.to_string())
    }
}

impl From<spa_protocol::ProtocolError> for RuntimeError {
    fn from(e: spa_protocol::ProtocolError) -> Self {
        RuntimeError::Protocol(e.to_string())
    }
}

impl RuntimeError {
    /// Whether retrying the same (idempotent) request may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RuntimeError::Transport { .. } | RuntimeError::Protocol(_)
        )
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, RuntimeError>;
