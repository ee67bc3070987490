//! prost definitions mirroring `proto/spa.proto` (same field numbers).
#![allow(missing_docs)]

/// Envelope of every HTTP body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(int32, tag = "2")]
    pub kind: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub crc32: u32,
}

/// Payload kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FrameKind {
    Unspecified = 0,
    Manifest = 1,
    CreateSessionRequest = 2,
    CreateSessionResponse = 3,
    StepRequest = 4,
    StepResponse = 5,
    Error = 6,
    LayerRequest = 7,
    LayerResponse = 8,
    FeaturesRequest = 9,
    FeaturesResponse = 10,
}

/// Tensor encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TensorEncoding {
    Unspecified = 0,
    I8RowF16Scale = 1,
    F16 = 2,
    I4RowF16Scale = 3,
}

/// A 2-D tensor on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tensor {
    #[prost(uint32, repeated, tag = "1")]
    pub shape: Vec<u32>,
    #[prost(enumeration = "TensorEncoding", tag = "2")]
    pub encoding: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub scales: Vec<u8>,
}

/// GET /v1/model.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Manifest {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(string, tag = "2")]
    pub base_identity: String,
    #[prost(uint32, tag = "3")]
    pub layers: u32,
    #[prost(uint32, tag = "4")]
    pub hidden: u32,
    #[prost(uint32, repeated, tag = "5")]
    pub taps: Vec<u32>,
    #[prost(uint32, tag = "6")]
    pub side_width: u32,
    #[prost(uint32, tag = "7")]
    pub projection_version: u32,
    #[prost(string, tag = "8")]
    pub projection_fingerprint: String,
    #[prost(uint32, tag = "9")]
    pub vocab: u32,
    #[prost(string, tag = "10")]
    pub tokenizer_hash: String,
    #[prost(uint32, tag = "11")]
    pub context: u32,
    #[prost(uint32, tag = "12")]
    pub max_draft: u32,
    #[prost(uint32, tag = "13")]
    pub max_positions_per_round: u32,
    #[prost(uint32, tag = "14")]
    pub max_frame_bytes: u32,
    #[prost(uint32, tag = "15")]
    pub top_k: u32,
    /// sha256 (hex) of the device pack served at `GET /v1/device-pack` ("" when none is).
    #[prost(string, tag = "16")]
    pub device_pack_sha256: String,
    /// Its size in bytes.
    #[prost(uint64, tag = "17")]
    pub device_pack_bytes: u64,
}

/// Session modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Mode {
    Spa = 0,
    Lst = 1,
    LayerSplit = 2,
}

/// POST /v1/sessions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSessionRequest {
    #[prost(enumeration = "Mode", tag = "1")]
    pub mode: i32,
}

/// Answer to POST /v1/sessions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSessionResponse {
    #[prost(string, tag = "1")]
    pub session_id: String,
}

/// POST /v1/sessions/{id}/step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StepRequest {
    #[prost(uint64, tag = "1")]
    pub position: u64,
    #[prost(uint32, repeated, tag = "2")]
    pub tokens: Vec<u32>,
    #[prost(uint32, tag = "3")]
    pub draft: u32,
    #[prost(uint32, tag = "4")]
    pub top_k: u32,
    #[prost(float, tag = "5")]
    pub temperature: f32,
    #[prost(float, tag = "6")]
    pub top_p: f32,
    #[prost(uint64, tag = "7")]
    pub seed: u64,
    /// Bits per tap value in the answer: 0 or 8 (int8 rows) or 4 (int4 rows, half the bytes);
    /// see [`crate::TapBits`].
    #[prost(uint32, tag = "8")]
    pub tap_bits: u32,
}

/// Base-side data of one position.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PositionState {
    #[prost(uint64, tag = "1")]
    pub position: u64,
    #[prost(message, optional, tag = "2")]
    pub taps: Option<Tensor>,
    #[prost(message, optional, tag = "3")]
    pub hidden: Option<Tensor>,
    #[prost(uint32, tag = "4")]
    pub draft_token: u32,
    #[prost(uint32, repeated, tag = "5")]
    pub topk_ids: Vec<u32>,
    #[prost(message, optional, tag = "6")]
    pub topk_logits: Option<Tensor>,
    #[prost(bool, tag = "7")]
    pub is_draft: bool,
}

/// Answer to a step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StepResponse {
    #[prost(message, repeated, tag = "1")]
    pub states: Vec<PositionState>,
    #[prost(uint64, tag = "2")]
    pub compute_us: u64,
    #[prost(uint64, tag = "3")]
    pub cache_len: u64,
}

