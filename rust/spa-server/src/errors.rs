//! Error answers ([`ApiError`]: HTTP status + typed error frame) and the one place where
//! protocol and engine errors become them.

use crate::StepError;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use spa_protocol::{encode_frame, ErrorCode, ErrorFrame, FrameKind, ProtocolError};

/// An error answer: HTTP status + typed error frame.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) frame: ErrorFrame,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            frame: ErrorFrame::new(code, msg),
        }
    }

    /// The answer to a step the engine refused: 409 when the device is ahead of the session
    /// (it re-prefills), 400 for a model error, and a bad request field as [`bad_frame`].
    pub(crate) fn from_step(e: StepError) -> Self {
        match e {
            StepError::PositionAhead { requested, held } => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::PositionAhead,
                format!("position {requested} is ahead of the session ({held} held); re-prefill"),
            ),
            StepError::Model(e) => Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.to_string(),
            ),
            StepError::Request(e) => bad_frame(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-protobuf".parse().expect("static header"),
        );
        if self.frame.retry_after_ms > 0 {
            let secs = self.frame.retry_after_ms.div_ceil(1000).to_string();
            if let Ok(v) = secs.parse() {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        (
            self.status,
            headers,
            encode_frame(FrameKind::Error, &self.frame),
        )
            .into_response()
    }
}

/// The answer to a frame that could not be decoded or validated: 413 (`Limit`) when it is over
/// a wire limit, 400 otherwise.
pub(crate) fn bad_frame(e: ProtocolError) -> ApiError {
    let code = match e {
        ProtocolError::TooLarge { .. } | ProtocolError::Limit(_) => ErrorCode::Limit,
        _ => ErrorCode::BadRequest,
    };
    let status = if code == ErrorCode::Limit {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, code, e.to_string())
}

/// Runs `f` on tokio's blocking pool (model compute must not hold an async worker); if the task
/// panics or is cancelled, the answer is a 500.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })
}
