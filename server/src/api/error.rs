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
                if let Ok(v) = retry_after_secs(&retry_after).parse() {
                    s.metadata_mut().insert("retry-after", v);
                }
                s
            }
            ApiError::NotFound(_) => tonic::Status::not_found(msg),
            ApiError::Unavailable(_) => tonic::Status::unavailable(msg),
            ApiError::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            ApiError::PermissionDenied { .. } => tonic::Status::permission_denied(msg),
            ApiError::RateLimited {
                retry_after, headers, ..
            } => {
                let mut s = tonic::Status::resource_exhausted(msg);
                let md = s.metadata_mut();
                for (k, v) in headers.iter().chain([&("retry-after", retry_after_secs(&retry_after))]) {
                    if let Ok(v) = v.parse() {
                        md.insert(*k, v);
                    }
                }
                s
            }
            ApiError::ContentFiltered { reason, .. } => {
                let mut s = tonic::Status::invalid_argument(msg);
                if let Ok(v) = reason.parse() {
                    s.metadata_mut().insert("genai-safety-reason", v);
                }
                s
            }
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
            ApiError::Unauthenticated(_) => ("invalid_request_error", None, "invalid_api_key"),
            ApiError::PermissionDenied { .. } => ("invalid_request_error", None, "insufficient_permissions"),
            ApiError::RateLimited { limit, .. } => {
                let code = if limit.starts_with("budget") {
                    "insufficient_quota"
                } else {
                    "rate_limit_exceeded"
                };
                ("rate_limit_error", Some(limit.clone()), code)
            }
            ApiError::ContentFiltered { .. } => ("invalid_request_error", None, "content_filter"),
            ApiError::Internal(_) => ("server_error", None, "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.message();
        let status = self.http_status();
        let (kind, param, code) = self.openai_fields();
        let mut error = json!({"message": msg, "type": kind, "param": param, "code": code});
        if let ApiError::ContentFiltered { stage, reason } = &self {
            error["stage"] = json!(stage);
            error["reason"] = json!(reason);
        }
        let mut resp = (status, Json(json!({ "error": error }))).into_response();
        let h = resp.headers_mut();
        match self {
            ApiError::Overloaded { retry_after } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs(&retry_after)) {
                    h.insert("retry-after", v);
                }
            }
            ApiError::RateLimited {
                retry_after, headers, ..
            } => {
                for (k, v) in headers.iter().chain([&("retry-after", retry_after_secs(&retry_after))]) {
                    if let Ok(v) = HeaderValue::from_str(v) {
                        h.insert(*k, v);
                    }
                }
            }
            ApiError::Unauthenticated(_) => {
                h.insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

/// `retry-after` in whole seconds, at least 1.
fn retry_after_secs(d: &std::time::Duration) -> String {
    d.as_secs_f64().ceil().max(1.0).to_string()
}
