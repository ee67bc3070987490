//! # spa-train
//!
//! Training and evaluation of SPA side networks on a frozen base (DESIGN.md section 1).
//!
//! - [`features`]: the base runs once per example; projected taps (wire int8) and the base's
//!   top-k shortlist are cached on disk, keyed by base, projection and data.
//! - [`sidegrad`] + [`train`]: the side network and gate as a differentiable candle graph equal
//!   to the device's [`spa_model::SideNetwork`]; SPA (mixture + CATE + usage cost), LST and full
//!   separation; AdamW, early stopping, checkpoints with exact resume.
//! - [`basegrad`]: LoRA, Adapter and full integration, which need gradients through the base.
//! - [`eval`] + [`report`]: the paper's Tables 1-3 with ROUGE-L ([`rouge`], equal to the
//!   `rouge-score` package), bootstrap intervals ([`stats`]) and rounds per token; resumable
//!   through one run file per finished (task, method).
//! - [`personalize`]: on-device personalization on one user's text with next-word metrics.
//!
//! ```no_run
//! use spa_model::{BaseModel, DownProjection, SidePlugin};
//! use spa_train::personalize::{personalize, LocalFeatures, PersonalizeConfig, UserTexts};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let base = BaseModel::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let taps: Vec<usize> = (0..base.config().n_layers).collect();
//! let proj = DownProjection::published(&base, 64, &taps, "projections".as_ref())?;
//! let mut plugin = SidePlugin::init(&base, &proj, 0, 0.0)?;
//! let texts = UserTexts {
//!     train: vec!["My earlier writing ...".into()],
//!     held_out: vec!["My later writing ...".into()],
//! };
//! let mut source = LocalFeatures {
//!     base: &base,
//!     proj: &proj,
//!     quiet: false,
//!     window_mode: spa_model::ForwardMode::Fast,
//! };
//! let report = personalize(
//!     &mut plugin,
//!     &spa_model::DeviceHead::from_base(&base, spa_model::QuantMode::Q8)?,
//!     base.tokenizer(),
//!     &mut source,
//!     &texts,
//!     &PersonalizeConfig::default(),
//!     &mut |p| {
//!         eprintln!("step {}/{} loss {:.3}", p.step, p.max_steps, p.loss);
//!         true // return false to cancel
//!     },
//! )?;
//! println!("keystroke savings {:.1}% -> {:.1}%", report.before.keystroke_savings, report.after.keystroke_savings);
//! plugin.save("personal.safetensors".as_ref())?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "host")]
pub mod basegrad;
#[cfg(feature = "host")]
pub mod data;
pub mod error;
#[cfg(feature = "host")]
pub mod eval;
pub mod features;
pub mod personalize;
#[cfg(feature = "host")]
pub mod report;
#[cfg(feature = "host")]
pub mod rouge;
pub mod sidegrad;
pub mod stats;
pub mod train;

pub use error::{Result, TrainError};
