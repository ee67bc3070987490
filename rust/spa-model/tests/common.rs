//! Shared helpers for integration tests: locating the real model fetched by scripts/fetch-assets.sh.
#![allow(dead_code)]

use spa_model::BaseModel;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of the SmolLM2 GGUF: $SPA_MODEL, else $SPA_HOME/models/..., else ~/.cache/spa-mobile/models/...
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SPA_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var("SPA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/spa-mobile")
        });
    let p = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "model not found at {}: run `scripts/fetch-assets.sh model` first",
        p.display()
    );
    p
}

/// The base model, loaded once per test binary.
pub fn base() -> &'static BaseModel {
    static M: OnceLock<BaseModel> = OnceLock::new();
    M.get_or_init(|| BaseModel::load(model_path()).expect("load base model"))
}
