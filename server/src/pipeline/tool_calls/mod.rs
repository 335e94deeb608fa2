//! OpenAI tool calling, protocol-neutral: the tool set a request declares, how tools and past
//! calls are written into the prompt, the grammar that constrains a call, and the streaming
//! parser that turns the model's text back into content and tool-call events. Both doors
//! (`/v1/chat/completions`, gRPC `Chat`) and the ReAct agent use these, so a call looks the same
//! whichever way it was asked for.
//!
//! The format is Hermes/Qwen's, written into the system prompt (SmolLM2's template knows no
//! tools): definitions inside `<tools>…</tools>`, each call as
//! `<tool_call>\n{"name": "…", "arguments": {…}}\n</tool_call>`, results back as a user turn of
//! `<tool_response>…</tool_response>` blocks ([`prompt`]).
//!
//! Constrained decoding ([`grammar`]): the call is generated under an llguidance Lark grammar in
//! which each tool's arguments are its own `%json` schema, so arguments are valid JSON that fits
//! the schema whatever the model (also under `auto`). `required` and a named function force a
//! call from the first token; `parallel_tool_calls = false` admits exactly one call; `none`
//! puts no tool in effect (no definitions in the prompt, no grammar, no parser). For `auto` the
//! grammar is one Lark grammar, "free text OR text up to `<tool_call>`, then calls", with a lazy
//! lexeme for the text before the trigger (llguidance's documented pattern for text-triggered
//! tool calls). We chose that over a trigger outside the grammar (unconstrained until the text
//! shows `<tool_call>`, then a matcher fed with that prefix) because the trigger rarely falls on
//! a token boundary: a token such as `>{"` would have to be split between "free" and
//! "constrained", which the engine's per-token masks cannot express; inside one grammar the
//! lexer handles it. The free-text lexeme excludes `<tool_call>` (llguidance's `&`/`~`
//! operators), so once the trigger is written the call must follow.
//!
//! Invariants: tool names are unique and valid (`^[A-Za-z0-9_-]{1,64}$`, so they need no
//! escaping in the prompt or the grammar); every declared schema compiles (jsonschema); a call's
//! events are, per index, one `CallStart` (id, name) then argument fragments in order; the
//! arguments of a finished call are checked against the tool's schema once more
//! ([`ToolSet::check_arguments`]) — belt and braces after the grammar.
//!
//! Tested: unit tests here and in each submodule (validation, prompt, grammar text, the parser
//! split at every byte); end to end through the binary with SmolLM2 and the official openai
//! client in `tests/e2e/tools.rs`.

pub(crate) mod grammar;
mod parser;
mod prompt;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiError;

pub(crate) use parser::{ToolCallParser, ToolEvent};
pub(crate) use prompt::{render_history, HistoryMessage};

/// OpenAI's limit on the number of tools in one request.
const MAX_TOOLS: usize = 128;
/// OpenAI's limit on a function name's length.
const MAX_NAME_LEN: usize = 64;

/// One function the model may call, as the request declares it.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub(crate) name: String,
    pub(crate) description: String,
    /// A JSON schema for the arguments object (OpenAI: `parameters`; absent = no arguments).
    pub(crate) parameters: Option<Value>,
    /// OpenAI's `strict`: the schema must be enforced exactly; an unsupported keyword is an
    /// error instead of being ignored.
    pub(crate) strict: bool,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// The model decides: text, or one or more calls.
    Auto,
    /// No call: the tools are not in effect.
    None,
    /// At least one call, from the first token.
    Required,
    /// Exactly this function is called.
    Named(String),
}

/// A finished call (also a past call in the history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    /// `call_` + 24 random hex digits (ours), or the client's id (history).
    pub(crate) id: String,
    pub(crate) name: String,
    /// A JSON object, as text (OpenAI sends arguments as a string).
    pub(crate) arguments: String,
}

/// How the door names the fields of a tool, for error messages (the two doors nest them
/// differently).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ToolPaths {
    /// Under `tools[i].`.
    pub(crate) name: &'static str,
    pub(crate) parameters: &'static str,
    /// The named function of `tool_choice`.
    pub(crate) choice_name: &'static str,
    /// Under `messages[i].tool_calls[j].`.
    pub(crate) call_name: &'static str,
    pub(crate) call_arguments: &'static str,
}

impl ToolPaths {
    pub(crate) const OPENAI: ToolPaths = ToolPaths {
        name: "function.name",
        parameters: "function.parameters",
        choice_name: "tool_choice.function.name",
        call_name: "function.name",
        call_arguments: "function.arguments",
    };
    pub(crate) const GRPC: ToolPaths = ToolPaths {
        name: "name",
        parameters: "parameters_json",
        choice_name: "tool_choice.name",
        call_name: "name",
        call_arguments: "arguments",
    };
}

