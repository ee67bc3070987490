//! Tensor codec: int8 or int4 rows with an f16 scale each, or plain f16. Decoding validates
//! every declared size against the actual bytes and the limits before allocating.

use crate::{Limits, ProtocolError, Tensor, TensorEncoding};
use half::f16;

/// A decoded 2-D tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl TensorData {
    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Encodes a `[rows, cols]` matrix as int8 with one f16 scale per row (`scale = max|x| / 127`).
pub fn encode_i8_rows(data: &[f32], rows: usize, cols: usize) -> Tensor {
    debug_assert_eq!(data.len(), rows * cols);
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * 2);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = f16::from_f32(amax / 127.0);
        let s = scale.to_f32();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        q.extend(
            row.iter()
                .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
        scales.extend(scale.to_le_bytes());
    }
    Tensor {
        shape: vec![rows as u32, cols as u32],
        encoding: TensorEncoding::I8RowF16Scale as i32,
        data: q,
        scales,
    }
}

/// Encodes a `[rows, cols]` matrix as int4 with one f16 scale per row (`scale = max|x| / 7`,
/// values in [-7, 7]), two values per byte, low nibble first, row-major; an odd element count
/// pads the last byte's high nibble with 0. Half the bytes of [`encode_i8_rows`] at 18x its
/// step: for the taps of a long prompt, which dominate a generation's bytes down.
pub fn encode_i4_rows(data: &[f32], rows: usize, cols: usize) -> Tensor {
    debug_assert_eq!(data.len(), rows * cols);
    let mut q: Vec<u8> = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * 2);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = f16::from_f32(amax / 7.0);
        let s = scale.to_f32();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        q.extend(
            row.iter()
                .map(|x| ((x * inv).round().clamp(-7.0, 7.0) as i8 as u8) & 0x0f),
        );
        scales.extend(scale.to_le_bytes());
    }
    let data = q
        .chunks(2)
        .map(|p| p[0] | p.get(1).map_or(0, |hi| hi << 4))
        .collect();
    Tensor {
        shape: vec![rows as u32, cols as u32],
        encoding: TensorEncoding::I4RowF16Scale as i32,
        data,
        scales,
    }
}

/// Encodes a `[rows, cols]` matrix as f16.
pub fn encode_f16(data: &[f32], rows: usize, cols: usize) -> Tensor {
    debug_assert_eq!(data.len(), rows * cols);
    Tensor {
        shape: vec![rows as u32, cols as u32],
        encoding: TensorEncoding::F16 as i32,
        data: data
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        scales: Vec::new(),
    }
}

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        what: "tensor",
        reason: reason.into(),
    }
}

/// Shape `[rows, cols]` of a wire tensor, checked against the limits.
fn shape_of(t: &Tensor, limits: &Limits) -> Result<(usize, usize, usize), ProtocolError> {
    let [rows, cols] = t.shape[..] else {
        return Err(bad(format!("expected 2 dims, got {}", t.shape.len())));
    };
    let (rows, cols) = (rows as usize, cols as usize);
    let n = rows
        .checked_mul(cols)
        .filter(|&n| n <= limits.max_tensor_elems)
        .ok_or_else(|| ProtocolError::Limit(format!("tensor [{rows}, {cols}] too large")))?;
    Ok((rows, cols, n))
}

