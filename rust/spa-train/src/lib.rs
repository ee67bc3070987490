//! # spa-train
//!
//! Training and evaluation of SPA side networks on a frozen base (DESIGN.md section 1).
#![warn(missing_docs)]

pub mod basegrad;
pub mod data;
pub mod error;
pub mod eval;
pub mod features;
pub mod personalize;
pub mod report;
pub mod rouge;
pub mod sidegrad;
pub mod train;

pub use error::{Result, TrainError};
