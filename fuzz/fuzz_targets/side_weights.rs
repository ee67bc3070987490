#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spa_fuzz::harness::run("side_weights", data));
