//! Shared helpers for integration tests: locating the real model fetched by scripts/fetch-assets.sh.
#![allow(dead_code)]

use spa_model::BaseModel;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of the SmolLM2 GGUF: $SPA_MODEL, else $SPA_HOME/models/..., else ~/.cache/spa-mobile/models/...
pub fn model_path() -> PathBuf {
    let p = std::env::var("SPA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| spa_model::paths::model_file(spa_model::paths::MODEL_FILE));
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
