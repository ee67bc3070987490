//! # spa-runtime
//!
//! The device side of SPA: a [`SpaSession`] talks to a base server over HTTPS (reqwest +
//! rustls), runs the personal side network, gate and LM head ([`DeviceModel`], quantized) over
//! each round's positions, and streams accepted tokens. See [`session`] for the round protocol.
//!
//! ```no_run
//! use std::sync::Arc;
//! use spa_model::{DeviceAssets, GateMode, PersonalVocab, QuantMode, SidePlugin};
//! use spa_runtime::{Client, ClientConfig, DeviceModel, Mode, RuntimeParams, SpaSession};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::new(ClientConfig::new("https://spa.example.com", "my-api-key"))?;
//! let assets = DeviceAssets::load("SmolLM2-135M-Instruct.Q4_1.gguf")?; // tokenizer + head rows
//! let plugin = SidePlugin::load("personal.safetensors".as_ref())?; // the user's side network
//! let device = DeviceModel::new(&assets, &plugin, QuantMode::Q8, GateMode::Learned, PersonalVocab::default())?;
//! device.check_manifest(&client.manifest().await?)?;
//! let device = Arc::new(device);
//! let mut session = SpaSession::new(client, device.clone(), Mode::Spa);
//! let prompt = device.tokenizer.encode(&device.tokenizer.chat_prompt("Hello!"))?;
//! let params = RuntimeParams { max_tokens: 64, draft: 8, ..Default::default() };
//! let (tokens, stats) = session.generate(&prompt, &params, None, |_token| true).await?;
//! println!("{} ({} rounds/token)", device.tokenizer.decode(&tokens)?, stats.rounds_per_token());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod device;
pub mod download;
pub mod error;
pub mod layer_split;
#[cfg(feature = "netsim")]
pub mod netsim;
pub mod reference;
pub mod session;
pub mod suggest;
pub mod words;

pub use client::{Client, ClientConfig};
pub use device::{untrained_plugin, Decision, DeviceModel, WireSampling};
pub use error::{Result, RuntimeError};
pub use session::{AdaptiveDraft, GenerationStats, RuntimeParams, SpaSession};
pub use spa_protocol::{Manifest, Mode, TapBits};
pub use suggest::{suggest, Suggester, Suggestions};
pub use words::{RankedWords, WordCache, WordVocab};
