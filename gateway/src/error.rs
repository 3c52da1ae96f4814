//! One error type for what clients can be told, mapped once to HTTP and once to acks.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shared::backplane::BackplaneError;
use shared::domain::InvalidInput;
use shared::jwt::TokenError;
use shared::store::StoreError;
use shared::wire::ErrorCode;

/// Everything a request or an event can fail with. Each variant's text is shown to the client,
/// except [`ChatError::Unavailable`] whose cause goes to the log only.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Malformed input: HTTP 400, `BAD_REQUEST`.
    #[error("{0}")]
    BadRequest(String),
    /// No valid token: HTTP 401, `UNAUTHORIZED`.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid user, not allowed: HTTP 403, `FORBIDDEN`.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing: HTTP 404, `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// A unique value is taken, or a room is full: HTTP 409, `BAD_REQUEST`.
    #[error("{0}")]
    Conflict(String),
    /// A request body over its route's limit: HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// A request body that did not arrive within `HTTP_BODY_TIMEOUT_SECS`: HTTP 408.
    #[error("{0}")]
    TooSlow(String),
    /// Too many events or attempts: HTTP 429, `RATE_LIMITED`; retry after the given seconds.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// Too much work queued (password hashing): HTTP 503 with `Retry-After`, `UNAVAILABLE`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after_secs: u64,
    },
    /// Redis or MongoDB failed: HTTP 503, `UNAVAILABLE`. The cause is logged, not shown.
    #[error("service temporarily unavailable")]
    Unavailable(String),
    /// A bug: HTTP 500. The cause is logged, not shown.
    #[error("internal server error")]
    Internal(String),
}

impl ChatError {
    /// The password hashing queue is full.
    pub fn busy() -> Self {
        ChatError::Busy {
            message: "too many sign-ins at once, try again shortly".into(),
            retry_after_secs: 1,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ChatError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ChatError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ChatError::Forbidden(_) => StatusCode::FORBIDDEN,
            ChatError::NotFound(_) => StatusCode::NOT_FOUND,
            ChatError::Conflict(_) => StatusCode::CONFLICT,
            ChatError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ChatError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            ChatError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ChatError::Unavailable(_) | ChatError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ChatError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::BadRequest(_)
            | ChatError::Conflict(_)
            | ChatError::TooLarge(_)
            | ChatError::TooSlow(_) => ErrorCode::BadRequest,
            ChatError::Unauthorized(_) => ErrorCode::Unauthorized,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::Unavailable(_) | ChatError::Busy { .. } | ChatError::Internal(_) => {
                ErrorCode::Unavailable
            }
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => "bad_request",
            ChatError::Unauthorized(_) => "unauthorized",
            ChatError::Forbidden(_) => "forbidden",
            ChatError::NotFound(_) => "not_found",
            ChatError::Conflict(_) => "conflict",
            ChatError::TooLarge(_) => "too_large",
            ChatError::TooSlow(_) => "too_slow",
            ChatError::RateLimited { .. } => "rate_limited",
            ChatError::Unavailable(_) => "unavailable",
            ChatError::Busy { .. } => "busy",
            ChatError::Internal(_) => "internal",
        }
    }

    /// Logs what the client is not told.
    pub fn log(&self) {
        match self {
            ChatError::Unavailable(cause) => tracing::warn!(%cause, "dependency unavailable"),
            ChatError::Internal(cause) => tracing::error!(%cause, "internal error"),
            _ => {}
        }
    }

    /// The failure ack: `{ ok: false, error: { code, message } }`.
    pub fn ack(&self) -> serde_json::Value {
        json!({ "ok": false, "error": { "code": self.code(), "message": self.to_string() } })
    }

    /// The `exception` event for a client that asked for no ack (the NestJS shape).
    pub fn exception(&self, event: &str) -> serde_json::Value {
        json!({ "status": "error", "event": event, "code": self.code(), "message": self.to_string() })
    }
}

impl From<InvalidInput> for ChatError {
    fn from(e: InvalidInput) -> Self {
        ChatError::BadRequest(e.0)
    }
}

impl From<TokenError> for ChatError {
    fn from(e: TokenError) -> Self {
        ChatError::Unauthorized(e.to_string())
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ChatError::Conflict("already exists".into()),
            StoreError::Full => ChatError::Conflict(
                "the room has the most participants allowed (MAX_ROOM_PARTICIPANTS)".into(),
            ),
            StoreError::Unavailable(cause) => ChatError::Unavailable(format!("store: {cause}")),
            taken @ StoreError::SeqTaken { .. } => ChatError::Internal(taken.to_string()),
        }
    }
}

impl From<BackplaneError> for ChatError {
    fn from(e: BackplaneError) -> Self {
        ChatError::Unavailable(e.to_string())
    }
}

impl IntoResponse for ChatError {
    /// The NestJS error body: `{ statusCode, error, message }`.
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let body = json!({
            "statusCode": status.as_u16(),
            "error": status.canonical_reason().unwrap_or("Error"),
            "message": self.to_string(),
        });
        let mut response = (status, Json(body)).into_response();
        if let ChatError::RateLimited {
            retry_after_secs, ..
        }
        | ChatError::Busy {
            retry_after_secs, ..
        } = self
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                retry_after_secs.max(1).into(),
            );
        }
        response
    }
}

/// What a deserialisation error says, without the framework's preamble, positions or the
/// names of internal types ("expected struct RegisterBody").
pub fn serde_detail(text: &str) -> String {
    let mut detail = text;
    for preamble in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
        "Failed to deserialize query string: ",
    ] {
        detail = detail.strip_prefix(preamble).unwrap_or(detail);
    }
    let detail = match detail.find(" at line ") {
        Some(at) => &detail[..at],
        None => detail,
    };
    match detail
        .find(", expected struct ")
        .or(detail.find(", expected a map"))
    {
        Some(at) => format!("{}, expected an object", &detail[..at]),
        None => detail.to_owned(),
    }
}