/// The tools in effect for one request: validated, schemas compiled. Cheap to clone.
#[derive(Clone)]
pub(crate) struct ToolSet(Arc<Inner>);

struct Inner {
    tools: Vec<Tool>,
    /// The arguments schema of each tool (an empty object schema when none was given).
    schemas: Vec<Value>,
    validators: Vec<jsonschema::Validator>,
    /// The only callable tool (a named `tool_choice`), or None: any of them.
    only: Option<usize>,
    /// A call is forced (`required` or named).
    forced: bool,
    parallel: bool,
}

impl std::fmt::Debug for ToolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.tools.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("ToolSet")
            .field("tools", &names)
            .field("forced", &self.0.forced)
            .field("parallel", &self.0.parallel)
            .finish()
    }
}

impl ToolSet {
    /// Validates a request's tools; `None` when no tool is in effect (no tools, or
    /// `tool_choice: "none"`). Errors name the offending field.
    pub(crate) fn new(
        tools: Vec<Tool>,
        choice: ToolChoice,
        parallel: bool,
        paths: ToolPaths,
    ) -> Result<Option<ToolSet>, ApiError> {
        if tools.len() > MAX_TOOLS {
            return Err(ApiError::invalid(
                "tools",
                format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
            ));
        }
        let mut seen = HashSet::new();
        let mut schemas = Vec::with_capacity(tools.len());
        let mut validators = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            check_name(&t.name).map_err(|m| ApiError::invalid(format!("tools[{i}].{}", paths.name), m))?;
            if !seen.insert(t.name.as_str()) {
                return Err(ApiError::invalid(
                    format!("tools[{i}].{}", paths.name),
                    format!("duplicate tool name {:?}", t.name),
                ));
            }
            let field = || format!("tools[{i}].{}", paths.parameters);
            let schema = match &t.parameters {
                None => serde_json::json!({"type": "object", "properties": {}}),
                Some(Value::Object(o)) => {
                    // Arguments are a JSON object (OpenAI); a schema that says otherwise cannot be met.
                    match o.get("type") {
                        None => {}
                        Some(Value::String(s)) if s == "object" => {}
                        Some(other) => {
                            return Err(ApiError::invalid(
                                field(),
                                format!("must describe an object (\"type\": \"object\"), got \"type\": {other}"),
                            ))
                        }
                    }
                    Value::Object(o.clone())
                }
                Some(other) => {
                    return Err(ApiError::invalid(
                        field(),
                        format!("must be a JSON schema object, got {}", json_kind(other)),
                    ))
                }
            };
            let v = jsonschema::validator_for(&schema)
                .map_err(|e| ApiError::invalid(field(), format!("not a valid JSON schema: {e}")))?;
            schemas.push(schema);
            validators.push(v);
        }
        let (only, forced) = match &choice {
            ToolChoice::None => return Ok(None),
            ToolChoice::Auto if tools.is_empty() => return Ok(None),
            ToolChoice::Auto => (None, false),
            ToolChoice::Required if tools.is_empty() => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "\"required\" needs at least one tool in `tools`",
                ))
            }
            ToolChoice::Required => (None, true),
            ToolChoice::Named(name) => match tools.iter().position(|t| &t.name == name) {
                Some(i) => (Some(i), true),
                None => {
                    return Err(ApiError::invalid(
                        paths.choice_name,
                        format!("no tool named {name:?} in `tools`"),
                    ))
                }
            },
        };
        Ok(Some(ToolSet(Arc::new(Inner {
            tools,
            schemas,
            validators,
            only,
            forced,
            parallel,
        }))))
    }

    /// The tools the model may call now (all, or the named one).
    fn callable(&self) -> impl Iterator<Item = (usize, &Tool)> {
        self.0
            .tools
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0.only.is_none_or(|o| o == *i))
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.callable().find(|(_, t)| t.name == name).map(|(i, _)| i)
    }

    /// A new streaming parser for one answer.
    pub(crate) fn parser(&self) -> ToolCallParser {
        ToolCallParser::new(self.clone())
    }

    /// Checks a finished call's arguments against its tool's schema.
    pub(crate) fn check_arguments(&self, name: &str, arguments: &str) -> Result<(), String> {
        let i = self.index_of(name).ok_or_else(|| format!("unknown tool {name:?}"))?;
        let v: Value = serde_json::from_str(arguments).map_err(|e| format!("arguments of {name} are not JSON: {e}"))?;
        let first = self.0.validators[i].iter_errors(&v).next().map(|e| e.to_string());
        match first {
            None => Ok(()),
            Some(e) => Err(format!("arguments of {name} do not match its schema: {e}")),
        }
    }
}

