//! Resumable evaluation: every finished (task, method) result is one small JSON file,
//! `<runs dir>/<task>-<method>.json` ([`RunRecord`]: per-example ROUGE-L, the figures of its
//! table rows, the settings it ran under and their hash). `spa eval` skips a (task, method)
//! whose file holds the current settings hash, so an interrupted run continues where it
//! stopped, and the tables can be rebuilt from committed run files alone
//! (`spa eval --from-runs DIR`).
//!
//! The settings hash covers everything a result depends on: [`RUNS_VERSION`] (bumped when the
//! evaluation's code changes what a result means), the base's sha256, the projection's
//! fingerprint, the task, the exact tokenized examples (ids, prompt and target tokens,
//! references) of the splits the method reads, and the training configuration. A file with any
//! other hash is stale and is recomputed, never reused.

use super::features::Tok;
use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Version of what a run file means; bump it when a change to the evaluation (decoding,
/// prompts, training defaults, scoring) makes finished runs incomparable with new ones.
pub const RUNS_VERSION: u32 = 1;

/// What SPA's run keeps for the measurement of rounds through the real protocol.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtocolRecord {
    /// The first `prompts` test examples are measured.
    pub prompts: usize,
    /// New tokens per prompt.
    pub max_new: usize,
    /// Simulated rounds per token on the same prompts.
    pub simulated_rounds_per_token: f64,
}

/// One finished (task, method) run: its per-example scores and the figures of its table rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// [`RUNS_VERSION`] it was made with.
    pub version: u32,
    /// Task name.
    pub task: String,
    /// Row name: "spa" | "lst" | "full_separation" | "base" | "lora" | "adapter" |
    /// "full_integration", or "spa_w{width}" for Table 1's other widths.
    pub method: String,
    /// Side width (ladder methods).
    pub width: Option<usize>,
    /// Profile name it ran under.
    pub profile: String,
    /// Hash of `settings`.
    pub settings_hash: String,
    /// Everything the result depends on (what the hash covers).
    pub settings: serde_json::Value,
    /// Test examples.
    pub n: usize,
    /// Test example ids, in the order of `rouge_l`.
    pub example_ids: Vec<String>,
    /// ROUGE-L F1 (x100) per test example.
    pub rouge_l: Vec<f64>,
    /// Wall time of this method on this task (training + generation), s.
    pub seconds: f64,
    /// Rounds per generated token under the method's protocol.
    pub rounds_per_token: f64,
    /// Rounds per token under speculative drafting (ladder methods).
    pub rounds_per_token_speculative: Option<f64>,
    /// Positions where the side path was used (%).
    pub side_usage_pct: f64,
    /// Emitted tokens that differ from the base's draft (%).
    pub override_pct: f64,
    /// Bytes server -> device per generated token (ladder methods).
    pub bytes_per_token: Option<f64>,
    /// Device compute per generated token (ms, ladder methods).
    pub device_ms_per_token: Option<f64>,
    /// Base compute per generated token (s), one per test generation (the base's run).
    pub base_s_per_token: Vec<f64>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Validation loss (initial, best).
    pub val_loss: Option<(f64, f64)>,
    /// Validation curve (step, loss) of the run that was kept.
    pub val_curve: Vec<(usize, f64)>,
    /// Side usage % over the validation positions (SPA).
    pub val_side_usage_pct: Option<f64>,
    /// SPA: the gate threshold chosen on validation (`train::choose_gate_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_threshold: Option<f32>,
    /// SPA: the validation sweep it was chosen from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gate_sweep: Vec<crate::train::GatePoint>,
    /// SPA: (side-path uses, generations) per generated position.
    pub side_by_position: Vec<(usize, usize)>,
    /// SPA at the profile's width: inputs of the protocol measurement.
    pub protocol: Option<ProtocolRecord>,
    /// Profile notes (the reduced profile of the methods through the base).
    pub note: String,
}

