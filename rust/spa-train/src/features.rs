//! The feature cache: the frozen base runs ONCE per example; what the side network needs is kept
//! on disk in compact form, so training never runs the base again.
//!
//! Per sequence (prompt + target tokens, or a chunk of personal text):
//! - the down-projected taps of every position, int8 with one scale per (position, tap) row,
//!   exactly the wire's quantization (`scale = f16(max|x| / 127)`), so training sees what the
//!   device sees at inference;
//! - for every *loss position* `t` (whose next token `tokens[t + 1]` is a target), the base's top-k
//!   candidate ids and logits plus the target (the device scores only this shortlist at
//!   inference, DESIGN.md section 2), and the target's index in that list.
//!
//! A cache file records the base identity, projection fingerprint, width, top-k and the example
//! ids it was made from; a cache made for anything else is recomputed, never reused.

use crate::error::{Result, TrainError};
use half::f16;
#[cfg(feature = "host")]
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
#[cfg(feature = "host")]
use spa_model::{shortlist_with_target, ForwardMode};
use spa_model::{BaseModel, DownProjection};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Padding logit for absent candidates (finite, so sums stay NaN-free).
pub const PAD_LOGIT: f32 = -1.0e4;

/// What a cache was made from; any difference invalidates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// sha256 of the base GGUF.
    pub base: String,
    /// Projection fingerprint.
    pub projection: String,
    /// Projection version.
    pub projection_version: u32,
    /// Side width.
    pub width: usize,
    /// Tapped layers.
    pub taps: Vec<usize>,
    /// Base candidates per loss position.
    pub top_k: usize,
    /// sha256 over the token sequences and loss starts.
    pub data: String,
}

/// Features of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqFeatures {
    /// Token ids of the whole sequence.
    pub tokens: Vec<u32>,
    /// First target token index: loss positions are `loss_start - 1 .. len - 1`.
    pub loss_start: usize,
    /// int8 taps `[len, n_taps, width]`.
    pub taps: Vec<i8>,
    /// One scale per (position, tap) `[len, n_taps]`.
    pub scales: Vec<f32>,
    /// Candidates per loss position `[n_loss, top_k + 1]` (base top-k, then the target or a pad).
    pub cand_ids: Vec<u32>,
    /// Base logits of the candidates (`PAD_LOGIT` for a pad) `[n_loss, top_k + 1]`.
    pub cand_logits: Vec<f32>,
    /// Index of the target in each candidate row `[n_loss]`.
    pub target_idx: Vec<u32>,
}

impl SeqFeatures {
    /// Sequence length.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// True for an empty sequence.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Number of loss positions.
    pub fn n_loss(&self) -> usize {
        self.target_idx.len()
    }
    /// Dequantized taps `[len * n_taps * width]`.
    pub fn taps_f32(&self, width: usize) -> Vec<f32> {
        self.taps
            .chunks(width)
            .zip(&self.scales)
            .flat_map(|(row, s)| row.iter().map(move |&q| q as f32 * s))
            .collect()
    }
}

/// A set of sequences with their cache key.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// What it was made from.
    pub key: CacheKey,
    /// Sequences.
    pub seqs: Vec<SeqFeatures>,
}

/// Quantizes one row like the wire codec (`spa_protocol::encode_i8_rows`).
pub fn quantize_row(row: &[f32], out: &mut Vec<i8>) -> f32 {
    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    let s = f16::from_f32(amax / 127.0).to_f32();
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    out.extend(
        row.iter()
            .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8),
    );
    s
}

/// A token sequence to featurize: ids and the index of its first target token.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSpec {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// First target index (>= 1).
    pub loss_start: usize,
}

