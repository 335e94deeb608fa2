//! Writes tools and past calls into chat messages, in the Hermes/Qwen format the grammar
//! constrains the model to ([`super::grammar`]): the model reads its own earlier calls exactly
//! as it would have written them.
//!
//! JSON in the prompt uses Python's `json.dumps` separators (`", "`, `": "`), the layout the
//! grammar enforces for arguments. Tool results become one user turn of `<tool_response>`
//! blocks (consecutive `tool` messages merged, as Qwen's template does): every chat template
//! knows the user role, and a tool's output has a user's trust, so the safety chain scans it as
//! such.
//!
//! Tested below: exact rendered text for the system prompt, calls and results; history errors
//! name the field.

use std::collections::HashSet;

use genai_models::chat_template::ChatMessage;
use serde::Serialize;
use serde_json::Value;

use super::{ToolCall, ToolPaths, ToolSet};
use crate::error::ApiError;

/// Opens a call in the model's output.
pub(crate) const CALL_OPEN: &str = "<tool_call>";
pub(crate) const CALL_CLOSE: &str = "</tool_call>";

/// A chat message as the doors decode it, before tool calls and results become text.
#[derive(Debug, Clone, Default)]
pub(crate) struct HistoryMessage {
    pub(crate) role: String,
    pub(crate) content: String,
    /// Assistant messages: the calls it made.
    pub(crate) tool_calls: Vec<ToolCall>,
    /// Tool messages: the call this answers.
    pub(crate) tool_call_id: Option<String>,
}

/// JSON with `json.dumps`' separators.
pub(crate) fn dumps(v: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    // Serializing a Value into memory cannot fail.
    let _ = v.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

/// One call as the model writes it (and as the grammar constrains it).
pub(crate) fn call_text(name: &str, arguments: &Value) -> String {
    format!(
        "{CALL_OPEN}\n{{\"name\": {}, \"arguments\": {}}}\n{CALL_CLOSE}",
        Value::String(name.to_owned()),
        dumps(arguments)
    )
}

impl ToolSet {
    /// The instructions and definitions, appended to the system prompt.
    pub(crate) fn system_prompt(&self) -> String {
        let mut s = String::from("# Tools\n\n");
        s.push_str(match (self.0.forced, self.0.parallel) {
            (false, true) => "You may call one or more functions to assist with the user query.",
            (false, false) => "You may call one function to assist with the user query.",
            (true, true) => "You must call one or more functions to assist with the user query.",
            (true, false) => "You must call one function to assist with the user query.",
        });
        s.push_str("\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n");
        for (i, t) in self.callable() {
            // Written by hand: name and description first, as Qwen's template orders them
            // (serde_json's maps sort their keys).
            s.push_str(&format!(
                "{{\"type\": \"function\", \"function\": {{\"name\": {}, \"description\": {}, \"parameters\": {}}}}}\n",
                Value::String(t.name.clone()),
                Value::String(t.description.clone()),
                dumps(&self.0.schemas[i]),
            ));
        }
        s.push_str(
            "</tools>\n\nFor each function call, return a json object with function name and arguments within \
             <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": \
             <args-json-object>}\n</tool_call>",
        );
        s
    }

    /// Puts the definitions into the prompt: appended to the first system message, or as a new
    /// one in front.
    pub(crate) fn inject(&self, messages: &mut Vec<ChatMessage>) {
        let block = self.system_prompt();
        match messages.first_mut().filter(|m| m.role == "system") {
            Some(sys) if !sys.content.is_empty() => {
                sys.content.push_str("\n\n");
                sys.content.push_str(&block);
            }
            Some(sys) => sys.content = block,
            None => messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: block,
                },
            ),
        }
    }
}