/// `^[A-Za-z0-9_-]{1,64}$`, OpenAI's rule for function names.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters, got {}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "may contain only A-Z, a-z, 0-9, '_' and '-', got {c:?} in {name:?}"
        ));
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A fresh call id, as OpenAI shapes them (`call_` + 24 characters).
fn call_id() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &hex[..24])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: "Current weather in a city.".into(),
            parameters: Some(json!({
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
                "additionalProperties": false,
            })),
            strict: true,
        }
    }

    pub(crate) fn clock() -> Tool {
        Tool {
            name: "now".into(),
            description: "The current time.".into(),
            parameters: None,
            strict: false,
        }
    }

    pub(crate) fn set(choice: ToolChoice, parallel: bool) -> ToolSet {
        ToolSet::new(vec![weather(), clock()], choice, parallel, ToolPaths::OPENAI)
            .unwrap()
            .unwrap()
    }

    fn err(tools: Vec<Tool>, choice: ToolChoice) -> (String, String) {
        match ToolSet::new(tools, choice, true, ToolPaths::OPENAI).unwrap_err() {
            ApiError::Invalid { param, message } => (param, message),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut dup = clock();
        dup.name = "get_weather".into();
        assert_eq!(err(vec![weather(), dup], ToolChoice::Auto).0, "tools[1].function.name");
        let mut bad = clock();
        bad.name = "has space".into();
        let (p, m) = err(vec![bad], ToolChoice::Auto);
        assert_eq!(p, "tools[0].function.name");
        assert!(m.contains("' '"), "{m}");
        let mut long = clock();
        long.name = "x".repeat(65);
        assert_eq!(err(vec![long], ToolChoice::Auto).0, "tools[0].function.name");
        let mut schema = clock();
        schema.parameters = Some(json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}}));
        let (p, m) = err(vec![weather(), schema], ToolChoice::Auto);
        assert_eq!(p, "tools[1].function.parameters");
        assert!(m.contains("not a valid JSON schema"), "{m}");
        let mut array = clock();
        array.parameters = Some(json!({"type": "array"}));
        assert_eq!(err(vec![array], ToolChoice::Auto).0, "tools[0].function.parameters");
        let mut not_obj = clock();
        not_obj.parameters = Some(json!("x"));
        assert_eq!(err(vec![not_obj], ToolChoice::Auto).0, "tools[0].function.parameters");
        let (p, m) = err(vec![weather()], ToolChoice::Named("nope".into()));
        assert_eq!(p, "tool_choice.function.name");
        assert!(m.contains("nope"), "{m}");
        assert_eq!(err(vec![], ToolChoice::Required).0, "tool_choice");
        assert_eq!(err(vec![clock(); MAX_TOOLS + 1], ToolChoice::Auto).0, "tools");
    }

    #[test]
    fn none_and_empty_mean_no_tools() {
        let none = ToolSet::new(vec![weather()], ToolChoice::None, true, ToolPaths::OPENAI).unwrap();
        assert!(none.is_none());
        assert!(ToolSet::new(vec![], ToolChoice::Auto, true, ToolPaths::OPENAI)
            .unwrap()
            .is_none());
        // Still validated: `none` does not excuse a bad declaration.
        let mut bad = clock();
        bad.name = String::new();
        assert_eq!(err(vec![bad], ToolChoice::None).0, "tools[0].function.name");
    }

    #[test]
    fn arguments_are_checked_against_the_schema() {
        let s = set(ToolChoice::Auto, true);
        assert!(s.check_arguments("get_weather", r#"{"city": "Paris"}"#).is_ok());
        assert!(s.check_arguments("get_weather", r#"{"city": 3}"#).is_err());
        assert!(s
            .check_arguments("get_weather", r#"{"city": "x", "extra": 1}"#)
            .is_err());
        assert!(s.check_arguments("get_weather", r#"{"city": "#).is_err());
        assert!(s.check_arguments("now", "{}").is_ok());
        assert!(s.check_arguments("nope", "{}").is_err());
        // A named choice: only that tool is callable.
        let named = set(ToolChoice::Named("now".into()), true);
        assert!(named.check_arguments("get_weather", r#"{"city": "Paris"}"#).is_err());
    }

    #[test]
    fn call_ids_look_like_openai_ones() {
        let a = call_id();
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
        assert_ne!(a, call_id());
    }
}
