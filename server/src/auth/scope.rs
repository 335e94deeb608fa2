//! Scopes and the route table: what each path of either door needs.
//!
//! One table for both doors (an HTTP path or a gRPC `/package.Service/Method`), read by the
//! context layer before any handler runs, so no handler can forget a check. A path the table
//! does not name needs `admin`: a route added later stays closed until someone decides its
//! scope here.
//!
//! Tested below: every route of both doors, admin implying all, parsing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Generation, embeddings, tokenization, model list, knowledge search (and RAG), the assistant.
    #[serde(rename = "infer")]
    Infer,
    /// Knowledge ingest, upsert and delete.
    #[serde(rename = "knowledge:write")]
    KnowledgeWrite,
    /// `/metrics` and knowledge stats (counts over all tenants).
    #[serde(rename = "metrics")]
    Metrics,
    /// Everything, and acting for another tenant (`x-tenant-id`, knowledge `tenant` fields).
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub(crate) const ALL: [Scope; 4] = [Scope::Infer, Scope::KnowledgeWrite, Scope::Metrics, Scope::Admin];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::KnowledgeWrite => "knowledge:write",
            Scope::Metrics => "metrics",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown scope {s:?} (expected one of {})", names.join(", "))
        })
    }
}

/// A set of scopes, as the request path checks it (a copyable bit set: no allocation per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Scopes(u8);

impl Scopes {
    pub(crate) fn of(scopes: &[Scope]) -> Self {
        Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit()))
    }

    /// True when a key with these scopes may do what `needed` guards: `admin` implies every scope.
    pub(crate) fn allows(self, needed: Scope) -> bool {
        self.0 & (needed.bit() | Scope::Admin.bit()) != 0
    }
}

/// What a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Served without a key even when authentication is on: probes and gRPC discovery.
    Open,
    Needs(Scope),
}

/// The access rule of a request path (HTTP path, or gRPC `/package.Service/Method`).
pub(crate) fn access(path: &str) -> Access {
    const OPEN_GRPC: [&str; 3] = [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    match path {
        // Kubernetes probes must not need a secret.
        "/live" | "/health" | "/ready" => Access::Open,
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models" | "/v1/feedback" => {
            Access::Needs(Scope::Infer)
        }
        "/v1/knowledge/search" | "/genai.v1.Knowledge/Search" => Access::Needs(Scope::Infer),
        "/v1/assistant/ask" | "/genai.v1.Assistant/Ask" => Access::Needs(Scope::Infer),
        "/v1/knowledge/documents"
        | "/genai.v1.Knowledge/Ingest"
        | "/genai.v1.Knowledge/IngestStream"
        | "/genai.v1.Knowledge/Delete" => Access::Needs(Scope::KnowledgeWrite),
        "/metrics" | "/v1/knowledge/stats" | "/genai.v1.Knowledge/Stats" => Access::Needs(Scope::Metrics),
        // DELETE /v1/knowledge/documents/{id}: one segment after the collection.
        p if p
            .strip_prefix("/v1/knowledge/documents/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')) =>
        {
            Access::Needs(Scope::KnowledgeWrite)
        }
        p if p.strip_prefix("/genai.v1.Inference/").is_some_and(is_method) => Access::Needs(Scope::Infer),
        p if OPEN_GRPC.iter().any(|s| p.strip_prefix(s).is_some_and(is_method)) => Access::Open,
        _ => Access::Needs(Scope::Admin),
    }
}

/// A gRPC method name: one non-empty segment.
fn is_method(m: &str) -> bool {
    !m.is_empty() && !m.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_both_doors_has_its_scope() {
        use Access::*;
        use Scope::*;
        for (path, want) in [
            ("/live", Open),
            ("/health", Open),
            ("/ready", Open),
            ("/grpc.health.v1.Health/Check", Open),
            ("/grpc.health.v1.Health/Watch", Open),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Open),
            ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Open),
            ("/v1/chat/completions", Needs(Infer)),
            ("/v1/completions", Needs(Infer)),
            ("/v1/embeddings", Needs(Infer)),
            ("/v1/models", Needs(Infer)),
            ("/v1/feedback", Needs(Infer)),
            ("/v1/knowledge/search", Needs(Infer)),
            ("/genai.v1.Inference/Chat", Needs(Infer)),
            ("/genai.v1.Inference/Generate", Needs(Infer)),
            ("/genai.v1.Inference/Embed", Needs(Infer)),
            ("/genai.v1.Inference/Tokenize", Needs(Infer)),
            ("/genai.v1.Knowledge/Search", Needs(Infer)),
            ("/v1/assistant/ask", Needs(Infer)),
            ("/genai.v1.Assistant/Ask", Needs(Infer)),
            ("/genai.v1.Assistant/Other", Needs(Admin)),
            ("/v1/knowledge/documents", Needs(KnowledgeWrite)),
            ("/v1/knowledge/documents/doc-1", Needs(KnowledgeWrite)),
            ("/genai.v1.Knowledge/Ingest", Needs(KnowledgeWrite)),
            ("/genai.v1.Knowledge/IngestStream", Needs(KnowledgeWrite)),
            ("/genai.v1.Knowledge/Delete", Needs(KnowledgeWrite)),
            ("/metrics", Needs(Metrics)),
            ("/v1/knowledge/stats", Needs(Metrics)),
            ("/genai.v1.Knowledge/Stats", Needs(Metrics)),
            // Not in the table: closed to all but admin.
            ("/", Needs(Admin)),
            ("/v1/unknown", Needs(Admin)),
            ("/health/", Needs(Admin)),
            ("/grpc.health.v1.Health/", Needs(Admin)),
            ("/grpc.health.v1.Health/Check/x", Needs(Admin)),
            ("/v1/knowledge/documents/a/b", Needs(Admin)),
            ("/genai.v1.Other/Chat", Needs(Admin)),
        ] {
            assert_eq!(access(path), want, "{path}");
        }
    }

    #[test]
    fn admin_implies_every_scope_and_nothing_else_does() {
        let admin = Scopes::of(&[Scope::Admin]);
        assert!(Scope::ALL.iter().all(|s| admin.allows(*s)));
        let infer = Scopes::of(&[Scope::Infer]);
        assert!(infer.allows(Scope::Infer));
        assert!(!infer.allows(Scope::KnowledgeWrite));
        assert!(!infer.allows(Scope::Metrics));
        assert!(!infer.allows(Scope::Admin));
        let two = Scopes::of(&[Scope::Metrics, Scope::KnowledgeWrite]);
        assert!(two.allows(Scope::Metrics) && two.allows(Scope::KnowledgeWrite) && !two.allows(Scope::Infer));
        assert!(!Scopes::default().allows(Scope::Infer));
    }

    #[test]
    fn scopes_parse_by_name_and_unknown_ones_are_named() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        let e = "write".parse::<Scope>().unwrap_err();
        assert!(e.contains("\"write\"") && e.contains("knowledge:write"), "{e}");
        assert!("Infer".parse::<Scope>().is_err());
    }
}
