//! [`RequestContext`]: who is asking, for whom, until when, and how urgently. Built once per
//! request by [`layer`], one tower layer applied to both axum and tonic (after the
//! request-id layer), and stored as a request extension; handlers read only that, never raw
//! headers.
//!
//! The layer also authenticates (`crate::auth`): with API keys configured, a request without a
//! valid key, or whose key lacks the route's scope, is answered here (401 / UNAUTHENTICATED,
//! 403 / PERMISSION_DENIED, in the door's own error format) and never reaches a handler. The
//! tenant then comes from the key only: an `x-tenant-id` naming another tenant is refused with
//! 403 unless the key has `admin` (an operator acting for a tenant). In open mode (no keys) the
//! tenant comes from `x-tenant-id`, as in vLLM.
//!
//! Tested below through a real axum router (extension present, tenant validated, deadline
//! parsed, keys and scopes enforced); gRPC through the binary in tests/e2e/auth.rs.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Request, Response};
use axum::response::IntoResponse;
use futures::future::{Either, Ready};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::auth::keys::KeyIdentity;
use crate::auth::scope::{Scope, Scopes};
use crate::auth::{Authenticator, LOG_TARGET};
use crate::error::ApiError;
use crate::ops::request_id;

/// Header naming the caller's tenant in open mode (and an admin key's tenant of choice).
pub(crate) const TENANT_HEADER: &str = "x-tenant-id";
/// Longest tenant name accepted.
const MAX_TENANT_LEN: usize = 64;

/// Who made the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// Open mode (no keys configured), or an open route such as `/health`.
    Anonymous,
    /// A verified API key; `id` is not secret (logs and the request span carry it).
    Key { id: String, scopes: Scopes },
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
    pub principal: Principal,
    /// From `grpc-timeout` (both doors accept it: it is an HTTP/2 header like any other).
    pub deadline: Option<Instant>,
    pub priority: Priority,
    /// A header the context could not accept (reported by the handler, which knows the protocol).
    invalid: Option<ApiError>,
}

impl RequestContext {
    /// The context of a request to `path`: authenticated and bound to the key's tenant when
    /// `auth` holds keys, or the refusal to answer with.
    fn build(headers: &HeaderMap, path: &str, auth: &Authenticator) -> Result<Self, ApiError> {
        let mut ctx = Self::from_headers(headers);
        if let Some(key) = auth.check(headers, path)? {
            ctx.bind_key(headers, key)?;
        }
        Ok(ctx)
    }

    /// The tenant is the key's; an `x-tenant-id` naming another one needs `admin`.
    fn bind_key(&mut self, headers: &HeaderMap, key: KeyIdentity) -> Result<(), ApiError> {
        match headers.get(TENANT_HEADER) {
            Some(named) if named.as_bytes() != key.tenant.as_bytes() => {
                if !key.scopes.allows(Scope::Admin) {
                    tracing::warn!(target: LOG_TARGET, key_id = %key.id, "permission denied: x-tenant-id names another tenant");
                    crate::auth::count_refusal("tenant");
                    return Err(ApiError::PermissionDenied {
                        scope: Scope::Admin.as_str().into(),
                        message: format!(
                            "{TENANT_HEADER}: API key {} acts for tenant {:?} only; naming another tenant needs the admin scope (leave the header out)",
                            key.id, key.tenant
                        ),
                    });
                }
                // An admin acts for the tenant it names (checked like in open mode).
            }
            _ => self.tenant = key.tenant,
        }
        self.principal = Principal::Key {
            id: key.id,
            scopes: key.scopes,
        };
        Ok(())
    }

