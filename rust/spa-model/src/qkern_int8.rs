//! Quantized matrix-vector / matrix-matrix kernels for GGML `Q4_1` and `Q8_0` weights with
//! 8-bit activations (llama.cpp's numerics). Selected by [`crate::BaseKernel::Int8Activations`];
//! the default base kernels ([`crate::kernels`]) keep f32 activations.
//!
//! The numerics follow llama.cpp (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`):
//! the f32 activations are first quantized per block of [`QK`] values (to Q8_1 for Q4_1
//! weights, to Q8_0 for Q8_0 weights, with the reference rounding of
//! `quantize_row_q8_1_ref` / `quantize_row_q8_0_ref`), then every block contributes
//!
//! * Q4_1: `d_w * d_x * Σ q_w·q_x + m_w * s_x`
//! * Q8_0: `d_w * d_x * Σ q_w·q_x`
//!
//! to the dot product. The integer sums are exact on every code path; the paths differ only
//! in the order of the f32 additions (and the use of FMA), so SIMD results match the scalar
//! reference up to float rounding.
//!
//! Code paths ([`Isa`]), picked at run time by [`Isa::detect`]:
//! * x86_64: AVX2 + FMA + F16C (`_mm256_maddubs_epi16` / `_mm256_madd_epi16`, as llama.cpp);
//! * aarch64: NEON with `SDOT` when the `dotprod` extension is present, otherwise NEON with
//!   widening multiplies (`vmull_s8` / `vpadalq_s16`);
//! * everything else: portable scalar code.
//!
//! Work is split over output rows with rayon (in tasks of at most [`PAR_ROWS_PER_TASK`] rows)
//! when a call does more than [`PAR_MIN_MACS`] multiply-accumulates; smaller calls run on the
//! calling thread. Results do not depend on the number of threads.
//!
//! Shapes are preconditions checked with `assert!` at every public entry point (callers are
//! expected to validate shapes beforehand): a violated precondition panics, it never reads
//! out of bounds.

use half::f16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Number of values per quantization block (the same for Q4_1, Q8_0 and Q8_1).
pub const QK: usize = 32;

/// A call is split across rayon threads only when it performs more multiply-accumulates
/// (`rows * cols * n`) than this.
pub const PAR_MIN_MACS: usize = 1 << 16;

/// Maximum number of weight rows handled by one rayon task.
pub const PAR_ROWS_PER_TASK: usize = 64;

/// Minimum number of weight rows handled by one rayon task.
const PAR_MIN_ROWS_PER_TASK: usize = 16;

// ---------------------------------------------------------------------------------------------
// Block types
// ---------------------------------------------------------------------------------------------

/// A GGML `block_q4_1`: 32 weights stored as 4-bit unsigned integers with a scale and a minimum.
///
/// Value `j` (for `j < 16`) is the low nibble of `qs[j]`, value `j + 16` is its high nibble;
/// the dequantized value is `d * q + m`. The layout (20 bytes, alignment 2) is identical to GGML.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset added to every value).
    pub m: f16,
    /// Packed nibbles.
    pub qs: [u8; QK / 2],
}

/// A GGML `block_q8_0`: 32 signed 8-bit integers with a scale; value `j` is `d * qs[j]`.
///
/// The layout (34 bytes, alignment 2) is identical to GGML.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// A GGML `block_q8_1`: like [`BlockQ8_0`] plus `s = d * Σ qs` (used by Q4_1 dot products).
///
/// The layout (36 bytes, alignment 2) is identical to GGML.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * Σ qs`, rounded to f16.
    pub s: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}

impl BlockQ4_1 {
    /// Size of one block in bytes (as stored in GGUF files).
    pub const BYTES: usize = 20;
}

impl BlockQ8_0 {
    /// Size of one block in bytes (as stored in GGUF files).
    pub const BYTES: usize = 34;
}

impl BlockQ8_1 {
    /// Size of one block in bytes.
    pub const BYTES: usize = 36;
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == BlockQ4_1::BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == BlockQ8_0::BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == BlockQ8_1::BYTES);
const _: () = assert!(std::mem::align_of::<BlockQ4_1>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ8_1>() == 2);

// ---------------------------------------------------------------------------------------------
// Parsing / serialisation
// ---------------------------------------------------------------------------------------------

/// Parses little-endian GGML `Q4_1` data (as found in a GGUF tensor) into blocks.
///
/// Returns `None` if `bytes.len()` is not a multiple of [`BlockQ4_1::BYTES`]. Works for any
/// alignment of `bytes` and on any host endianness (the data is copied).
pub fn q4_1_from_bytes(bytes: &[u8]) -> Option<Vec<BlockQ4_1>> {
    if !bytes.len().is_multiple_of(BlockQ4_1::BYTES) {
        return None;
    }
    let blocks = bytes
        .chunks_exact(BlockQ4_1::BYTES)
        .map(|c| {
            let mut qs = [0u8; QK / 2];
            qs.copy_from_slice(&c[4..]);
            BlockQ4_1 {
                d: f16::from_le_bytes([c[0], c[1]]),
                m: f16::from_le_bytes([c[2], c[3]]),
                qs,
            }
        })
        .collect();
    Some(blocks)
}

/// Parses little-endian GGML `Q8_0` data (as found in a GGUF tensor) into blocks.
///
/// Returns `None` if `bytes.len()` is not a multiple of [`BlockQ8_0::BYTES`]. Works for any
/// alignment of `bytes` and on any host endianness (the data is copied).
pub fn q8_0_from_bytes(bytes: &[u8]) -> Option<Vec<BlockQ8_0>> {
    if !bytes.len().is_multiple_of(BlockQ8_0::BYTES) {
        return None;
    }
    let blocks = bytes
        .chunks_exact(BlockQ8_0::BYTES)
        .map(|c| {
            let mut qs = [0i8; QK];
            for (q, &b) in qs.iter_mut().zip(&c[2..]) {
                *q = b as i8;
            }
            BlockQ8_0 {
                d: f16::from_le_bytes([c[0], c[1]]),
                qs,
            }
        })
        .collect();
    Some(blocks)
}

/// Serialises Q4_1 blocks to the little-endian GGML byte layout (inverse of [`q4_1_from_bytes`]).
pub fn q4_1_to_bytes(blocks: &[BlockQ4_1]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BlockQ4_1::BYTES);
    for b in blocks {
        out.extend_from_slice(&b.d.to_le_bytes());
        out.extend_from_slice(&b.m.to_le_bytes());
        out.extend_from_slice(&b.qs);
    }
    out
}

/// Serialises Q8_0 blocks to the little-endian GGML byte layout (inverse of [`q8_0_from_bytes`]).
pub fn q8_0_to_bytes(blocks: &[BlockQ8_0]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BlockQ8_0::BYTES);
    for b in blocks {
        out.extend_from_slice(&b.d.to_le_bytes());
        out.extend(b.qs.iter().map(|&q| q as u8));
    }
    out
}

/// Reinterprets little-endian GGML `Q4_1` bytes in place, without copying (e.g. from a
/// memory-mapped GGUF file).
///
/// Returns `None` if the length is not a multiple of [`BlockQ4_1::BYTES`] or the data is not
/// 2-byte aligned; fall back to [`q4_1_from_bytes`] then. Only available on little-endian hosts.
#[cfg(target_endian = "little")]
pub fn q4_1_view(bytes: &[u8]) -> Option<&[BlockQ4_1]> {
    if !bytes.len().is_multiple_of(BlockQ4_1::BYTES)
        || bytes
            .as_ptr()
            .align_offset(std::mem::align_of::<BlockQ4_1>())
            != 0
    {
        return None;
    }
    // SAFETY: `BlockQ4_1` is `repr(C)`, made only of `f16`/`u8` fields without padding (size 20
    // checked at compile time), so every bit pattern is a valid value. The pointer is non-null,
    // suitably aligned (checked above), and `len` blocks cover exactly `bytes.len()` bytes of
    // the borrowed slice, whose lifetime the returned slice inherits. On a little-endian host
    // the in-memory layout of the `f16` fields equals the GGML file layout.
    Some(unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr().cast::<BlockQ4_1>(),
            bytes.len() / BlockQ4_1::BYTES,
        )
    })
}

