//! Fuzz harness of spa-mobile: see `harness.rs` and `fuzz_targets/`.
pub mod harness;
