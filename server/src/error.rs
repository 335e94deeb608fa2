//! The one error type of the request path, from the doors through the pipeline to the
//! backends. Protocol-neutral: `api::error` maps it to a gRPC status or to an OpenAI-style
//! HTTP error body.

use std::time::Duration;

use axum::http::StatusCode;

use crate::ops::request_log::FeedbackError;
use genai_engine::{InvalidParam, SubmitError};
use genai_retrieval::RetrievalError;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Bad input; `param` names the offending field.
    Invalid {
        param: String,
        message: String,
    },
    /// A field we know but do not implement yet: refused rather than silently dropped.
    Unsupported {
        param: String,
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
    /// No API key, or one that is unknown or revoked.
    Unauthenticated(String),
    /// The key is valid but lacks `scope`.
    PermissionDenied {
        scope: String,
        message: String,
    },
    /// A per-tenant limit (`limit` names it: `requests_per_minute`, `budget_usd`, ...) is
    /// exhausted; `headers` are the `x-ratelimit-*` pairs both doors send back.
    RateLimited {
        limit: String,
        message: String,
        retry_after: Duration,
        headers: Vec<(&'static str, String)>,
    },
    /// A safety stage blocked the request (`stage`, `reason`: stable codes, never the matched
    /// text).
    ContentFiltered {
        stage: String,
        reason: String,
    },
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The gRPC code and the HTTP status this error is answered with (for the observer).
    pub fn codes(&self) -> (tonic::Code, u16) {
        (tonic::Status::from(self.clone()).code(), self.http_status().as_u16())
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::Unsupported { .. } => StatusCode::BAD_REQUEST,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ContentFiltered { .. } => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::Invalid { param, message } => format!("{param}: {message}"),
            ApiError::Unsupported { param } => format!("{param}: this parameter is not supported by this server"),
            ApiError::Overloaded { retry_after } => {
                format!(
                    "server overloaded: request queue is full; retry after {} s",
                    retry_after.as_secs().max(1)
                )
            }
            ApiError::NotFound(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m)
            | ApiError::Unauthenticated(m)
            | ApiError::PermissionDenied { message: m, .. }
            | ApiError::RateLimited { message: m, .. } => m.clone(),
            ApiError::ContentFiltered { stage, reason } => {
                format!("the request was blocked by the {stage} safety stage (reason: {reason})")
            }
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

impl From<genai_models::EmbedError> for ApiError {
    fn from(e: genai_models::EmbedError) -> Self {
        RetrievalError::from(e).into()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { retry_after } => ApiError::Overloaded { retry_after },
            SubmitError::Invalid(p) => p.into(),
            SubmitError::ShuttingDown => ApiError::Unavailable("server is shutting down".into()),
            SubmitError::EngineStopped => ApiError::Unavailable(
                "the generation engine has stopped after an internal error; the server reports NOT_SERVING".into(),
            ),
        }
    }
}
