//! Q4_1-weight x f32-activation matrix kernels for the base model.
//!
//! candle 0.11 multiplies Q4_1 weights with a scalar loop after quantizing the activations to
//! 8 bits (Q8_1). That is slow (the stock path decodes SmolLM2 at ~20 tok/s here) and the 8-bit
//! activations move the greedy output away from the float reference ("loved to play in the sun"
//! instead of "... with her toys"). These kernels keep activations in f32 and dequantize the
//! 4-bit weights on the fly: `w = d * q + m`, so
//! `row . x = sum_b d_b * sum_j q_j x_j + m_b * sum_j x_j`.
//!
//! x86_64 uses AVX-512F or AVX2 + FMA (runtime-detected; `SPA_NO_AVX512=1` forces AVX2);
//! other targets use the portable loop. Output rows
//! are split across the rayon pool for large matrices; several activation rows (prefill) share
//! each unpacked weight block.

use crate::error::{Result, SpaError};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
const GGML_Q4_1_BYTES: usize = 20;

/// A `[rows, cols]` Q4_1 or Q8_0 matrix, structure-of-arrays (scales as f32).
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    /// Q4_1 offsets (empty for Q8_0).
    m: Vec<f32>,
    /// Q4_1 nibbles (empty for Q8_0).
    qs: Vec<[u8; 16]>,
    /// Q8_0 values (empty for Q4_1).
    q8: Vec<[i8; 32]>,
}

impl Q41Matrix {
    /// Parses GGML Q4_1 blocks (`f16 d, f16 m, 16 bytes`, 20 bytes per 32 values).
    pub fn from_ggml_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * GGML_Q4_1_BYTES {
            return Err(SpaError::WrongShape {
                name: "q4_1 matrix".into(),
                expected: vec![rows, cols, rows * cols / QK * GGML_Q4_1_BYTES],
                got: vec![data.len()],
            });
        }
        let n = rows * cols / QK;
        let mut d = Vec::with_capacity(n);
        let mut m = Vec::with_capacity(n);
        let mut qs = Vec::with_capacity(n);
        for b in data.chunks_exact(GGML_Q4_1_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            let mut q = [0u8; 16];
            q.copy_from_slice(&b[4..20]);
            qs.push(q);
        }
        Ok(Self {
            rows,
            cols,
            d,
            m,
            qs,
            q8: Vec::new(),
        })
    }

    /// Parses GGML Q8_0 blocks (`f16 d, 32 x i8`, 34 bytes per 32 values).
    pub fn from_ggml_q8_0(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * 34 {
            return Err(SpaError::WrongShape {
                name: "q8_0 matrix".into(),
                expected: vec![rows, cols, rows * cols / QK * 34],
                got: vec![data.len()],
            });
        }
        let n = rows * cols / QK;
        let mut d = Vec::with_capacity(n);
        let mut q8 = Vec::with_capacity(n);
        for b in data.chunks_exact(34) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            let mut q = [0i8; 32];
            for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                *o = v as i8;
            }
            q8.push(q);
        }
        Ok(Self {
            rows,
            cols,
            d,
            m: Vec::new(),
            qs: Vec::new(),
            q8,
        })
    }

    /// Stacks matrices with equal `cols` and format on top of each other (fused projections).
    pub fn concat_rows(parts: &[&Q41Matrix]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| SpaError::InvalidConfig("concat of no matrices".into()))?;
        if parts
            .iter()
            .any(|p| p.cols != first.cols || p.is_q8() != first.is_q8())
        {
            return Err(SpaError::InvalidConfig(
                "concat of incompatible matrices".into(),
            ));
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            q8: parts.iter().flat_map(|p| p.q8.iter().copied()).collect(),
        })
    }

    fn is_q8(&self) -> bool {
        !self.q8.is_empty()
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (scales as f32).
    pub fn bytes(&self) -> usize {
        self.qs.len() * 24 + self.q8.len() * 36
    }

    /// Dequantized row-major f32 weights.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (b, q) in self.q8.iter().enumerate() {
            out.extend(q.iter().map(|&v| self.d[b] * v as f32));
        }
        for b in 0..self.qs.len() {
            let (d, m, q) = (self.d[b], self.m[b], &self.qs[b]);
            out.extend(q.iter().map(|v| d * (v & 15) as f32 + m));
            out.extend(q.iter().map(|v| d * (v >> 4) as f32 + m));
        }
        out
    }

    /// `y = x W^T` for `n` activation rows: `x` is `n x cols`, `y` is `n x rows` (row-major).
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        if x.len() != n * self.cols || y.len() != n * self.rows {
            return Err(SpaError::WrongShape {
                name: "q4_1 matmul operands".into(),
                expected: vec![n * self.cols, n * self.rows],
                got: vec![x.len(), y.len()],
            });
        }
        let nb = self.cols / QK;
        // Per-block sums of the activations, shared by every row.
        let xsum: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        let work = self.rows * self.cols * n;
        // About 4 tasks per thread, at least 16 rows each: few wake-ups per matmul.
        let threads = rayon::current_num_threads().max(1);
        let chunk = self.rows.div_ceil(threads * 4).max(16);
        let compute = |r0: usize, r1: usize| -> Vec<f32> {
            let mut out = vec![0f32; (r1 - r0) * n];
            for r in r0..r1 {
                let blocks = r * nb..(r + 1) * nb;
                let dst = &mut out[(r - r0) * n..(r - r0 + 1) * n];
                self.row_dot(blocks, x, &xsum, n, dst);
            }
            out
        };
        let chunks: Vec<(usize, usize)> = (0..self.rows)
            .step_by(chunk)
            .map(|r| (r, (r + chunk).min(self.rows)))
            .collect();
        let parts: Vec<Vec<f32>> = if work >= 1 << 17 {
            chunks.par_iter().map(|&(a, b)| compute(a, b)).collect()
        } else {
            chunks.iter().map(|&(a, b)| compute(a, b)).collect()
        };
        for (&(r0, r1), part) in chunks.iter().zip(&parts) {
            for r in r0..r1 {
                for i in 0..n {
                    y[i * self.rows + r] = part[(r - r0) * n + i];
                }
            }
        }
        Ok(())
    }

    fn row_dot(
        &self,
        blocks: std::ops::Range<usize>,
        x: &[f32],
        xsum: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_available() {
                // SAFETY: AVX-512F was detected at run time; same bounds as the AVX2 path.
                unsafe { avx512::row_dot(self, blocks, x, xsum, n, out) };
                return;
            }
            if avx2_available() {
                // SAFETY: AVX2 and FMA were detected at run time; slices are bounds-checked by
                // construction (blocks within self, x has n*cols values, xsum n*nb values).
                unsafe { avx2::row_dot(self, blocks, x, xsum, n, out) };
                return;
            }
        }
        row_dot_scalar(self, blocks, x, xsum, n, out)
    }
}