/// Turns a conversation with tool calls and results into plain role + content messages.
/// Every `tool` message must answer a call made earlier in the conversation (its
/// `tool_call_id`); past calls' arguments must be JSON.
pub(crate) fn render_history(messages: Vec<HistoryMessage>, paths: ToolPaths) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut call_ids: HashSet<String> = HashSet::new();
    // Whether the last message out is a user turn of tool responses (the next one joins it).
    let mut in_responses = false;
    for (i, m) in messages.into_iter().enumerate() {
        if m.role == "tool" {
            let field = format!("messages[{i}].tool_call_id");
            let id = m
                .tool_call_id
                .ok_or_else(|| ApiError::invalid(&field, "a tool message needs the id of the call it answers"))?;
            if !call_ids.contains(&id) {
                return Err(ApiError::invalid(
                    field,
                    format!("{id:?} answers no tool call of an earlier assistant message"),
                ));
            }
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match out.last_mut() {
                Some(last) if in_responses => {
                    last.content.push('\n');
                    last.content.push_str(&block);
                }
                _ => out.push(ChatMessage {
                    role: "user".into(),
                    content: block,
                }),
            }
            in_responses = true;
            continue;
        }
        in_responses = false;
        if !m.tool_calls.is_empty() && m.role != "assistant" {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls"),
                format!("only assistant messages carry tool calls, not {:?}", m.role),
            ));
        }
        let mut content = m.content;
        for (j, c) in m.tool_calls.into_iter().enumerate() {
            let at = |leaf: &str| format!("messages[{i}].tool_calls[{j}].{leaf}");
            super::check_name(&c.name).map_err(|e| ApiError::invalid(at(paths.call_name), e))?;
            let args: Value = serde_json::from_str(&c.arguments)
                .map_err(|e| ApiError::invalid(at(paths.call_arguments), format!("must be a JSON object: {e}")))?;
            if !args.is_object() {
                return Err(ApiError::invalid(
                    at(paths.call_arguments),
                    format!("must be a JSON object, got {}", super::json_kind(&args)),
                ));
            }
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&call_text(&c.name, &args));
            call_ids.insert(c.id);
        }
        out.push(ChatMessage { role: m.role, content });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::tests::set;
    use super::super::ToolChoice;
    use super::*;
    use serde_json::json;

    fn msg(role: &str, content: &str) -> HistoryMessage {
        HistoryMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    #[test]
    fn dumps_uses_python_separators() {
        assert_eq!(
            dumps(&json!({"a": [1, 2], "b": {"c": "x"}})),
            r#"{"a": [1, 2], "b": {"c": "x"}}"#
        );
        assert_eq!(dumps(&json!({})), "{}");
    }

    #[test]
    fn definitions_go_into_the_system_prompt() {
        let s = set(ToolChoice::Auto, true);
        let mut msgs = vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        s.inject(&mut msgs);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].role, "system");
        let p = &msgs[0].content;
        assert!(p.starts_with("# Tools\n\nYou may call one or more functions"), "{p}");
        assert!(p.contains(
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Current weather in a city.\", \"parameters\": {\"additionalProperties\": false, \"properties\": {\"city\""
        ), "{p}");
        // A tool without parameters gets the empty object schema.
        assert!(p.contains("{\"name\": \"now\", \"description\": \"The current time.\", \"parameters\": {\"properties\": {}, \"type\": \"object\"}}}\n</tools>"), "{p}");
        assert!(
            p.ends_with("<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
        );
        // An existing system prompt keeps its text, the tools follow it.
        let mut msgs = vec![ChatMessage {
            role: "system".into(),
            content: "Be terse.".into(),
        }];
        s.inject(&mut msgs);
        assert!(msgs[0].content.starts_with("Be terse.\n\n# Tools\n"));
        // A named choice lists only that tool, and says a call is due.
        let named = set(ToolChoice::Named("now".into()), false);
        let p = named.system_prompt();
        assert!(p.contains("You must call one function"), "{p}");
        assert!(!p.contains("get_weather"), "{p}");
    }

    #[test]
    fn calls_and_results_render_as_the_model_writes_them() {
        let mut a = msg("assistant", "");
        a.tool_calls = vec![
            ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            ToolCall {
                id: "call_2".into(),
                name: "now".into(),
                arguments: "{}".into(),
            },
        ];
        let mut t1 = msg("tool", "18C");
        t1.tool_call_id = Some("call_1".into());
        let mut t2 = msg("tool", "12:00");
        t2.tool_call_id = Some("call_2".into());
        let out = render_history(
            vec![msg("user", "weather?"), a, t1, t2, msg("assistant", "18C at noon.")],
            ToolPaths::OPENAI,
        )
        .unwrap();
        let got: Vec<(&str, &str)> = out.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("user", "weather?"),
                (
                    "assistant",
                    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                     <tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"
                ),
                (
                    "user",
                    "<tool_response>\n18C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
                ),
                ("assistant", "18C at noon."),
            ]
        );
    }

    #[test]
    fn history_errors_name_the_field() {
        let invalid = |msgs: Vec<HistoryMessage>| match render_history(msgs, ToolPaths::OPENAI).unwrap_err() {
            ApiError::Invalid { param, .. } => param,
            e => panic!("{e:?}"),
        };
        let mut orphan = msg("tool", "x");
        orphan.tool_call_id = Some("call_9".into());
        assert_eq!(invalid(vec![msg("user", "q"), orphan]), "messages[1].tool_call_id");
        assert_eq!(invalid(vec![msg("tool", "x")]), "messages[0].tool_call_id");
        let mut bad = msg("assistant", "");
        bad.tool_calls = vec![ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: "{not json".into(),
        }];
        assert_eq!(
            invalid(vec![bad.clone()]),
            "messages[0].tool_calls[0].function.arguments"
        );
        bad.tool_calls[0].arguments = "[1]".into();
        assert_eq!(
            invalid(vec![bad.clone()]),
            "messages[0].tool_calls[0].function.arguments"
        );
        bad.role = "user".into();
        assert_eq!(invalid(vec![bad]), "messages[0].tool_calls");
    }
}
