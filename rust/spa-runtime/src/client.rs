//! HTTPS client for the base server (reqwest + rustls with the ring provider), with retries
//! and exponential backoff for idempotent requests.

use crate::error::{Result, RuntimeError};
use prost::Message;
use reqwest::StatusCode;
use spa_protocol::{
    decode_frame, encode_frame, open_frame, CreateSessionRequest, CreateSessionResponse, ErrorCode,
    ErrorFrame, FeaturesRequest, FeaturesResponse, FrameKind, LayerRequest, LayerResponse, Limits,
    Manifest, Mode, StepRequest, StepResponse,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, e.g. `https://spa.example.com` or `https://127.0.0.1:8443`.
    pub base_url: String,
    /// Bearer API key.
    pub api_key: String,
    /// Extra trusted root certificate (PEM), e.g. a dev server's self-signed certificate.
    pub extra_root_pem: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Attempts per request (>= 1) for transport errors.
    pub max_attempts: u32,
    /// First backoff delay (doubles each retry).
    pub backoff: Duration,
    /// Allow plain `http://` URLs (development only).
    pub allow_http: bool,
}

impl ClientConfig {
    /// Settings with sane defaults for `base_url` and `api_key`.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: api_key.into(),
            extra_root_pem: None,
            timeout: Duration::from_secs(30),
            max_attempts: 4,
            backoff: Duration::from_millis(50),
            allow_http: false,
        }
    }
}

/// Byte counters of one client.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Request body bytes sent.
    pub up: AtomicU64,
    /// Response body bytes received.
    pub down: AtomicU64,
    /// HTTP requests sent (including retries).
    pub requests: AtomicU64,
}

/// A connection to one base server.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) cfg: ClientConfig,
    limits: Limits,
    /// Traffic counters.
    pub traffic: Arc<Traffic>,
}

/// A transport failure as the app should see it: a TLS certificate the client does not trust
/// is a configuration problem (a self-signed server without `extra_root_pem`, a wrong
/// certificate), not a network one, and retrying cannot fix it.
pub(crate) fn transport_error(e: reqwest::Error) -> RuntimeError {
    // Only the certificate verdict: other TLS errors (a corrupted record, a reset
    // mid-handshake) are network faults and stay retryable.
    if let Some(rustls::Error::InvalidCertificate(c)) = find_rustls(&e) {
        return RuntimeError::Config(format!(
            "TLS: the server's certificate is not trusted ({c:?}); for a self-signed or \
             private-CA server, pass its certificate's PEM text as the extra root"
        ));
    }
    RuntimeError::Transport {
        attempts: 1,
        message: e.to_string(),
    }
}

/// The rustls error under `e`, through `source()` chains and the errors that `io::Error`s wrap
/// (whose `source()` skips them).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut todo: Vec<&(dyn std::error::Error + 'static)> = vec![e];
    while let Some(err) = todo.pop() {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            todo.push(inner);
        }
        if let Some(s) = err.source() {
            todo.push(s);
        }
    }
    None
}

