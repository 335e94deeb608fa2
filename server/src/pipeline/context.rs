//! [`RequestContext`]: who is asking, for whom, until when, and how urgently. Built once per
//! request by [`layer`], one tower layer applied to both axum and tonic (after the
//! request-id layer), and stored as a request extension; handlers read only that, never raw
//! headers.
//!
//! Today the tenant comes from the `x-tenant-id` header (open mode, as vLLM); the ingress issue
//! replaces that with the tenant bound to an API key, here and nowhere else.
//!
//! Tested below through a real axum router (extension present, tenant validated, deadline parsed).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::ops::request_id::{self, MapPartsLayer};

/// Header naming the caller's tenant in open mode.
pub(crate) const TENANT_HEADER: &str = "x-tenant-id";
/// Longest tenant name accepted.
const MAX_TENANT_LEN: usize = 64;

/// Who made the request. Open mode has no credentials, so everyone is anonymous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    Anonymous,
}

/// Scheduling class: interactive requests go ahead of bulk work (ingest, evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    Interactive,
    Bulk,
}

#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    pub request_id: String,
    /// "" = the default tenant.
    pub tenant: String,
    #[allow(dead_code)] // Read by the ingress issue's auth and audit; set here so every door has it.
    pub principal: Principal,
    /// From `grpc-timeout` (both doors accept it: it is an HTTP/2 header like any other).
    pub deadline: Option<Instant>,
    pub priority: Priority,
    /// A header the context could not accept (reported by the handler, which knows the protocol).
    invalid: Option<ApiError>,
}

impl RequestContext {
    fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut invalid = None;
        let tenant = match text(TENANT_HEADER) {
            None => String::new(),
            Some(t) if is_valid_tenant(t) => t.to_owned(),
            Some(_) => {
                invalid = Some(ApiError::invalid(
                    TENANT_HEADER,
                    format!("must be at most {MAX_TENANT_LEN} characters of [A-Za-z0-9._-]"),
                ));
                String::new()
            }
        };
        let deadline = match text("grpc-timeout") {
            None => None,
            Some(v) => match parse_grpc_timeout(v) {
                Some(d) => Some(Instant::now() + d),
                None => {
                    invalid.get_or_insert(ApiError::invalid("grpc-timeout", format!("malformed value {v:?}")));
                    None
                }
            },
        };
        let priority = match text("x-priority") {
            Some("bulk") | Some("batch") => Priority::Bulk,
            _ => Priority::Interactive,
        };
        Self {
            request_id: text(request_id::HEADER).unwrap_or_default().to_owned(),
            tenant,
            principal: Principal::Anonymous,
            deadline,
            priority,
            invalid,
        }
    }

    /// The context of a request that went through [`layer`], or the header error it found.
    pub(crate) fn of(extensions: &axum::http::Extensions) -> Result<Self, ApiError> {
        let ctx = extensions
            .get::<RequestContext>()
            .ok_or_else(|| ApiError::Internal("request context missing (the context layer is not applied)".into()))?;
        match &ctx.invalid {
            Some(e) => Err(e.clone()),
            None => Ok(ctx.clone()),
        }
    }
}

fn is_valid_tenant(t: &str) -> bool {
    t.len() <= MAX_TENANT_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a gRPC `grpc-timeout` header value ("100m", "5S", ...).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Attaches a [`RequestContext`] to every request (axum and tonic alike); after the request-id
/// layer, which it reads.
pub(crate) fn layer() -> MapPartsLayer {
    MapPartsLayer(|headers, extensions| {
        extensions.insert(RequestContext::from_headers(headers));
    })
}

/// axum extractor: the request's context, or a 400 naming the bad header.
impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        RequestContext::of(&parts.extensions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    async fn handler(ctx: RequestContext) -> String {
        format!(
            "{}|{}|{:?}|{}",
            ctx.tenant,
            ctx.request_id,
            ctx.priority,
            ctx.deadline.is_some()
        )
    }

    async fn call(headers: &[(&str, &str)]) -> (u16, String) {
        let app = Router::new()
            .route("/t", get(handler))
            .layer(layer())
            .layer(request_id::layer());
        let mut req = Request::builder().uri("/t");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn context_carries_tenant_id_priority_and_deadline() {
        let (status, body) = call(&[
            ("x-tenant-id", "acme"),
            ("x-request-id", "r-1"),
            ("x-priority", "bulk"),
            ("grpc-timeout", "5S"),
        ])
        .await;
        assert_eq!((status, body.as_str()), (200, "acme|r-1|Bulk|true"));
        let (status, body) = call(&[]).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("|") && body.ends_with("|Interactive|false"), "{body}");
    }

    #[tokio::test]
    async fn bad_tenant_or_timeout_is_a_400_naming_the_header() {
        let (status, body) = call(&[("x-tenant-id", "acme/../other")]).await;
        assert_eq!(status, 400);
        assert!(body.contains("x-tenant-id"), "{body}");
        let long = "t".repeat(MAX_TENANT_LEN + 1);
        assert_eq!(call(&[("x-tenant-id", long.as_str())]).await.0, 400);
        let (status, body) = call(&[("grpc-timeout", "soon")]).await;
        assert_eq!(status, 400);
        assert!(body.contains("grpc-timeout"), "{body}");
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
        assert_eq!(parse_grpc_timeout("999999999S"), None);
    }
}
