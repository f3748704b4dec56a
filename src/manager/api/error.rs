//! The one error shape of the public API.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An API failure: status plus `{"error":{"code","message","field"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
    /// Offending field, when input was at fault.
    pub field: Option<String>,
    /// Leader API address, for 503s where it is known.
    pub leader: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<&'a str>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, code: code.to_string(), message: message.into(), field: None, leader: None }
    }

    /// Names the offending field.
    pub fn field(mut self, field: &str) -> Self {
        self.field = (!field.is_empty()).then(|| field.to_string());
        self
    }

    /// 500 for failures that are ours, not the caller's.
    pub fn internal(message: String) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 503 naming the leader when known.
    pub fn unavailable(message: String, leader: Option<String>) -> Self {
        let message = match &leader {
            Some(l) => format!("{message} (leader API: {l})"),
            None => message,
        };
        ApiError { leader, ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: &self.code,
                message: &self.message,
                field: self.field.as_deref(),
                leader: self.leader.as_deref(),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(super::RETRY_AFTER.as_secs()));
        }
        resp
    }
}
