//! The LM head on the device: full vocabulary, or only a candidate shortlist.
//!
//! The full SmolLM2 head is 49,152 x 576 (~28M MACs per position), far more than the side
//! blocks. The server sends the base's top-k ids per position; the device scores only those
//! plus a personal vocabulary (the user's frequent tokens) with the head rows it holds.

use crate::base::{argmax, BaseModel};
use crate::error::Result;
use crate::linear::QuantMode;
use crate::qmat::QRows;
use std::collections::HashMap;

/// Tied LM head weights held on the device (`[vocab, hidden]`, f32 / q8_0 / q4_0). Clones
/// share the weights.
#[derive(Debug, Clone)]
pub struct DeviceHead {
    rows: std::sync::Arc<QRows>,
}

impl DeviceHead {
    /// Builds the device head from the base's (tied) head weights.
    pub fn from_base(base: &BaseModel, mode: QuantMode) -> Result<Self> {
        Self::from_weights(&base.head_weight_f32()?, mode)
    }

    /// Builds the device head from f32 head weights `[vocab, hidden]`.
    pub fn from_weights(w: &candle_core::Tensor, mode: QuantMode) -> Result<Self> {
        Ok(Self {
            rows: std::sync::Arc::new(QRows::from_tensor(w, mode)?),
        })
    }

    /// Wraps quantized rows (e.g. read from a device pack).
    pub fn from_rows(rows: QRows) -> Self {
        Self {
            rows: std::sync::Arc::new(rows),
        }
    }

    /// The rows (their quantized blocks: [`QRows::block_bytes`]).
    pub fn rows(&self) -> &QRows {
        &self.rows
    }

    /// Hidden size (columns).
    pub fn hidden(&self) -> usize {
        self.rows.cols()
    }

    /// The rows of `ids` dequantized to f32, `[ids.len(), hidden]` row-major (e.g. the frozen
    /// head rows of a training shortlist).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.rows.gather_f32(ids)
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.rows.rows()
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        self.rows.bytes()
    }

    /// Logits over the whole vocabulary.
    pub fn full(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        self.rows.matvec(hidden)
    }

    /// Logits of the candidate ids only (same order as `ids`).
    pub fn shortlist(&self, ids: &[u32], hidden: &[f32]) -> Result<Vec<f32>> {
        self.rows.dot_rows(ids, hidden)
    }

    /// The best candidate id by shortlist logits; `None` for an empty shortlist.
    pub fn shortlist_argmax(&self, ids: &[u32], hidden: &[f32]) -> Result<Option<u32>> {
        let l = self.shortlist(ids, hidden)?;
        Ok(argmax(&l).map(|i| ids[i]))
    }
}

/// The user's frequent tokens, always added to the candidate shortlist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonalVocab {
    ids: Vec<u32>,
}

impl PersonalVocab {
    /// The `size` most frequent ids of the user's token sequences (ties by id).
    pub fn from_tokens<'a>(seqs: impl IntoIterator<Item = &'a [u32]>, size: usize) -> Self {
        let mut freq: HashMap<u32, usize> = HashMap::new();
        for s in seqs {
            for &t in s {
                *freq.entry(t).or_default() += 1;
            }
        }
        let mut v: Vec<(u32, usize)> = freq.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            ids: v.into_iter().take(size).map(|x| x.0).collect(),
        }
    }

    /// The ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Union of `base_topk` (kept first, in order) and this vocabulary, without duplicates.
    pub fn candidates(&self, base_topk: &[u32]) -> Vec<u32> {
        let mut out = base_topk.to_vec();
        let mut seen: std::collections::HashSet<u32> = base_topk.iter().copied().collect();
        for &id in &self.ids {
            if seen.insert(id) {
                out.push(id);
            }
        }
        out
    }
}

/// The gate's mixture over one shortlist: `g · softmax(side) + (1 - g) · softmax(base)`, the
/// next-token distribution SPA training fits (`g` = the gate's probability of the side path).
///
/// ```
/// let p = spa_model::gate_mixture(0.25, &[0.0, 0.0], &[10.0, -10.0]);
/// assert!((p[0] - 0.875).abs() < 1e-4 && (p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
/// ```
pub fn gate_mixture(g: f32, side: &[f32], base: &[f32]) -> Vec<f32> {
    softmax(side)
        .into_iter()
        .zip(softmax(base))
        .map(|(s, b)| g * s + (1.0 - g) * b)
        .collect()
}

/// Softmax of `x` (empty for an empty `x`).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let e: Vec<f32> = x.iter().map(|v| (v - mx).exp()).collect();
    let z: f32 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// The `k` ids with the largest logits, in decreasing order.
pub fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx
}

/// The base's top-`k` candidates at one position plus the next token `y`, as `k + 1` slots of
/// (id, logit): the last slot holds `y`, with logit `pad` when `y` is already among the top-k.
/// Returns the ids, their logits and the slot index of `y` (the training shortlist; the server's
/// features answer uses the same layout).
pub fn shortlist_with_target(
    logits: &[f32],
    y: u32,
    k: usize,
    pad: f32,
) -> (Vec<u32>, Vec<f32>, u32) {
    let mut ids = top_k(logits, k);
    let mut vals: Vec<f32> = ids.iter().map(|&t| logits[t as usize]).collect();
    let target = match ids.iter().position(|&t| t == y) {
        Some(p) => {
            vals.push(pad);
            p
        }
        None => {
            vals.push(logits[y as usize]);
            k
        }
    };
    ids.push(y);
    (ids, vals, target as u32)
}