fn data_hash(specs: &[SeqSpec]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in specs {
        h.update((s.tokens.len() as u64).to_le_bytes());
        h.update((s.loss_start as u64).to_le_bytes());
        for t in &s.tokens {
            h.update(t.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// The cache key of `specs` under `base` and `proj`.
pub fn cache_key(
    base: &BaseModel,
    proj: &DownProjection,
    top: usize,
    specs: &[SeqSpec],
) -> CacheKey {
    let m = proj.meta();
    CacheKey {
        base: base.identity().to_string(),
        projection: proj.fingerprint().to_string(),
        projection_version: m.version,
        width: m.width,
        taps: m.taps.clone(),
        top_k: top,
        data: data_hash(specs),
    }
}

#[cfg(feature = "host")]
/// Runs the base once per sequence and computes the features for every projection in `projs`
/// (e.g. widths 32/64/128 from one base pass). Shows a progress bar unless `quiet`.
///
/// Uses the base's [`ForwardMode::Fast`] (several times the server's prefill speed): taps and
/// candidate logits equal the server's up to float rounding, which can move an int8 tap by one
/// quantum or swap near-tied candidates. [`compute_with`] with
/// [`ForwardMode::BatchInvariant`] gives exactly the server's features.
pub fn compute(
    base: &BaseModel,
    projs: &[&DownProjection],
    top: usize,
    specs: &[SeqSpec],
    label: &str,
    quiet: bool,
) -> Result<Vec<FeatureSet>> {
    compute_with(base, projs, top, specs, label, quiet, ForwardMode::Fast)
}

#[cfg(feature = "host")]
/// [`compute`] with a chosen forward mode.
pub fn compute_with(
    base: &BaseModel,
    projs: &[&DownProjection],
    top: usize,
    specs: &[SeqSpec],
    label: &str,
    quiet: bool,
    mode: ForwardMode,
) -> Result<Vec<FeatureSet>> {
    let vocab = base.config().vocab;
    if top == 0 || top >= vocab {
        return Err(TrainError::Config(format!("top-k {top} out of range")));
    }
    let pb = progress(specs.len() as u64, label, quiet);
    let mut sets: Vec<FeatureSet> = projs
        .iter()
        .map(|p| FeatureSet {
            key: cache_key(base, p, top, specs),
            seqs: Vec::with_capacity(specs.len()),
        })
        .collect();
    for spec in specs {
        let n = spec.tokens.len();
        if spec.loss_start == 0 || spec.loss_start >= n {
            return Err(TrainError::Data(format!(
                "sequence of {n} tokens with loss start {}",
                spec.loss_start
            )));
        }
        let mut cache = base.new_cache();
        let out = base.forward_with(&spec.tokens, &mut cache, mode)?;
        // Candidates at loss positions.
        let lp0 = spec.loss_start - 1;
        let n_loss = n - 1 - lp0;
        let hid = out.hidden.narrow(0, lp0, n_loss)?;
        let logits: Vec<Vec<f32>> = match mode {
            ForwardMode::Fast => base.logits_fast(&hid)?,
            ForwardMode::BatchInvariant => base.logits(&hid)?,
        }
        .to_vec2()?;
        let c = top + 1;
        let mut cand_ids = Vec::with_capacity(n_loss * c);
        let mut cand_logits = Vec::with_capacity(n_loss * c);
        let mut target_idx = Vec::with_capacity(n_loss);
        for (j, row) in logits.iter().enumerate() {
            let y = spec.tokens[lp0 + j + 1];
            let (ids, vals, t) = shortlist_with_target(row, y, top, PAD_LOGIT);
            cand_ids.extend(ids);
            cand_logits.extend(vals);
            target_idx.push(t);
        }
        for (set, proj) in sets.iter_mut().zip(projs) {
            let z = proj.apply_taps(&out.taps)?;
            let mut taps = Vec::with_capacity(n * z[0].len() * proj.meta().width);
            let mut scales = Vec::with_capacity(n * z[0].len());
            for pos in &z {
                for row in pos {
                    scales.push(quantize_row(row, &mut taps));
                }
            }
            set.seqs.push(SeqFeatures {
                tokens: spec.tokens.clone(),
                loss_start: spec.loss_start,
                taps,
                scales,
                cand_ids: cand_ids.clone(),
                cand_logits: cand_logits.clone(),
                target_idx: target_idx.clone(),
            });
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(sets)
}

#[cfg(feature = "host")]
/// A progress bar with label, counts and ETA (hidden when `quiet`).
pub fn progress(n: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}

impl FeatureSet {
    /// Saves as safetensors (atomic): tensors `"{i}.{field}"`, the key in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, s) in self.seqs.iter().enumerate() {
            let le32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let lef = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let mut meta = s.tokens.clone();
            meta.push(s.loss_start as u32);
            bufs.push((
                format!("{i}.tokens"),
                Dtype::U32,
                vec![meta.len()],
                le32(&meta),
            ));
            bufs.push((
                format!("{i}.taps"),
                Dtype::I8,
                vec![s.taps.len()],
                s.taps.iter().map(|&x| x as u8).collect(),
            ));
            bufs.push((
                format!("{i}.scales"),
                Dtype::F32,
                vec![s.scales.len()],
                lef(&s.scales),
            ));
            bufs.push((
                format!("{i}.cand_ids"),
                Dtype::U32,
                vec![s.cand_ids.len()],
                le32(&s.cand_ids),
            ));
            bufs.push((
                format!("{i}.cand_logits"),
                Dtype::F32,
                vec![s.cand_logits.len()],
                lef(&s.cand_logits),
            ));
            bufs.push((
                format!("{i}.target_idx"),
                Dtype::U32,
                vec![s.target_idx.len()],
                le32(&s.target_idx),
            ));
        }
        let views: Vec<(String, TensorView)> = bufs
            .iter()
            .map(|(n, d, sh, b)| {
                TensorView::new(*d, sh.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| TrainError::Tensor(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        meta.insert(
            "spa.cache".to_string(),
            serde_json::to_string(&self.key).map_err(|e| TrainError::Config(e.to_string()))?,
        );
        meta.insert("spa.count".to_string(), self.seqs.len().to_string());
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| TrainError::Tensor(e.to_string()))?;
        spa_model::io::atomic_write(path, &bytes)?;
        Ok(())
    }

    /// Loads a cache; fails with [`TrainError::Cache`] when it is unreadable or its key differs
    /// from `expect`.
    pub fn load(path: &Path, expect: &CacheKey) -> Result<Self> {
        let bad = |r: String| TrainError::Cache {
            path: path.to_path_buf(),
            reason: r,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        let key: CacheKey =
            serde_json::from_str(meta.get("spa.cache").ok_or_else(|| bad("no key".into()))?)
                .map_err(|e| bad(e.to_string()))?;
        if &key != expect {
            return Err(bad(
                "made for another base, projection or data (stale)".into()
            ));
        }
        let count: usize = meta
            .get("spa.count")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("no count".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let get = |n: String| -> Result<Vec<u8>> {
            Ok(st
                .tensor(&n)
                .map_err(|e| bad(format!("{n}: {e}")))?
                .data()
                .to_vec())
        };
        let u32s = |b: Vec<u8>| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let n_taps = key.taps.len();
        let mut seqs = Vec::with_capacity(count);
        for i in 0..count {
            let mut tokens = u32s(get(format!("{i}.tokens"))?);
            let loss_start = tokens.pop().ok_or_else(|| bad("empty sequence".into()))? as usize;
            let s = SeqFeatures {
                taps: get(format!("{i}.taps"))?
                    .into_iter()
                    .map(|b| b as i8)
                    .collect(),
                scales: f32s(get(format!("{i}.scales"))?),
                cand_ids: u32s(get(format!("{i}.cand_ids"))?),
                cand_logits: f32s(get(format!("{i}.cand_logits"))?),
                target_idx: u32s(get(format!("{i}.target_idx"))?),
                tokens,
                loss_start,
            };
            let (n, c) = (s.tokens.len(), key.top_k + 1);
            let n_loss = n.saturating_sub(loss_start);
            if loss_start == 0
                || s.taps.len() != n * n_taps * key.width
                || s.scales.len() != n * n_taps
                || s.target_idx.len() != n_loss
                || s.cand_ids.len() != n_loss * c
                || s.cand_logits.len() != n_loss * c
                || s.target_idx.iter().any(|&t| t as usize >= c)
            {
                return Err(bad(format!("sequence {i} has inconsistent sizes")));
            }
            seqs.push(s);
        }
        Ok(Self { key, seqs })
    }
}

#[cfg(feature = "host")]
/// Loads the caches at `paths` (one per projection) when all are valid, else computes them with
/// one base pass and saves them. Returns one set per projection.
pub fn load_or_compute(
    base: &BaseModel,
    projs: &[&DownProjection],
    top: usize,
    specs: &[SeqSpec],
    paths: &[&Path],
    label: &str,
    quiet: bool,
) -> Result<Vec<FeatureSet>> {
    let keys: Vec<CacheKey> = projs
        .iter()
        .map(|p| cache_key(base, p, top, specs))
        .collect();
    let loaded: Vec<Option<FeatureSet>> = paths
        .iter()
        .zip(&keys)
        .map(|(p, k)| match FeatureSet::load(p, k) {
            Ok(s) => Some(s),
            Err(e) => {
                if p.exists() {
                    log::info!("recomputing feature cache: {e}");
                }
                None
            }
        })
        .collect();
    if loaded.iter().all(|l| l.is_some()) {
        return Ok(loaded.into_iter().flatten().collect());
    }
    let sets = compute(base, projs, top, specs, label, quiet)?;
    for (s, p) in sets.iter().zip(paths) {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        s.save(p)?;
    }
    Ok(sets)
}
