//! `GET /v1/device-pack`: the device pack ([`spa_model::pack`]) the SDK downloads instead of
//! holding the base GGUF. Immutable, so it is served with its sha256 as a strong `ETag`
//! (`If-None-Match` gives 304) and with single byte ranges (`Range: bytes=a-b` / `bytes=a-`,
//! 206 with `Content-Range`; 416 when unsatisfiable), so an interrupted download resumes. The
//! bytes are held once in memory and every answer is a slice of them (no copy per request).

use crate::handlers::auth;
use crate::{ApiError, AppState};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use spa_protocol::ErrorCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// The pack a server publishes.
#[derive(Debug, Clone)]
pub struct ServedPack {
    /// The file's bytes.
    pub bytes: Bytes,
    /// Their sha256 (hex).
    pub sha256: String,
}

impl ServedPack {
    /// Wraps a pack's bytes (hashing them).
    pub fn new(bytes: Vec<u8>) -> Self {
        let sha256 = spa_model::sha256_hex(&bytes);
        Self {
            bytes: bytes.into(),
            sha256,
        }
    }
}

/// The byte range a `Range` header asks of a `len`-byte body: `None` = the whole body,
/// `Some(Ok((start, end_inclusive)))`, or `Some(Err(()))` when it cannot be satisfied. Only a
/// single `bytes=` range is supported (several ranges, suffix ranges `bytes=-n` and other
/// units are answered with the whole body, as RFC 9110 allows a server to ignore Range).
pub fn parse_range(h: Option<&HeaderValue>, len: u64) -> Option<Result<(u64, u64), ()>> {
    let v = h?.to_str().ok()?.trim();
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => len.checked_sub(1),
        b => b.parse::<u64>().ok().map(|e| e.min(len.saturating_sub(1))),
    };
    Some(match end {
        Some(end) if start <= end && start < len => Ok((start, end)),
        _ => Err(()),
    })
}

/// `GET /v1/device-pack` (API key required, like every `/v1` route).
pub async fn device_pack_h(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth(&st, &headers)?;
    let pack = st.device_pack.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this server publishes no device pack",
        )
    })?;
    let len = pack.bytes.len() as u64;
    let etag = format!("\"{}\"", pack.sha256);
    let mut b = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let built = if not_modified {
        b.status(StatusCode::NOT_MODIFIED).body(Body::empty())
    } else {
        match parse_range(headers.get(header::RANGE), len) {
            None => {
                st.metrics.bytes_out.fetch_add(len, Relaxed);
                b = b.header(header::CONTENT_LENGTH, len);
                b.status(StatusCode::OK)
                    .body(Body::from(pack.bytes.clone()))
            }
            Some(Ok((start, end))) => {
                let part = pack.bytes.slice(start as usize..=end as usize);
                st.metrics.bytes_out.fetch_add(part.len() as u64, Relaxed);
                b.status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                    .header(header::CONTENT_LENGTH, part.len())
                    .body(Body::from(part))
            }
            Some(Err(())) => b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty()),
        }
    };
    built.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    use axum::http::HeaderValue;

    fn r(s: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), len)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), None);
        assert_eq!(r("bytes=0-", 10), Some(Ok((0, 9))));
        assert_eq!(r("bytes=3-5", 10), Some(Ok((3, 5))));
        assert_eq!(r("bytes=3-500", 10), Some(Ok((3, 9))));
        assert_eq!(r("bytes=9-", 10), Some(Ok((9, 9))));
        assert_eq!(r("bytes=10-", 10), Some(Err(())));
        assert_eq!(r("bytes=5-3", 10), Some(Err(())));
        assert_eq!(r("bytes=0-", 0), Some(Err(())));
        // Ignored (whole body): several ranges, suffix ranges, other units, garbage.
        assert_eq!(r("bytes=0-1,3-4", 10), None);
        assert_eq!(r("bytes=-3", 10), None);
        assert_eq!(r("items=0-1", 10), None);
        assert_eq!(r("bytes=x-1", 10), None);
    }
}
