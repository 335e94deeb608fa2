//! Knowledge and RAG through the binary: ingest (HTTP, gRPC and the `ingest`
//! command), search, RAG chat with citations, embeddings on both doors, and an
//! index that survives a restart.

use std::time::Duration;

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use pb::knowledge_client::KnowledgeClient;
use serde_json::{json, Value};

use crate::harness::{repo_root, run_to_exit, Server};

fn passages() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("tests/data/corpus/passages.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn ingest_http(server: &Server, tenant: &str) {
    let docs: Vec<Value> = passages()
        .into_iter()
        .map(|(id, text)| json!({"id": id, "tenant": tenant, "source": format!("{id}.txt"), "content": text}))
        .collect();
    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/knowledge/documents"))
        .json(&json!({"documents": docs}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test]
async fn ingest_search_and_rag_chat_with_citations() {
    let server = Server::start().await;
    ingest_http(&server, "acme").await;
    let channel = server.channel().await;

    let mut knowledge = KnowledgeClient::new(channel.clone());
    let hits = knowledge
        .search(pb::SearchRequest {
            query: "Which planet has a giant storm called the Great Red Spot?".into(),
            top_k: 3,
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits[0].document_id, "astronomy-2");
    // Another tenant sees nothing of acme's.
    let none = knowledge
        .search(pb::SearchRequest {
            query: "Jupiter".into(),
            top_k: 3,
            tenant: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert!(none.is_empty(), "{none:?}");

    // RAG chat: the first message carries the numbered sources, the gold passage among them.
    let mut inference = InferenceClient::new(channel);
    let mut req = tonic::Request::new(pb::ChatRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "What is the Great Red Spot?".into(),
            ..Default::default()
        }],
        mode: pb::ChatMode::Rag as i32,
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(32),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut().insert("x-tenant-id", "acme".parse().unwrap());
    let mut stream = inference.chat(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.citations.is_empty());
    assert_eq!(first.citations[0].index, 1);
    assert!(
        first.citations.iter().any(|c| c.chunk_id.starts_with("astronomy-2")),
        "{:?}",
        first.citations
    );
    let mut last = first;
    while let Some(m) = stream.message().await.unwrap() {
        last = m;
    }
    assert!(!last.finish_reason.is_empty());
    assert!(last.usage.unwrap().prompt_tokens > 40, "the sources are in the prompt");

    // The same over HTTP.
    let body = json!({"mode": "rag", "max_tokens": 16, "messages": [{"role": "user", "content": "How far does light travel in a year?"}]});
    let v: Value = reqwest::Client::new()
        .post(server.http_url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v.get("citations").is_some(), "{v}");
}

#[tokio::test]
async fn embeddings_agree_across_doors_and_are_normalised() {
    let server = Server::start().await;
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Paged attention stores KV in blocks.",
    ];
    let mut client = InferenceClient::new(server.channel().await);
    let grpc = client
        .embed(pb::EmbedRequest {
            texts: texts.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.embeddings.len(), 2);
    assert!(grpc.prompt_tokens > 10);
    let v: Value = reqwest::Client::new()
        .post(server.http_url("/v1/embeddings"))
        .json(&json!({"input": texts, "model": "all-minilm-l6-v2"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (i, e) in grpc.embeddings.iter().enumerate() {
        assert_eq!(e.values.len(), 384);
        let norm: f32 = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        let http: Vec<f32> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let dot: f32 = http.iter().zip(&e.values).map(|(a, b)| a * b).sum();
        assert!(dot > 0.9999, "gRPC and HTTP vectors differ: {dot}");
    }
    let bad = client
        .embed(pb::EmbedRequest {
            texts: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("input[0]"), "{}", bad.message());
}

/// `field` of the top 3 hits of tenant "acme" for `query`, over HTTP.
async fn search(server: &Server, query: &str, field: &str) -> Vec<String> {
    let (status, v) = server
        .post(
            "/v1/knowledge/search",
            json!({"query": query, "tenant": "acme", "top_k": 3}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[field].as_str().unwrap().to_owned())
        .collect()
}

/// `genai-factory ingest` of the test corpus into tenant "acme", plus `target` (an index
/// directory or a server), to completion.
fn ingest_corpus(target: &[&str]) -> std::process::Output {
    let corpus = repo_root().join("tests/data/corpus");
    let models = crate::harness::models_dir();
    let mut args = vec!["ingest", "--models-dir", models.to_str().unwrap()];
    args.extend_from_slice(target);
    args.extend(["--tenant", "acme", "--quiet", corpus.to_str().unwrap()]);
    run_to_exit(&args, &[], Duration::from_secs(300))
}

#[tokio::test]
async fn ingest_command_then_index_survives_restart() {
    let work = tempfile::tempdir().unwrap();
    let index = work.path().join("index");
    let out = ingest_corpus(&["--index-dir", index.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "ingest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let index_env = index.to_str().unwrap().to_owned();
    let server = Server::builder().env("GENAI_INDEX__DIR", &index_env).start().await;
    let before = search(&server, "volcano eruption lava", "chunk_id").await;
    assert!(!before.is_empty());
    assert!(server.terminate(Duration::from_secs(40)).await.success());
    let server = Server::builder().env("GENAI_INDEX__DIR", &index_env).start().await;
    assert_eq!(
        search(&server, "volcano eruption lava", "chunk_id").await,
        before,
        "the persisted index must reload unchanged"
    );
}

/// The README's tour: with the server running, CLI ingest goes through it (or fails at once
/// naming it); documents ingested by the CLI and over HTTP are all searchable, also after a
/// restart. Before the one-writer rule the server's next save deleted the CLI's documents.
#[tokio::test]
async fn cli_ingest_while_the_server_runs_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let index = work.path().join("index");
    let index_env = index.to_str().unwrap().to_owned();
    let server = Server::builder().env("GENAI_INDEX__DIR", &index_env).start().await;

    // Straight into the directory the server holds: refused at once, naming the server and the fix.
    let out = ingest_corpus(&["--index-dir", index.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--server") && err.contains(&server.pid().to_string()),
        "{err}"
    );

    // Through the server.
    let out = ingest_corpus(&["--server", &server.grpc_url()]);
    assert!(
        out.status.success(),
        "ingest --server failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/knowledge/documents"))
        .json(
            &json!({"documents": [{"id": "tides", "tenant": "acme", "source": "tides.md",
                       "content": "Tides are caused by the gravitational pull of the Moon."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let cli_hits = search(&server, "volcano eruption lava", "document_id").await;
    assert!(!cli_hits.is_empty(), "the CLI's documents are searchable");
    assert_eq!(
        search(&server, "What causes tides?", "document_id")
            .await
            .first()
            .map(String::as_str),
        Some("tides")
    );
    assert!(server.terminate(Duration::from_secs(40)).await.success());

    let server = Server::builder().env("GENAI_INDEX__DIR", &index_env).start().await;
    assert_eq!(search(&server, "volcano eruption lava", "document_id").await, cli_hits);
    assert_eq!(
        search(&server, "What causes tides?", "document_id")
            .await
            .first()
            .map(String::as_str),
        Some("tides")
    );
}
