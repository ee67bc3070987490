//! Row-addressable quantized matrices built on candle's GGML block types.
//!
//! candle's `QMatMul` computes whole matrix products; the device head also needs *selected rows*
//! (a candidate shortlist). [`QRows`] keeps the rows as candle `BlockQ8_0` / `BlockQ4_0` blocks and
//! uses candle's SIMD `vec_dot` kernels (AVX2 / NEON) for each row.

use crate::error::{Result, SpaError};
use crate::linear::QuantMode;
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};
use rayon::prelude::*;
use std::sync::Arc;

const BLOCK: usize = 32;

/// Quantized blocks: owned, or borrowed from a memory-mapped file (a device pack), where the
/// pages are the file's and the OS may drop and re-read them instead of counting them as the
/// app's own (dirty) memory.
#[derive(Clone)]
enum Blocks<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        /// Byte offset of the first block; a multiple of `align_of::<T>()`.
        start: usize,
        /// Number of blocks; `start + len * size_of::<T>() <= map.len()`.
        len: usize,
    },
}

impl<T> std::ops::Deref for Blocks<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Blocks::Owned(v) => v,
            // SAFETY: `Mapped` is built only by `QRows::map_blocks`, which checks that the
            // range lies inside the mapping and that `start` is aligned for `T` (the mapping
            // itself is page-aligned). `T` is a ggml block (`repr(C)`: an f16 and integers), for
            // which every bit pattern is valid. The mapping is read-only and kept alive by the
            // `Arc`; the file is never written in place (a pack is replaced by renaming a new
            // file over it, which leaves this mapping's pages intact).
            Blocks::Mapped { map, start, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*start).cast::<T>(), *len)
            },
        }
    }
}

impl<T> std::fmt::Debug for Blocks<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocks::Owned(v) => write!(f, "Owned({} blocks)", v.len()),
            Blocks::Mapped { len, .. } => write!(f, "Mapped({len} blocks)"),
        }
    }
}

#[derive(Debug, Clone)]
enum Store {
    F32(Vec<f32>),
    Q8(Blocks<BlockQ8_0>),
    Q4(Blocks<BlockQ4_0>),
}

/// A `[rows, cols]` matrix stored per row in f32, q8_0 or q4_0.
#[derive(Debug, Clone)]
pub struct QRows {
    store: Store,
    rows: usize,
    cols: usize,
}

fn quantize<T: GgmlType>(w: &[f32], rows: usize, cols: usize) -> Vec<T> {
    let per_row = cols / BLOCK;
    let mut out = vec![T::zeros(); rows * per_row];
    out.par_chunks_mut(per_row)
        .zip(w.par_chunks(cols))
        .for_each(|(o, r)| T::from_float(r, o));
    out
}

