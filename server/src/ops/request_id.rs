//! Request ids: taken from the client's `x-request-id` (HTTP header or gRPC
//! metadata, which travel as the same HTTP/2 header) or generated as a UUID v4,
//! echoed back on the response, and recorded on a `request` tracing span that
//! wraps the request — so every log line emitted while serving it carries
//! `request_id`.
//!
//! [`layer`] is one tower layer for both axum (`Router::layer`) and tonic
//! (`Server::builder().layer`). From outside in: a sanitizer drops a client id that is empty, longer than [`MAX_LEN`] or has characters
//! outside `[A-Za-z0-9._:-]` (it ends up in logs, in the request log and in
//! downstream tools); tower-http's `SetRequestId` adds
//! a UUID when there is none; `TraceLayer` opens the span (also entered while
//! the response body streams); `PropagateRequestId` copies the id onto the
//! response. Work a handler moves onto another task must carry the span with
//! it (`.in_current_span()`); the engine thread logs the id as a field.
//!
//! The span is created at ERROR level on purpose: a span is recorded only if
//! its level passes the filter, and the id must be present even when the
//! filter is `warn`.
//!
//! Tests: a real axum router driven with `tower::ServiceExt::oneshot` (id kept,
//! generated, replaced when invalid, present in captured JSON log lines) and a
//! real tonic health server over TCP (id echoed in response metadata).

use std::task::{Context, Poll};

use axum::http::{Extensions, HeaderMap, HeaderName, Request};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{MakeSpan, TraceLayer};
use tracing::Span;

/// The header (and gRPC metadata key) carrying the id.
pub const HEADER: &str = "x-request-id";
/// Longest client-supplied id kept.
pub const MAX_LEN: usize = 128;

fn header_name() -> HeaderName {
    HeaderName::from_static(HEADER)
}

/// True for an id we keep as given.
pub fn is_valid(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The request's id (after [`layer`] ran, always present).
pub fn from_request<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(HEADER).and_then(|v| v.to_str().ok())
}

/// The id from a tonic request's metadata (after [`layer`] ran, always present).
#[cfg(test)]
pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    md.get(HEADER).and_then(|v| v.to_str().ok())
}

/// The `request` span: id, method and path (for gRPC the path is `/package.Service/Method`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeRequestSpan;

impl<B> MakeSpan<B> for MakeRequestSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let id = from_request(req).unwrap_or_default();
        // `principal` is filled by the context layer once it has authenticated the caller.
        tracing::error_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path(), principal = tracing::field::Empty)
    }
}

/// A layer that edits a request's headers and extensions before the inner service sees it, for
/// any body type (axum's and tonic's alike).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MapPartsLayer(pub fn(&mut HeaderMap, &mut Extensions));

impl<S> Layer<S> for MapPartsLayer {
    type Service = MapParts<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MapParts { inner, f: self.0 }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct MapParts<S> {
    inner: S,
    f: fn(&mut HeaderMap, &mut Extensions),
}

impl<S, B> Service<Request<B>> for MapParts<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        (self.f)(&mut parts.headers, &mut parts.extensions);
        self.inner.call(Request::from_parts(parts, body))
    }
}

/// Removes an `x-request-id` that [`is_valid`] rejects, so a fresh one is generated.
fn sanitize(headers: &mut HeaderMap, _: &mut Extensions) {
    if headers.get(HEADER).is_some_and(|v| !is_valid(v.as_bytes())) {
        headers.remove(HEADER);
    }
}

/// The composed layer type [`layer`] returns.
pub type RequestIdLayer = ServiceBuilder<
    Stack<
        PropagateRequestIdLayer,
        Stack<
            TraceLayer<SharedClassifier<ServerErrorsAsFailures>, MakeRequestSpan>,
            Stack<SetRequestIdLayer<MakeRequestUuid>, Stack<MapPartsLayer, Identity>>,
        >,
    >,
>;

/// Sanitize → set (UUID if absent) → span → propagate to the response.
pub fn layer() -> RequestIdLayer {
    ServiceBuilder::new()
        .layer(MapPartsLayer(sanitize))
        .layer(SetRequestIdLayer::new(header_name(), MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(MakeRequestSpan))
        .layer(PropagateRequestIdLayer::new(header_name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::json_subscriber;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    async fn handler(req: Request<Body>) -> String {
        tracing::info!("handling");
        from_request(&req).unwrap_or("none").to_owned()
    }

    fn app() -> Router {
        Router::new().route("/t", get(handler)).layer(layer())
    }

    async fn call(id: Option<&str>) -> (String, String) {
        let mut req = Request::builder().uri("/t");
        if let Some(id) = id {
            req = req.header(HEADER, id);
        }
        let resp = app().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let header = resp
            .headers()
            .get(HEADER)
            .expect("id echoed")
            .to_str()
            .unwrap()
            .to_owned();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (header, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn client_id_is_kept_echoed_and_on_every_log_line() {
        let (sub, logs) = json_subscriber();
        let _guard = tracing::subscriber::set_default(sub);
        let (header, seen) = call(Some("req-42.a:b_c")).await;
        assert_eq!((header.as_str(), seen.as_str()), ("req-42.a:b_c", "req-42.a:b_c"));
        let lines = logs.lines();
        let handled = lines
            .iter()
            .find(|l| l["message"] == "handling")
            .expect("handler logged");
        assert_eq!(handled["span"]["request_id"], "req-42.a:b_c", "{handled}");
        assert_eq!(handled["span"]["path"], "/t");
        // tower-http's own request/response lines are inside the span too.
        assert!(lines.len() >= 2, "{lines:?}");
        for l in &lines {
            assert_eq!(l["span"]["request_id"], "req-42.a:b_c", "{l}");
        }
    }

    #[tokio::test]
    async fn missing_or_invalid_ids_are_replaced_by_uuids() {
        let too_long = "a".repeat(MAX_LEN + 1);
        for id in [
            None,
            Some(""),
            Some("has space"),
            Some("quote\"d"),
            Some(too_long.as_str()),
        ] {
            let (header, seen) = call(id).await;
            assert_eq!(header, seen);
            let uuid = uuid::Uuid::parse_str(&header).unwrap_or_else(|e| panic!("{id:?} → {header}: {e}"));
            assert_eq!(uuid.get_version_num(), 4);
        }
        let (a, _) = call(None).await;
        let (b, _) = call(None).await;
        assert_ne!(a, b);
        assert!(is_valid(&[b'x'; MAX_LEN]));
    }

    #[tokio::test]
    async fn grpc_metadata_id_is_echoed_by_a_tonic_server() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(layer())
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
        req.metadata_mut().insert(HEADER, "grpc-id-7".parse().unwrap());
        let resp = client.check(req).await.unwrap();
        assert_eq!(from_metadata(resp.metadata()), Some("grpc-id-7"));
        let resp = client
            .check(HealthCheckRequest { service: String::new() })
            .await
            .unwrap();
        let generated = from_metadata(resp.metadata()).expect("generated id echoed");
        assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
    }
}
