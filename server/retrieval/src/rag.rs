//! The RAG prompt builder: the last user message queries the knowledge base,
//! the best chunks (optionally diversified with maximal marginal relevance)
//! become numbered sources in a system prompt rendered from a minijinja
//! template, and `[n]` markers in the model's answer map back to the sources.
//! Generation itself is the engine's (the Chat RPC in RAG mode wires it).
//!
//! Invariants: source numbers start at 1 and follow the citation list order;
//! [`parse_citations`] returns only sources that exist, each once, in order of
//! first mention.
//!
//! Tested by: template rendering with the real retrieval stack, MMR picking a
//! diverse set over near-duplicates, citation parsing edge cases.

use std::path::Path;
use std::sync::Arc;

use minijinja::{context, Environment};
use serde::Serialize;

use super::index::{Filter, Hit};
use super::knowledge::{KnowledgeService, SearchQuery};
use super::RetrievalError;
use crate::config::RagConfig;
use genai_models::chat_template::ChatMessage;
use genai_models::embedder::Priority;

type Result<T> = std::result::Result<T, RetrievalError>;

/// The built-in system prompt. Context: `sources` (list of `{n, source, text,
/// score}`) and `question` (the last user message).
pub(crate) const DEFAULT_TEMPLATE: &str = "\
You are a helpful assistant. Answer the question using only the numbered sources below. \
Cite the sources you use with their number in square brackets, like [1]. \
If the sources do not contain the answer, say that you do not know.

Sources:
{% for s in sources %}[{{ s.n }}] ({{ s.source }}) {{ s.text }}
{% endfor %}";

/// A source passage given to the model (and, once cited, to the client).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Citation {
    /// The number used in the prompt and the answer, as in "[1]".
    pub index: u32,
    pub chunk_id: String,
    pub source: String,
    pub text: String,
    pub score: f32,
}

/// What the engine gets: the messages to render with the model's chat template,
/// and the sources they number.
#[derive(Debug, Clone)]
pub struct RagPrompt {
    pub messages: Vec<ChatMessage>,
    pub citations: Vec<Citation>,
}

pub struct RagPipeline {
    knowledge: Arc<KnowledgeService>,
    cfg: RagConfig,
    env: Environment<'static>,
}

impl RagPipeline {
    /// Compiles the configured template (or the built-in one).
    pub fn new(knowledge: Arc<KnowledgeService>, cfg: &RagConfig) -> Result<Self> {
        let source = if cfg.template.as_os_str().is_empty() {
            DEFAULT_TEMPLATE.to_string()
        } else {
            read_template(&cfg.template)?
        };
        let mut env = Environment::new();
        env.add_template_owned("rag", source)
            .map_err(|e| RetrievalError::invalid("rag.template", e.to_string()))?;
        Ok(Self {
            knowledge,
            cfg: cfg.clone(),
            env,
        })
    }

    /// Retrieves sources for the last user message of `messages` and returns
    /// the prompt messages (our system prompt first, then the conversation).
    pub async fn prepare(&self, messages: &[ChatMessage], filter: &Filter) -> Result<RagPrompt> {
        let question = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .filter(|q| !q.trim().is_empty())
            .ok_or_else(|| RetrievalError::invalid("messages", "RAG mode needs a non-empty user message"))?;
        let k = self.cfg.top_k;
        let fetch = if self.cfg.mmr { k * self.cfg.mmr_fetch_factor } else { k };
        let mut hits = self
            .knowledge
            .search(&SearchQuery {
                query: question.clone(),
                top_k: fetch.min(super::knowledge::MAX_TOP_K),
                filter: filter.clone(),
                min_score: self.cfg.min_score,
            })
            .await?;
        if self.cfg.mmr && hits.len() > k {
            hits = self.diversify(&question, hits, k).await?;
        }
        hits.truncate(k);
        let citations: Vec<Citation> = hits
            .into_iter()
            .enumerate()
            .map(|(i, h)| Citation {
                index: i as u32 + 1,
                chunk_id: h.chunk.chunk_id,
                source: h.chunk.source,
                text: h.chunk.text,
                score: h.score,
            })
            .collect();
        let system = self.render(&question, &citations)?;
        let mut out = vec![ChatMessage {
            role: "system".into(),
            content: system,
        }];
        out.extend(messages.iter().cloned());
        Ok(RagPrompt {
            messages: out,
            citations,
        })
    }

    /// Renders the system prompt for `question` and `sources`.
    pub(crate) fn render(&self, question: &str, sources: &[Citation]) -> Result<String> {
        let sources: Vec<_> = sources
            .iter()
            .map(|c| context! { n => c.index, source => c.source, text => c.text, score => c.score })
            .collect();
        self.env
            .get_template("rag")
            .and_then(|t| t.render(context! { sources => sources, question => question }))
            .map_err(|e| RetrievalError::invalid("rag.template", e.to_string()))
    }

    /// MMR over the candidates: the chunk vectors are recomputed (the index
    /// types we allow cannot all return stored vectors).
    async fn diversify(&self, question: &str, hits: Vec<Hit>, k: usize) -> Result<Vec<Hit>> {
        let mut texts: Vec<String> = hits.iter().map(|h| h.chunk.text.clone()).collect();
        texts.push(question.to_string());
        let mut vecs = self
            .knowledge
            .embedder()
            .embed(texts, Priority::Interactive)
            .await?
            .vectors;
        let q = vecs
            .pop()
            .ok_or_else(|| RetrievalError::Model("no query vector".into()))?;
        let order = mmr(&q, &vecs, k, self.cfg.mmr_lambda);
        let mut slots: Vec<Option<Hit>> = hits.into_iter().map(Some).collect();
        Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
    }
}