/// Reinterprets little-endian GGML `Q8_0` bytes in place, without copying.
///
/// Returns `None` if the length is not a multiple of [`BlockQ8_0::BYTES`] or the data is not
/// 2-byte aligned; fall back to [`q8_0_from_bytes`] then. Only available on little-endian hosts.
#[cfg(target_endian = "little")]
pub fn q8_0_view(bytes: &[u8]) -> Option<&[BlockQ8_0]> {
    if !bytes.len().is_multiple_of(BlockQ8_0::BYTES)
        || bytes
            .as_ptr()
            .align_offset(std::mem::align_of::<BlockQ8_0>())
            != 0
    {
        return None;
    }
    // SAFETY: `BlockQ8_0` is `repr(C)`, made only of `f16`/`i8` fields without padding (size 34
    // checked at compile time), so every bit pattern is a valid value. The pointer is non-null,
    // suitably aligned (checked above), and `len` blocks cover exactly `bytes.len()` bytes of
    // the borrowed slice, whose lifetime the returned slice inherits. On a little-endian host
    // the in-memory layout of the `f16` field equals the GGML file layout.
    Some(unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr().cast::<BlockQ8_0>(),
            bytes.len() / BlockQ8_0::BYTES,
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Quantization / dequantization (llama.cpp reference semantics)
// ---------------------------------------------------------------------------------------------

/// `roundf` (round half away from zero) for finite `|v| < 2^23`, without a libm call so that
/// quantization loops vectorise; NaN maps to 0 like `f32::round(NaN) as i32`.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32; // truncation toward zero (saturating; NaN -> 0)
    let frac = v - t as f32; // exact for |v| < 2^23
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

#[inline(always)]
fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |a, &v| a.max(v.abs()))
}

/// Quantizes `x` to Q8_0 like llama.cpp's `quantize_row_q8_0_ref`: per block
/// `d = amax / 127`, `q = round(x / d)` (computed as `x * (1/d)`, half away from zero).
///
/// # Panics
/// If `x.len() != out.len() * QK`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_row_q8_0: length mismatch"
    );
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let d = absmax(xb) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f16::from_f32(d);
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = round_away(v * id) as i8;
        }
    }
}

/// Quantizes `x` to Q8_1 like llama.cpp's `quantize_row_q8_1_ref`: as [`quantize_row_q8_0`],
/// plus `s = d * Σ q` (computed in f32 from the f32 `d`, then rounded to f16).
///
/// # Panics
/// If `x.len() != out.len() * QK`.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_row_q8_1: length mismatch"
    );
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let d = absmax(xb) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            let r = round_away(v * id) as i8;
            *q = r;
            sum += i32::from(r);
        }
        yb.d = f16::from_f32(d);
        yb.s = f16::from_f32(sum as f32 * d);
    }
}

