//! Generates the wire messages (`$OUT_DIR/spa.v1.rs`) from `proto/spa.proto`: protox parses the
//! schema in pure Rust (no protoc on the build machine), prost-build writes the Rust types.

fn main() {
    println!("cargo:rerun-if-changed=proto/spa.proto");
    let fds = match protox::compile(["spa.proto"], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            // protox's error names the file, line and column of the bad schema.
            eprintln!("proto/spa.proto does not compile: {e:?}");
            std::process::exit(1);
        }
    };
    if let Err(e) = prost_build::Config::new().compile_fds(fds) {
        eprintln!("prost-build failed on proto/spa.proto: {e}");
        std::process::exit(1);
    }
}
