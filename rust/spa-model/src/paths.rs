//! Where assets live: `$SPA_HOME` (default `~/.cache/spa-mobile`), filled by
//! `scripts/fetch-assets.sh`.

use std::path::PathBuf;

/// File name of the default base model (SmolLM2-135M-Instruct, Q4_1).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the second base (Gemma-3-270m, Q4_K_M).
pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// `$SPA_HOME`, default `~/.cache/spa-mobile`.
pub fn spa_home() -> PathBuf {
    if let Ok(h) = std::env::var("SPA_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/spa-mobile")
}

/// `$SPA_HOME/models/<file>`.
pub fn model_file(file: &str) -> PathBuf {
    spa_home().join("models").join(file)
}