fn row_dot_scalar(
    w: &Q41Matrix,
    blocks: std::ops::Range<usize>,
    x: &[f32],
    xsum: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let nb = w.cols / QK;
    for (i, o) in out.iter_mut().enumerate().take(n) {
        let xr = &x[i * w.cols..(i + 1) * w.cols];
        let mut acc = 0f32;
        for (k, b) in blocks.clone().enumerate() {
            let xb = &xr[k * QK..(k + 1) * QK];
            if w.is_q8() {
                acc += w.d[b]
                    * w.q8[b]
                        .iter()
                        .zip(xb)
                        .map(|(&q, x)| q as f32 * x)
                        .sum::<f32>();
                continue;
            }
            let q = &w.qs[b];
            let mut s = 0f32;
            for j in 0..16 {
                s += (q[j] & 15) as f32 * xb[j] + (q[j] >> 4) as f32 * xb[j + 16];
            }
            acc += w.d[b] * s + w.m[b] * xsum[i * nb + k];
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::env::var_os("SPA_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::env::var_os("SPA_NO_SIMD").is_none()
            && std::env::var_os("SPA_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
    })
}

/// AVX-512: one block of 32 values is two 16-lane vectors, so a block costs about half the
/// instructions of the AVX2 path (the nibble layout maps straight onto the lanes: low nibbles
/// are values 0..16, high nibbles 16..32).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Q41Matrix, QK};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_dot(
        w: &Q41Matrix,
        blocks: std::ops::Range<usize>,
        x: &[f32],
        xsum: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / QK;
        if w.is_q8() {
            for (i, o) in out.iter_mut().enumerate().take(n) {
                let mut acc = _mm512_setzero_ps();
                for (k, b) in blocks.clone().enumerate() {
                    let p = w.q8[b].as_ptr() as *const __m128i;
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1))));
                    let xp = x.as_ptr().add(i * cols + k * QK);
                    let t = _mm512_fmadd_ps(
                        q1,
                        _mm512_loadu_ps(xp.add(16)),
                        _mm512_mul_ps(q0, _mm512_loadu_ps(xp)),
                    );
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(w.d[b]), t, acc);
                }
                *o = _mm512_reduce_add_ps(acc);
            }
            return;
        }
        let mask = _mm_set1_epi8(0x0f);
        let mut i0 = 0;
        while i0 < n {
            let cnt = (n - i0).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut macc = [0f32; 4];
            for (k, b) in blocks.clone().enumerate() {
                let raw = _mm_loadu_si128(w.qs[b].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                let d = _mm512_set1_ps(w.d[b]);
                let m = w.m[b];
                for j in 0..cnt {
                    let i = i0 + j;
                    let xp = x.as_ptr().add(i * cols + k * QK);
                    let t = _mm512_fmadd_ps(
                        q1,
                        _mm512_loadu_ps(xp.add(16)),
                        _mm512_mul_ps(q0, _mm512_loadu_ps(xp)),
                    );
                    acc[j] = _mm512_fmadd_ps(d, t, acc[j]);
                    macc[j] += m * *xsum.get_unchecked(i * nb + k);
                }
            }
            for j in 0..cnt {
                out[i0 + j] = _mm512_reduce_add_ps(acc[j]) + macc[j];
            }
            i0 += cnt;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q41Matrix, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one weight row (`blocks`) with up to 4 activation rows at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dot(
        w: &Q41Matrix,
        blocks: std::ops::Range<usize>,
        x: &[f32],
        xsum: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let cols = w.cols;
        let nb = cols / QK;
        if w.is_q8() {
            for (i, o) in out.iter_mut().enumerate().take(n) {
                let mut acc = _mm256_setzero_ps();
                for (k, b) in blocks.clone().enumerate() {
                    let p = w.q8[b].as_ptr() as *const __m128i;
                    let r0 = _mm_loadu_si128(p);
                    let r1 = _mm_loadu_si128(p.add(1));
                    let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(r0));
                    let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(r0, 8)));
                    let q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(r1));
                    let q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(r1, 8)));
                    let xp = x.as_ptr().add(i * cols + k * QK);
                    let mut t = _mm256_mul_ps(q0, _mm256_loadu_ps(xp));
                    t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), t);
                    t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(16)), t);
                    t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(24)), t);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d[b]), t, acc);
                }
                *o = hsum(acc);
            }
            return;
        }
        let mask = _mm_set1_epi8(0x0f);
        let mut i0 = 0;
        while i0 < n {
            let cnt = (n - i0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut macc = [0f32; 4];
            for (k, b) in blocks.clone().enumerate() {
                let raw = _mm_loadu_si128(w.qs[b].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                let d = _mm256_set1_ps(w.d[b]);
                let m = w.m[b];
                for j in 0..cnt {
                    let i = i0 + j;
                    let xp = x.as_ptr().add(i * cols + k * QK);
                    let mut t = _mm256_mul_ps(q0, _mm256_loadu_ps(xp));
                    t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), t);
                    t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(16)), t);
                    t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(24)), t);
                    acc[j] = _mm256_fmadd_ps(d, t, acc[j]);
                    macc[j] += m * *xsum.get_unchecked(i * nb + k);
                }
            }
            for j in 0..cnt {
                out[i0 + j] = hsum(acc[j]) + macc[j];
            }
            i0 += cnt;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u32) -> (Vec<u8>, Q41Matrix) {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as u8
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(f16::from_f32(0.01 + (next() as f32) / 5000.0).to_le_bytes());
            bytes.extend(f16::from_f32(-(next() as f32) / 2000.0).to_le_bytes());
            for _ in 0..16 {
                bytes.push(next());
            }
        }
        let m = Q41Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        (bytes, m)
    }

    #[test]
    fn matches_dequantized_f32_matmul() {
        for &(rows, cols, n) in &[(7, 64, 1), (96, 576, 1), (200, 576, 5), (33, 1536, 3)] {
            let (_, w) = random_matrix(rows, cols, rows as u32);
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut y = vec![0f32; n * rows];
            w.matmul(&x, n, &mut y).unwrap();
            let wf = w.to_f32();
            for i in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wf[r * cols + c] as f64 * x[i * cols + c] as f64)
                        .sum();
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{cols} n={n} [{i},{r}] {got} vs {want}"
                    );
                }
            }
            // the portable path agrees with the SIMD path
            let nb = cols / QK;
            let xsum: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
            let mut o = vec![0f32; n];
            row_dot_scalar(&w, 0..nb, &x, &xsum, n, &mut o);
            for i in 0..n {
                assert!((o[i] - y[i * rows]).abs() <= 1e-4 * (1.0 + o[i].abs()));
            }
        }
    }

    #[test]
    fn q8_0_matches_dequantized() {
        let (rows, cols, n) = (37, 96, 2);
        let mut bytes = Vec::new();
        for b in 0..rows * cols / QK {
            bytes.extend(f16::from_f32(0.01 + b as f32 * 1e-4).to_le_bytes());
            bytes.extend((0..32).map(|j| ((b * 7 + j * 13) % 255) as u8));
        }
        let w = Q41Matrix::from_ggml_q8_0(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 17 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let mut y = vec![0f32; n * rows];
        w.matmul(&x, n, &mut y).unwrap();
        let wf = w.to_f32();
        for i in 0..n {
            for r in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| wf[r * cols + c] as f64 * x[i * cols + c] as f64)
                    .sum();
                assert!((y[i * rows + r] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Q41Matrix::from_ggml_bytes(&[0u8; 19], 1, 32).is_err());
        assert!(Q41Matrix::from_ggml_bytes(&[0u8; 20], 1, 31).is_err());
        let (_, w) = random_matrix(2, 32, 1);
        let mut y = vec![0f32; 2];
        assert!(w.matmul(&[0f32; 31], 1, &mut y).is_err());
    }
}
