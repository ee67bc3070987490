//! # spa-protocol
//!
//! Versioned, self-describing binary messages between the device runtime and the base-model
//! server (protobuf via prost; the schema is `proto/spa.proto`, explained in docs/protocol.md,
//! so a non-Rust server can implement it). Every HTTP body is one [`Frame`]: version, kind,
//! payload and a CRC-32 of the payload. Tensor payloads are int8 or int4 with a per-row f16 scale,
//! or f16.
//! Limits are checked before anything is allocated from untrusted lengths.
//!
//! ```
//! use spa_protocol::{decode_frame, encode_frame, FrameKind, Limits, StepRequest};
//! let req = StepRequest { position: 0, tokens: vec![504, 3575], draft: 4, ..Default::default() };
//! let bytes = encode_frame(FrameKind::StepRequest, &req);
//! let back: StepRequest = decode_frame(&bytes, FrameKind::StepRequest, &Limits::default()).unwrap();
//! assert_eq!(back, req);
//! ```

#![warn(missing_docs)]

mod codec;
mod messages;
pub mod sampling;
mod states;

pub use codec::{
    decode_i8_rows, decode_tensor, encode_f16, encode_i4_rows, encode_i8_rows, TensorData,
};
pub use messages::*;
pub use states::{position_state, HeadState, TapBits};

use prost::Message;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;

/// Limits enforced on every decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame in bytes.
    pub max_frame_bytes: usize,
    /// Most positions (prompt tokens + drafts) in one round.
    pub max_positions_per_round: usize,
    /// Largest K.
    pub max_draft: usize,
    /// Largest tensor element count.
    pub max_tensor_elems: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_positions_per_round: 4096,
            max_draft: 64,
            max_tensor_elems: 1 << 20,
        }
    }
}

/// Errors decoding or validating wire data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame exceeds `max_frame_bytes`.
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Frame size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Not a decodable frame or message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The payload checksum does not match.
    #[error("checksum mismatch (frame corrupted in transit)")]
    Checksum,
    /// Another protocol version.
    #[error("protocol version {got} not supported (this side speaks {PROTOCOL_VERSION})")]
    Version {
        /// Version in the frame.
        got: u32,
    },
    /// Another message kind than expected.
    #[error("expected a {expected:?} frame, got kind {got}")]
    WrongKind {
        /// Expected kind.
        expected: FrameKind,
        /// Kind received.
        got: i32,
    },
    /// A declared size exceeds a limit.
    #[error("limit exceeded: {0}")]
    Limit(String),
}

/// Encodes `msg` in a checksummed frame of kind `kind`.
pub fn encode_frame<M: Message>(kind: FrameKind, msg: &M) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    let frame = Frame {
        version: PROTOCOL_VERSION,
        kind: kind as i32,
        crc32: crc32fast::hash(&payload),
        payload,
    };
    frame.encode_to_vec()
}

/// Decodes a frame, checking size, version, checksum and kind, and returns its message.
pub fn decode_frame<M: Message + Default>(
    bytes: &[u8],
    expected: FrameKind,
    limits: &Limits,
) -> Result<M, ProtocolError> {
    let (kind, payload) = open_frame(bytes, limits)?;
    if kind != expected as i32 {
        return Err(ProtocolError::WrongKind {
            expected,
            got: kind,
        });
    }
    M::decode(payload.as_slice()).map_err(|e| ProtocolError::Malformed {
        what: "message",
        reason: e.to_string(),
    })
}

/// Decodes the frame envelope only: `(kind, payload)` after size/version/checksum checks.
pub fn open_frame(bytes: &[u8], limits: &Limits) -> Result<(i32, Vec<u8>), ProtocolError> {
    if bytes.len() > limits.max_frame_bytes {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            max: limits.max_frame_bytes,
        });
    }
    let f = Frame::decode(bytes).map_err(|e| ProtocolError::Malformed {
        what: "frame",
        reason: e.to_string(),
    })?;
    if f.version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: f.version });
    }
    if crc32fast::hash(&f.payload) != f.crc32 {
        return Err(ProtocolError::Checksum);
    }
    Ok((f.kind, f.payload))
}

impl StepRequest {
    /// Checks the request against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtocolError> {
        if self.tokens.is_empty() {
            return Err(ProtocolError::Limit(
                "a step needs at least one token".into(),
            ));
        }
        if !(self.temperature.is_finite()
            && self.temperature >= 0.0
            && self.top_p.is_finite()
            && self.top_p >= 0.0)
        {
            return Err(ProtocolError::Limit(
                "temperature and top_p must be finite and >= 0".into(),
            ));
        }
        TapBits::from_wire(self.tap_bits)?;
        if self.draft == 0 || self.draft as usize > limits.max_draft {
            return Err(ProtocolError::Limit(format!(
                "draft K = {} not in 1..={}",
                self.draft, limits.max_draft
            )));
        }
        if self.tokens.len() + self.draft as usize > limits.max_positions_per_round {
            return Err(ProtocolError::Limit(format!(
                "{} tokens + K {} exceed {} positions per round",
                self.tokens.len(),
                self.draft,
                limits.max_positions_per_round
            )));
        }
        Ok(())
    }
}

