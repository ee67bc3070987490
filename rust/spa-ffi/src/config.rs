//! Configuration and result records (plain data crossing the boundary).

use spa_runtime::{RuntimeParams, WireSampling};

/// Weight quantization of the on-device side network and LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Quantization {
    /// 4-bit blocks (smallest, slightly less exact).
    Q4,
    /// 8-bit blocks (default).
    Q8,
}

impl From<Quantization> for spa_model::QuantMode {
    fn from(q: Quantization) -> Self {
        match q {
            Quantization::Q4 => spa_model::QuantMode::Q4,
            Quantization::Q8 => spa_model::QuantMode::Q8,
        }
    }
}

/// How to reach the base server and run the device half.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SpaConfig {
    /// Server URL, e.g. `https://spa.example.com` (HTTPS only).
    pub server_url: String,
    /// API key (sent as a bearer token).
    pub api_key: String,
    /// Extra trusted root certificate (PEM), e.g. a development server's self-signed one.
    #[uniffi(default = None)]
    pub ca_cert_pem: Option<String>,
    /// Path of the base model's GGUF bundled with the app (offline use): only its tokenizer
    /// and LM head rows are read. `None` (the default): `connect` downloads the server's device
    /// pack (tokenizer + quantized LM head, ~32 MB for SmolLM2) into `device_pack_dir` once
    /// and reuses it.
    #[uniffi(default = None)]
    pub model_path: Option<String>,
    /// App-storage directory for the device pack when `model_path` is `None` (e.g. Android
    /// `context.filesDir.path + "/spa"`, iOS Application Support). The pack is verified by its
    /// sha256 on every connect; a damaged file is downloaded again.
    #[uniffi(default = None)]
    pub device_pack_dir: Option<String>,
    /// Personal side weights (safetensors, see `Personalizer`); `None` or a missing file: the
    /// untrained side network for the server's base.
    #[uniffi(default = None)]
    pub personal_weights_path: Option<String>,
    /// The user's word cache for the suggestion strip (see `Personalizer`); `None` or a missing
    /// file: the model's suggestions alone.
    #[uniffi(default = None)]
    pub personal_words_path: Option<String>,
    /// Quantization of the on-device weights.
    pub quantization: Quantization,
    /// Compute threads of the device half (0: one per core). Applied by the first `connect`
    /// of the process only.
    #[uniffi(default = 0)]
    pub threads: u32,
    /// Per-request timeout in milliseconds.
    #[uniffi(default = 30000)]
    pub timeout_ms: u64,
    /// Attempts per request on network errors (>= 1).
    #[uniffi(default = 4)]
    pub max_attempts: u32,
}

/// Settings of one generation.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct GenerateParams {
    /// Maximum new tokens.
    #[uniffi(default = 128)]
    pub max_tokens: u32,
    /// Drafts per round (K): more tokens per round trip when the device agrees with the base.
    /// With `adaptive_draft`, the largest K.
    #[uniffi(default = 8)]
    pub draft_k: u32,
    /// Choose K per round from the recent override rate (between 2 and `draft_k`): long rounds
    /// while the personal model agrees with the base, short ones while it overrides.
    #[uniffi(default = false)]
    pub adaptive_draft: bool,
    /// Softmax temperature (0: greedy).
    #[uniffi(default = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold (0 or 1: off).
    #[uniffi(default = 0.0)]
    pub top_p: f32,
    /// Sampling seed (same seed, same text).
    #[uniffi(default = 0)]
    pub seed: u64,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            draft_k: 8,
            adaptive_draft: false,
            temperature: 0.0,
            top_p: 0.0,
            seed: 0,
        }
    }
}

impl GenerateParams {
    pub(crate) fn runtime(&self, stop_tokens: &[u32]) -> RuntimeParams {
        RuntimeParams {
            max_tokens: self.max_tokens as usize,
            draft: self.draft_k,
            adaptive_draft: self.adaptive_draft.then(|| spa_runtime::AdaptiveDraft {
                min: 2.min(self.draft_k),
                max: self.draft_k,
            }),
            top_k: 0,
            stop_tokens: stop_tokens.to_vec(),
            sampling: WireSampling {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            },
            // int4 taps: about half the bytes down, no measurable ROUGE-L cost (README).
            tap_bits: RuntimeParams::default().tap_bits,
        }
    }
}

/// Statistics of one generation.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct GenerationStats {
    /// Tokens emitted.
    pub tokens: u32,
    /// Round trips to the server.
    pub rounds: u32,
    /// Round trips per token (lower is better; 1/K at best).
    pub rounds_per_token: f64,
    /// Fraction of decisions that took the personal side path.
    pub side_usage: f64,
    /// Fraction of tokens that differ from the base's draft.
    pub override_rate: f64,
    /// Network time (request wall time minus server compute), milliseconds.
    pub t_net_ms: f64,
    /// On-device compute time (side network, gate, head), milliseconds.
    pub t_on_device_ms: f64,
    /// Server compute time, milliseconds.
    pub t_server_ms: f64,
    /// Total wall time, milliseconds.
    pub t_total_ms: f64,
    /// Request bytes sent.
    pub bytes_up: u64,
    /// Response bytes received.
    pub bytes_down: u64,
}

impl From<&spa_runtime::GenerationStats> for GenerationStats {
    fn from(s: &spa_runtime::GenerationStats) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        Self {
            tokens: s.tokens as u32,
            rounds: s.rounds as u32,
            rounds_per_token: s.rounds_per_token(),
            side_usage: s.side_usage(),
            override_rate: s.override_rate(),
            t_net_ms: ms(s.t_net),
            t_on_device_ms: ms(s.t_device),
            t_server_ms: ms(s.t_pretrained),
            t_total_ms: ms(s.t_total),
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
        }
    }
}

/// The answer of one generation.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Reply {
    /// The generated text.
    pub text: String,
    /// Statistics.
    pub stats: GenerationStats,
}

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Role {
    /// The app's user.
    User,
    /// The model.
    Assistant,
}

/// One message of a conversation's history.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ChatMessage {
    /// Author.
    pub role: Role,
    /// Text.
    pub text: String,
}

/// What the server serves (its manifest).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ModelManifest {
    /// Protocol version.
    pub protocol_version: u32,
    /// SHA-256 of the base model file.
    pub base_identity: String,
    /// Base layers.
    pub layers: u32,
    /// Base hidden size.
    pub hidden: u32,
    /// Side network width.
    pub side_width: u32,
    /// Fingerprint of the shared down-projection.
    pub projection_fingerprint: String,
    /// Vocabulary size.
    pub vocab: u32,
    /// Context length.
    pub context: u32,
    /// Largest K the server accepts.
    pub max_draft: u32,
}

/// Next-word suggestions for one cursor position (see `SpaClient::suggest`).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Suggestions {
    /// Whole words, best first, each starting with `partial`.
    pub words: Vec<String>,
    /// The partly typed word they complete ("" after a space or punctuation).
    pub partial: String,
    /// The personal side path chose them (the gate picked it at this position).
    pub personal: bool,
}
