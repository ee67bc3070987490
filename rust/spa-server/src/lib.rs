//! # spa-server
//!
//! The cloud half of SPA: an HTTPS (rustls; HTTP/2 and HTTP/1.1) server holding the frozen
//! base model. Devices create a session, then send steps: the absolute position they have
//! accepted up to plus new tokens; the server truncates its KV cache there, appends, drafts K
//! tokens greedily and answers in one response with per-position projected taps, final hidden
//! state, draft token and top-k candidates (docs/protocol.md).
//!
//! Endpoints: `GET /healthz`, `GET /metrics`, `GET /v1/model`, `POST /v1/sessions`,
//! `DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/step`, `POST /v1/sessions/{id}/layer`.

#![warn(missing_docs)]

pub mod auth;
pub mod base_engine;
pub mod batch;
pub mod device_pack;
pub mod engine;
mod errors;
pub mod features;
mod handlers;
#[cfg(feature = "llamacpp")]
pub mod llamacpp;
pub mod metrics;
mod middleware;
pub mod sessions;
mod state;
pub mod tls;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use auth::Keys;
pub use base_engine::{
    engine_by_name, engine_from_env, engine_with, BaseEngine, CandleEngine, EngineOutput, Sequence,
    DEFAULT_ENGINE, ENGINES,
};
pub use engine::{run_step, run_step_with, StepError};
pub use errors::ApiError;
pub use middleware::ACCESS_LOG;
pub use sessions::{Lookup, Session, Sessions};
pub use state::{AppState, ServerConfig};

/// The HTTP routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_frame_bytes;
    Router::new()
        .route("/healthz", get(handlers::model::healthz))
        .route("/metrics", get(handlers::model::metrics_h))
        .route("/v1/model", get(handlers::model::model_h))
        .route("/v1/sessions", post(handlers::sessions::create_h))
        .route("/v1/sessions/{id}", delete(handlers::sessions::delete_h))
        .route("/v1/sessions/{id}/step", post(handlers::step::step_h))
        .route("/v1/sessions/{id}/layer", post(handlers::layer::layer_h))
        .route("/v1/features", post(features::features_h))
        .route("/v1/device-pack", get(device_pack::device_pack_h))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::body_guard,
        ))
        .with_state(state)
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Whether it speaks TLS.
    pub tls: bool,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    sweeper: Option<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Base URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stops accepting and closes connections.
    pub async fn shutdown(self) {
        if let Some(s) = &self.sweeper {
            s.abort();
        }
        self.handle.shutdown();
        let _ = self.task.await;
    }
}

/// Starts serving `state` on `addr` (port 0 picks a free port), with TLS when `tls` is given
/// (otherwise plain HTTP, which the CLI only allows with `--insecure-dev`).
pub async fn start(
    state: Arc<AppState>,
    addr: SocketAddr,
    tls: Option<&tls::CertPair>,
) -> Result<RunningServer, String> {
    let (header_timeout, handshake_timeout) =
        (state.config.header_timeout, state.config.handshake_timeout);
    let sweeper = state
        .config
        .session_idle_ttl
        .map(|_| Arc::downgrade(&state));
    let app = router(state);
    let handle = axum_server::Handle::new();
    let h2 = handle.clone();
    let is_tls = tls.is_some();
    let task = match tls {
        Some(pair) => {
            let cfg = axum_server::tls_rustls::RustlsConfig::from_config(tls::server_config(pair)?);
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(cfg)
                .handshake_timeout(handshake_timeout);
            let mut server = axum_server::bind(addr)
                .acceptor(acceptor)
                .first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(async move { server.handle(h2).serve(app.into_make_service()).await })
        }
        None => {
            let mut server = axum_server::bind(addr).first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(async move { server.handle(h2).serve(app.into_make_service()).await })
        }
    };
    let addr = handle
        .listening()
        .await
        .ok_or_else(|| format!("could not listen on {addr}"))?;
    let sweeper = sweeper.map(|st| tokio::spawn(sweep_idle_sessions(st)));
    log::info!(
        "spa-server listening on {addr} ({})",
        if is_tls {
            "https"
        } else {
            "http, insecure dev"
        }
    );
    Ok(RunningServer {
        addr,
        tls: is_tls,
        handle,
        task,
        sweeper,
    })
}

/// Expires idle sessions in the background (a lookup also expires them, so this only frees
/// memory of sessions nobody asks about), every quarter TTL and at most a second apart.
async fn sweep_idle_sessions(state: std::sync::Weak<AppState>) {
    let period = state
        .upgrade()
        .and_then(|s| s.config.session_idle_ttl)
        .map_or(Duration::from_secs(1), |t| {
            (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(st) = state.upgrade() else { return };
        let n = st.sessions().expire_idle();
        if n > 0 {
            log::info!("expired {n} idle sessions");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::middleware::route_of;

    #[test]
    fn access_log_routes_redact_ids_and_unknown_paths() {
        assert_eq!(route_of("/v1/features"), "/v1/features");
        assert_eq!(route_of("/v1/sessions"), "/v1/sessions");
        assert_eq!(
            route_of("/v1/sessions/3f9a1c/step"),
            "/v1/sessions/{id}/step"
        );
        assert_eq!(
            route_of("/v1/sessions/3f9a1c/layer"),
            "/v1/sessions/{id}/layer"
        );
        assert_eq!(route_of("/v1/sessions/3f9a1c"), "/v1/sessions/{id}");
        assert_eq!(route_of("/v1/model/"), "/v1/model");
        assert_eq!(route_of("/secret-user-text"), "other");
        assert_eq!(route_of("/v1/sessions/a/b/c"), "other");
    }
}
