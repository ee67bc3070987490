//! # spa-ffi
//!
//! UniFFI bindings of spa-mobile for Kotlin (Android, JVM) and Swift (iOS, Linux): a thin shell
//! of newtype objects over [`spa_runtime`] (and the personalization of `spa-train` when it is
//! built in).
//!
//! - [`connect`] a [`SpaClient`] ([`SpaConfig`]: server URL, API key, CA certificate, model
//!   file, personal weights, quantization, threads);
//! - [`SpaClient::conversation`] → [`Conversation::generate`] (async) or
//!   [`Conversation::start`] → [`Generation`] (cancel, cancel on drop, `finish`), streaming text
//!   to a foreign [`GenerationListener`];
//! - [`SpaClient::suggest`]: next-word suggestions for a keyboard's suggestion strip;
//! - one error type, [`SpaMobileError`], mapped once from the runtime's errors.
//!
//! No panic crosses the boundary: UniFFI's scaffolding catches panics of exported calls (they
//! become an internal error on the foreign side), every async call runs as a task on the
//! library's own tokio runtime whose panics are turned into [`SpaMobileError::Internal`], and
//! foreign callbacks run under `catch_unwind` with their exceptions mapped to
//! [`SpaMobileError::Callback`]. The futures handed to the foreign side only await those tasks,
//! so they can be polled by any executor (Kotlin coroutines, Swift concurrency).

#![warn(missing_docs)]

mod client;
mod config;
mod error;
mod personalize;

pub use client::{
    connect, connect_with_progress, ConnectListener, Conversation, Generation, GenerationListener,
    SpaClient,
};
pub use config::{
    ChatMessage, GenerateParams, GenerationStats, ModelManifest, Quantization, Reply, Role,
    SpaConfig, Suggestions,
};
pub use error::{Result, SpaMobileError};
pub use personalize::{
    NextWordQuality, PersonalizationReport, PersonalizeListener, PersonalizeOptions, Personalizer,
    TrainProgress, WEIGHTS_FILE,
};

use std::future::Future;
use std::sync::OnceLock;

uniffi::setup_scaffolding!();

/// The library's tokio runtime (network I/O and the generation loop), created on first use.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("spa-ffi")
            .enable_all()
            .build()
            // Creating two threads only fails when the OS refuses threads: nothing can run then.
            .expect("spa-ffi: cannot start the runtime threads")
    })
}

/// Runs `fut` on the library runtime and waits for it from any executor. A panic inside
/// becomes [`SpaMobileError::Internal`]; dropping the returned future aborts the task.
pub(crate) async fn run_task<T: Send + 'static>(
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut h = AbortOnDrop(runtime().spawn(fut));
    match (&mut h.0).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(SpaMobileError::Internal {
            reason: "a library task panicked".into(),
        }),
        Err(_) => Err(SpaMobileError::Cancelled),
    }
}

/// Sizes the compute thread pool of the device half (once per process; later calls with
/// another value are logged and ignored). 0 keeps the default (one thread per core).
pub(crate) fn configure_threads(threads: u32) {
    if threads == 0 {
        return;
    }
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads as usize)
            .thread_name(|i| format!("spa-compute-{i}"))
            .build_global()
        {
            log::warn!("compute threads already configured: {e}");
        }
    });
}

/// Calls a listener method; a panic or exception is contained (and returned as an error).
pub(crate) fn call(f: impl FnOnce() -> Result<()>) -> Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(SpaMobileError::Callback {
            reason: "a listener method panicked".into(),
        }),
    }
}

/// The library version.
#[uniffi::export]
pub fn library_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
