//! `knowledge_search`: the knowledge base of the caller's tenant, through the same
//! [`KnowledgeService`] the RAG route retrieves from (`[rag] top_k` and `min_score`).
//!
//! Invariant: the filter is always the context's tenant; the arguments cannot name another
//! (the schema has no such field and unknown fields are refused).
//!
//! Tested below on the real MiniLM embedder: two tenants' documents in one index, each search
//! sees only its own tenant's.

use std::sync::Arc;

use async_trait::async_trait;
use genai_retrieval::index::Filter;
use genai_retrieval::knowledge::{KnowledgeService, SearchQuery};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_args, Tool, ToolContext, ToolError};
use crate::config::RagConfig;

/// Most passages one call returns.
const MAX_TOP_K: usize = 10;

pub(crate) struct KnowledgeSearch {
    svc: Arc<KnowledgeService>,
    top_k: usize,
    min_score: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    query: String,
    #[serde(default)]
    top_k: Option<usize>,
}

impl KnowledgeSearch {
    pub(crate) fn new(svc: Arc<KnowledgeService>, rag: &RagConfig) -> Self {
        Self {
            svc,
            top_k: rag.top_k.clamp(1, MAX_TOP_K),
            min_score: rag.min_score,
        }
    }
}

#[async_trait]
impl Tool for KnowledgeSearch {
    fn name(&self) -> &'static str {
        "knowledge_search"
    }

    fn description(&self) -> &'static str {
        "Searches the knowledge base of documents for passages relevant to a query."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "description": "How many passages."}
            },
            "required": ["query"],
            "additionalProperties": false
        })
    }

    async fn run(&self, args: Value, ctx: &ToolContext) -> Result<String, ToolError> {
        let a: Args = parse_args(args)?;
        if a.query.trim().is_empty() {
            return Err(ToolError::InvalidArguments("query: must not be empty".into()));
        }
        let top_k = match a.top_k {
            None => self.top_k,
            Some(k) if (1..=MAX_TOP_K).contains(&k) => k,
            Some(k) => {
                return Err(ToolError::InvalidArguments(format!(
                    "top_k: must be in 1..={MAX_TOP_K}, got {k}"
                )))
            }
        };
        let hits = self
            .svc
            .search(&SearchQuery {
                query: a.query,
                top_k,
                filter: Filter::tenant(ctx.tenant.as_str()),
                min_score: self.min_score,
            })
            .await
            .map_err(|e| ToolError::Failed(e.to_string()))?;
        if hits.is_empty() {
            return Ok("No passages found.".into());
        }
        Ok(hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                format!(
                    "[{}] {} (score {:.2})\n{}",
                    i + 1,
                    h.chunk.source,
                    h.score,
                    h.chunk.text
                )
            })
            .collect::<Vec<_>>()
            .join("\n\n"))
    }
}

#[cfg(test)]
mod tests {
    use genai_retrieval::chunker::DocFormat;
    use genai_retrieval::config::IndexConfig;
    use genai_retrieval::knowledge::DocumentInput;

    use super::*;

    fn doc(id: &str, tenant: &str, content: &str) -> DocumentInput {
        DocumentInput {
            id: id.into(),
            tenant: tenant.into(),
            source: format!("{tenant}/{id}.md"),
            tags: vec![],
            format: DocFormat::Text,
            content: content.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn searches_only_the_callers_tenant() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = Arc::new(genai_retrieval::test_support::service(IndexConfig {
            dir: tmp.path().to_path_buf(),
            ..Default::default()
        }));
        svc.ingest(vec![
            doc(
                "tides",
                "acme",
                "The Moon's gravity raises two tidal bulges in the oceans.",
            ),
            doc(
                "bread",
                "acme",
                "Knead the dough for ten minutes and let it rise for an hour.",
            ),
            doc(
                "secret-tides",
                "globex",
                "Globex's private tide tables for the harbour of Brest.",
            ),
        ])
        .await
        .unwrap();
        let tool = KnowledgeSearch::new(svc, &RagConfig::default());
        let ask = |tenant: &str, q: &str| {
            let ctx = ToolContext { tenant: tenant.into() };
            let args = json!({ "query": q });
            let tool = &tool;
            async move { tool.run(args, &ctx).await.unwrap() }
        };
        let acme = ask("acme", "tide tables").await;
        assert!(acme.starts_with("[1] acme/tides.md (score"), "{acme}");
        assert!(!acme.contains("globex") && !acme.contains("Globex"), "{acme}");
        let globex = ask("globex", "tides").await;
        assert!(globex.contains("globex/secret-tides.md"), "{globex}");
        assert!(!globex.contains("acme/"), "{globex}");
        assert_eq!(ask("initech", "tides").await, "No passages found.");

        let ctx = ToolContext { tenant: "acme".into() };
        let e = tool
            .run(json!({"query": "tides", "tenant": "globex"}), &ctx)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ToolError::InvalidArguments(m) if m.contains("tenant")),
            "{e}"
        );
        let e = tool.run(json!({"query": "x", "top_k": 50}), &ctx).await.unwrap_err();
        assert!(
            matches!(&e, ToolError::InvalidArguments(m) if m.starts_with("top_k")),
            "{e}"
        );
    }
}
