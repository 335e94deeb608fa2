//! One error type for both front doors, mapped to a gRPC status or to an
//! OpenAI-style HTTP error body `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::{InvalidParam, SubmitError};
use crate::ops::request_log::FeedbackError;
use crate::retrieval::RetrievalError;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Bad input; `param` names the offending field.
    Invalid {
        param: String,
        message: String,
    },
    /// The engine's waiting queue is full; retry after the hint.
    Overloaded {
        retry_after: Duration,
    },
    /// The named thing does not exist (a knowledge document).
    NotFound(String),
    /// Not serving right now (loading, shutting down).
    Unavailable(String),
    /// The request's deadline passed.
    DeadlineExceeded,
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Invalid { param, message } => format!("{param}: {message}"),
            ApiError::Overloaded { retry_after } => {
                format!(
                    "server overloaded: request queue is full; retry after {} s",
                    retry_after.as_secs().max(1)
                )
            }
            ApiError::NotFound(m) | ApiError::Unavailable(m) | ApiError::Internal(m) => m.clone(),
            ApiError::DeadlineExceeded => "deadline exceeded".into(),
        }
    }
}

impl From<InvalidParam> for ApiError {
    fn from(e: InvalidParam) -> Self {
        ApiError::invalid(e.field, e.message)
    }
}

impl From<FeedbackError> for ApiError {
    fn from(e: FeedbackError) -> Self {
        match e {
            FeedbackError::Invalid { field, message } => ApiError::invalid(field, message),
            FeedbackError::Unavailable => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<RetrievalError> for ApiError {
    fn from(e: RetrievalError) -> Self {
        let msg = e.to_string();
        match e {
            RetrievalError::InvalidArgument { field, message } => ApiError::invalid(field, message),
            RetrievalError::NotFound(_) => ApiError::NotFound(msg),
            // The embedding queue is full: the same back-off contract as the engine's queue.
            RetrievalError::Overloaded(_) => ApiError::Overloaded {
                retry_after: Duration::from_secs(1),
            },
            RetrievalError::Unavailable(_) => ApiError::Unavailable(msg),
            RetrievalError::Model(_) | RetrievalError::Index(_) | RetrievalError::Io { .. } => ApiError::Internal(msg),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { retry_after } => ApiError::Overloaded { retry_after },
            SubmitError::Invalid(p) => p.into(),
            SubmitError::ShuttingDown => ApiError::Unavailable("server is shutting down".into()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.message();
        match e {
            ApiError::Invalid { .. } => tonic::Status::invalid_argument(msg),
            ApiError::Overloaded { retry_after } => {
                let mut s = tonic::Status::resource_exhausted(msg);
                if let Ok(v) = retry_after.as_secs().max(1).to_string().parse() {
                    s.metadata_mut().insert("retry-after", v);
                }
                s
            }
            ApiError::NotFound(_) => tonic::Status::not_found(msg),
            ApiError::Unavailable(_) => tonic::Status::unavailable(msg),
            ApiError::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            ApiError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.message();
        let status = self.http_status();
        let (kind, param, code) = match &self {
            ApiError::Invalid { param, .. } => {
                let code = if param == "model" {
                    "model_not_found"
                } else {
                    "invalid_value"
                };
                ("invalid_request_error", Some(param.clone()), code)
            }
            ApiError::Overloaded { .. } => ("rate_limit_error", None, "queue_full"),
            ApiError::NotFound(_) => ("invalid_request_error", None, "not_found"),
            ApiError::Unavailable(_) => ("server_error", None, "unavailable"),
            ApiError::DeadlineExceeded => ("server_error", None, "timeout"),
            ApiError::Internal(_) => ("server_error", None, "internal_error"),
        };
        let body = json!({"error": {"message": msg, "type": kind, "param": param, "code": code}});
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Overloaded { retry_after } = self {
            if let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}
