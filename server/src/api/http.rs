//! axum server: the OpenAI-compatible HTTP API and the health endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::error::ApiError;
use super::openai;
use crate::llm::Health;
use crate::state::AppState;

pub(crate) async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut app = Router::new()
        .route("/live", get(live))
        .route("/health", get(health))
        .route("/ready", get(health))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/feedback", post(feedback))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/assistant/ask", post(super::assistant::ask));
    // `/metrics` is here (behind the `metrics` scope once keys exist) unless it has its own listener.
    if state.config.server.metrics_addr.is_none() {
        app = app.route("/metrics", get(metrics));
    }
    let app = app
        .with_state(state.clone())
        .merge(super::knowledge::router(state.knowledge.clone()))
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .layer(crate::pipeline::context::layer(state.auth.clone()))
        .layer(crate::ops::request_id::layer());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// `/metrics` alone on `server.metrics_addr`: no API key asked (the address is meant for a network
/// only the scraper reaches).
pub(crate) async fn serve_metrics(
    state: Arc<AppState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Readiness: 200 while serving; 503 with the reason while loading, draining, or after the
/// engine or the embedder stopped.
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.pipeline.health() {
        Health::Serving => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Health::NotServing(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_serving", "reason": why})),
        ),
    }
}

/// Liveness: 200 while the process answers (a Kubernetes liveness probe must not kill a pod
/// that is still loading its models).
async fn live() -> impl IntoResponse {
    (StatusCode::OK, Json(json!({"status": "alive"})))
}

/// Prometheus text exposition of every metric.
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.ops().metrics.render(),
    )
}

#[derive(Deserialize)]
struct FeedbackBody {
    request_id: String,
    rating: i32,
    #[serde(default)]
    comment: String,
}

/// Appends a rating for an earlier request to the request log.
async fn feedback(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let res = super::parse_json::<FeedbackBody>(&body).and_then(|f| {
        let log = state.ops().request_log.as_ref().ok_or_else(|| {
            ApiError::Unavailable("the request log is disabled (ops.request_log.enabled = false)".into())
        })?;
        log.append_feedback(&f.request_id, f.rating, &f.comment)
            .map_err(ApiError::from)
    });
    match res {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "recorded"}))).into_response(),
        Err(e) => e.into_response(),
    }
}
