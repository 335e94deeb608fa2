//! The router of `mode = "auto"` assistant requests: chat, RAG or agent, decided by
//! `genai-router` (rules, then the nearest-exemplar classifier) with what only the server knows —
//! the query's MiniLM embedding and whether the caller's tenant has documents.
//!
//! [`Mode`] is the set of pipelines (`auto` is not one: the caller asks [`Router::route`] when a
//! request says `auto`). A [`Decision`] carries the mode, a confidence, a reason string and
//! which stage made it ([`By`]).
//!
//! Owns: the exemplar classifier, built once from the shipped train split
//! (`data/router/queries.jsonl`, compiled in) by embedding it on the embedder's bulk queue —
//! [`Router::warm`] does it at startup, and a request that arrives first waits for that one
//! computation. Per request: the rules (microseconds); if none applies, one query embedding on
//! the interactive queue plus a few hundred dot products.
//!
//! Invariants: a tenant without documents is never routed to RAG; routing never fails a
//! request — when the embedder cannot answer, the decision is chat `By::Fallback` with the
//! reason (availability over a classifier opinion, as in the safety chain).
//!
//! Tested: the rules and the classifier in `genai-router` (unit tests, and the shipped set
//! classified with the real MiniLM in `server/router/tests/shipped.rs`); this wrapper by
//! `tests::routes_by_rule_classifier_and_documents` with the real embedder and an in-memory
//! index; accuracy and latency by `cargo bench -p genai-benches --bench router_eval`.

use std::sync::Arc;

use genai_models::embedder::Priority;
use genai_retrieval::knowledge::KnowledgeService;
use genai_router::{dataset, rules, Classifier, Context};
pub(crate) use genai_router::{Decision, Mode};
use tokio::sync::OnceCell;

pub(crate) struct Router {
    knowledge: Arc<KnowledgeService>,
    classifier: OnceCell<Classifier>,
}

impl Router {
    pub(crate) fn new(knowledge: Arc<KnowledgeService>) -> Self {
        Self {
            knowledge,
            classifier: OnceCell::new(),
        }
    }

    /// Builds the classifier now (at startup), so the first `auto` request need not wait.
    pub(crate) async fn warm(&self) {
        match self.classifier().await {
            Ok(c) => tracing::info!(exemplars = c.len(), "router ready"),
            Err(e) => tracing::warn!("router classifier not built yet: {e}; requests will retry"),
        }
    }

    /// The exemplar classifier, built once; a failed build (embedder stopped) is retried by the
    /// next caller.
    async fn classifier(&self) -> Result<&Classifier, String> {
        self.classifier
            .get_or_try_init(|| async {
                let train = dataset::shipped_split(dataset::Split::Train);
                let texts: Vec<String> = train.iter().map(|e| e.text.clone()).collect();
                let embedded = self
                    .knowledge
                    .embedder()
                    .embed(texts, Priority::Bulk)
                    .await
                    .map_err(|e| format!("embedding the exemplars: {e}"))?;
                let exemplars = train
                    .into_iter()
                    .zip(embedded.vectors)
                    .map(|(e, v)| (e.text, e.mode, v))
                    .collect();
                Classifier::new(exemplars, Classifier::DEFAULT_K)
            })
            .await
    }

    /// The mode for `query` (the last user message) from `tenant`.
    pub(crate) async fn route(&self, tenant: &str, query: &str) -> Decision {
        let ctx = Context {
            has_documents: self.knowledge.has_documents(tenant),
        };
        if let Some(d) = rules::apply(query, &ctx) {
            return d;
        }
        let classifier = match self.classifier().await {
            Ok(c) => c,
            Err(e) => return Decision::fallback(format!("no rule applied and the classifier is unavailable: {e}")),
        };
        match self
            .knowledge
            .embedder()
            .embed(vec![query.to_owned()], Priority::Interactive)
            .await
        {
            Ok(e) => match e.vectors.first() {
                Some(v) => classifier.classify(v, &ctx),
                None => Decision::fallback("the embedder returned no vector"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "router: the embedder did not answer; falling back to chat");
                Decision::fallback(format!("no rule applied and the embedder did not answer: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IndexConfig;
    use genai_retrieval::test_support::{corpus, passage_docs, service};
    use genai_router::By;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_by_rule_classifier_and_documents() {
        let tmp = tempfile::tempdir().unwrap();
        let knowledge = Arc::new(service(IndexConfig {
            dir: tmp.path().to_path_buf(),
            ..Default::default()
        }));
        knowledge.ingest(passage_docs(&corpus(), "acme")).await.unwrap();
        let router = Router::new(knowledge);
        router.warm().await;

        let d = router.route("acme", "What is 17 * 23?").await;
        assert_eq!((d.mode, d.by), (Mode::Agent, By::Rule), "{d:?}");
        let d = router
            .route("acme", "According to our handbook, how many vacation days do I get?")
            .await;
        assert_eq!((d.mode, d.by), (Mode::Rag, By::Rule), "{d:?}");

        // No rule: the classifier, with a confidence and the nearest exemplar in its reason.
        let q = "Please write a short limerick about a cat who loves lasagna";
        let d = router.route("acme", q).await;
        assert_eq!((d.mode, d.by), (Mode::Chat, By::Classifier), "{d:?}");
        assert!(d.confidence > 0.0 && d.confidence <= 1.0, "{d:?}");
        assert!(d.reason.contains("nearest"), "{}", d.reason);
        let q = "What is the reimbursement limit for hotel stays in our travel policy?";
        assert_eq!(router.route("acme", q).await.mode, Mode::Rag);

        // A tenant without documents is never sent to RAG, by a rule or by the classifier.
        let d = router.route("globex", q).await;
        assert_ne!(d.mode, Mode::Rag, "{d:?}");
        let d = router
            .route("globex", "according to the docs, how do I rotate an API key")
            .await;
        assert_ne!(d.mode, Mode::Rag, "{d:?}");
    }
}