impl QRows {
    /// Quantizes a row-major f32 matrix.
    pub fn new(w: &[f32], rows: usize, cols: usize, mode: QuantMode) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(SpaError::WrongShape {
                name: "matrix".into(),
                expected: vec![rows, cols],
                got: vec![w.len()],
            });
        }
        if mode != QuantMode::F32 && !cols.is_multiple_of(BLOCK) {
            return Err(SpaError::InvalidConfig(format!(
                "{cols} columns is not a multiple of {BLOCK} (quantization block)"
            )));
        }
        let store = match mode {
            QuantMode::F32 => Store::F32(w.to_vec()),
            QuantMode::Q8 => Store::Q8(Blocks::Owned(quantize(w, rows, cols))),
            QuantMode::Q4 => Store::Q4(Blocks::Owned(quantize(w, rows, cols))),
        };
        Ok(Self { store, rows, cols })
    }

    /// Quantizes a `[rows, cols]` f32 tensor a block of rows at a time (no f32 copy of the
    /// whole matrix besides the tensor itself).
    pub fn from_tensor(w: &candle_core::Tensor, mode: QuantMode) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        if mode == QuantMode::F32 {
            return Self::new(&w.flatten_all()?.to_vec1::<f32>()?, rows, cols, mode);
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(SpaError::InvalidConfig(format!(
                "{cols} columns is not a multiple of {BLOCK} (quantization block)"
            )));
        }
        const CHUNK: usize = 2048;
        let (mut q8, mut q4) = (Vec::new(), Vec::new());
        match mode {
            QuantMode::Q8 => q8.reserve_exact(rows * cols / BLOCK),
            _ => q4.reserve_exact(rows * cols / BLOCK),
        }
        for r0 in (0..rows).step_by(CHUNK) {
            let n = CHUNK.min(rows - r0);
            let chunk: Vec<f32> = w.narrow(0, r0, n)?.flatten_all()?.to_vec1()?;
            match mode {
                QuantMode::Q8 => q8.extend(quantize::<BlockQ8_0>(&chunk, n, cols)),
                _ => q4.extend(quantize::<BlockQ4_0>(&chunk, n, cols)),
            }
        }
        let store = match mode {
            QuantMode::Q8 => Store::Q8(Blocks::Owned(q8)),
            _ => Store::Q4(Blocks::Owned(q4)),
        };
        Ok(Self { store, rows, cols })
    }

    /// The selected rows, dequantized to f32 (`[ids.len(), cols]` row-major). Ids must be
    /// `< rows`.
    pub fn gather_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(SpaError::BadTokenId {
                id: bad,
                vocab: self.rows,
            });
        }
        let (c, per_row) = (self.cols, self.cols / BLOCK);
        let mut out = vec![0f32; ids.len() * c];
        for (o, &i) in out.chunks_mut(c).zip(ids) {
            let i = i as usize;
            match &self.store {
                Store::F32(w) => o.copy_from_slice(&w[i * c..(i + 1) * c]),
                Store::Q8(w) => BlockQ8_0::to_float(&w[i * per_row..(i + 1) * per_row], o),
                Store::Q4(w) => BlockQ4_0::to_float(&w[i * per_row..(i + 1) * per_row], o),
            }
        }
        Ok(out)
    }

    /// Bytes of one quantized row (ggml blocks: q8_0 34 bytes, q4_0 18 bytes per 32 values).
    pub fn row_bytes(cols: usize, mode: QuantMode) -> Option<usize> {
        match mode {
            QuantMode::Q8 => Some(cols / BLOCK * std::mem::size_of::<BlockQ8_0>()),
            QuantMode::Q4 => Some(cols / BLOCK * std::mem::size_of::<BlockQ4_0>()),
            QuantMode::F32 => None,
        }
    }

    /// The quantized blocks as bytes (ggml's q8_0 / q4_0 layout: an f16 scale, then the
    /// 32 values of the block), `None` for f32.
    pub fn block_bytes(&self) -> Option<&[u8]> {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: the block types are `repr(C)` plain data without padding (an f16 and a
            // byte array; their sizes are asserted by candle), so every byte is initialized.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        match &self.store {
            Store::F32(_) => None,
            Store::Q8(v) => Some(bytes(v)),
            Store::Q4(v) => Some(bytes(v)),
        }
    }

    /// Reads a `[rows, cols]` matrix of q8_0 / q4_0 blocks ([`QRows::block_bytes`]'s layout)
    /// straight from `r` into its final buffer (no intermediate copy).
    pub fn read_blocks(
        r: &mut impl std::io::Read,
        rows: usize,
        cols: usize,
        mode: QuantMode,
    ) -> Result<Self> {
        fn fill<T: GgmlType>(r: &mut impl std::io::Read, n: usize) -> std::io::Result<Vec<T>> {
            let mut v = vec![T::zeros(); n];
            // SAFETY: as in `block_bytes`; and every bit pattern is a valid block (an f16 and
            // integers), so filling the bytes from the reader cannot make an invalid value.
            let b = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(&v[..]),
                )
            };
            r.read_exact(b)?;
            Ok(v)
        }
        if mode == QuantMode::F32 || !cols.is_multiple_of(BLOCK) {
            return Err(SpaError::InvalidConfig(format!(
                "quantized blocks need q8/q4 and a multiple of {BLOCK} columns"
            )));
        }
        let n = rows
            .checked_mul(cols / BLOCK)
            .ok_or_else(|| SpaError::InvalidConfig("matrix size overflows".into()))?;
        let io = |e: std::io::Error| SpaError::InvalidConfig(format!("reading blocks: {e}"));
        let store = match mode {
            QuantMode::Q8 => Store::Q8(Blocks::Owned(fill(r, n).map_err(io)?)),
            _ => Store::Q4(Blocks::Owned(fill(r, n).map_err(io)?)),
        };
        Ok(Self { store, rows, cols })
    }

    /// A `[rows, cols]` matrix of q8_0 / q4_0 blocks ([`QRows::block_bytes`]'s layout) read
    /// in place from `map` at byte offset `start`: nothing is copied, and the rows' pages are
    /// the file's (read on first use, droppable by the OS). `None` when `start` is not aligned
    /// for the block type (the caller then reads the blocks instead); an error when the
    /// matrix does not fit in the mapping.
    pub fn map_blocks(
        map: Arc<memmap2::Mmap>,
        start: usize,
        rows: usize,
        cols: usize,
        mode: QuantMode,
    ) -> Result<Option<Self>> {
        if mode == QuantMode::F32 || !cols.is_multiple_of(BLOCK) {
            return Err(SpaError::InvalidConfig(format!(
                "quantized blocks need q8/q4 and a multiple of {BLOCK} columns"
            )));
        }
        let (size, align) = match mode {
            QuantMode::Q8 => (
                std::mem::size_of::<BlockQ8_0>(),
                std::mem::align_of::<BlockQ8_0>(),
            ),
            _ => (
                std::mem::size_of::<BlockQ4_0>(),
                std::mem::align_of::<BlockQ4_0>(),
            ),
        };
        let len = rows
            .checked_mul(cols / BLOCK)
            .ok_or_else(|| SpaError::InvalidConfig("matrix size overflows".into()))?;
        let end = len
            .checked_mul(size)
            .and_then(|b| b.checked_add(start))
            .ok_or_else(|| SpaError::InvalidConfig("matrix size overflows".into()))?;
        if end > map.len() {
            return Err(SpaError::InvalidConfig(format!(
                "quantized matrix [{rows}, {cols}] at byte {start} runs past the mapping ({} bytes)",
                map.len()
            )));
        }
        if !(map.as_ptr() as usize + start).is_multiple_of(align) {
            return Ok(None);
        }
        let store = match mode {
            QuantMode::Q8 => Store::Q8(Blocks::Mapped { map, start, len }),
            _ => Store::Q4(Blocks::Mapped { map, start, len }),
        };
        Ok(Some(Self { store, rows, cols }))
    }

    /// Whether the rows are read in place from a memory-mapped file ([`QRows::map_blocks`]).
    pub fn is_mapped(&self) -> bool {
        matches!(
            &self.store,
            Store::Q8(Blocks::Mapped { .. }) | Store::Q4(Blocks::Mapped { .. })
        )
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of storage.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::F32(v) => v.len() * 4,
            Store::Q8(v) => v.len() * std::mem::size_of::<BlockQ8_0>(),
            Store::Q4(v) => v.len() * std::mem::size_of::<BlockQ4_0>(),
        }
    }

    fn check_x(&self, x: &[f32]) -> Result<()> {
        if x.len() != self.cols {
            return Err(SpaError::WrongShape {
                name: "input vector".into(),
                expected: vec![self.cols],
                got: vec![x.len()],
            });
        }
        Ok(())
    }

    fn q8_x(&self, x: &[f32]) -> Vec<BlockQ8_0> {
        let mut xq = vec![BlockQ8_0::zeros(); self.cols / BLOCK];
        BlockQ8_0::from_float(x, &mut xq);
        xq
    }

    /// `y[i] = row(ids[i]) . x` for the selected rows only. Ids must be `< rows`.
    pub fn dot_rows(&self, ids: &[u32], x: &[f32]) -> Result<Vec<f32>> {
        self.check_x(x)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(SpaError::BadTokenId {
                id: bad,
                vocab: self.rows,
            });
        }
        let per_row = self.cols / BLOCK;
        Ok(match &self.store {
            Store::F32(w) => ids
                .iter()
                .map(|&i| {
                    let r = &w[i as usize * self.cols..(i as usize + 1) * self.cols];
                    r.iter().zip(x).map(|(a, b)| a * b).sum()
                })
                .collect(),
            Store::Q8(w) => {
                let xq = self.q8_x(x);
                ids.iter()
                    .map(|&i| {
                        BlockQ8_0::vec_dot(
                            self.cols,
                            &w[i as usize * per_row..(i as usize + 1) * per_row],
                            &xq,
                        )
                    })
                    .collect()
            }
            Store::Q4(w) => {
                let xq = self.q8_x(x);
                ids.iter()
                    .map(|&i| {
                        BlockQ4_0::vec_dot(
                            self.cols,
                            &w[i as usize * per_row..(i as usize + 1) * per_row],
                            &xq,
                        )
                    })
                    .collect()
            }
        })
    }

    /// Full matrix-vector product `W x` (all rows), parallel over row chunks.
    pub fn matvec(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.check_x(x)?;
        let mut y = vec![0f32; self.rows];
        let per_row = self.cols.div_ceil(BLOCK);
        let chunk = 256;
        let par = self.rows * self.cols > 1 << 16;
        let xq = match &self.store {
            Store::F32(_) => Vec::new(),
            _ => self.q8_x(x),
        };
        let run = |(ci, ys): (usize, &mut [f32])| {
            let r0 = ci * chunk;
            for (j, y) in ys.iter_mut().enumerate() {
                let r = r0 + j;
                *y = match &self.store {
                    Store::F32(w) => w[r * self.cols..(r + 1) * self.cols]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum(),
                    Store::Q8(w) => {
                        BlockQ8_0::vec_dot(self.cols, &w[r * per_row..(r + 1) * per_row], &xq)
                    }
                    Store::Q4(w) => {
                        BlockQ4_0::vec_dot(self.cols, &w[r * per_row..(r + 1) * per_row], &xq)
                    }
                };
            }
        };
        if par {
            y.par_chunks_mut(chunk).enumerate().for_each(run);
        } else {
            y.chunks_mut(chunk).enumerate().for_each(run);
        }
        Ok(y)
    }

    /// Dequantized f32 copy (row-major).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.store {
            Store::F32(w) => w.clone(),
            Store::Q8(w) => {
                let mut o = vec![0f32; self.rows * self.cols];
                BlockQ8_0::to_float(w, &mut o);
                o
            }
            Store::Q4(w) => {
                let mut o = vec![0f32; self.rows * self.cols];
                BlockQ4_0::to_float(w, &mut o);
                o
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_quantization_and_gathered_rows_match_the_whole_matrix() {
        // 5,000 rows: more than one chunk of from_tensor, the last one partial.
        let (rows, cols) = (5000, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = candle_core::Tensor::from_vec(w.clone(), (rows, cols), &candle_core::Device::Cpu)
            .unwrap();
        for mode in [QuantMode::Q8, QuantMode::Q4, QuantMode::F32] {
            let whole = QRows::new(&w, rows, cols, mode).unwrap();
            let chunked = QRows::from_tensor(&t, mode).unwrap();
            let deq = whole.to_f32();
            assert_eq!(chunked.to_f32(), deq, "{mode:?}");
            let ids = [4999u32, 0, 2048, 2047, 17];
            let g = chunked.gather_f32(&ids).unwrap();
            for (k, &i) in ids.iter().enumerate() {
                let i = i as usize;
                assert_eq!(&g[k * cols..(k + 1) * cols], &deq[i * cols..(i + 1) * cols]);
            }
            assert!(chunked.gather_f32(&[5000]).is_err());
            if let Some(b) = chunked.block_bytes() {
                assert_eq!(b.len(), rows * QRows::row_bytes(cols, mode).unwrap());
                let back = QRows::read_blocks(&mut &b[..], rows, cols, mode).unwrap();
                assert_eq!(back.to_f32(), deq);
                assert!(QRows::read_blocks(&mut &b[..b.len() - 1], rows, cols, mode).is_err());
                // The same blocks mapped in place from a file, after a 2-byte prefix (aligned)
                // and after a 1-byte prefix (not aligned: the caller must read them instead).
                let path =
                    std::env::temp_dir().join(format!("qmat-map-{}-{mode:?}", std::process::id()));
                let mut file = vec![7u8, 7];
                file.extend_from_slice(b);
                std::fs::write(&path, &file).unwrap();
                // SAFETY: a private temporary file, not modified while mapped.
                let map = Arc::new(unsafe {
                    memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()).unwrap()
                });
                let mapped = QRows::map_blocks(map.clone(), 2, rows, cols, mode)
                    .unwrap()
                    .expect("aligned blocks are mapped");
                assert!(mapped.is_mapped() && !back.is_mapped());
                assert_eq!(mapped.to_f32(), deq);
                let x: Vec<f32> = (0..cols).map(|i| i as f32 / 40.0 - 0.7).collect();
                assert_eq!(mapped.matvec(&x).unwrap(), back.matvec(&x).unwrap());
                assert_eq!(
                    mapped.dot_rows(&ids, &x).unwrap(),
                    back.dot_rows(&ids, &x).unwrap()
                );
                assert_eq!(mapped.block_bytes(), Some(b));
                assert!(QRows::map_blocks(map.clone(), 1, rows, cols, mode)
                    .unwrap()
                    .is_none());
                // One row too many runs past the file: an error, not a read out of bounds.
                assert!(QRows::map_blocks(map, 2, rows + 1, cols, mode).is_err());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}
