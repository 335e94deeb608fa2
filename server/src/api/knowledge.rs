//! The knowledge API on both front doors: the tonic implementation of
//! `genai.v1.Knowledge` ([`grpc_service`]) and the HTTP equivalents ([`router`]):
//!
//! | HTTP | gRPC |
//! |---|---|
//! | `POST /v1/knowledge/documents` `{"documents": [...]}` | `Ingest` / `IngestStream` |
//! | `POST /v1/knowledge/search` | `Search` |
//! | `DELETE /v1/knowledge/documents/{id}?tenant=T` | `Delete` |
//! | `GET /v1/knowledge/stats` | `Stats` |
//!
//! Tenants: a request's `tenant` field (each document's, the search's, the delete's) defaults to
//! the caller's tenant ([`RequestContext::tenant_for`]); with API keys, naming another tenant
//! than the key's needs the `admin` scope (403 naming the field). Which scope each call needs is
//! decided by the context layer (`auth::scope`), before any handler runs.
//!
//! Protocol only: decode, default, call [`KnowledgeService`], map
//! [`RetrievalError`] to a gRPC code or an HTTP status with an OpenAI-style
//! body `{"error": {"message", "type", "param", "code"}}` (400 names the field).
//!
//! Tested by an in-process HTTP round trip (tower `oneshot`) and a real tonic
//! server on a loopback port driven by the generated client (including the
//! client-streaming ingest).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};