    /// The tenant a request acts on when its body or query names one in `field` (the knowledge
    /// API): the caller's own when `value` is empty. With a key, naming another tenant than the
    /// key's needs `admin`; in open mode any tenant may be named, as before keys existed.
    pub(crate) fn tenant_for(&self, field: &str, value: String) -> Result<String, ApiError> {
        if value.is_empty() || value == self.tenant {
            return Ok(self.tenant.clone());
        }
        match &self.principal {
            Principal::Anonymous => Ok(value),
            Principal::Key { scopes, .. } if scopes.allows(Scope::Admin) => Ok(value),
            Principal::Key { id, .. } => {
                tracing::warn!(target: LOG_TARGET, key_id = %id, field, "permission denied: a tenant field names another tenant");
                crate::auth::count_refusal("tenant");
                Err(ApiError::PermissionDenied {
                    scope: Scope::Admin.as_str().into(),
                    message: format!(
                        "{field}: API key {id} acts for tenant {:?} only; naming another tenant needs the admin scope (leave {field} empty)",
                        self.tenant
                    ),
                })
            }
        }
    }

    /// An open-mode context of no particular request (backend tests).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::from_headers(&HeaderMap::new())
    }

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

/// A tenant name: at most 64 characters of `[A-Za-z0-9._-]` ("" is the default tenant).
pub(crate) fn is_valid_tenant(t: &str) -> bool {
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

/// Authenticates every request (axum and tonic alike) and attaches its [`RequestContext`], or
/// answers it with the refusal; after the request-id layer, which it reads.
pub(crate) fn layer(auth: Arc<Authenticator>) -> ContextLayer {
    ContextLayer { auth }
}

/// The layer of a server without keys (open mode), for tests of handlers that read the context.
#[cfg(test)]
pub(crate) fn open_layer() -> ContextLayer {
    layer(open_auth())
}

/// An authenticator whose keys file does not exist: open mode.
#[cfg(test)]
fn open_auth() -> Arc<Authenticator> {
    let none = std::env::temp_dir().join(format!("genai-no-keys-{}/keys.json", uuid::Uuid::new_v4()));
    Authenticator::load(&none).expect("a missing keys file is open mode")
}

#[derive(Clone)]
pub(crate) struct ContextLayer {
    auth: Arc<Authenticator>,
}

impl<S> Layer<S> for ContextLayer {
    type Service = ContextService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ContextService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct ContextService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

/// A response body a door writes its refusals in: axum's as an OpenAI-style JSON error, tonic's
/// as a trailers-only gRPC status.
pub(crate) trait RefusalBody: Sized {
    fn refusal(e: ApiError) -> Response<Self>;
}

impl RefusalBody for axum::body::Body {
    fn refusal(e: ApiError) -> Response<Self> {
        e.into_response()
    }
}

impl RefusalBody for tonic::body::Body {
    fn refusal(e: ApiError) -> Response<Self> {
        tonic::Status::from(e).into_http()
    }
}

impl<S, B, RB> Service<Request<B>> for ContextService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: RefusalBody,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        match RequestContext::build(&parts.headers, parts.uri.path(), &self.auth) {
            Ok(ctx) => {
                if let Principal::Key { id, .. } = &ctx.principal {
                    // The request span (opened by the request-id layer around this call).
                    tracing::Span::current().record("principal", tracing::field::display(id));
                }
                parts.extensions.insert(ctx);
                Either::Left(self.inner.call(Request::from_parts(parts, body)))
            }
            Err(e) => Either::Right(futures::future::ready(Ok(RB::refusal(e)))),
        }
    }
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

    use crate::auth::keys;

    async fn handler(ctx: RequestContext) -> String {
        format!(
            "{}|{}|{:?}|{}",
            ctx.tenant,
            ctx.request_id,
            ctx.priority,
            ctx.deadline.is_some()
        )
    }

    async fn call_with(auth: Arc<Authenticator>, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let app = Router::new()
            .route(path, get(handler))
            .layer(layer(auth))
            .layer(request_id::layer());
        let mut req = Request::builder().uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        if status == 401 {
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Open mode: no keys file.
    async fn call(headers: &[(&str, &str)]) -> (u16, String) {
        call_with(open_auth(), "/v1/models", headers).await
    }

    #[tokio::test]
    async fn with_keys_the_tenant_is_the_keys_and_scopes_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let (_, infer) = keys::add(&path, "acme", &[], None).unwrap();
        let (_, admin) = keys::add(&path, "ops", &[Scope::Admin], None).unwrap();
        let auth = Authenticator::load(&path).unwrap();
        let bearer = |k: &str| format!("Bearer {k}");
        let (infer_h, admin_h) = (bearer(&infer), bearer(&admin));

        let (status, body) = call_with(auth.clone(), "/v1/models", &[]).await;
        assert_eq!(status, 401, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        // The body starts with the context's tenant (then the generated request id).
        let tenant = |(status, body): (u16, String)| (status, body.split('|').next().unwrap_or_default().to_owned());
        let r = call_with(auth.clone(), "/v1/models", &[("authorization", &infer_h)]).await;
        assert_eq!(tenant(r), (200, "acme".into()));
        // The header cannot move a key to another tenant; naming its own is fine.
        let (status, body) = call_with(
            auth.clone(),
            "/v1/models",
            &[("authorization", &infer_h), ("x-tenant-id", "globex")],
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("x-tenant-id") && body.contains("insufficient_permissions"),
            "{body}"
        );
        let r = call_with(
            auth.clone(),
            "/v1/models",
            &[("authorization", &infer_h), ("x-tenant-id", "acme")],
        )
        .await;
        assert_eq!(tenant(r), (200, "acme".into()));
        // An admin acts for the tenant it names, or for its own.
        let r = call_with(
            auth.clone(),
            "/v1/models",
            &[("authorization", &admin_h), ("x-tenant-id", "globex")],
        )
        .await;
        assert_eq!(tenant(r), (200, "globex".into()));
        let r = call_with(auth.clone(), "/v1/models", &[("authorization", &admin_h)]).await;
        assert_eq!(tenant(r), (200, "ops".into()));
        // Missing scope; open probe; unknown path closed to all but admin.
        let (status, body) = call_with(auth.clone(), "/metrics", &[("authorization", &infer_h)]).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("`metrics` scope"), "{body}");
        assert_eq!(call_with(auth.clone(), "/health", &[]).await.0, 200);
        assert_eq!(
            call_with(auth.clone(), "/v2/secret", &[("authorization", &infer_h)])
                .await
                .0,
            403
        );
        assert_eq!(
            call_with(auth.clone(), "/v2/secret", &[("authorization", &admin_h)])
                .await
                .0,
            200
        );
    }

    #[test]
    fn tenant_fields_are_admin_only_with_keys() {
        let ctx = |principal: Principal| RequestContext {
            request_id: String::new(),
            tenant: "acme".into(),
            principal,
            deadline: None,
            priority: Priority::Interactive,
            invalid: None,
        };
        let user = ctx(Principal::Key {
            id: "0123456789ab".into(),
            scopes: Scopes::of(&[Scope::Infer, Scope::KnowledgeWrite]),
        });
        assert_eq!(user.tenant_for("tenant", String::new()).unwrap(), "acme");
        assert_eq!(user.tenant_for("tenant", "acme".into()).unwrap(), "acme");
        match user.tenant_for("documents[3].tenant", "globex".into()) {
            Err(ApiError::PermissionDenied { scope, message }) => {
                assert_eq!(scope, "admin");
                assert!(message.starts_with("documents[3].tenant"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let admin = ctx(Principal::Key {
            id: "0123456789ab".into(),
            scopes: Scopes::of(&[Scope::Admin]),
        });
        assert_eq!(admin.tenant_for("tenant", "globex".into()).unwrap(), "globex");
        let open = ctx(Principal::Anonymous);
        assert_eq!(open.tenant_for("tenant", "globex".into()).unwrap(), "globex");
        assert_eq!(open.tenant_for("tenant", String::new()).unwrap(), "acme");
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
