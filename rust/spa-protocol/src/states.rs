//! Building the wire state of one position from the base's outputs: the one place where the
//! server's engine, the runtime's local reference and the evaluation package projected taps,
//! the final hidden state and the head's candidates, so all three send the same bytes.

use crate::codec::{encode_f16, encode_i4_rows, encode_i8_rows};
use crate::{PositionState, ProtocolError, Tensor};

/// Bits per tap value on the wire (`StepRequest::tap_bits`). The hidden state and the top-k
/// logits keep their encodings (int8 rows, f16): only the taps, which every prompt position
/// carries, change size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TapBits {
    /// int8 rows with an f16 scale each (the default; `tap_bits` 0 or 8).
    #[default]
    Int8,
    /// int4 rows with an f16 scale each: half the bytes (`tap_bits` 4).
    Int4,
}

impl TapBits {
    /// The request's `tap_bits` field: 0 or 8 is [`TapBits::Int8`], 4 is [`TapBits::Int4`].
    pub fn from_wire(bits: u32) -> Result<Self, ProtocolError> {
        match bits {
            0 | 8 => Ok(Self::Int8),
            4 => Ok(Self::Int4),
            b => Err(ProtocolError::Malformed {
                what: "step request",
                reason: format!("tap_bits {b} is not 0, 4 or 8"),
            }),
        }
    }

    /// The value of `StepRequest::tap_bits` that asks for this encoding.
    pub fn wire(self) -> u32 {
        match self {
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }

    /// Encodes `[n_taps, width]` row-major taps.
    pub fn encode(self, taps: &[f32], n_taps: usize, width: usize) -> Tensor {
        match self {
            Self::Int8 => encode_i8_rows(taps, n_taps, width),
            Self::Int4 => encode_i4_rows(taps, n_taps, width),
        }
    }
}

/// What the base's head gives at a draft position: its final normed state, its top-k
/// candidates with their logits, and the drafted token.
#[derive(Debug, Clone, Copy)]
pub struct HeadState<'a> {
    /// Final normed hidden state (`[hidden]`).
    pub hidden: &'a [f32],
    /// Top-k token ids, best first.
    pub topk_ids: &'a [u32],
    /// Their logits.
    pub topk_logits: &'a [f32],
    /// The drafted token (greedy or sampled).
    pub draft_token: u32,
}

/// The wire state of `position`: its projected taps (`[n_taps, width]` row-major, encoded
/// with `bits`) and, at a draft position (`head`), the hidden state as int8 rows, the top-k ids
/// with their logits as f16 and the draft token.
pub fn position_state(
    position: u64,
    taps: &[f32],
    n_taps: usize,
    width: usize,
    bits: TapBits,
    head: Option<HeadState<'_>>,
) -> PositionState {
    let mut s = PositionState {
        position,
        taps: Some(bits.encode(taps, n_taps, width)),
        ..Default::default()
    };
    if let Some(h) = head {
        s.is_draft = true;
        s.draft_token = h.draft_token;
        s.hidden = Some(encode_i8_rows(h.hidden, 1, h.hidden.len()));
        s.topk_ids = h.topk_ids.to_vec();
        s.topk_logits = Some(encode_f16(h.topk_logits, 1, h.topk_logits.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_tensor, Limits, TensorEncoding};

    #[test]
    fn tap_bits_parse_and_halve_the_taps() {
        assert_eq!(TapBits::from_wire(0).unwrap(), TapBits::Int8);
        assert_eq!(TapBits::from_wire(8).unwrap(), TapBits::Int8);
        assert_eq!(TapBits::from_wire(4).unwrap(), TapBits::Int4);
        assert!(TapBits::from_wire(2).is_err());
        assert!(TapBits::from_wire(16).is_err());
        for b in [TapBits::Int8, TapBits::Int4] {
            assert_eq!(TapBits::from_wire(b.wire()).unwrap(), b);
        }
        let taps: Vec<f32> = (0..30 * 64).map(|i| (i % 97) as f32 / 13.0 - 3.0).collect();
        let s8 = position_state(5, &taps, 30, 64, TapBits::Int8, None);
        let s4 = position_state(5, &taps, 30, 64, TapBits::Int4, None);
        let (t8, t4) = (s8.taps.unwrap(), s4.taps.unwrap());
        assert_eq!((t8.data.len(), t4.data.len()), (30 * 64, 30 * 32));
        assert_eq!(t4.encoding, TensorEncoding::I4RowF16Scale as i32);
        assert!(!s4.is_draft && s4.hidden.is_none() && s4.topk_logits.is_none());
    }

    #[test]
    fn a_draft_state_carries_the_head_and_its_logits() {
        let taps = vec![0.5f32; 2 * 4];
        let hidden = [1.0f32, -2.0, 0.25];
        let s = position_state(
            9,
            &taps,
            2,
            4,
            TapBits::Int8,
            Some(HeadState {
                hidden: &hidden,
                topk_ids: &[7, 3],
                topk_logits: &[2.5, 1.0],
                draft_token: 7,
            }),
        );
        assert!(s.is_draft);
        assert_eq!(
            (s.position, s.draft_token, &s.topk_ids[..]),
            (9, 7, &[7, 3][..])
        );
        let l = Limits::default();
        let h = decode_tensor(s.hidden.as_ref().unwrap(), &l).unwrap();
        assert_eq!((h.rows, h.cols), (1, 3));
        let lg = decode_tensor(s.topk_logits.as_ref().unwrap(), &l).unwrap();
        assert_eq!(lg.data, vec![2.5, 1.0]);
    }
}