impl RunRecord {
    /// A record of `method` on `task`'s test examples `te`, with `scores` in their order.
    pub(super) fn new(
        task: &str,
        method: &str,
        profile: &str,
        settings: serde_json::Value,
        te: &[Tok],
        scores: Vec<f64>,
    ) -> Self {
        Self {
            version: RUNS_VERSION,
            task: task.into(),
            method: method.into(),
            profile: profile.into(),
            settings_hash: settings_hash(&settings),
            settings,
            n: scores.len(),
            example_ids: te.iter().map(|t| t.ex.id.clone()).collect(),
            rouge_l: scores,
            ..Default::default()
        }
    }
}

/// Hash of a settings record (hex, 16 digits).
pub fn settings_hash(settings: &serde_json::Value) -> String {
    let d = Sha256::digest(settings.to_string().as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Hash of tokenized examples: ids, prompt and target tokens, references (hex, 16 digits).
pub(super) fn data_hash(toks: &[Tok]) -> String {
    let mut h = Sha256::new();
    for t in toks {
        h.update(t.ex.id.as_bytes());
        h.update([0]);
        h.update(t.ex.reference.as_bytes());
        h.update([0]);
        for x in t.prompt.iter().chain([&u32::MAX]).chain(&t.target) {
            h.update(x.to_le_bytes());
        }
        h.update([0xff; 4]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Run files of one profile (`None`: nothing is read or written).
#[derive(Debug, Clone, Default)]
pub(super) struct RunStore {
    pub(super) dir: Option<PathBuf>,
}

impl RunStore {
    fn path(&self, task: &str, method: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{task}-{method}.json")))
    }

    /// The finished run of `method` on `task` with settings `settings`, if its file exists and
    /// holds the same version and hash.
    pub(super) fn find(
        &self,
        task: &str,
        method: &str,
        settings: &serde_json::Value,
    ) -> Option<RunRecord> {
        let path = self.path(task, method)?;
        let bytes = std::fs::read(&path).ok()?;
        let rec: RunRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{}: unreadable run file ({e}); recomputing", path.display());
                return None;
            }
        };
        let hash = settings_hash(settings);
        if rec.version != RUNS_VERSION || rec.settings_hash != hash {
            log::info!(
                "{}: stale run (version {}, settings {}; now {RUNS_VERSION}, {hash}); recomputing",
                path.display(),
                rec.version,
                rec.settings_hash
            );
            return None;
        }
        log::info!("{}: finished run reused", path.display());
        Some(rec)
    }

    /// Writes `rec` (atomically) to its file.
    pub(super) fn save(&self, rec: &RunRecord) -> Result<()> {
        let Some(path) = self.path(&rec.task, &rec.method) else {
            return Ok(());
        };
        let json = serde_json::to_string_pretty(rec)
            .map_err(|e| TrainError::Config(format!("run record: {e}")))?;
        spa_model::io::atomic_write(&path, json.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_round_trip_exactly_and_detect_stale_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore {
            dir: Some(dir.path().to_path_buf()),
        };
        let settings = serde_json::json!({"task": "xsum", "n": 2});
        let mut rec = RunRecord {
            version: RUNS_VERSION,
            task: "xsum".into(),
            method: "spa".into(),
            settings_hash: settings_hash(&settings),
            settings: settings.clone(),
            n: 2,
            example_ids: vec!["a".into(), "b".into()],
            // Values whose shortest decimal form needs exact parsing to come back bit for bit.
            rouge_l: vec![23.117408906882588, 0.1 + 0.2],
            val_loss: Some((3.8976073265075684, 2.0 / 3.0)),
            ..Default::default()
        };
        rec.val_curve = vec![(0, 1.0 / 7.0)];
        store.save(&rec).unwrap();
        assert!(dir.path().join("xsum-spa.json").exists());
        assert_eq!(store.find("xsum", "spa", &settings), Some(rec.clone()));
        // Other settings or another version: stale, not reused.
        let other = serde_json::json!({"task": "xsum", "n": 3});
        assert_eq!(store.find("xsum", "spa", &other), None);
        rec.version = RUNS_VERSION + 1;
        store.save(&rec).unwrap();
        assert_eq!(store.find("xsum", "spa", &settings), None);
        assert_eq!(store.find("xsum", "lst", &settings), None);
        // No directory: nothing kept.
        let none = RunStore::default();
        none.save(&rec).unwrap();
        assert_eq!(none.find("xsum", "spa", &settings), None);
    }
}
