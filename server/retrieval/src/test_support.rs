//! Shared fixtures for retrieval tests (this crate's and the server's): the labelled corpus and
//! a knowledge service over the real MiniLM embedder in a given index directory.

use std::sync::Arc;

use genai_models::config::{EmbeddingConfig, ModelsConfig};
use genai_models::embedder::EmbedderHandle;
use genai_models::test_support::{embedder, repo_path};
use serde::Deserialize;

use crate::chunker::DocFormat;
use crate::config::IndexConfig;
use crate::index::VectorStore;
use crate::knowledge::{DocumentInput, KnowledgeService};

#[derive(Deserialize)]
pub struct Passage {
    pub id: String,
    pub topic: String,
    pub text: String,
}

pub fn corpus() -> Vec<Passage> {
    let text = std::fs::read_to_string(repo_path("tests/data/corpus/passages.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn service(index: IndexConfig) -> KnowledgeService {
    let e = embedder();
    let handle = EmbedderHandle::spawn(e.clone(), &EmbeddingConfig::default()).unwrap();
    let store = Arc::new(VectorStore::open(&index, e.dim()).unwrap());
    KnowledgeService::new(handle, store, &index, &ModelsConfig::default().embedding.name, true)
}

pub fn passage_docs(passages: &[Passage], tenant: &str) -> Vec<DocumentInput> {
    passages
        .iter()
        .map(|p| DocumentInput {
            id: p.id.clone(),
            tenant: tenant.into(),
            source: format!("corpus/{}", p.topic),
            tags: vec![p.topic.clone()],
            format: DocFormat::Text,
            content: p.text.clone(),
        })
        .collect()
}