/// Little-endian f16 values as f32.
fn f16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// The values (int8 or int4, as i8) and finite per-row scales of a quantized tensor of the
/// checked shape `[rows, cols]` (`n` elements) with `bits` per value.
fn quant_parts(
    t: &Tensor,
    bits: u32,
    rows: usize,
    cols: usize,
    n: usize,
) -> Result<(Vec<i8>, Vec<f32>), ProtocolError> {
    let want = if bits == 4 { n.div_ceil(2) } else { n };
    if t.data.len() != want || t.scales.len() != rows * 2 {
        return Err(bad(format!(
            "int{bits} tensor [{rows}, {cols}] with {} data / {} scale bytes",
            t.data.len(),
            t.scales.len()
        )));
    }
    let scales = f16_values(&t.scales);
    if scales.iter().any(|s| !s.is_finite()) {
        return Err(bad("non-finite scale"));
    }
    let q = if bits == 4 {
        // Sign-extend each nibble: shift it to the top of an i8, then arithmetic-shift back.
        let nib = |v: u8| ((v << 4) as i8) >> 4;
        let mut q: Vec<i8> = t
            .data
            .iter()
            .flat_map(|&b| [nib(b & 0x0f), nib(b >> 4)])
            .collect();
        q.truncate(n);
        q
    } else {
        t.data.iter().map(|&b| b as i8).collect()
    };
    Ok((q, scales))
}

/// An int8 wire tensor ([`TensorEncoding::I8RowF16Scale`]) kept as int8: `(rows, cols, values
/// [rows * cols], one f32 scale per row)`, with the same checks as [`decode_tensor`] (shape,
/// byte counts, limits, finite scales). For consumers that store the int8 values (training
/// features) instead of dequantizing them.
pub fn decode_i8_rows(
    t: &Tensor,
    limits: &Limits,
) -> Result<(usize, usize, Vec<i8>, Vec<f32>), ProtocolError> {
    let (rows, cols, n) = shape_of(t, limits)?;
    if t.encoding != TensorEncoding::I8RowF16Scale as i32 {
        return Err(bad(format!(
            "expected int8 rows, got encoding {}",
            t.encoding
        )));
    }
    let (q, scales) = quant_parts(t, 8, rows, cols, n)?;
    Ok((rows, cols, q, scales))
}