impl ErrorFrame {
    /// A new error frame.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            message: message.into(),
            retry_after_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_errors() {
        let l = Limits::default();
        let m = Manifest {
            protocol_version: 1,
            base_identity: "abc".into(),
            taps: vec![0, 1, 2],
            ..Default::default()
        };
        let b = encode_frame(FrameKind::Manifest, &m);
        assert_eq!(
            decode_frame::<Manifest>(&b, FrameKind::Manifest, &l).unwrap(),
            m
        );
        // wrong kind
        assert!(matches!(
            decode_frame::<Manifest>(&b, FrameKind::StepResponse, &l),
            Err(ProtocolError::WrongKind { .. })
        ));
        // corrupted payload byte -> checksum error (or malformed)
        let mut c = b.clone();
        let n = c.len();
        c[n - 8] ^= 0x40;
        assert!(decode_frame::<Manifest>(&c, FrameKind::Manifest, &l).is_err());
        // truncated
        assert!(decode_frame::<Manifest>(&b[..b.len() / 2], FrameKind::Manifest, &l).is_err());
        // garbage
        assert!(decode_frame::<Manifest>(&[0xff; 64], FrameKind::Manifest, &l).is_err());
        // too large is refused before decoding
        let small = Limits {
            max_frame_bytes: 4,
            ..l
        };
        assert!(matches!(
            decode_frame::<Manifest>(&b, FrameKind::Manifest, &small),
            Err(ProtocolError::TooLarge { .. })
        ));
        // version
        let mut f = Frame::decode(b.as_slice()).unwrap();
        f.version = 99;
        assert!(matches!(
            decode_frame::<Manifest>(&f.encode_to_vec(), FrameKind::Manifest, &l),
            Err(ProtocolError::Version { got: 99 })
        ));
    }

    #[test]
    fn step_limits() {
        let l = Limits::default();
        let ok = StepRequest {
            position: 0,
            tokens: vec![1],
            draft: 4,
            ..Default::default()
        };
        assert!(ok.validate(&l).is_ok());
        assert!(StepRequest {
            draft: 0,
            ..ok.clone()
        }
        .validate(&l)
        .is_err());
        assert!(StepRequest {
            draft: 65,
            ..ok.clone()
        }
        .validate(&l)
        .is_err());
        assert!(StepRequest {
            tokens: vec![],
            ..ok.clone()
        }
        .validate(&l)
        .is_err());
        assert!(StepRequest {
            tokens: vec![1; 4093],
            ..ok
        }
        .validate(&l)
        .is_err());
    }

    #[test]
    fn generated_messages_keep_the_wire_format() {
        // The messages are generated from proto/spa.proto (build.rs). Devices and servers already
        // deployed speak these exact bytes: a renumbered field or enum value fails here.
        let s = PositionState {
            position: 7,
            draft_token: 9,
            is_draft: true,
            ..Default::default()
        };
        // position=1 (varint tag 0x08), draft_token=4 (tag 0x20), is_draft=7 (tag 0x38)
        assert_eq!(s.encode_to_vec(), vec![0x08, 7, 0x20, 9, 0x38, 1]);
        let f = Frame {
            version: 1,
            kind: FrameKind::StepRequest as i32,
            payload: vec![1, 2],
            crc32: 5,
        };
        assert_eq!(
            f.encode_to_vec(),
            vec![0x08, 1, 0x10, 4, 0x1a, 2, 1, 2, 0x20, 5]
        );
        let e = ErrorFrame {
            code: ErrorCode::SessionGone as i32,
            message: "x".into(),
            retry_after_ms: 3,
        };
        assert_eq!(e.encode_to_vec(), vec![0x08, 4, 0x12, 1, b'x', 0x18, 3]);
        // Packed repeated tokens (tag 2), tap_bits (tag 8).
        let r = StepRequest {
            tokens: vec![1, 2],
            tap_bits: 4,
            ..Default::default()
        };
        assert_eq!(r.encode_to_vec(), vec![0x12, 2, 1, 2, 0x40, 4]);
        // A two-byte key: field 17.
        let m = Manifest {
            device_pack_bytes: 1,
            ..Default::default()
        };
        assert_eq!(m.encode_to_vec(), vec![0x88, 0x01, 1]);
        let c = FeaturesRequest {
            continuation_positions: vec![3],
            ..Default::default()
        };
        assert_eq!(c.encode_to_vec(), vec![0x32, 1, 3]);
        let t = Tensor {
            shape: vec![1, 2],
            encoding: TensorEncoding::I4RowF16Scale as i32,
            ..Default::default()
        };
        assert_eq!(t.encode_to_vec(), vec![0x0a, 2, 1, 2, 0x10, 3]);
        assert_eq!(
            CreateSessionRequest {
                mode: Mode::LayerSplit as i32
            }
            .encode_to_vec(),
            vec![0x08, 2]
        );
        assert_eq!(FrameKind::FeaturesResponse as i32, 10);
        assert_eq!(ErrorCode::Internal as i32, 7);
        assert_eq!(TensorEncoding::F16 as i32, 2);
    }
}