/// Quantizes `x` to Q4_1 like llama.cpp's `quantize_row_q4_1_ref` (mainly useful for tests and
/// for producing weights; models normally ship pre-quantized).
///
/// # Panics
/// If `x.len() != out.len() * QK`.
pub fn quantize_row_q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_row_q4_1: length mismatch"
    );
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in xb {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f16::from_f32(d);
        yb.m = f16::from_f32(min);
        for j in 0..QK / 2 {
            // `(int8_t)(v + 0.5f)` then `MIN(15, ..)`, as in the C reference (v >= 0).
            let q0 = (((xb[j] - min) * id + 0.5) as i8).clamp(0, 15) as u8;
            let q1 = (((xb[j + QK / 2] - min) * id + 0.5) as i8).clamp(0, 15) as u8;
            yb.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Dequantizes Q4_1 blocks: `out[32*i + j] = d_i * q_ij + m_i`.
///
/// # Panics
/// If `out.len() != w.len() * QK`.
pub fn dequantize_row_q4_1(w: &[BlockQ4_1], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        w.len() * QK,
        "dequantize_row_q4_1: length mismatch"
    );
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for (j, &q) in b.qs.iter().enumerate() {
            o[j] = f32::from(q & 0x0f) * d + m;
            o[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

/// Dequantizes Q8_0 blocks: `out[32*i + j] = d_i * q_ij`.
///
/// # Panics
/// If `out.len() != w.len() * QK`.
pub fn dequantize_row_q8_0(w: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        w.len() * QK,
        "dequantize_row_q8_0: length mismatch"
    );
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in o.iter_mut().zip(&b.qs) {
            *o = f32::from(q) * d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instruction-set selection
// ---------------------------------------------------------------------------------------------

/// Kernel implementation flavour. [`Isa::detect`] picks the fastest one the CPU supports;
/// the others are exposed for testing and benchmarking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar reference code (always available).
    Scalar,
    /// x86_64 with AVX2, FMA and F16C.
    Avx2,
    /// aarch64 Advanced SIMD, using widening multiplies (no `dotprod` needed).
    Neon,
    /// aarch64 Advanced SIMD with the `SDOT` instruction (`dotprod` extension).
    NeonDotprod,
}

impl Isa {
    /// Every flavour, in order of increasing preference on its architecture.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Neon, Isa::NeonDotprod];

    /// Whether this flavour can run on the current CPU.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => has_avx2(),
            Isa::Neon => has_neon(),
            Isa::NeonDotprod => has_neon() && has_dotprod(),
        }
    }

    /// The fastest flavour available on the current CPU (detected once, then cached).
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            [Isa::NeonDotprod, Isa::Neon, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// All flavours available on the current CPU.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}
#[cfg(target_arch = "aarch64")]
fn has_neon() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}
#[cfg(not(target_arch = "aarch64"))]
fn has_neon() -> bool {
    false
}
#[cfg(target_arch = "aarch64")]
fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}
#[cfg(not(target_arch = "aarch64"))]
fn has_dotprod() -> bool {
    false
}

/// Proof that an [`Isa`] is available on this CPU: only [`Checked::new`] creates one, and it
/// asserts availability, so holding a `Checked` makes calling that flavour's
/// `#[target_feature]` kernels sound.
#[derive(Clone, Copy, Debug)]
struct Checked(Isa);

impl Checked {
    fn new(isa: Isa) -> Checked {
        assert!(isa.is_available(), "{isa:?} is not supported by this CPU");
        Checked(isa)
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference kernels
// ---------------------------------------------------------------------------------------------

mod scalar {
    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

    /// `ggml_vec_dot_q4_1_q8_1`, generic C path.
    pub(super) fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        assert_eq!(w.len(), x.len());
        let mut sumf = 0f32;
        for (bw, bx) in w.iter().zip(x) {
            let (mut sumi0, mut sumi1) = (0i32, 0i32);
            for j in 0..QK / 2 {
                sumi0 += i32::from(bw.qs[j] & 0x0f) * i32::from(bx.qs[j]);
                sumi1 += i32::from(bw.qs[j] >> 4) * i32::from(bx.qs[j + QK / 2]);
            }
            let sumi = sumi0 + sumi1;
            sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32 + bw.m.to_f32() * bx.s.to_f32();
        }
        sumf
    }

    /// `ggml_vec_dot_q8_0_q8_0`, generic C path.
    pub(super) fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        assert_eq!(w.len(), x.len());
        let mut sumf = 0f32;
        for (bw, bx) in w.iter().zip(x) {
            let sumi: i32 = bw
                .qs
                .iter()
                .zip(&bx.qs)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            sumf += sumi as f32 * (bw.d.to_f32() * bx.d.to_f32());
        }
        sumf
    }
}

// ---------------------------------------------------------------------------------------------
// x86_64 AVX2 kernels
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1};
    use core::arch::x86_64::*;
    use half::f16;

    /// Converts two f16 values to f32 lanes 0 and 1 (lanes 2, 3 are zero).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x2(lo: f16, hi: f16) -> __m128 {
        let bits = u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16);
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dot products of `R` consecutive Q4_1 rows (`w`: `R * nb` blocks) with `C` consecutive
    /// Q8_1 vectors (`x`: `C * nb` blocks); `out[i][c] = row i · vector c`. Every output is
    /// computed with the same operation sequence whatever `R` and `C` are.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1<const R: usize, const C: usize>(
        w: &[BlockQ4_1],
        x: &[BlockQ8_1],
    ) -> [[f32; C]; R] {
        let nb = w.len() / R;
        assert!(w.len() == R * nb && x.len() == C * nb);
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut summs = [[_mm_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut qx = [_mm256_setzero_si256(); R];
            let mut wdm = [_mm_setzero_ps(); R];
            for (i, (qx, wdm)) in qx.iter_mut().zip(wdm.iter_mut()).enumerate() {
                // SAFETY: i < R and b < nb, so i * nb + b < R * nb == w.len() (asserted above).
                let wb = unsafe { w.get_unchecked(i * nb + b) };
                *wdm = f16x2(wb.d, wb.m);
                // SAFETY: `wb.qs` is 16 readable bytes; `loadu` has no alignment requirement.
                let raw = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
                *qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw), mask);
            }
            for c in 0..C {
                // SAFETY: c < C and b < nb, so c * nb + b < C * nb == x.len() (asserted above).
                let xb = unsafe { x.get_unchecked(c * nb + b) };
                // SAFETY: `xb.qs` is 32 readable bytes; `loadu` has no alignment requirement.
                let qy = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let ds = f16x2(xb.d, xb.s);
                for i in 0..R {
                    // lane 0: d_w * d_x, lane 1: m_w * s_x
                    let dm = _mm_mul_ps(wdm[i], ds);
                    summs[i][c] = _mm_add_ps(summs[i][c], dm);
                    // u8 (0..=15) x i8 pairs: |sum| <= 2*15*128, no i16 saturation.
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qx[i], qy), ones);
                    acc[i][c] = _mm256_fmadd_ps(
                        _mm256_broadcastss_ps(dm),
                        _mm256_cvtepi32_ps(dot),
                        acc[i][c],
                    );
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for i in 0..R {
            for c in 0..C {
                out[i][c] = hsum(acc[i][c]) + _mm_cvtss_f32(_mm_movehdup_ps(summs[i][c]));
            }
        }
        out
    }

    /// Dot products of `R` consecutive Q8_0 rows (`w`: `R * nb` blocks) with `C` consecutive
    /// Q8_0 vectors (`x`: `C * nb` blocks, values in `-127..=127`); `out[i][c] = row i · vector
    /// c`, computed with the same operation sequence whatever `R` and `C` are.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0<const R: usize, const C: usize>(
        w: &[BlockQ8_0],
        x: &[BlockQ8_0],
    ) -> [[f32; C]; R] {
        let nb = w.len() / R;
        assert!(w.len() == R * nb && x.len() == C * nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); R]; C]; // activation-major
        for b in 0..nb {
            let mut qx = [_mm256_setzero_si256(); R];
            let mut ax = [_mm256_setzero_si256(); R];
            let mut dw = [_mm_setzero_ps(); R];
            for i in 0..R {
                // SAFETY: i < R and b < nb, so i * nb + b < R * nb == w.len() (asserted above).
                let wb = unsafe { w.get_unchecked(i * nb + b) };
                dw[i] = f16x2(wb.d, f16::ZERO);
                // SAFETY: `wb.qs` is 32 readable bytes; `loadu` has no alignment requirement.
                qx[i] = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
                // |w| as u8 (-128 -> 0x80 = 128 unsigned, still right).
                ax[i] = _mm256_sign_epi8(qx[i], qx[i]);
            }
            for (c, acc_c) in acc.iter_mut().enumerate() {
                // SAFETY: c < C and b < nb, so c * nb + b < C * nb == x.len() (asserted above).
                let xb = unsafe { x.get_unchecked(c * nb + b) };
                // SAFETY: `xb.qs` is 32 readable bytes; `loadu` has no alignment requirement.
                let qy = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                let dx = f16x2(xb.d, f16::ZERO);
                for i in 0..R {
                    let d = _mm_mul_ss(dw[i], dx);
                    // y * sign(w) (exact for |y| <= 127); |pair sum| <= 2*128*127 < 2^15.
                    let sy = _mm256_sign_epi8(qy, qx[i]);
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[i], sy), ones);
                    acc_c[i] = _mm256_fmadd_ps(
                        _mm256_broadcastss_ps(d),
                        _mm256_cvtepi32_ps(dot),
                        acc_c[i],
                    );
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for (c, acc_c) in acc.iter().enumerate() {
            for (i, a) in acc_c.iter().enumerate() {
                out[i][c] = hsum(*a);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// aarch64 NEON kernels
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1};
    use core::arch::aarch64::*;
    use half::f16;

    /// f16 -> f32 with the base-ARMv8 `FCVT` (no `fp16` extension or run-time detection needed).
    #[inline(always)]
    pub(super) fn f16_to_f32(h: f16) -> f32 {
        let out: f32;
        // SAFETY: `FCVT Sd, Hn` belongs to the base ARMv8-A floating-point unit, which every
        // aarch64 target Rust supports has; it only reads and writes the named registers.
        unsafe {
            core::arch::asm!(
                "fcvt {o:s}, {i:h}",
                i = in(vreg) h.to_bits() as i16,
                o = lateout(vreg) out,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        out
    }

    /// Loads 32 int8 values as two vectors.
    #[inline(always)]
    fn load_i8x32(q: &[i8; 32]) -> (int8x16_t, int8x16_t) {
        // SAFETY: `q` is 32 readable bytes and vld1q has no alignment requirement; NEON is a
        // baseline feature of every aarch64 target.
        unsafe { (vld1q_s8(q.as_ptr()), vld1q_s8(q.as_ptr().add(16))) }
    }

    /// `acc + (a·b)` spread over 4 lanes, with widening multiplies.
    /// Requires `|a_k * b_k + a_{k+8} * b_{k+8}| < 2^15` (true unless a and b both hold -128).
    #[inline(always)]
    unsafe fn dot_mull(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let p = vmlal_high_s8(p, a, b);
        vpadalq_s16(acc, p)
    }

    /// `acc + (a·b)` spread over 4 lanes, with `SDOT` (exact for all inputs).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn dot_sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: the enclosing function is only entered when the `dotprod` extension is
        // present; SDOT only reads and writes the named vector registers.
        unsafe {
            core::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    macro_rules! neon_kernels {
        ($feat:literal, $dot:ident, $q4_1:ident, $q8_0:ident) => {
            /// Dot products of `R` consecutive Q4_1 rows (`R * nb` blocks) with `C` consecutive
            /// Q8_1 vectors (`C * nb` blocks); `out[i][c] = row i · vector c`, computed with
            /// the same operation sequence whatever `R` and `C` are.
            ///
            /// # Safety
            /// The CPU must support the target features this function enables.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q4_1<const R: usize, const C: usize>(
                w: &[BlockQ4_1],
                x: &[BlockQ8_1],
            ) -> [[f32; C]; R] {
                let nb = w.len() / R;
                assert!(w.len() == R * nb && x.len() == C * nb);
                let m4 = vdupq_n_u8(0x0f);
                let mut acc = [[vdupq_n_f32(0.0); C]; R];
                let mut summs = [[0f32; C]; R];
                for b in 0..nb {
                    let mut lo = [vdupq_n_s8(0); R];
                    let mut hi = [vdupq_n_s8(0); R];
                    let mut dw = [0f32; R];
                    let mut mw = [0f32; R];
                    for i in 0..R {
                        // SAFETY: i < R and b < nb, so i * nb + b < R * nb == w.len().
                        let wb = unsafe { w.get_unchecked(i * nb + b) };
                        // SAFETY: `wb.qs` is 16 readable bytes; vld1q has no alignment needs.
                        let v = unsafe { vld1q_u8(wb.qs.as_ptr()) };
                        lo[i] = vreinterpretq_s8_u8(vandq_u8(v, m4));
                        hi[i] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                        dw[i] = f16_to_f32(wb.d);
                        mw[i] = f16_to_f32(wb.m);
                    }
                    for c in 0..C {
                        // SAFETY: c < C and b < nb, so c * nb + b < C * nb == x.len().
                        let xb = unsafe { x.get_unchecked(c * nb + b) };
                        let (y0, y1) = load_i8x32(&xb.qs);
                        let (dx, sx) = (f16_to_f32(xb.d), f16_to_f32(xb.s));
                        for i in 0..R {
                            let p = $dot($dot(vdupq_n_s32(0), lo[i], y0), hi[i], y1);
                            acc[i][c] = vfmaq_n_f32(acc[i][c], vcvtq_f32_s32(p), dw[i] * dx);
                            summs[i][c] += mw[i] * sx;
                        }
                    }
                }
                let mut out = [[0f32; C]; R];
                for i in 0..R {
                    for c in 0..C {
                        out[i][c] = vaddvq_f32(acc[i][c]) + summs[i][c];
                    }
                }
                out
            }

            /// Dot products of `R` consecutive Q8_0 rows (`R * nb` blocks) with `C` consecutive
            /// Q8_0 vectors (`C * nb` blocks, values in `-127..=127`); `out[i][c] = row i ·
            /// vector c`, computed with the same operation sequence whatever `R` and `C` are.
            ///
            /// # Safety
            /// The CPU must support the target features this function enables.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q8_0<const R: usize, const C: usize>(
                w: &[BlockQ8_0],
                x: &[BlockQ8_0],
            ) -> [[f32; C]; R] {
                let nb = w.len() / R;
                assert!(w.len() == R * nb && x.len() == C * nb);
                let mut acc = [[vdupq_n_f32(0.0); C]; R];
                for b in 0..nb {
                    let mut w0 = [vdupq_n_s8(0); R];
                    let mut w1 = [vdupq_n_s8(0); R];
                    let mut dw = [0f32; R];
                    for i in 0..R {
                        // SAFETY: i < R and b < nb, so i * nb + b < R * nb == w.len().
                        let wb = unsafe { w.get_unchecked(i * nb + b) };
                        (w0[i], w1[i]) = load_i8x32(&wb.qs);
                        dw[i] = f16_to_f32(wb.d);
                    }
                    for c in 0..C {
                        // SAFETY: c < C and b < nb, so c * nb + b < C * nb == x.len().
                        let xb = unsafe { x.get_unchecked(c * nb + b) };
                        let (y0, y1) = load_i8x32(&xb.qs);
                        let dx = f16_to_f32(xb.d);
                        for i in 0..R {
                            let p = $dot($dot(vdupq_n_s32(0), w0[i], y0), w1[i], y1);
                            acc[i][c] = vfmaq_n_f32(acc[i][c], vcvtq_f32_s32(p), dw[i] * dx);
                        }
                    }
                }
                let mut out = [[0f32; C]; R];
                for i in 0..R {
                    for c in 0..C {
                        out[i][c] = vaddvq_f32(acc[i][c]);
                    }
                }
                out
            }
        };
    }

    neon_kernels!("neon", dot_mull, dot_q4_1, dot_q8_0);
    neon_kernels!("neon,dotprod", dot_sdot, dot_q4_1_dotprod, dot_q8_0_dotprod);
}

// ---------------------------------------------------------------------------------------------
// Dispatch and row/thread driver
// ---------------------------------------------------------------------------------------------

/// A weight format together with its activation format and kernels.
trait Format {
    type W: Copy + Send + Sync;
    type A: Copy + Send + Sync + Default;

    /// Quantizes activations.
    fn quantize(x: &[f32], out: &mut [Self::A]);

    /// `out[i][c]` = row `i` of `w` (`R * nb` blocks) · activation `c` of `a` (`C * nb` blocks).
    /// The value of each output does not depend on `R` or `C`.
    fn dot<const R: usize, const C: usize>(
        isa: Checked,
        w: &[Self::W],
        a: &[Self::A],
    ) -> [[f32; C]; R];

    /// [`rows_kernel`] with this format's best tile sizes.
    fn rows(isa: Checked, w: &[Self::W], nb: usize, acts: &[Self::A], n: usize, out: &mut [f32]);
}

struct Q4_1Format;
struct Q8_0Format;

/// Scalar fallback for [`Format::dot`].
fn scalar_tile<W, A, const R: usize, const C: usize>(
    w: &[W],
    a: &[A],
    dot: fn(&[W], &[A]) -> f32,
) -> [[f32; C]; R] {
    let nb = w.len() / R;
    assert!(w.len() == R * nb && a.len() == C * nb);
    std::array::from_fn(|i| {
        std::array::from_fn(|c| dot(&w[i * nb..(i + 1) * nb], &a[c * nb..(c + 1) * nb]))
    })
}

impl Format for Q4_1Format {
    type W = BlockQ4_1;
    type A = BlockQ8_1;

    fn quantize(x: &[f32], out: &mut [BlockQ8_1]) {
        quantize_row_q8_1(x, out)
    }

    #[inline]
    fn dot<const R: usize, const C: usize>(
        isa: Checked,
        w: &[BlockQ4_1],
        a: &[BlockQ8_1],
    ) -> [[f32; C]; R] {
        match isa.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Checked` guarantees AVX2, FMA and F16C are present.
            Isa::Avx2 => unsafe { avx2::dot_q4_1::<R, C>(w, a) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Checked` guarantees NEON is present.
            Isa::Neon => unsafe { neon::dot_q4_1::<R, C>(w, a) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Checked` guarantees NEON and dotprod are present.
            Isa::NeonDotprod => unsafe { neon::dot_q4_1_dotprod::<R, C>(w, a) },
            _ => scalar_tile::<_, _, R, C>(w, a, scalar::dot_q4_1),
        }
    }

    fn rows(isa: Checked, w: &[BlockQ4_1], nb: usize, a: &[BlockQ8_1], n: usize, out: &mut [f32]) {
        if n == 1 {
            // 4 rows: 8 accumulators fit the 16 AVX2 registers (8 rows spill).
            rows_kernel::<Self, 4, 1>(isa, w, nb, a, n, out)
        } else {
            // Batched: unpack each weight block once for 4 activations (~20% faster than 4x1
            // with AVX2 for n = 64; 2x2, 2x4 and 1x8 tiles were slower).
            rows_kernel::<Self, 1, 4>(isa, w, nb, a, n, out)
        }
    }
}

impl Format for Q8_0Format {
    type W = BlockQ8_0;
    type A = BlockQ8_0;

    fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
        quantize_row_q8_0(x, out)
    }

    #[inline]
    fn dot<const R: usize, const C: usize>(
        isa: Checked,
        w: &[BlockQ8_0],
        a: &[BlockQ8_0],
    ) -> [[f32; C]; R] {
        match isa.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Checked` guarantees AVX2, FMA and F16C are present.
            Isa::Avx2 => unsafe { avx2::dot_q8_0::<R, C>(w, a) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Checked` guarantees NEON is present.
            Isa::Neon => unsafe { neon::dot_q8_0::<R, C>(w, a) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Checked` guarantees NEON and dotprod are present.
            Isa::NeonDotprod => unsafe { neon::dot_q8_0_dotprod::<R, C>(w, a) },
            _ => scalar_tile::<_, _, R, C>(w, a, scalar::dot_q8_0),
        }
    }

    fn rows(isa: Checked, w: &[BlockQ8_0], nb: usize, a: &[BlockQ8_0], n: usize, out: &mut [f32]) {
        // 8 rows x 1 activation, also when batched: the activation-side work (load, scale
        // conversion) dominates here, and with AVX2 this beat 4x1 by ~25% and 1x4 / 2x4 / 4x2
        // tiles were no faster for n = 64.
        rows_kernel::<Self, 8, 1>(isa, w, nb, a, n, out)
    }
}

/// Rayon tasks hold a multiple of this many rows, so that only the last task has a partial
/// row group (every format's row-group size divides it).
const TASK_ROW_ALIGN: usize = 8;

/// Writes an `R x C` tile of results at weight row `r`, activation `j` of the `rows x n` output.
#[inline(always)]
fn store_tile<const R: usize, const C: usize>(
    tile: [[f32; C]; R],
    out: &mut [f32],
    n: usize,
    r: usize,
    j: usize,
) {
    for (i, row) in tile.iter().enumerate() {
        out[(r + i) * n + j..(r + i) * n + j + C].copy_from_slice(row);
    }
}

/// Computes `out[r * n + j] = dot(row r of w, activation j)` for all rows of `w` (a whole
/// number of rows of `nb` blocks) and the `n` activations in `acts`, on the calling thread,
/// in tiles of `R` rows x `C` activations (remainders use 1-row / 1-activation tiles).
fn rows_kernel<F: Format, const R: usize, const C: usize>(
    isa: Checked,
    w: &[F::W],
    nb: usize,
    acts: &[F::A],
    n: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n;
    debug_assert_eq!(w.len(), rows * nb);
    debug_assert_eq!(acts.len(), n * nb);
    let mut r = 0;
    while r < rows {
        let full_r = rows - r >= R;
        let rr = if full_r { R } else { 1 };
        let wg = &w[r * nb..(r + rr) * nb];
        let mut j = 0;
        while j < n {
            let full_c = n - j >= C;
            let cc = if full_c { C } else { 1 };
            let a = &acts[j * nb..(j + cc) * nb];
            match (full_r, full_c) {
                (true, true) => store_tile(F::dot::<R, C>(isa, wg, a), out, n, r, j),
                (true, false) => store_tile(F::dot::<R, 1>(isa, wg, a), out, n, r, j),
                (false, true) => store_tile(F::dot::<1, C>(isa, wg, a), out, n, r, j),
                (false, false) => store_tile(F::dot::<1, 1>(isa, wg, a), out, n, r, j),
            }
            j += cc;
        }
        r += rr;
    }
}

/// Rows per rayon task: about 8 tasks per thread for load balance, clamped to
/// `PAR_MIN_ROWS_PER_TASK..=PAR_ROWS_PER_TASK` and rounded up to a multiple of
/// [`TASK_ROW_ALIGN`].
fn rows_per_task(rows: usize, threads: usize) -> usize {
    let target = rows.div_ceil(threads * 8);
    target
        .clamp(PAR_MIN_ROWS_PER_TASK, PAR_ROWS_PER_TASK)
        .div_ceil(TASK_ROW_ALIGN)
        * TASK_ROW_ALIGN
}

/// `out` is `rows x n`, row-major by weight row.
fn drive<F: Format>(
    isa: Checked,
    w: &[F::W],
    rows: usize,
    nb: usize,
    acts: &[F::A],
    n: usize,
    out: &mut [f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    if nb == 0 {
        out.fill(0.0);
        return;
    }
    let macs = rows.saturating_mul(nb * QK).saturating_mul(n);
    let threads = rayon::current_num_threads();
    if macs <= PAR_MIN_MACS || threads < 2 || rows <= PAR_MIN_ROWS_PER_TASK {
        F::rows(isa, w, nb, acts, n, out);
    } else {
        let rpt = rows_per_task(rows, threads);
        w.par_chunks(rpt * nb)
            .zip(out.par_chunks_mut(rpt * n))
            .for_each(|(wc, oc)| F::rows(isa, wc, nb, acts, n, oc));
    }
}

/// Shared entry point: checks shapes, then runs `n` pre-quantized activations.
#[allow(clippy::too_many_arguments)]
fn matmul_prequant<F: Format>(
    isa: Isa,
    w: &[F::W],
    rows: usize,
    cols: usize,
    acts: &[F::A],
    n: usize,
    ys: &mut [f32],
    name: &str,
) {
    let isa = Checked::new(isa);
    assert!(
        cols.is_multiple_of(QK),
        "{name}: cols ({cols}) must be a multiple of {QK}"
    );
    let nb = cols / QK;
    assert_eq!(
        rows.checked_mul(nb),
        Some(w.len()),
        "{name}: weight has {} blocks, expected rows ({rows}) * cols ({cols}) / {QK}",
        w.len()
    );
    assert_eq!(
        n.checked_mul(nb),
        Some(acts.len()),
        "{name}: activation length mismatch"
    );
    assert_eq!(
        n.checked_mul(rows),
        Some(ys.len()),
        "{name}: output length must be n * rows"
    );
    if n == 1 {
        drive::<F>(isa, w, rows, nb, acts, 1, ys);
    } else if n > 1 {
        // Weight-row-major scratch (each weight row is read once for all n activations),
        // transposed into the n x rows output at the end.
        let mut tmp = vec![0f32; rows * n];
        drive::<F>(isa, w, rows, nb, acts, n, &mut tmp);
        for (r, tr) in tmp.chunks_exact(n).enumerate() {
            for (j, &v) in tr.iter().enumerate() {
                ys[j * rows + r] = v;
            }
        }
    }
}

/// Shared entry point for f32 activations: quantizes each activation row once, then runs.
fn matmul_f32<F: Format>(
    w: &[F::W],
    rows: usize,
    cols: usize,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
    name: &str,
) {
    assert!(
        cols.is_multiple_of(QK),
        "{name}: cols ({cols}) must be a multiple of {QK}"
    );
    assert_eq!(
        n.checked_mul(cols),
        Some(xs.len()),
        "{name}: xs must hold n * cols values"
    );
    let mut acts = vec![F::A::default(); xs.len() / QK];
    F::quantize(xs, &mut acts);
    matmul_prequant::<F>(Isa::detect(), w, rows, cols, &acts, n, ys, name);
}

// ---------------------------------------------------------------------------------------------
// Public kernels
// ---------------------------------------------------------------------------------------------

/// `y = W x` for a row-major Q4_1 matrix `w` of `rows x cols` values; `x` is quantized to Q8_1
/// first (llama.cpp numerics). Uses the fastest [`Isa`] and rayon for large matrices.
///
/// # Panics
/// Unless `cols % 32 == 0`, `w.len() == rows * cols / 32`, `x.len() == cols` and
/// `y.len() == rows`.
pub fn matvec_q4_1(w: &[BlockQ4_1], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    matmul_f32::<Q4_1Format>(w, rows, cols, x, 1, y, "matvec_q4_1");
}

/// Batched `ys[j] = W xs[j]` for `n` activation rows: `xs` is `n x cols` and `ys` is `n x rows`,
/// both row-major. Each activation row is quantized to Q8_1 once, and each weight row is read
/// once for all `n` activations (the fast path for prompt prefill).
///
/// # Panics
/// Unless `cols % 32 == 0`, `w.len() == rows * cols / 32`, `xs.len() == n * cols` and
/// `ys.len() == n * rows`.
pub fn matmul_q4_1(
    w: &[BlockQ4_1],
    rows: usize,
    cols: usize,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    matmul_f32::<Q4_1Format>(w, rows, cols, xs, n, ys, "matmul_q4_1");
}

/// Like [`matmul_q4_1`] with activations already quantized by [`quantize_row_q8_1`]
/// (`xq` is `n x cols/32` blocks), so one quantized input can feed several matrices, and with an
/// explicit [`Isa`] (pass [`Isa::detect()`] normally).
///
/// # Panics
/// If `isa` is not available on this CPU, or unless `cols % 32 == 0`,
/// `w.len() == rows * cols / 32`, `xq.len() == n * cols / 32` and `ys.len() == n * rows`.
pub fn matmul_q4_1_q8_1(
    isa: Isa,
    w: &[BlockQ4_1],
    rows: usize,
    cols: usize,
    xq: &[BlockQ8_1],
    n: usize,
    ys: &mut [f32],
) {
    matmul_prequant::<Q4_1Format>(isa, w, rows, cols, xq, n, ys, "matmul_q4_1_q8_1");
}

/// `y = W x` for a row-major Q8_0 matrix `w` of `rows x cols` values; `x` is quantized to Q8_0
/// first (llama.cpp numerics). Uses the fastest [`Isa`] and rayon for large matrices.
///
/// # Panics
/// Unless `cols % 32 == 0`, `w.len() == rows * cols / 32`, `x.len() == cols` and
/// `y.len() == rows`.
pub fn matvec_q8_0(w: &[BlockQ8_0], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    matmul_f32::<Q8_0Format>(w, rows, cols, x, 1, y, "matvec_q8_0");
}

/// Batched `ys[j] = W xs[j]` for a Q8_0 matrix; see [`matmul_q4_1`] for the layout.
///
/// # Panics
/// Unless `cols % 32 == 0`, `w.len() == rows * cols / 32`, `xs.len() == n * cols` and
/// `ys.len() == n * rows`.
pub fn matmul_q8_0(
    w: &[BlockQ8_0],
    rows: usize,
    cols: usize,
    xs: &[f32],
    n: usize,
    ys: &mut [f32],
) {
    matmul_f32::<Q8_0Format>(w, rows, cols, xs, n, ys, "matmul_q8_0");
}

/// Like [`matmul_q8_0`] with activations already quantized by [`quantize_row_q8_0`] and an
/// explicit [`Isa`].
///
/// The activation values must lie in `-127..=127` (always true for [`quantize_row_q8_0`]
/// output); a `-128` there may give a wrong (but memory-safe) result on SIMD paths, as in
/// llama.cpp. Weights may use the full `i8` range.
///
/// # Panics
/// If `isa` is not available on this CPU, or unless `cols % 32 == 0`,
/// `w.len() == rows * cols / 32`, `xq.len() == n * cols / 32` and `ys.len() == n * rows`.
pub fn matmul_q8_0_q8_0(
    isa: Isa,
    w: &[BlockQ8_0],
    rows: usize,
    cols: usize,
    xq: &[BlockQ8_0],
    n: usize,
    ys: &mut [f32],
) {
    matmul_prequant::<Q8_0Format>(isa, w, rows, cols, xq, n, ys, "matmul_q8_0_q8_0");
}

/// Dot product of one Q4_1 row with one Q8_1 vector (`ggml_vec_dot_q4_1_q8_1`).
///
/// # Panics
/// If `w.len() != x.len()` or `isa` is not available on this CPU.
pub fn vec_dot_q4_1_q8_1(isa: Isa, w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let isa = Checked::new(isa);
    assert_eq!(w.len(), x.len(), "vec_dot_q4_1_q8_1: length mismatch");
    Q4_1Format::dot::<1, 1>(isa, w, x)[0][0]
}

/// Dot product of one Q8_0 row with one Q8_0 vector (`ggml_vec_dot_q8_0_q8_0`); `x` values
/// must lie in `-127..=127` (see [`matmul_q8_0_q8_0`]).
///
/// # Panics
/// If `w.len() != x.len()` or `isa` is not available on this CPU.
pub fn vec_dot_q8_0_q8_0(isa: Isa, w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let isa = Checked::new(isa);
    assert_eq!(w.len(), x.len(), "vec_dot_q8_0_q8_0: length mismatch");
    Q8_0Format::dot::<1, 1>(isa, w, x)[0][0]
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic PRNG (xorshift64*), so the tests need no extra dependency.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.f32() * scale).collect()
        }
        fn byte(&mut self) -> u8 {
            (self.next_u64() >> 56) as u8
        }
    }

    fn rand_q4_1(rng: &mut Rng, rows: usize, cols: usize) -> Vec<BlockQ4_1> {
        let x = rng.vec(rows * cols, 1.0);
        let mut w = vec![BlockQ4_1::default(); rows * cols / QK];
        quantize_row_q4_1(&x, &mut w);
        w
    }

    fn rand_q8_0(rng: &mut Rng, rows: usize, cols: usize) -> Vec<BlockQ8_0> {
        let x = rng.vec(rows * cols, 1.0);
        let mut w = vec![BlockQ8_0::default(); rows * cols / QK];
        quantize_row_q8_0(&x, &mut w);
        w
    }

    fn q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
        let mut q = vec![BlockQ8_1::default(); x.len() / QK];
        quantize_row_q8_1(x, &mut q);
        q
    }

    fn q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
        let mut q = vec![BlockQ8_0::default(); x.len() / QK];
        quantize_row_q8_0(x, &mut q);
        q
    }

    /// `Σ_j |d_w q_wj · d_x q_xj| + Σ_b |m_w s_x|`: the magnitude that bounds float rounding
    /// in any summation order of a Q4_1 x Q8_1 dot product.
    fn l1_q4_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(a, b)| {
                let d = (a.d.to_f32() * b.d.to_f32()).abs();
                let isum: i32 = (0..QK / 2)
                    .map(|j| {
                        i32::from(a.qs[j] & 0x0f) * i32::from(b.qs[j]).abs()
                            + i32::from(a.qs[j] >> 4) * i32::from(b.qs[j + QK / 2]).abs()
                    })
                    .sum();
                d * isum as f32 + (a.m.to_f32() * b.s.to_f32()).abs()
            })
            .sum()
    }

    /// `Σ_j |d_w q_wj · d_x q_xj|` for a Q8_0 x Q8_0 dot product.
    fn l1_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(a, b)| {
                let isum: i32 =
                    a.qs.iter()
                        .zip(&b.qs)
                        .map(|(&p, &q)| (i32::from(p) * i32::from(q)).abs())
                        .sum();
                (a.d.to_f32() * b.d.to_f32()).abs() * isum as f32
            })
            .sum()
    }

    /// Asserts a normwise relative error `‖got - want‖₂ / ‖want‖₂ < 1e-5` and, per element,
    /// `|got - want| <= 1e-5 * max(|want|, mag)` where `mag` is the dot product's `Σ|a_j b_j|`
    /// (the standard conditioning of a float dot product: the SIMD paths round 8 lane partial
    /// sums separately, so a row whose products cancel can differ by more than 1e-5 of |want|).
    fn assert_close(got: &[f32], want: &[f32], mags: &[f32], what: &str) {
        assert_eq!(got.len(), want.len());
        let (mut num, mut den) = (0f64, 0f64);
        for ((&g, &r), &m) in got.iter().zip(want).zip(mags) {
            let e = (g - r).abs();
            assert!(
                e <= 1e-5 * m.max(r.abs()) + 1e-30,
                "{what}: {g} vs {r} (magnitude {m})"
            );
            num += f64::from(e) * f64::from(e);
            den += f64::from(r) * f64::from(r);
        }
        let rel = (num / den.max(1e-300)).sqrt();
        assert!(rel < 1e-5, "{what}: normwise relative error {rel}");
    }

    #[test]
    fn layout_matches_ggml() {
        assert_eq!(std::mem::size_of::<BlockQ4_1>(), 20);
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
        assert_eq!(std::mem::size_of::<BlockQ8_1>(), 36);
        let b = BlockQ4_1::default();
        let base = &b as *const BlockQ4_1 as usize;
        assert_eq!(&b.m as *const f16 as usize - base, 2);
        assert_eq!(b.qs.as_ptr() as usize - base, 4);
        let b = BlockQ8_1::default();
        let base = &b as *const BlockQ8_1 as usize;
        assert_eq!(&b.s as *const f16 as usize - base, 2);
        assert_eq!(b.qs.as_ptr() as usize - base, 4);
    }

    #[test]
    fn bytes_roundtrip_and_parse() {
        let mut rng = Rng::new(1);
        let bytes: Vec<u8> = (0..BlockQ4_1::BYTES * 7).map(|_| rng.byte()).collect();
        let blocks = q4_1_from_bytes(&bytes).unwrap();
        assert_eq!(blocks.len(), 7);
        assert_eq!(q4_1_to_bytes(&blocks), bytes);
        assert_eq!(
            blocks[1].d.to_bits(),
            u16::from_le_bytes([bytes[20], bytes[21]])
        );
        assert_eq!(
            blocks[1].m.to_bits(),
            u16::from_le_bytes([bytes[22], bytes[23]])
        );
        assert_eq!(blocks[1].qs[..], bytes[24..40]);
        assert!(q4_1_from_bytes(&bytes[1..]).is_none());
        assert_eq!(q4_1_from_bytes(&[]).unwrap(), vec![]);

        let bytes: Vec<u8> = (0..BlockQ8_0::BYTES * 5).map(|_| rng.byte()).collect();
        let blocks = q8_0_from_bytes(&bytes).unwrap();
        assert_eq!(blocks.len(), 5);
        assert_eq!(q8_0_to_bytes(&blocks), bytes);
        assert_eq!(blocks[2].qs[3], bytes[68 + 2 + 3] as i8);
        assert!(q8_0_from_bytes(&bytes[..33]).is_none());

        #[cfg(target_endian = "little")]
        {
            // Views need 2-byte alignment: use a u16 buffer as backing storage.
            let backing: Vec<u16> = (0..BlockQ8_0::BYTES * 5 / 2 + 1)
                .map(|_| u16::from(rng.byte()))
                .collect();
            // SAFETY: reading the initialised u16 buffer as bytes (u8 has no alignment or
            // validity requirements); the slice lives no longer than `backing`.
            let raw = unsafe {
                std::slice::from_raw_parts(backing.as_ptr().cast::<u8>(), backing.len() * 2)
            };
            let aligned = &raw[..BlockQ8_0::BYTES * 5];
            assert_eq!(
                q8_0_view(aligned).unwrap(),
                &q8_0_from_bytes(aligned).unwrap()[..]
            );
            let aligned = &raw[..BlockQ4_1::BYTES * 4];
            assert_eq!(
                q4_1_view(aligned).unwrap(),
                &q4_1_from_bytes(aligned).unwrap()[..]
            );
            assert!(q4_1_view(&raw[1..1 + BlockQ4_1::BYTES]).is_none());
            assert!(q8_0_view(&raw[..BlockQ8_0::BYTES + 1]).is_none());
        }
    }

    #[test]
    fn round_away_matches_libm_round() {
        let special = [
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.499_999_97,
            -0.499_999_97,
            126.5,
            -126.5,
            127.0,
            -127.0,
            127.49,
            1e-30,
            f32::NAN,
        ];
        for &v in &special {
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
        let mut rng = Rng::new(2);
        for _ in 0..200_000 {
            let v = rng.f32() * 128.0;
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
    }

    #[test]
    fn quantize_q8_matches_definition() {
        let mut rng = Rng::new(3);
        let mut x = rng.vec(32 * 40, 3.0);
        x[32..64].fill(0.0); // all-zero block: d = 0, q = 0
        let a = q8_0(&x);
        let b = q8_1(&x);
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            assert_eq!(a[i].d, f16::from_f32(d));
            assert_eq!(b[i].d, f16::from_f32(d));
            let mut sum = 0i32;
            for (j, &v) in xb.iter().enumerate() {
                let q = (v * id).round() as i8;
                assert_eq!(a[i].qs[j], q);
                assert_eq!(b[i].qs[j], q);
                assert!(q >= -127);
                assert!((v - f32::from(q) * d).abs() <= 0.5 * d * (1.0 + 1e-6));
                sum += i32::from(q);
            }
            assert_eq!(b[i].s, f16::from_f32(sum as f32 * d));
        }
    }

    #[test]
    fn q4_1_quantization_error_bound() {
        let mut rng = Rng::new(4);
        let x = rng.vec(32 * 64, 2.0);
        let mut w = vec![BlockQ4_1::default(); 64];
        quantize_row_q4_1(&x, &mut w);
        let mut deq = vec![0f32; x.len()];
        dequantize_row_q4_1(&w, &mut deq);
        for (b, (xb, db)) in w.iter().zip(x.chunks_exact(QK).zip(deq.chunks_exact(QK))) {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            // half a step, plus the f16 rounding of d (times q <= 15) and of m.
            let bound = 0.5 * d + 15.0 * d.abs() / 1024.0 + m.abs() / 1024.0 + 1e-6;
            for (&v, &r) in xb.iter().zip(db) {
                assert!((v - r).abs() <= bound, "{v} vs {r} (bound {bound})");
            }
        }
    }

    #[test]
    fn q4_1_matvec_matches_dequantized_f32() {
        let mut rng = Rng::new(5);
        for &(rows, cols) in &[(7usize, 576usize), (33, 1536), (5, 32)] {
            let w = rand_q4_1(&mut rng, rows, cols);
            let x = rng.vec(cols, 1.5);
            let mut y = vec![0f32; rows];
            matvec_q4_1(&w, rows, cols, &x, &mut y);
            let xq = q8_1(&x);
            let mut wd = vec![0f32; rows * cols];
            dequantize_row_q4_1(&w, &mut wd);
            for (r, (&yr, wr)) in y.iter().zip(wd.chunks_exact(cols)).enumerate() {
                let (mut exact, mut quant, mut bound, mut sbound, mut mag) =
                    (0f64, 0f64, 0f64, 0f64, 0f64);
                for (b, (xb, xqb)) in x.chunks_exact(QK).zip(&xq).enumerate() {
                    let dx = f64::from(xqb.d.to_f32());
                    let wblk = &wr[b * QK..(b + 1) * QK];
                    let mut qsum = 0f64;
                    for j in 0..QK {
                        let wv = f64::from(wblk[j]);
                        exact += wv * f64::from(xb[j]);
                        quant += wv * f64::from(xqb.qs[j]) * dx;
                        qsum += f64::from(xqb.qs[j]);
                        // activation quantization error: half a step (plus f16 rounding of d).
                        bound += wv.abs() * (0.5 + 127.0 / 2048.0) * dx;
                        mag += (wv * f64::from(xb[j])).abs();
                    }
                    // The kernel uses s = f16(d * Σq) instead of d * Σq (relative error 2^-11).
                    let m = f64::from(w[r * cols / QK + b].m.to_f32());
                    sbound += (m * dx * qsum).abs() / 2048.0;
                }
                let yr = f64::from(yr);
                let tol = 1e-5 * mag + 1e-6;
                assert!(
                    (yr - quant).abs() <= sbound + tol,
                    "row {r}: {yr} vs quantized-activation dot {quant}"
                );
                assert!(
                    (yr - exact).abs() <= bound + sbound + tol,
                    "row {r}: {yr} vs f32 {exact} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn q8_0_matvec_matches_dequantized_f32() {
        let mut rng = Rng::new(6);
        for &(rows, cols) in &[(9usize, 576usize), (3, 1536)] {
            let w = rand_q8_0(&mut rng, rows, cols);
            let x = rng.vec(cols, 0.7);
            let mut y = vec![0f32; rows];
            matvec_q8_0(&w, rows, cols, &x, &mut y);
            let xq = q8_0(&x);
            let mut wd = vec![0f32; rows * cols];
            dequantize_row_q8_0(&w, &mut wd);
            for (r, (&yr, wr)) in y.iter().zip(wd.chunks_exact(cols)).enumerate() {
                let (mut exact, mut quant, mut bound, mut mag) = (0f64, 0f64, 0f64, 0f64);
                for (b, (xb, xqb)) in x.chunks_exact(QK).zip(&xq).enumerate() {
                    let dx = f64::from(xqb.d.to_f32());
                    for j in 0..QK {
                        let wv = f64::from(wr[b * QK + j]);
                        exact += wv * f64::from(xb[j]);
                        quant += wv * f64::from(xqb.qs[j]) * dx;
                        bound += wv.abs() * (0.5 + 127.0 / 2048.0) * dx;
                        mag += (wv * f64::from(xb[j])).abs();
                    }
                }
                let yr = f64::from(yr);
                let tol = 1e-5 * mag + 1e-6;
                // Same integers and scales: only f32 rounding separates these two.
                assert!((yr - quant).abs() <= tol, "row {r}: {yr} vs {quant}");
                assert!(
                    (yr - exact).abs() <= bound + tol,
                    "row {r}: {yr} vs f32 {exact} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn simd_matches_scalar_q4_1() {
        let mut rng = Rng::new(7);
        for &rows in &[1usize, 3, 4, 5, 7, 67, 133] {
            for &cols in &[32usize, 576, 1536] {
                let w = rand_q4_1(&mut rng, rows, cols);
                let xq = q8_1(&rng.vec(cols, 1.0));
                let mut want = vec![0f32; rows];
                matmul_q4_1_q8_1(Isa::Scalar, &w, rows, cols, &xq, 1, &mut want);
                let nb = cols / QK;
                let mags: Vec<f32> = w.chunks_exact(nb).map(|wr| l1_q4_1(wr, &xq)).collect();
                for isa in Isa::available() {
                    let mut got = vec![0f32; rows];
                    matmul_q4_1_q8_1(isa, &w, rows, cols, &xq, 1, &mut got);
                    assert_close(&got, &want, &mags, &format!("{isa:?} {rows}x{cols}"));
                    for (r, wr) in w.chunks_exact(nb).enumerate() {
                        assert_eq!(vec_dot_q4_1_q8_1(isa, wr, &xq), got[r]);
                    }
                }
            }
        }
    }

    #[test]
    fn simd_matches_scalar_q8_0() {
        let mut rng = Rng::new(8);
        for &rows in &[1usize, 3, 4, 5, 7, 67, 133] {
            for &cols in &[32usize, 576, 1536] {
                let mut w = rand_q8_0(&mut rng, rows, cols);
                // Raw weights may use the full i8 range, including -128.
                for b in w.iter_mut().step_by(3) {
                    b.qs[5] = -128;
                    b.qs[21] = -128;
                }
                let xq = q8_0(&rng.vec(cols, 1.0));
                let mut want = vec![0f32; rows];
                matmul_q8_0_q8_0(Isa::Scalar, &w, rows, cols, &xq, 1, &mut want);
                let nb = cols / QK;
                let mags: Vec<f32> = w.chunks_exact(nb).map(|wr| l1_q8_0(wr, &xq)).collect();
                for isa in Isa::available() {
                    let mut got = vec![0f32; rows];
                    matmul_q8_0_q8_0(isa, &w, rows, cols, &xq, 1, &mut got);
                    assert_close(&got, &want, &mags, &format!("{isa:?} {rows}x{cols}"));
                    for (r, wr) in w.chunks_exact(nb).enumerate() {
                        assert_eq!(vec_dot_q8_0_q8_0(isa, wr, &xq), got[r]);
                    }
                }
            }
        }
    }

    #[test]
    fn simd_matches_scalar_on_extreme_blocks() {
        // Saturated nibbles / int8 extremes and large scales, to exercise i16 headroom.
        let cols = 256;
        let nb = cols / QK;
        let rows = 6;
        let w4: Vec<BlockQ4_1> = (0..rows * nb)
            .map(|i| BlockQ4_1 {
                d: f16::from_f32(0.5 + i as f32),
                m: f16::from_f32(-3.0),
                qs: [if i % 2 == 0 { 0xff } else { 0xf0 }; 16],
            })
            .collect();
        let x8_1: Vec<BlockQ8_1> = (0..nb)
            .map(|i| {
                let q = if i % 2 == 0 { -127i8 } else { 127 };
                BlockQ8_1 {
                    d: f16::from_f32(0.25),
                    s: f16::from_f32(0.25 * 32.0 * f32::from(q)),
                    qs: [q; QK],
                }
            })
            .collect();
        let w8: Vec<BlockQ8_0> = (0..rows * nb)
            .map(|i| BlockQ8_0 {
                d: f16::from_f32(1.0 + i as f32),
                qs: [if i % 3 == 0 { -128 } else { 127 }; QK],
            })
            .collect();
        let x8: Vec<BlockQ8_0> = (0..nb)
            .map(|i| BlockQ8_0 {
                d: f16::from_f32(2.0),
                qs: [if i % 2 == 0 { -127 } else { 127 }; QK],
            })
            .collect();
        let mut want4 = vec![0f32; rows];
        let mut want8 = vec![0f32; rows];
        matmul_q4_1_q8_1(Isa::Scalar, &w4, rows, cols, &x8_1, 1, &mut want4);
        matmul_q8_0_q8_0(Isa::Scalar, &w8, rows, cols, &x8, 1, &mut want8);
        let mags4: Vec<f32> = w4.chunks_exact(nb).map(|w| l1_q4_1(w, &x8_1)).collect();
        let mags8: Vec<f32> = w8.chunks_exact(nb).map(|w| l1_q8_0(w, &x8)).collect();
        for isa in Isa::available() {
            let mut got = vec![0f32; rows];
            matmul_q4_1_q8_1(isa, &w4, rows, cols, &x8_1, 1, &mut got);
            assert_close(&got, &want4, &mags4, &format!("{isa:?} q4_1 extreme"));
            matmul_q8_0_q8_0(isa, &w8, rows, cols, &x8, 1, &mut got);
            assert_close(&got, &want8, &mags8, &format!("{isa:?} q8_0 extreme"));
        }
    }

    #[test]
    fn threaded_and_batched_match_single_thread() {
        let mut rng = Rng::new(9);
        // 301 rows x 576 cols > PAR_MIN_MACS, so the rayon path is taken (odd row count).
        let (rows, cols, n) = (301usize, 576usize, 6usize);
        let w4 = rand_q4_1(&mut rng, rows, cols);
        let w8 = rand_q8_0(&mut rng, rows, cols);
        let xs = rng.vec(n * cols, 1.0);
        let pool = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        let run = |t: usize| {
            pool(t).install(|| {
                let mut y4 = vec![0f32; n * rows];
                let mut y8 = vec![0f32; n * rows];
                matmul_q4_1(&w4, rows, cols, &xs, n, &mut y4);
                matmul_q8_0(&w8, rows, cols, &xs, n, &mut y8);
                (y4, y8)
            })
        };
        let (a4, a8) = run(1);
        let (b4, b8) = run(2);
        let (c4, c8) = run(3);
        assert_eq!(a4, b4);
        assert_eq!(a4, c4);
        assert_eq!(a8, b8);
        assert_eq!(a8, c8);
        // Batched == one matvec per activation row, bit for bit.
        for j in 0..n {
            let x = &xs[j * cols..(j + 1) * cols];
            let mut y = vec![0f32; rows];
            matvec_q4_1(&w4, rows, cols, x, &mut y);
            assert_eq!(y[..], a4[j * rows..(j + 1) * rows]);
            matvec_q8_0(&w8, rows, cols, x, &mut y);
            assert_eq!(y[..], a8[j * rows..(j + 1) * rows]);
        }
    }

    #[test]
    fn batched_tiles_match_matvec_for_every_isa() {
        let mut rng = Rng::new(12);
        let cols = 96;
        let nb = cols / QK;
        for &rows in &[1usize, 5, 13] {
            let w4 = rand_q4_1(&mut rng, rows, cols);
            let w8 = rand_q8_0(&mut rng, rows, cols);
            for &n in &[1usize, 2, 4, 5, 9] {
                let xs = rng.vec(n * cols, 1.0);
                let (x81, x80) = (q8_1(&xs), q8_0(&xs));
                for isa in Isa::available() {
                    let mut y4 = vec![0f32; n * rows];
                    let mut y8 = vec![0f32; n * rows];
                    matmul_q4_1_q8_1(isa, &w4, rows, cols, &x81, n, &mut y4);
                    matmul_q8_0_q8_0(isa, &w8, rows, cols, &x80, n, &mut y8);
                    for j in 0..n {
                        let mut y = vec![0f32; rows];
                        let a = &x81[j * nb..(j + 1) * nb];
                        matmul_q4_1_q8_1(isa, &w4, rows, cols, a, 1, &mut y);
                        assert_eq!(y[..], y4[j * rows..(j + 1) * rows], "{isa:?} q4_1");
                        let a = &x80[j * nb..(j + 1) * nb];
                        matmul_q8_0_q8_0(isa, &w8, rows, cols, a, 1, &mut y);
                        assert_eq!(y[..], y8[j * rows..(j + 1) * rows], "{isa:?} q8_0");
                    }
                }
            }
        }
    }

    #[test]
    fn degenerate_shapes() {
        let mut y: Vec<f32> = vec![];
        matvec_q4_1(&[], 0, 64, &[0.0; 64], &mut y);
        let mut y = vec![1f32; 3];
        matvec_q8_0(&[], 3, 0, &[], &mut y);
        assert_eq!(y, vec![0.0; 3]);
        let mut ys: Vec<f32> = vec![];
        matmul_q4_1(&[BlockQ4_1::default(); 2], 1, 64, &[], 0, &mut ys);
        // zero activations give m-free zero output for Q8_0 and `Σ m * s = 0` for Q4_1
        let w = rand_q4_1(&mut Rng::new(10), 2, 64);
        let mut y = vec![1f32; 2];
        matvec_q4_1(&w, 2, 64, &[0.0; 64], &mut y);
        assert_eq!(y, vec![0.0; 2]);
    }

    #[test]
    #[should_panic(expected = "multiple of 32")]
    fn rejects_cols_not_multiple_of_32() {
        let mut y = vec![0f32; 1];
        matvec_q4_1(&[BlockQ4_1::default(); 1], 1, 40, &[0.0; 40], &mut y);
    }

    #[test]
    #[should_panic(expected = "weight has")]
    fn rejects_wrong_weight_length() {
        let mut y = vec![0f32; 2];
        matvec_q8_0(&[BlockQ8_0::default(); 3], 2, 64, &[0.0; 64], &mut y);
    }

    #[test]
    #[should_panic(expected = "output length")]
    fn rejects_wrong_output_length() {
        let mut y = vec![0f32; 3];
        matvec_q8_0(&[BlockQ8_0::default(); 4], 2, 64, &[0.0; 64], &mut y);
    }

    #[test]
    #[should_panic(expected = "xs must hold")]
    fn rejects_wrong_input_length() {
        let mut y = vec![0f32; 2];
        matvec_q4_1(&[BlockQ4_1::default(); 4], 2, 64, &[0.0; 32], &mut y);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_f16_conversion_matches_half() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (got, want) = (neon::f16_to_f32(h), h.to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn isa_detection_is_consistent() {
        let best = Isa::detect();
        eprintln!("available: {:?}, detected: {best:?}", Isa::available());
        assert!(best.is_available());
        assert!(Isa::available().contains(&Isa::Scalar));
        assert!(Isa::available().contains(&best));
        #[cfg(target_arch = "aarch64")]
        assert_ne!(best, Isa::Scalar);
    }

    /// Throughput benchmark: `cargo test --release -- --ignored --nocapture bench_gmacs`.
    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_gmacs() {
        use std::time::{Duration, Instant};
        let mut rng = Rng::new(11);
        let best = Isa::detect();
        println!("best isa: {best:?}; GMAC/s (multiply-accumulates per second / 1e9), incl. activation quantization");
        let shapes = [
            (1536usize, 576usize, 1usize),
            (576, 1536, 1),
            (49152, 576, 1),
            (1536, 576, 64),
        ];
        for &(rows, cols, n) in &shapes {
            let nb = cols / QK;
            let w4: Vec<BlockQ4_1> = (0..rows * nb)
                .map(|_| {
                    let mut qs = [0u8; 16];
                    qs.iter_mut().for_each(|q| *q = rng.byte());
                    BlockQ4_1 {
                        d: f16::from_f32(0.01 + 0.01 * rng.f32().abs()),
                        m: f16::from_f32(-0.1 * rng.f32().abs()),
                        qs,
                    }
                })
                .collect();
            let w8: Vec<BlockQ8_0> = (0..rows * nb)
                .map(|_| {
                    let mut qs = [0i8; QK];
                    qs.iter_mut()
                        .for_each(|q| *q = (rng.byte() as i8).max(-127));
                    BlockQ8_0 {
                        d: f16::from_f32(0.001 + 0.001 * rng.f32().abs()),
                        qs,
                    }
                })
                .collect();
            let xs = rng.vec(n * cols, 1.0);
            let mut ys = vec![0f32; n * rows];
            let macs = (rows * cols * n) as f64;
            for isa in [Isa::Scalar, best] {
                for threads in [1usize, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut line = format!("{rows:>6}x{cols:<5} n={n:<3} {isa:<11?} {threads}T");
                    for fmt in ["q4_1", "q8_0"] {
                        let mut call = || match fmt {
                            "q4_1" => {
                                let mut xq = vec![BlockQ8_1::default(); n * nb];
                                quantize_row_q8_1(&xs, &mut xq);
                                matmul_q4_1_q8_1(isa, &w4, rows, cols, &xq, n, &mut ys)
                            }
                            _ => {
                                let mut xq = vec![BlockQ8_0::default(); n * nb];
                                quantize_row_q8_0(&xs, &mut xq);
                                matmul_q8_0_q8_0(isa, &w8, rows, cols, &xq, n, &mut ys)
                            }
                        };
                        let best_t = pool.install(|| {
                            call();
                            let mut best_t = f64::MAX;
                            for _ in 0..5 {
                                let (start, mut iters) = (Instant::now(), 0u32);
                                while iters < 2 || start.elapsed() < Duration::from_millis(60) {
                                    call();
                                    iters += 1;
                                }
                                best_t =
                                    best_t.min(start.elapsed().as_secs_f64() / f64::from(iters));
                            }
                            best_t
                        });
                        line += &format!(
                            "  {fmt}: {:7.2} GMAC/s ({:8.1} us)",
                            macs / best_t / 1e9,
                            best_t * 1e6
                        );
                    }
                    println!("{line}");
                }
            }
        }
    }
}