fn read_template(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| RetrievalError::invalid("rag.template", format!("reading {}: {e}", path.display())))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Maximal marginal relevance: greedily picks `k` of `candidates` (unit
/// vectors) maximising `lambda * sim(query) - (1 - lambda) * max sim(picked)`.
/// Returns candidate indices in pick order.
pub(crate) fn mmr(query: &[f32], candidates: &[Vec<f32>], k: usize, lambda: f32) -> Vec<usize> {
    let rel: Vec<f32> = candidates.iter().map(|c| dot(query, c)).collect();
    let mut picked: Vec<usize> = Vec::with_capacity(k.min(candidates.len()));
    let mut left: Vec<usize> = (0..candidates.len()).collect();
    while picked.len() < k && !left.is_empty() {
        let (pos, _) = left
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                let red = picked
                    .iter()
                    .map(|&j| dot(&candidates[i], &candidates[j]))
                    .fold(f32::MIN, f32::max);
                let red = if picked.is_empty() { 0.0 } else { red };
                (pos, lambda * rel[i] - (1.0 - lambda) * red)
            })
            .fold((0, f32::MIN), |best, cur| if cur.1 > best.1 { cur } else { best });
        picked.push(left.remove(pos));
    }
    picked
}

/// The sources an answer cites with `[n]` markers (also `[1, 2]` and `[1][3]`),
/// each once, in order of first mention; numbers with no source are ignored.
pub fn parse_citations(answer: &str, sources: &[Citation]) -> Vec<Citation> {
    let mut out: Vec<Citation> = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inside = &after[..close];
        // Only brackets holding nothing but numbers, commas and spaces count.
        if !inside.is_empty() && inside.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') {
            for n in inside.split(',').filter_map(|s| s.trim().parse::<u32>().ok()) {
                if let Some(c) = sources.iter().find(|c| c.index == n) {
                    if !out.iter().any(|o| o.index == n) {
                        out.push(c.clone());
                    }
                }
            }
            rest = &after[close + 1..];
        } else {
            rest = after;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IndexConfig;
    use crate::test_support::{corpus, passage_docs, service};

    fn src(n: u32) -> Citation {
        Citation {
            index: n,
            chunk_id: format!("doc#{n}"),
            source: format!("s{n}"),
            text: format!("text {n}"),
            score: 0.5,
        }
    }

    #[test]
    fn citations_map_markers_to_sources() {
        let s: Vec<Citation> = (1..=4).map(src).collect();
        let got = parse_citations(
            "Tides come from the Moon [2]. Also [1, 3][3] and [9] and [x] [ ] [4",
            &s,
        );
        assert_eq!(got.iter().map(|c| c.index).collect::<Vec<_>>(), vec![2, 1, 3]);
        assert!(parse_citations("no markers", &s).is_empty());
        assert!(parse_citations("[1]", &[]).is_empty());
        assert_eq!(parse_citations("[[2]]", &s)[0].chunk_id, "doc#2");
    }

    #[test]
    fn mmr_prefers_diversity_over_near_duplicates() {
        let q = vec![1.0, 0.0, 0.0];
        let unit = |mut v: Vec<f32>| {
            genai_models::embedder::normalize(&mut v);
            v
        };
        // Candidate 1 nearly duplicates candidate 0; candidate 2 is a bit less
        // relevant but points elsewhere.
        let cands = vec![
            unit(vec![0.9, 0.436, 0.0]),
            unit(vec![0.89, 0.456, 0.0]),
            unit(vec![0.85, -0.3, 0.43]),
        ];
        assert_eq!(mmr(&q, &cands, 2, 1.0), vec![0, 1], "lambda 1 = relevance only");
        assert_eq!(mmr(&q, &cands, 2, 0.5), vec![0, 2], "the near-duplicate is skipped");
        assert_eq!(mmr(&q, &cands, 10, 0.5).len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepare_numbers_sources_in_the_prompt() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = Arc::new(service(IndexConfig {
            dir: tmp.path().to_path_buf(),
            ..Default::default()
        }));
        svc.ingest(passage_docs(&corpus(), "acme")).await.unwrap();
        for mmr_on in [false, true] {
            let cfg = RagConfig {
                top_k: 3,
                mmr: mmr_on,
                ..Default::default()
            };
            let rag = RagPipeline::new(svc.clone(), &cfg).unwrap();
            let msgs = vec![ChatMessage {
                role: "user".into(),
                content: "How do vaccines train the immune system?".into(),
            }];
            let p = rag.prepare(&msgs, &Filter::tenant("acme")).await.unwrap();
            assert_eq!(p.citations.len(), 3);
            assert_eq!(p.messages.len(), 2);
            assert_eq!(p.messages[0].role, "system");
            for c in &p.citations {
                let line = format!("[{}] ({}) {}", c.index, c.source, c.text);
                assert!(p.messages[0].content.contains(&line), "missing {line}");
            }
            assert!(p.citations[0].source.contains("health"), "{:?}", p.citations[0]);
            let cited = parse_citations("Vaccines expose the body to antigens [1].", &p.citations);
            assert_eq!(cited[0].chunk_id, p.citations[0].chunk_id);
        }
        let rag = RagPipeline::new(svc.clone(), &RagConfig::default()).unwrap();
        let e = rag.prepare(&[], &Filter::tenant("acme")).await.unwrap_err();
        assert!(matches!(e, RetrievalError::InvalidArgument { ref field, .. } if field == "messages"));
        let bad = RagConfig {
            template: tmp.path().join("missing.j2"),
            ..Default::default()
        };
        assert!(matches!(RagPipeline::new(svc, &bad),
            Err(RetrievalError::InvalidArgument { field, .. }) if field == "rag.template"));
    }
}
