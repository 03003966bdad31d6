//! The one error type of the HTTP layer. Every failure leaves the server as
//! `{"error":{"code":"…","message":"…"}}`; internal details go to the log, never the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_proto::api::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidCursor(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    /// The disk (of the database or the artifact store) is full: 507, nothing was changed.
    #[error("{0}")]
    StorageFull(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) | AppError::InvalidCursor(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "invalid_request",
            AppError::InvalidCursor(_) => "invalid_cursor",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::Conflict(_) => "conflict",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::UnsupportedMediaType(_) => "unsupported_media_type",
            AppError::RangeNotSatisfiable(_) => "range_not_satisfiable",
            AppError::TooManyRequests { .. } => "too_many_requests",
            AppError::StorageFull(_) => "storage_full",
            AppError::Internal(_) => "internal",
        }
    }

    /// The message a client may see.
    pub fn public_message(&self) -> String {
        match self {
            AppError::Internal(_) => "internal server error; the server log has details".to_string(),
            other => other.to_string(),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code().to_string(), message: self.public_message() } }
    }

    pub fn internal(e: impl std::fmt::Display) -> AppError {
        AppError::Internal(e.to_string())
    }

    /// The answer to a write the database refused for lack of space.
    pub fn database_full() -> AppError {
        AppError::StorageFull(
            "storage full: the server's database cannot write (its disk is full), so nothing was changed; \
             reads still work — try again once space has been freed"
                .into(),
        )
    }

    /// The answer to an upload the artifact store refused for lack of space.
    pub fn store_full() -> AppError {
        AppError::StorageFull(
            "storage full: the artifact store has no space left, so nothing was stored; \
             try again once space has been freed"
                .into(),
        )
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_storage_full(&e) {
            crate::db::note_storage_full();
            tracing::warn!(error = %e, "database: a write failed for lack of space");
            return AppError::database_full();
        }
        AppError::Internal(format!("database: {e}"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let AppError::TooManyRequests { retry_after_secs, .. } = &self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