fn tls_config(extra_root_pem: Option<&str>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_root_pem {
        let mut added = 0;
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let c = c.map_err(|e| RuntimeError::Config(format!("bad root certificate: {e}")))?;
            roots
                .add(c)
                .map_err(|e| RuntimeError::Config(format!("bad root certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(RuntimeError::Config(
                "the extra root certificate holds no PEM certificate (pass the certificate's \
                 text, \"-----BEGIN CERTIFICATE-----...\", not a file path)"
                    .into(),
            ));
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RuntimeError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl Client {
    /// Builds a client (no network I/O yet).
    pub fn new(cfg: ClientConfig) -> Result<Self> {
        let url = cfg.base_url.trim_end_matches('/').to_string();
        if !(url.starts_with("https://") || (cfg.allow_http && url.starts_with("http://"))) {
            return Err(RuntimeError::Config(
                "the server URL must start with https://".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(cfg.extra_root_pem.as_deref())?)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        Ok(Self {
            http,
            cfg: ClientConfig {
                base_url: url,
                ..cfg
            },
            limits: Limits::default(),
            traffic: Arc::new(Traffic::default()),
        })
    }

    /// Settings.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    async fn once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let url = format!("{}{}", self.cfg.base_url, path);
        let mut rb = self
            .http
            .request(method, &url)
            .bearer_auth(&self.cfg.api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
        if let Some(b) = body {
            self.traffic.up.fetch_add(b.len() as u64, Relaxed);
            rb = rb.body(b.to_vec());
        }
        self.traffic.requests.fetch_add(1, Relaxed);
        let transport = transport_error;
        let resp = rb.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        self.traffic.down.fetch_add(bytes.len() as u64, Relaxed);
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let msg = decode_frame::<ErrorFrame>(&bytes, FrameKind::Error, &self.limits)
            .map(|e| {
                (
                    ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                    e.message,
                )
            })
            .unwrap_or((ErrorCode::Unspecified, format!("HTTP {status}")));
        Err(match (status, msg.0) {
            (StatusCode::UNAUTHORIZED, _) => RuntimeError::Unauthorized,
            (_, ErrorCode::SessionGone) => RuntimeError::SessionGone,
            (_, ErrorCode::PositionAhead) => RuntimeError::PositionAhead,
            (StatusCode::NOT_FOUND, _) => RuntimeError::NotFound,
            (StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE, _) => {
                RuntimeError::Limit(msg.1)
            }
            (s, _) if s.is_server_error() => RuntimeError::Transport {
                attempts: 1,
                message: format!("HTTP {s}: {}", msg.1),
            },
            _ => RuntimeError::BadRequest(msg.1),
        })
    }

    /// Sends a request, retrying transport errors with exponential backoff (the caller
    /// guarantees the request is idempotent).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        expect: FrameKind,
    ) -> Result<Vec<u8>> {
        let mut delay = self.cfg.backoff;
        let attempts = self.cfg.max_attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            let r = self
                .once(method.clone(), path, body.as_deref())
                .await
                .and_then(|b| {
                    // Validate the envelope here so a corrupted body is retried like a lost one.
                    let (kind, _) = open_frame(&b, &self.limits)?;
                    if kind != expect as i32 {
                        return Err(RuntimeError::Protocol(format!(
                            "unexpected frame kind {kind}"
                        )));
                    }
                    Ok(b)
                });
            match r {
                Ok(b) => return Ok(b),
                Err(e) if e.is_retryable() && attempt < attempts => {
                    log::warn!("request {path} failed (attempt {attempt}/{attempts}): {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    last = Some(e);
                }
                Err(RuntimeError::Transport { message, .. }) => {
                    return Err(RuntimeError::Transport {
                        attempts: attempt,
                        message,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(RuntimeError::Transport {
            attempts,
            message: "no attempt made".into(),
        }))
    }

    fn decode<M: Message + Default>(&self, b: &[u8], kind: FrameKind) -> Result<M> {
        Ok(decode_frame(b, kind, &self.limits)?)
    }

    /// GET /v1/model.
    pub async fn manifest(&self) -> Result<Manifest> {
        let b = self
            .call(reqwest::Method::GET, "/v1/model", None, FrameKind::Manifest)
            .await?;
        self.decode(&b, FrameKind::Manifest)
    }

    /// POST /v1/sessions. Retried like the others: a retry after a lost response leaves an
    /// orphan session on the server, bounded by its per-key limit and LRU eviction.
    pub async fn create_session(&self, mode: Mode) -> Result<String> {
        let body = encode_frame(
            FrameKind::CreateSessionRequest,
            &CreateSessionRequest { mode: mode as i32 },
        );
        let b = self
            .call(
                reqwest::Method::POST,
                "/v1/sessions",
                Some(body),
                FrameKind::CreateSessionResponse,
            )
            .await?;
        Ok(self
            .decode::<CreateSessionResponse>(&b, FrameKind::CreateSessionResponse)?
            .session_id)
    }

    /// DELETE /v1/sessions/{id}.
    pub async fn delete_session(&self, id: &str) -> Result<()> {
        let url = format!("{}/v1/sessions/{id}", self.cfg.base_url);
        let r = self
            .http
            .delete(url)
            .bearer_auth(&self.cfg.api_key)
            .send()
            .await
            .map_err(transport_error)?;
        match r.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED => Err(RuntimeError::Unauthorized),
            StatusCode::NOT_FOUND => Err(RuntimeError::NotFound),
            s if s.is_server_error() => Err(RuntimeError::Transport {
                attempts: 1,
                message: format!("HTTP {s}"),
            }),
            s => Err(RuntimeError::BadRequest(format!("HTTP {s}"))),
        }
    }

    /// POST /v1/sessions/{id}/step (idempotent by position, retried).
    pub async fn step(&self, id: &str, req: &StepRequest) -> Result<StepResponse> {
        let body = encode_frame(FrameKind::StepRequest, req);
        let b = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/step"),
                Some(body),
                FrameKind::StepResponse,
            )
            .await?;
        self.decode(&b, FrameKind::StepResponse)
    }

    /// POST /v1/features: the base's features of `tokens` (taps of every position, top-k
    /// candidates and the next token's logit per position), for on-device personalization.
    /// Stateless and idempotent (retried).
    pub async fn features(&self, tokens: &[u32], top_k: u32) -> Result<FeaturesResponse> {
        self.features_with(&FeaturesRequest {
            tokens: tokens.to_vec(),
            top_k,
            ..Default::default()
        })
        .await
    }

    /// POST /v1/features with every option: candidate lists (`top_k`, 0 for none), the final
    /// hidden state at `hidden_positions`, taps from `taps_from` on. Stateless and idempotent
    /// (retried).
    pub async fn features_with(&self, req: &FeaturesRequest) -> Result<FeaturesResponse> {
        let body = encode_frame(FrameKind::FeaturesRequest, req);
        let b = self
            .call(
                reqwest::Method::POST,
                "/v1/features",
                Some(body),
                FrameKind::FeaturesResponse,
            )
            .await?;
        self.decode(&b, FrameKind::FeaturesResponse)
    }

    /// POST /v1/sessions/{id}/layer (layer-split baseline).
    pub async fn layer(&self, id: &str, req: &LayerRequest) -> Result<LayerResponse> {
        let body = encode_frame(FrameKind::LayerRequest, req);
        let b = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/layer"),
                Some(body),
                FrameKind::LayerResponse,
            )
            .await?;
        self.decode(&b, FrameKind::LayerResponse)
    }
}
