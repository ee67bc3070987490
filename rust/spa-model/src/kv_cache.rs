//! Key/value cache with append, truncate-to-position (rollback) and clear.
//!
//! Storage is preallocated in chunks and reused: truncation only moves the length back, the
//! next append overwrites the stale rows. Used by both the base model and the side blocks.

use crate::error::{Result, SpaError};
use candle_core::Tensor;

/// Cache of one attention layer: keys and values shaped `[1, kv_heads, capacity, head_dim]`.
/// Not `Clone`: the storage is written in place, so copies must be deep (see [`LayerKv::fork`]).
#[derive(Debug, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerKv {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[1, kv_heads, seq, head_dim]`) and returns the full cached keys and
    /// values (`[1, kv_heads, len, head_dim]`, contiguous).
    pub fn append(&mut self, k: &Tensor, v: &Tensor, max_len: usize) -> Result<(Tensor, Tensor)> {
        let (b, h, s, d) = k.dims4()?;
        let new_len = self.len + s;
        if new_len > max_len {
            return Err(SpaError::ContextOverflow {
                requested: new_len,
                max: max_len,
            });
        }
        let cap = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if new_len > cap {
            let new_cap = (cap * 2).max(new_len).max(64).min(max_len.max(new_len));
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(t)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kc, vc) = match (&self.k, &self.v) {
            (Some(kc), Some(vc)) => (kc, vc),
            _ => unreachable!("allocated above"),
        };
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = new_len;
        Ok((
            kc.narrow(2, 0, new_len)?.contiguous()?,
            vc.narrow(2, 0, new_len)?.contiguous()?,
        ))
    }

    /// Drops every position at or after `pos`. A `pos` beyond the length is a no-op.
    pub fn truncate(&mut self, pos: usize) {
        self.len = self.len.min(pos);
    }

    /// Drops all positions and frees the storage.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// An independent deep copy of the cached positions.
    pub fn fork(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => Some(t.copy()?),
                None => None,
            })
        };
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
        })
    }

    /// An independent copy of the first `len` positions (at most the length) with room for
    /// `extra` more before the storage grows: copies only those rows, not the capacity.
    pub fn fork_prefix(&self, len: usize, extra: usize) -> Result<Self> {
        let len = len.min(self.len);
        let copy = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match t {
                Some(t) => {
                    let (b, h, _, d) = t.dims4()?;
                    let out = Tensor::zeros((b, h, len + extra.max(1), d), t.dtype(), t.device())?;
                    if len > 0 {
                        out.slice_set(&t.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                    Some(out)
                }
                None => None,
            })
        };
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len,
        })
    }

    /// Bytes held by the storage (capacity, not length).
    pub fn capacity_bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// A cache for a stack of attention layers.
/// Not `Clone`: use [`KvCache::fork`] for an independent copy (beam search, session forks).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    max_len: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers and at most `max_len` positions.
    pub fn new(n_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::default()).collect(),
            max_len,
        }
    }

    /// Number of positions cached (the absolute position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maximum positions (context window).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rolls back to `pos` positions (keeps positions `0..pos`).
    pub fn truncate(&mut self, pos: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(pos));
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(LayerKv::clear);
    }

    /// An independent deep copy (appending to one never changes the other).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(LayerKv::fork)
                .collect::<Result<_>>()?,
            max_len: self.max_len,
        })
    }

    /// An independent copy of the first `len` positions with room for `extra` more (a branch
    /// off a prefix: copies `len` rows per layer instead of the whole storage).
    pub fn fork_prefix(&self, len: usize, extra: usize) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.fork_prefix(len, extra))
                .collect::<Result<_>>()?,
            max_len: self.max_len,
        })
    }

    /// Mutable access to one layer's cache.
    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Checks that `extra` more positions fit.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        let requested = self.len() + extra;
        if requested > self.max_len {
            return Err(SpaError::ContextOverflow {
                requested,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Bytes of storage held by all layers.
    pub fn capacity_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::capacity_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(from: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (from * 4..(from + n) * 4).map(|x| x as f32).collect();
        Tensor::from_vec(v, (1, 1, n, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn fork_prefix_copies_the_prefix_and_branches_independently() {
        let mut a = LayerKv::default();
        a.append(&rows(0, 5), &rows(0, 5), 64).unwrap();
        let mut b = a.fork_prefix(3, 1).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b.capacity_bytes(), 2 * 4 * 4 * 4);
        // Appending to the branch: the prefix, then the new row; the original is untouched.
        let (k, _) = b.append(&rows(9, 1), &rows(9, 1), 64).unwrap();
        let got: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        let mut want: Vec<f32> = (0..12).map(|x| x as f32).collect();
        want.extend((36..40).map(|x| x as f32));
        assert_eq!(got, want);
        let (k, _) = a.append(&rows(5, 1), &rows(5, 1), 64).unwrap();
        let got: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, (0..24).map(|x| x as f32).collect::<Vec<_>>());
        // A prefix longer than the cache is the whole cache; an empty cache forks empty.
        assert_eq!(a.fork_prefix(99, 0).unwrap().len(), 6);
        assert!(LayerKv::default().fork_prefix(2, 1).unwrap().is_empty());
    }
}