/// Decodes a wire tensor, checking shape, byte counts, limits and finiteness.
pub fn decode_tensor(t: &Tensor, limits: &Limits) -> Result<TensorData, ProtocolError> {
    let (rows, cols, n) = shape_of(t, limits)?;
    let data = match TensorEncoding::try_from(t.encoding) {
        Ok(enc @ (TensorEncoding::I8RowF16Scale | TensorEncoding::I4RowF16Scale)) => {
            let bits = if enc == TensorEncoding::I4RowF16Scale {
                4
            } else {
                8
            };
            let (q, scales) = quant_parts(t, bits, rows, cols, n)?;
            let mut out = Vec::with_capacity(n);
            for (row, s) in q.chunks_exact(cols.max(1)).zip(&scales) {
                out.extend(row.iter().map(|&v| v as f32 * s));
            }
            out
        }
        Ok(TensorEncoding::F16) => {
            if t.data.len() != n * 2 {
                return Err(bad(format!(
                    "f16 tensor [{rows}, {cols}] with {} bytes",
                    t.data.len()
                )));
            }
            let out = f16_values(&t.data);
            if out.iter().any(|x| !x.is_finite()) {
                return Err(bad("non-finite value"));
            }
            out
        }
        _ => return Err(bad(format!("unknown encoding {}", t.encoding))),
    };
    Ok(TensorData { rows, cols, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_round_trip_error_is_bounded_by_half_a_step() {
        let (rows, cols) = (5, 64);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let t = encode_i8_rows(&data, rows, cols);
        assert_eq!(t.data.len(), rows * cols);
        let back = decode_tensor(&t, &Limits::default()).unwrap();
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 127.0;
            for (a, b) in row.iter().zip(back.row(r)) {
                assert!((a - b).abs() <= 0.51 * step + 1e-3 * amax, "{a} vs {b}");
            }
        }
        // all-zero row
        let z = decode_tensor(&encode_i8_rows(&[0.0; 32], 1, 32), &Limits::default()).unwrap();
        assert!(z.data.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn int8_rows_kept_as_int8_agree_with_the_decoder_and_reject_bad_scales() {
        let (rows, cols) = (3, 8);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 - 11.5).collect();
        let mut t = encode_i8_rows(&data, rows, cols);
        let (r, c, q, scales) = decode_i8_rows(&t, &Limits::default()).unwrap();
        assert_eq!(
            (r, c, q.len(), scales.len()),
            (rows, cols, rows * cols, rows)
        );
        let full = decode_tensor(&t, &Limits::default()).unwrap();
        for (i, v) in full.data.iter().enumerate() {
            assert_eq!(*v, q[i] as f32 * scales[i / cols]);
        }
        // An f16 tensor is not int8 rows; an infinite scale is refused by both decoders.
        let f = encode_f16(&data, rows, cols);
        assert!(decode_i8_rows(&f, &Limits::default()).is_err());
        let inf = half::f16::INFINITY.to_le_bytes();
        t.scales[2..4].copy_from_slice(&inf);
        assert!(decode_i8_rows(&t, &Limits::default()).is_err());
        assert!(decode_tensor(&t, &Limits::default()).is_err());
    }

    #[test]
    fn int4_round_trip_error_is_bounded_by_half_a_step_and_halves_the_bytes() {
        // Odd columns: the last byte of the tensor carries one value and a zero pad.
        let (rows, cols) = (5, 63);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let t = encode_i4_rows(&data, rows, cols);
        assert_eq!(t.data.len(), (rows * cols).div_ceil(2));
        assert_eq!(t.encoding, TensorEncoding::I4RowF16Scale as i32);
        let back = decode_tensor(&t, &Limits::default()).unwrap();
        let mut worst = 0f32;
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 7.0;
            for (a, b) in row.iter().zip(back.row(r)) {
                assert!((a - b).abs() <= 0.51 * step + 1e-3 * amax, "{a} vs {b}");
                worst = worst.max((a - b).abs() / step);
            }
        }
        // The rounding really happens at the int4 step (an int8 codec would stay near 0.03).
        assert!(worst > 0.3, "largest error {worst} steps");
        // Every value of [-7, 7] survives, negative nibbles included.
        let ramp: Vec<f32> = (-7..=7).map(|v| v as f32).collect();
        let t = encode_i4_rows(&ramp, 1, 15);
        assert_eq!(decode_tensor(&t, &Limits::default()).unwrap().data, ramp);
        // A short data buffer, or int4 data offered as int8 rows, is refused.
        let mut short = t.clone();
        short.data.pop();
        assert!(decode_tensor(&short, &Limits::default()).is_err());
        assert!(decode_i8_rows(&t, &Limits::default()).is_err());
        let mut inf = t.clone();
        inf.scales = half::f16::INFINITY.to_le_bytes().to_vec();
        assert!(decode_tensor(&inf, &Limits::default()).is_err());
    }

    #[test]
    fn f16_round_trip() {
        let data = vec![1.0, -2.5, 1e-3, 65000.0];
        let back = decode_tensor(&encode_f16(&data, 2, 2), &Limits::default()).unwrap();
        for (a, b) in data.iter().zip(&back.data) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0) * 2.0);
        }
    }

    #[test]
    fn rejects_inconsistent_or_huge_tensors() {
        let l = Limits::default();
        let mut t = encode_i8_rows(&[1.0; 64], 2, 32);
        t.data.pop();
        assert!(decode_tensor(&t, &l).is_err());
        let mut t = encode_i8_rows(&[1.0; 64], 2, 32);
        t.scales.clear();
        assert!(decode_tensor(&t, &l).is_err());
        let t = Tensor {
            shape: vec![u32::MAX, u32::MAX],
            encoding: TensorEncoding::F16 as i32,
            data: vec![],
            scales: vec![],
        };
        assert!(matches!(
            decode_tensor(&t, &l),
            Err(ProtocolError::Limit(_))
        ));
        let t = Tensor {
            shape: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(decode_tensor(&t, &l).is_err());
        let t = Tensor {
            shape: vec![1, 1],
            encoding: 9,
            data: vec![0],
            scales: vec![],
        };
        assert!(decode_tensor(&t, &l).is_err());
        let nan = encode_f16(&[f32::NAN], 1, 1);
        assert!(decode_tensor(&nan, &l).is_err());
    }
}
