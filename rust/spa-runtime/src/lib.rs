//! # spa-runtime
//!
//! The device side of SPA: a [`SpaSession`] talks to a base server over HTTPS (reqwest +
//! rustls), runs the personal side network, gate and LM head ([`DeviceModel`], quantized) over
//! each round's positions, and streams accepted tokens. See [`session`] for the round protocol.

pub mod client;
pub mod device;
pub mod error;
pub mod layer_split;
#[cfg(feature = "netsim")]
pub mod netsim;
pub mod reference;
pub mod session;

pub use client::{Client, ClientConfig};
pub use device::{Decision, DeviceModel, WireSampling};
pub use error::{Result, RuntimeError};
pub use session::{GenerationStats, RuntimeParams, SpaSession};
pub use spa_protocol::Mode;
