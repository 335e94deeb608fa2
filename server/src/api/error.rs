//! The protocol side of [`ApiError`]: a gRPC status, or an OpenAI-style HTTP error body
//! `{"error": {"message", "type", "param", "code"}}` with the right status code.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub(crate) use crate::error::ApiError;

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.message();
        match e {
            ApiError::Invalid { .. } | ApiError::Unsupported { .. } => tonic::Status::invalid_argument(msg),
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

impl ApiError {
    /// OpenAI's error `type`, `param` and `code` for this error.
    pub(crate) fn openai_fields(&self) -> (&'static str, Option<String>, &'static str) {
        match self {
            ApiError::Invalid { param, .. } => {
                let code = if param == "model" {
                    "model_not_found"
                } else {
                    "invalid_value"
                };
                ("invalid_request_error", Some(param.clone()), code)
            }
            ApiError::Unsupported { param } => ("invalid_request_error", Some(param.clone()), "unsupported_parameter"),
            ApiError::Overloaded { .. } => ("rate_limit_error", None, "queue_full"),
            ApiError::NotFound(_) => ("invalid_request_error", None, "not_found"),
            ApiError::Unavailable(_) => ("server_error", None, "unavailable"),
            ApiError::DeadlineExceeded => ("server_error", None, "timeout"),
            ApiError::Internal(_) => ("server_error", None, "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.message();
        let status = self.http_status();
        let (kind, param, code) = self.openai_fields();
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