/// POST /v1/sessions/{id}/layer (layer-split baseline).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LayerRequest {
    #[prost(uint64, tag = "1")]
    pub position: u64,
    #[prost(uint32, tag = "2")]
    pub token: u32,
    #[prost(uint32, tag = "3")]
    pub layer: u32,
    #[prost(message, optional, tag = "4")]
    pub delta: Option<Tensor>,
}

/// Answer to a layer request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LayerResponse {
    #[prost(message, optional, tag = "1")]
    pub activation: Option<Tensor>,
    #[prost(uint32, tag = "2")]
    pub layer: u32,
    #[prost(bool, tag = "3")]
    pub done: bool,
    #[prost(uint32, tag = "4")]
    pub next_token: u32,
    #[prost(uint64, tag = "5")]
    pub compute_us: u64,
}

/// POST /v1/features: base features of a token sequence for on-device personalization
/// (stateless; the server keeps nothing).
#[derive(Clone, PartialEq, prost::Message)]
pub struct FeaturesRequest {
    #[prost(uint32, repeated, tag = "1")]
    pub tokens: Vec<u32>,
    /// Base candidates per position; 0 asks for no candidate lists (only `hidden_positions`).
    #[prost(uint32, tag = "2")]
    pub top_k: u32,
    /// Positions whose final normed hidden state (the LM head's input) is returned, so that the
    /// device can score the whole vocabulary with the head it holds (next-word suggestions).
    #[prost(uint32, repeated, tag = "3")]
    pub hidden_positions: Vec<u32>,
    /// Taps are returned for positions `taps_from..n` only (the device already holds the side
    /// states of the earlier ones); 0 = every position.
    #[prost(uint32, tag = "4")]
    pub taps_from: u32,
    /// At each of `continuation_positions`, the server also extends the text by each of its
    /// `continuations` most likely word-start tokens (a space, then letters) and returns the
    /// final normed hidden state after it: the device then scores the word's second token, so
    /// words of two tokens can be suggested. The tokens are the server's own choice, so nothing
    /// the user did not type is sent. 0 = none; at most 16.
    #[prost(uint32, tag = "5")]
    pub continuations: u32,
    /// Positions to extend (each below the token count).
    #[prost(uint32, repeated, tag = "6")]
    pub continuation_positions: Vec<u32>,
}

/// Answer to a features request for `n` tokens: taps of every position (from `taps_from`), for
/// each position `t < n - 1` the base's top-k candidates plus the next token (`k + 1` slots; the
/// last slot holds the next token with logit -1e4 when it is already among the top-k; none when
/// `top_k` is 0), and the final hidden state at the requested positions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FeaturesResponse {
    /// `[(n - taps_from) * taps, width]` int8 rows.
    #[prost(message, optional, tag = "1")]
    pub taps: Option<Tensor>,
    /// `[(n - 1) * (k + 1)]`.
    #[prost(uint32, repeated, tag = "2")]
    pub cand_ids: Vec<u32>,
    /// `[(n - 1) * (k + 1)]` base logits.
    #[prost(float, repeated, tag = "3")]
    pub cand_logits: Vec<f32>,
    /// `[n - 1]` index of the next token among the slots.
    #[prost(uint32, repeated, tag = "4")]
    pub target_idx: Vec<u32>,
    #[prost(uint64, tag = "5")]
    pub compute_us: u64,
    /// `[hidden_positions.len(), hidden]` int8 rows: the base's final normed hidden state at
    /// each requested position, in request order.
    #[prost(message, optional, tag = "6")]
    pub hidden: Option<Tensor>,
    /// `[continuation_positions.len() * c]`: per continuation position (in request order) the
    /// `c` word-start tokens the server extended it by, most likely first (`c` = the request's
    /// `continuations`).
    #[prost(uint32, repeated, tag = "7")]
    pub cont_ids: Vec<u32>,
    /// `[hidden_positions.len() * c, hidden]` int8 rows: the final normed hidden state after
    /// each token of `cont_ids`.
    #[prost(message, optional, tag = "8")]
    pub cont_hidden: Option<Tensor>,
}

/// Error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    BadRequest = 1,
    Unauthorized = 2,
    NotFound = 3,
    SessionGone = 4,
    PositionAhead = 5,
    Limit = 6,
    Internal = 7,
}

/// A typed error body (message `Error` in the .proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorFrame {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
}
