//! The wire messages, generated at build time from `proto/spa.proto` (build.rs: prost-build
//! over protox). The schema's comments are their documentation; docs/protocol.md explains the
//! protocol.
#![allow(missing_docs)]
#![allow(clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/spa.v1.rs"));
