//! The agent's tools: the [`Tool`] trait and the built-in tools `knowledge_search`,
//! `calculator`, `current_time` and `http_get` (names are part of the public interface).
//!
//! A tool declares its name, a description and a JSON schema of its arguments (what the model
//! sees, and what constrains its tool-call decoding), and runs asynchronously with a timeout
//! the agent enforces ([`Tool::timeout`]); dropping the future cancels it. Arguments arrive as
//! a JSON value the tool decodes itself ([`parse_args`]): a wrong type or unknown field is a
//! [`ToolError::InvalidArguments`] naming the field, which the agent feeds back to the model.
//!
//! Invariants: a tool never sees another tenant's data (the context carries the caller's
//! tenant); a tool's output is plain text the agent screens for injection before the model
//! reads it; no tool panics on any input.
//!
//! Tested: each tool's own tests (calculator edge cases, http_get against a real local HTTP
//! server, knowledge_search tenant isolation on the real embedder), the registry below.

pub(crate) mod calculator;
pub(crate) mod clock;
pub(crate) mod http_get;
pub(crate) mod knowledge;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AgentConfig;
use crate::error::ApiError;

/// What a tool may know about the request it works for.
#[derive(Debug, Clone, Default)]
pub(crate) struct ToolContext {
    /// The caller's tenant ("" = default): the only knowledge a tool may read.
    pub tenant: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ToolError {
    /// The arguments do not fit the tool's schema; the model gets the message and may retry.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The tool refused (a host not on the allow-list, ...).
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
}

#[async_trait]
pub(crate) trait Tool: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// JSON schema of the arguments object.
    fn parameters(&self) -> Value;
    /// How long one call may take; the agent cancels it after that.
    fn timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
    async fn run(&self, args: Value, ctx: &ToolContext) -> Result<String, ToolError>;
}

/// Decodes a tool's arguments; an error names the offending field.
pub(crate) fn parse_args<T: DeserializeOwned>(args: Value) -> Result<T, ToolError> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        ToolError::InvalidArguments(if path == "." { msg } else { format!("{path}: {msg}") })
    })
}

/// The built-in tool names, in the order they are offered.
pub(crate) const BUILTIN: [&str; 4] = ["knowledge_search", "calculator", "current_time", "http_get"];

/// The built-in tools.
pub(crate) fn builtin(
    cfg: &AgentConfig,
    knowledge: Arc<genai_retrieval::knowledge::KnowledgeService>,
    rag: &crate::config::RagConfig,
) -> anyhow::Result<Vec<Arc<dyn Tool>>> {
    Ok(vec![
        Arc::new(knowledge::KnowledgeSearch::new(knowledge, rag)),
        Arc::new(calculator::Calculator),
        Arc::new(clock::CurrentTime),
        Arc::new(http_get::HttpGet::new(cfg)?),
    ])
}

/// The tools a request enables: all of them for an empty list, else those it names (an unknown
/// name is a 400 on `tools[i]`).
pub(crate) fn select(all: &[Arc<dyn Tool>], names: &[String]) -> Result<Vec<Arc<dyn Tool>>, ApiError> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    let mut out: Vec<Arc<dyn Tool>> = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let t = all.iter().find(|t| t.name() == n).ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}]"),
                format!("unknown tool {n:?}; the built-in tools are {}", BUILTIN.join(", ")),
            )
        })?;
        if !out.iter().any(|o| o.name() == t.name()) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_name_names_the_bad_entry() {
        let all: Vec<Arc<dyn Tool>> = vec![Arc::new(calculator::Calculator), Arc::new(clock::CurrentTime)];
        assert_eq!(select(&all, &[]).unwrap().len(), 2);
        let one = select(&all, &["current_time".into(), "current_time".into()]).unwrap();
        assert_eq!(one.iter().map(|t| t.name()).collect::<Vec<_>>(), ["current_time"]);
        let e = select(&all, &["calculator".into(), "shell".into()]).err().unwrap();
        assert!(
            matches!(&e, ApiError::Invalid { param, message } if param == "tools[1]" && message.contains("\"shell\""))
        );
    }

    #[tokio::test]
    async fn arguments_are_checked_against_the_tool_types() {
        let ctx = ToolContext::default();
        let calc = calculator::Calculator;
        let e = calc.run(serde_json::json!({"expr": "1"}), &ctx).await.unwrap_err();
        assert!(
            matches!(&e, ToolError::InvalidArguments(m) if m.contains("expr")),
            "{e}"
        );
        let e = calc.run(serde_json::json!({"expression": 5}), &ctx).await.unwrap_err();
        assert!(
            matches!(&e, ToolError::InvalidArguments(m) if m.starts_with("expression")),
            "{e}"
        );
        assert_eq!(
            calc.run(serde_json::json!({"expression": "6*7"}), &ctx).await.unwrap(),
            "42"
        );
    }
}
