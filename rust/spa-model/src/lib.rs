//! # spa-model
//!
//! The core of spa-mobile (Side Plugin Adaptation): a frozen base language model that exposes
//! the hidden state after every layer ("taps"), a KV cache with rollback, the personal side
//! network (ladder side-tuning) with its gate classifier, and the device-side LM head over a
//! candidate shortlist. Device components run in f32 (reference) or candle q8_0 / q4_0.
//!
//! ```no_run
//! use spa_model::{BaseModel, GenerateParams};
//! # fn main() -> spa_model::Result<()> {
//! let base = BaseModel::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let ids = base.tokenizer().encode("The capital of France is")?;
//! let out = spa_model::generate(&mut base.decoder(), &ids, &GenerateParams::greedy(8), |_| true)?;
//! println!("{}", base.tokenizer().decode(&out)?);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod base;
pub mod config;
pub mod corpus;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod io;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod mem;
pub mod pack;
pub mod paths;
pub mod projection;
pub mod qkern_int8;
pub mod qmat;
pub mod side;
pub mod spa;
pub mod tokenizer;

pub use base::{argmax, sha256_hex, BaseModel, BaseOutput, DeviceAssets, ForwardMode};
pub use config::{Arch, BaseConfig};
pub use error::{Result, SpaError};
pub use generate::{generate, BaseDecoder, Decoder, GenerateParams, Sampling};
pub use gguf::GgufFile;
pub use head::{gate_mixture, shortlist_with_target, softmax, top_k, DeviceHead, PersonalVocab};
pub use kv_cache::KvCache;
pub use linear::{BaseKernel, Linear, QuantMode};
pub use pack::{build_device_pack, DevicePack, PACK_FORMAT};
pub use projection::{DownProjection, ProjectionMeta, PROJECTION_VERSION};
pub use qmat::QRows;
pub use side::{SideCache, SideConfig, SideNetwork, SideStep, SideWeights};
pub use spa::{side_network, GateMode, SideMeta, SidePlugin, SpaCounters, SpaDecoder};
pub use tokenizer::SpaTokenizer;

/// candle's tensor type, re-exported so dependants need not depend on candle directly.
pub use candle_core::{Device as CandleDevice, Tensor as CandleTensor};
