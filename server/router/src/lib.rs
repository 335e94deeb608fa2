//! Which pipeline answers an assistant request: plain chat, RAG over the caller's documents, or
//! the tool-using agent.
//!
//! Owns the decision only — no I/O, no async; the server embeds the query for it (as it does for
//! `genai-safety`'s injection classifier). Two stages:
//! 1. [`rules::apply`]: cheap, explicit patterns (arithmetic, "calculate", the current time or
//!    date, a URL, a unit conversion → agent; "according to our handbook / the knowledge base" →
//!    RAG; a bare greeting → chat). A rule decides with confidence 1 and names itself.
//! 2. [`classifier::Classifier`]: nearest exemplars (k-NN, similarity-weighted votes) over the
//!    MiniLM embeddings of the labelled train split of [`dataset`] (`data/router/queries.jsonl`,
//!    compiled in). Its confidence is the winner's share of the votes; its reason names the
//!    vote and the nearest exemplar.
//!
//! Invariants: a tenant without documents is never routed to RAG (neither by a rule nor by the
//! classifier, whose RAG exemplars are then ignored); every [`Decision`] says which stage made
//! it and why; the train/test split of the labelled set is a pure function of each query's text
//! (FNV-1a), so it never changes between runs, machines or Rust versions.
//!
//! Tested: unit tests of the rules, the classifier (a tiny hand-made exemplar set) and the
//! dataset (parse errors, split stability); `tests/shipped.rs` embeds the shipped set with the
//! real MiniLM and checks the train split classifies the held-out split above a floor. Accuracy
//! per class and latency: `cargo bench -p genai-benches --bench router_eval`.

pub mod classifier;
pub mod dataset;
pub mod rules;

use serde::{Deserialize, Serialize};

pub use classifier::Classifier;

/// A pipeline a request can be routed to. (`auto` is not a mode: it is the request for a
/// decision, handled by the caller.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The model answers from its own knowledge: small talk, writing, general knowledge.
    Chat,
    /// Retrieve from the caller's tenant and answer with numbered sources.
    Rag,
    /// The ReAct agent with tools (calculator, current time, HTTP GET, knowledge search).
    Agent,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Chat, Mode::Rag, Mode::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Chat => "chat",
            Mode::Rag => "rag",
            Mode::Agent => "agent",
        }
    }

    /// `"chat"`, `"rag"` or `"agent"`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which stage made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Rule,
    Classifier,
    /// Neither could decide (the classifier was not available): chat, the mode that needs
    /// nothing but the model.
    Fallback,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::Rule => "rule",
            By::Classifier => "classifier",
            By::Fallback => "fallback",
        }
    }
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub mode: Mode,
    /// 1 for a rule; the winner's share of the votes for the classifier, in (0, 1].
    pub confidence: f32,
    /// Human-readable: the rule, or the vote and the nearest exemplar.
    pub reason: String,
    pub by: By,
}

impl Decision {
    /// Chat, because nothing better could be decided (`why` says what was missing).
    pub fn fallback(why: impl Into<String>) -> Self {
        Decision {
            mode: Mode::Chat,
            confidence: 0.0,
            reason: why.into(),
            by: By::Fallback,
        }
    }
}

/// What the router knows about the caller besides the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The tenant has at least one document in the knowledge base (RAG is possible).
    pub has_documents: bool,
}

impl Context {
    fn allows(self, mode: Mode) -> bool {
        mode != Mode::Rag || self.has_documents
    }
}