use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use genai_proto::v1 as pb;
use pb::knowledge_server::{Knowledge, KnowledgeServer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::{Request, Status, Streaming};

use super::error::ApiError;
use super::parse_json;
use crate::pipeline::context::RequestContext;
use genai_retrieval::chunker::DocFormat;
use genai_retrieval::index::{Filter, Hit};
use genai_retrieval::knowledge::{DocumentInput, IngestResult, IngestStatus, KnowledgeService, SearchQuery};
use genai_retrieval::RetrievalError;

/// `top_k` when a request leaves it out (or sends 0 over gRPC).
pub const DEFAULT_TOP_K: usize = 5;
/// Documents ingested per group while an `IngestStream` is still arriving.
const STREAM_GROUP: usize = 32;

/// gRPC code for each retrieval error (the same mapping as HTTP's, through [`ApiError`]).
pub fn to_status(e: RetrievalError) -> Status {
    ApiError::from(e).into()
}

/// The tonic service; the lead's server adds it next to `Inference`.
pub fn grpc_service(svc: Arc<KnowledgeService>, max_message_bytes: usize) -> KnowledgeServer<KnowledgeGrpc> {
    KnowledgeServer::new(KnowledgeGrpc { svc })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

pub struct KnowledgeGrpc {
    svc: Arc<KnowledgeService>,
}

fn format_from_pb(format: i32, source: &str, field: &str) -> Result<DocFormat, RetrievalError> {
    match pb::DocumentFormat::try_from(format) {
        Ok(pb::DocumentFormat::Unspecified) => {
            Ok(DocFormat::from_path(std::path::Path::new(source)).unwrap_or(DocFormat::Text))
        }
        Ok(pb::DocumentFormat::Text) => Ok(DocFormat::Text),
        Ok(pb::DocumentFormat::Markdown) => Ok(DocFormat::Markdown),
        Ok(pb::DocumentFormat::Html) => Ok(DocFormat::Html),
        Err(_) => Err(RetrievalError::invalid(
            field,
            format!("unknown DocumentFormat value {format}"),
        )),
    }
}

fn doc_from_pb(ctx: &RequestContext, i: usize, d: pb::Document) -> Result<DocumentInput, Status> {
    let format = format_from_pb(d.format, &d.source, &format!("documents[{i}].format")).map_err(to_status)?;
    Ok(DocumentInput {
        id: d.id,
        tenant: ctx.tenant_for(&format!("documents[{i}].tenant"), d.tenant)?,
        source: d.source,
        tags: d.tags,
        format,
        content: d.content,
    })
}

fn result_to_pb(r: IngestResult) -> pb::DocumentResult {
    let status = match r.status {
        IngestStatus::Added => pb::IngestStatus::Added,
        IngestStatus::Updated => pb::IngestStatus::Updated,
        IngestStatus::Unchanged => pb::IngestStatus::Unchanged,
    };
    pb::DocumentResult {
        id: r.id,
        status: status as i32,
        chunks: r.chunks as u32,
    }
}

fn hit_to_pb(h: Hit) -> pb::SearchHit {
    pb::SearchHit {
        chunk_id: h.chunk.chunk_id,
        document_id: h.chunk.document_id,
        source: h.chunk.source,
        tags: h.chunk.tags,
        text: h.chunk.text,
        score: h.score,
    }
}

#[tonic::async_trait]
impl Knowledge for KnowledgeGrpc {
    async fn ingest(&self, req: Request<pb::IngestRequest>) -> Result<tonic::Response<pb::IngestResponse>, Status> {
        let ctx = RequestContext::of(req.extensions())?;
        let docs = req.into_inner().documents;
        if docs.is_empty() {
            return Err(to_status(RetrievalError::invalid(
                "documents",
                "at least one document is required",
            )));
        }
        let docs = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| doc_from_pb(&ctx, i, d))
            .collect::<Result<Vec<_>, _>>()?;
        let results = self.svc.ingest(docs).await.map_err(to_status)?;
        Ok(tonic::Response::new(pb::IngestResponse {
            results: results.into_iter().map(result_to_pb).collect(),
        }))
    }

    async fn ingest_stream(
        &self,
        req: Request<Streaming<pb::IngestStreamRequest>>,
    ) -> Result<tonic::Response<pb::IngestResponse>, Status> {
        let ctx = RequestContext::of(req.extensions())?;
        let mut stream = req.into_inner();
        let mut results = Vec::new();
        let mut seen = 0usize;
        let outcome = async {
            let mut group = Vec::with_capacity(STREAM_GROUP);
            // Ingest in groups as documents arrive: memory stays bounded by the group.
            while let Some(msg) = stream.next().await {
                let msg = msg?;
                let doc = msg.document.ok_or_else(|| {
                    to_status(RetrievalError::invalid(
                        format!("messages[{seen}].document"),
                        "is required",
                    ))
                })?;
                let d = doc_from_pb(&ctx, seen, doc)?;
                // Errors name the position in the stream, not in the group.
                validate_in_stream(&d, seen)?;
                group.push(d);
                seen += 1;
                if group.len() == STREAM_GROUP {
                    results.extend(self.svc.ingest(std::mem::take(&mut group)).await.map_err(to_status)?);
                }
            }
            if !group.is_empty() {
                results.extend(self.svc.ingest(group).await.map_err(to_status)?);
            }
            Ok::<_, Status>(())
        }
        .await;
        if let Err(e) = outcome {
            return Err(partial_ingest_error(e, results.len()));
        }
        if seen == 0 {
            return Err(to_status(RetrievalError::invalid(
                "documents",
                "the stream carried no document",
            )));
        }
        Ok(tonic::Response::new(pb::IngestResponse {
            results: results.into_iter().map(result_to_pb).collect(),
        }))
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<tonic::Response<pb::SearchResponse>, Status> {
        let ctx = RequestContext::of(req.extensions())?;
        let r = req.into_inner();
        let q = SearchQuery {
            query: r.query,
            top_k: if r.top_k == 0 { DEFAULT_TOP_K } else { r.top_k as usize },
            filter: Filter {
                tenant: ctx.tenant_for("tenant", r.tenant)?,
                source: r.source,
                tags: r.tags,
                document_id: r.document_id,
            },
            min_score: r.min_score.unwrap_or(-1.0),
        };
        let hits = self.svc.search(&q).await.map_err(to_status)?;
        Ok(tonic::Response::new(pb::SearchResponse {
            hits: hits.into_iter().map(hit_to_pb).collect(),
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<tonic::Response<pb::DeleteResponse>, Status> {
        let ctx = RequestContext::of(req.extensions())?;
        let r = req.into_inner();
        let tenant = ctx.tenant_for("tenant", r.tenant)?;
        let n = self.svc.delete(&tenant, &r.document_id).await.map_err(to_status)?;
        Ok(tonic::Response::new(pb::DeleteResponse {
            chunks_removed: n as u32,
        }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<tonic::Response<pb::StatsResponse>, Status> {
        let s = self.svc.stats();
        Ok(tonic::Response::new(pb::StatsResponse {
            documents: s.documents as u64,
            chunks: s.chunks as u64,
            vectors: s.vectors,
            tombstones: s.tombstones,
            dimension: s.dimension as u32,
            index_factory: s.factory,
            embedding_model: self.svc.embedding_model().to_string(),
            generation: s.generation,
        }))
    }
}

/// Stream documents are validated one by one by the service with index 0:
/// check the required fields here so the error names the stream position.
/// An `IngestStream` that failed after some groups were stored says how many, in the message and
/// in the `genai-ingested-documents` trailer: re-sending them is harmless (unchanged documents are
/// skipped), but the client must know they landed.
fn partial_ingest_error(e: Status, ingested: usize) -> Status {
    if ingested == 0 {
        return e;
    }
    let msg = format!(
        "{}; the {ingested} documents before it were ingested (re-sending them is harmless: unchanged documents are skipped)",
        e.message()
    );
    let mut s = Status::new(e.code(), msg);
    s.metadata_mut().insert("genai-ingested-documents", ingested.into());
    s
}

fn validate_in_stream(d: &DocumentInput, i: usize) -> Result<(), Status> {
    if d.id.trim().is_empty() {
        return Err(to_status(RetrievalError::invalid(
            format!("documents[{i}].id"),
            "must not be empty",
        )));
    }
    if d.content.trim().is_empty() {
        return Err(to_status(RetrievalError::invalid(
            format!("documents[{i}].content"),
            "must not be empty",
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- HTTP

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpDocument {
    id: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    tags: Vec<String>,
    /// "text", "markdown" or "html"; inferred from `source` when absent.
    #[serde(default)]
    format: Option<String>,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpIngest {
    documents: Vec<HttpDocument>,
}

#[derive(Debug, Serialize)]
struct HttpIngestResponse {
    results: Vec<IngestResult>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSearch {
    query: String,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    document_id: Option<String>,
    #[serde(default)]
    min_score: Option<f32>,
}

#[derive(Debug, Serialize)]
struct HttpHit {
    chunk_id: String,
    document_id: String,
    source: String,
    tags: Vec<String>,
    text: String,
    score: f32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantQuery {
    #[serde(default)]
    tenant: String,
}

/// The HTTP routes, with their state applied (merge into the main router).
pub fn router(svc: Arc<KnowledgeService>) -> Router {
    Router::new()
        .route("/v1/knowledge/documents", post(http_ingest))
        .route("/v1/knowledge/documents/{id}", delete(http_delete))
        .route("/v1/knowledge/search", post(http_search))
        .route("/v1/knowledge/stats", get(http_stats))
        .with_state(svc)
}

async fn http_ingest(
    State(svc): State<Arc<KnowledgeService>>,
    ctx: RequestContext,
    body: Bytes,
) -> Result<Json<HttpIngestResponse>, ApiError> {
    let body: HttpIngest = parse_json(&body)?;
    if body.documents.is_empty() {
        return Err(RetrievalError::invalid("documents", "at least one document is required").into());
    }
    let mut docs = Vec::with_capacity(body.documents.len());
    for (i, d) in body.documents.into_iter().enumerate() {
        let format = match &d.format {
            Some(f) => DocFormat::parse(f, &format!("documents[{i}].format"))?,
            None => DocFormat::from_path(std::path::Path::new(&d.source)).unwrap_or(DocFormat::Text),
        };
        docs.push(DocumentInput {
            id: d.id,
            tenant: ctx.tenant_for(&format!("documents[{i}].tenant"), d.tenant)?,
            source: d.source,
            tags: d.tags,
            format,
            content: d.content,
        });
    }
    let results = svc.ingest(docs).await?;
    Ok(Json(HttpIngestResponse { results }))
}

async fn http_search(
    State(svc): State<Arc<KnowledgeService>>,
    ctx: RequestContext,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b: HttpSearch = parse_json(&body)?;
    let q = SearchQuery {
        query: b.query,
        top_k: b.top_k.unwrap_or(DEFAULT_TOP_K),
        filter: Filter {
            tenant: ctx.tenant_for("tenant", b.tenant)?,
            source: b.source,
            tags: b.tags,
            document_id: b.document_id,
        },
        min_score: b.min_score.unwrap_or(-1.0),
    };
    let hits: Vec<HttpHit> = svc
        .search(&q)
        .await?
        .into_iter()
        .map(|h| HttpHit {
            chunk_id: h.chunk.chunk_id,
            document_id: h.chunk.document_id,
            source: h.chunk.source,
            tags: h.chunk.tags,
            text: h.chunk.text,
            score: h.score,
        })
        .collect();
    Ok(Json(json!({ "hits": hits })))
}

async fn http_delete(
    State(svc): State<Arc<KnowledgeService>>,
    ctx: RequestContext,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(t) = query.map_err(|r| ApiError::invalid("tenant", r.body_text()))?;
    let n = svc.delete(&ctx.tenant_for("tenant", t.tenant)?, &id).await?;
    Ok(Json(json!({ "id": id, "deleted": true, "chunks_removed": n })))
}

async fn http_stats(State(svc): State<Arc<KnowledgeService>>) -> Json<serde_json::Value> {
    let s = svc.stats();
    Json(json!({
        "documents": s.documents,
        "chunks": s.chunks,
        "vectors": s.vectors,
        "tombstones": s.tombstones,
        "dimension": s.dimension,
        "index_factory": s.factory,
        "embedding_model": svc.embedding_model(),
        "generation": s.generation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IndexConfig;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use axum::http::StatusCode;
    use genai_retrieval::test_support::service;
    use tower::ServiceExt;

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let req = HttpRequest::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_round_trip_and_errors_name_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = Arc::new(service(IndexConfig {
            dir: tmp.path().to_path_buf(),
            ..Default::default()
        }));
        let app = router(svc).layer(crate::pipeline::context::open_layer());
        let docs = json!({"documents": [
            {"id": "tides", "tenant": "a", "source": "tides.md", "tags": ["sea"],
             "content": "# Tides\nThe Moon's gravity raises two tidal bulges in the oceans."},
            {"id": "bread", "tenant": "a", "format": "text", "content": "Knead the dough and let it rise."},
            {"id": "secret", "tenant": "b", "content": "Tenant b's tide tables are private."}
        ]});
        let (s, v) = call(&app, "POST", "/v1/knowledge/documents", Some(docs.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["results"][0]["status"], "added");
        let (_, v) = call(&app, "POST", "/v1/knowledge/documents", Some(docs)).await;
        assert_eq!(v["results"][2]["status"], "unchanged");

        let (s, v) = call(
            &app,
            "POST",
            "/v1/knowledge/search",
            Some(json!({"query": "what causes tides", "tenant": "a", "top_k": 5})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let hits = v["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 2, "tenant b's document must not appear: {v}");
        assert_eq!(hits[0]["document_id"], "tides");
        assert_eq!(hits[0]["chunk_id"], "tides#0");
        let (_, v) = call(
            &app,
            "POST",
            "/v1/knowledge/search",
            Some(json!({"query": "tides", "tenant": "a", "tags": ["sea"]})),
        )
        .await;
        assert_eq!(v["hits"].as_array().unwrap().len(), 1);

        let (s, v) = call(&app, "POST", "/v1/knowledge/search", Some(json!({"top_k": 3}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["param"], "query", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let (s, v) = call(
            &app,
            "POST",
            "/v1/knowledge/search",
            Some(json!({"query": "x", "top_k": 0})),
        )
        .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("top_k"))
        );
        let (s, v) = call(
            &app,
            "POST",
            "/v1/knowledge/documents",
            Some(json!({"documents": [{"id": "x", "content": "y", "format": "pdf"}]})),
        )
        .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("documents[0].format"))
        );
        let (s, v) = call(
            &app,
            "POST",
            "/v1/knowledge/documents",
            Some(json!({"documents": [{"id": "x", "content": 7}]})),
        )
        .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("documents[0].content")),
            "{v}"
        );

        let (s, v) = call(&app, "DELETE", "/v1/knowledge/documents/tides?tenant=b", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "another tenant cannot delete it: {v}");
        let (s, v) = call(&app, "DELETE", "/v1/knowledge/documents/tides?tenant=a", None).await;
        assert_eq!((s, v["chunks_removed"].as_u64()), (StatusCode::OK, Some(1)));
        let (s, v) = call(&app, "GET", "/v1/knowledge/stats", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!((v["documents"].as_u64(), v["dimension"].as_u64()), (Some(2), Some(384)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_round_trip_with_streaming_ingest() {
        use pb::knowledge_client::KnowledgeClient;
        let tmp = tempfile::tempdir().unwrap();
        let svc = Arc::new(service(IndexConfig {
            dir: tmp.path().to_path_buf(),
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(crate::pipeline::context::open_layer())
                .add_service(grpc_service(svc, 4 << 20))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = KnowledgeClient::connect(format!("http://{addr}")).await.unwrap();
        let docs: Vec<pb::IngestStreamRequest> = (0..40)
            .map(|i| pb::IngestStreamRequest {
                document: Some(pb::Document {
                    id: format!("d{i}"),
                    tenant: "t".into(),
                    source: format!("d{i}.html"),
                    content: format!(
                        "<p>Fact number {i}: the number {i} is {}.</p>",
                        if i % 2 == 0 { "even" } else { "odd" }
                    ),
                    ..Default::default()
                }),
            })
            .collect();
        let r = client
            .ingest_stream(futures::stream::iter(docs))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), 40, "two groups of the stream");
        // A bad document after the first group: the error says the group before it landed.
        let mut bad: Vec<pb::IngestStreamRequest> = (0..35)
            .map(|i| pb::IngestStreamRequest {
                document: Some(pb::Document {
                    id: format!("p{i}"),
                    tenant: "partial".into(),
                    content: format!("Partial document {i}."),
                    ..Default::default()
                }),
            })
            .collect();
        bad[34].document.as_mut().unwrap().content.clear();
        let e = client.ingest_stream(futures::stream::iter(bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("documents[34].content"), "{}", e.message());
        assert!(
            e.message().contains("the 32 documents before it were ingested"),
            "{}",
            e.message()
        );
        assert_eq!(e.metadata().get("genai-ingested-documents").unwrap(), "32");
        assert!(r
            .results
            .iter()
            .all(|d| d.status == pb::IngestStatus::Added as i32 && d.chunks == 1));
        let hits = client
            .search(pb::SearchRequest {
                query: "Fact number 7".into(),
                tenant: "t".into(),
                top_k: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .hits;
        assert_eq!(hits.len(), 3);
        assert!(!hits[0].text.contains('<'), "HTML was inferred from the .html source");
        let e = client
            .ingest(pb::IngestRequest {
                documents: vec![pb::Document {
                    id: "x".into(),
                    ..Default::default()
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("documents[0].content"), "{}", e.message());
        let e = client
            .delete(pb::DeleteRequest {
                tenant: "other".into(),
                document_id: "d1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let n = client
            .delete(pb::DeleteRequest {
                tenant: "t".into(),
                document_id: "d1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(n.chunks_removed, 1);
        let s = client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        // 39 left of the first stream, 32 of the partial one.
        assert_eq!((s.documents, s.chunks, s.dimension), (39 + 32, 39 + 32, 384));
        assert_eq!(s.embedding_model, "all-minilm-l6-v2");
        server.abort();
    }
}
