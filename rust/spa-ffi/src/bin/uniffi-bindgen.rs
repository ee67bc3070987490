//! The UniFFI bindings generator, built from the same uniffi version as the library.
//! Usage: `uniffi-bindgen generate --library target/debug/libspa_ffi.so --language kotlin
//! --out-dir android/src/main/kotlin` (see scripts/test-ffi.sh).

fn main() {
    uniffi::uniffi_bindgen_main()
}
