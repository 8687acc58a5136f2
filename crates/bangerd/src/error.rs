//! How daemon failures become API answers: a status, a stable code and one line naming the fix.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use banger_proto::ApiError;
use banger_store::StoreError;

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// One line for humans.
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// Renders an error with its whole source chain on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    banger_core::error_chain(e)
}

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { kind: "vm", reference } => {
                Self::not_found(format!("no vm '{reference}'; see `banger vm list`"))
            }
            StoreError::NotFound { kind: "operation", reference } => {
                Self::not_found(format!("no operation '{reference}'; see `banger op list`"))
            }
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::NameTaken { kind, name } => Self::conflict(format!(
                "a {kind} named '{name}' already exists; pick another name or delete it with `banger {kind} delete {name}`"
            )),
            StoreError::ForwardTaken { .. } => {
                Self::conflict(format!("{e}; see `banger vm forward NAME --list` for each vm"))
            }
            StoreError::Ambiguous { .. } => Self::invalid(e.to_string()),
            _ => Self::internal(chain(&e)),
        }
    }
}

impl From<banger_core::NameError> for ApiFailure {
    fn from(e: banger_core::NameError) -> Self {
        Self::invalid(format!("invalid name: {e}"))
    }
}

impl From<banger_core::size::SizeError> for ApiFailure {
    fn from(e: banger_core::size::SizeError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<banger_core::TransitionError> for ApiFailure {
    fn from(e: banger_core::TransitionError) -> Self {
        Self::conflict(e.to_string())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(ApiError { code: self.code.to_owned(), message: self.message })).into_response()
    }
}
