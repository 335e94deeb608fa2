//! The llguidance Lark grammar of a request's tool calls (see the parent module for why `auto`
//! is one grammar with a lazy trigger lexeme rather than a trigger outside it).
//!
//! Shape, with `call` the exact text [`super::prompt::call_text`] writes:
//!
//! ```text
//! auto:      start: TEXT | pre body more        (pre = any text, then "<tool_call>")
//! forced:    start: "<tool_call>" body more     (required, or a named function)
//! body:      "\n" (fn_0 | fn_1 | …) "\n</tool_call>"
//! more:      ("\n<tool_call>" body)*            (left out when parallel_tool_calls = false)
//! fn_i:      "{\"name\": \"NAME\", \"arguments\": " args_i "}"
//! args_i:    %json { the tool's schema + x-guidance layout }
//! ```
//!
//! Each schema gets a top-level `x-guidance` with compact-but-spaced separators (`", "`,
//! `": "`) and no free whitespace: a small model given free whitespace may loop on newlines
//! forever. A non-`strict` tool is compiled `lenient` (unsupported keywords ignored, the rest
//! still enforced); a `strict` one must compile exactly, or the request is refused.
//!
//! Tested below on the generated text; the grammar's behaviour through the engine in
//! `tests/e2e/tools.rs`.

use serde_json::Value;

use super::prompt::{CALL_CLOSE, CALL_OPEN};
use super::ToolSet;

impl ToolSet {
    /// The Lark grammar constraining the whole answer.
    pub(crate) fn lark(&self) -> String {
        let mut g = String::from("%llguidance {}\n");
        let fns: Vec<String> = self.callable().map(|(i, _)| format!("fn_{i}")).collect();
        let calls = if self.0.parallel { "body more" } else { "body" };
        if self.0.forced {
            g.push_str(&format!("start: {} {calls}\n", lit(CALL_OPEN)));
        } else {
            // Free text may not contain the trigger: once it is written, a call must follow.
            g.push_str(&format!("start: TEXT | pre {calls}\n"));
            g.push_str(&format!(
                "TEXT: /(?s:.*)/ & ~/(?s:.*){}(?s:.*)/\n",
                regex_escape(CALL_OPEN)
            ));
            g.push_str(&format!("pre[lazy]: TEXT {}\n", lit(CALL_OPEN)));
        }
        g.push_str(&format!("body: \"\\n\" ({}) {}\n", fns.join(" | "), lit(&format!("\n{CALL_CLOSE}"))));
        if self.0.parallel {
            g.push_str(&format!("more: ({} body)*\n", lit(&format!("\n{CALL_OPEN}"))));
        }
        for (i, t) in self.callable() {
            let head = format!("{{\"name\": \"{}\", \"arguments\": ", t.name);
            g.push_str(&format!("fn_{i}: {} args_{i} \"}}\"\n", lit(&head)));
            g.push_str(&format!("args_{i}: %json {}\n", self.guided_schema(i)));
        }
        g
    }

    /// Tool `i`'s schema with the layout options llguidance reads from `x-guidance`.
    fn guided_schema(&self, i: usize) -> String {
        let mut schema = self.0.schemas[i].clone();
        if let Value::Object(o) = &mut schema {
            o.insert(
                "x-guidance".into(),
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                    "lenient": !self.0.tools[i].strict,
                }),
            );
        }
        schema.to_string()
    }
}

/// A Lark string literal.
fn lit(s: &str) -> String {
    // JSON string escaping is valid Lark (Python-style) string escaping for these characters.
    Value::String(s.to_owned()).to_string()
}

/// Escapes regex metacharacters (the trigger is plain text inside a `/…/` regex).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::set;
    use super::super::ToolChoice;

    #[test]
    fn auto_allows_text_or_calls_after_the_trigger() {
        let g = set(ToolChoice::Auto, true).lark();
        let expected = "%llguidance {}\n\
            start: TEXT | pre body more\n\
            TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n\
            pre[lazy]: TEXT \"<tool_call>\"\n\
            body: \"\\n\" (fn_0 | fn_1) \"\\n</tool_call>\"\n\
            more: (\"\\n<tool_call>\" body)*\n\
            fn_0: \"{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_0 \"}\"\n";
        assert!(g.starts_with(expected), "{g}");
        assert!(g.contains(
            "args_0: %json {\"additionalProperties\":false,\"properties\":{\"city\":{\"type\":\"string\"},\"unit\":{\"enum\":[\"c\",\"f\"]}},\"required\":[\"city\"],\"type\":\"object\",\"x-guidance\":{\"item_separator\":\", \",\"key_separator\":\": \",\"lenient\":false,\"whitespace_flexible\":false}}\n"
        ), "{g}");
        // The parameterless tool: an empty object schema, lenient (not strict).
        assert!(g.contains("fn_1: \"{\\\"name\\\": \\\"now\\\", \\\"arguments\\\": \" args_1 \"}\"\n"), "{g}");
        assert!(g.contains("args_1: %json {\"properties\":{},\"type\":\"object\",\"x-guidance\":{\"item_separator\":\", \",\"key_separator\":\": \",\"lenient\":true,\"whitespace_flexible\":false}}\n"), "{g}");
    }

    #[test]
    fn forced_and_single_call_shapes() {
        let g = set(ToolChoice::Required, false).lark();
        assert!(g.contains("start: \"<tool_call>\" body\n"), "{g}");
        assert!(!g.contains("TEXT"), "{g}");
        assert!(!g.contains("more"), "{g}");
        assert!(g.contains("(fn_0 | fn_1)"), "{g}");
        let named = set(ToolChoice::Named("now".into()), true).lark();
        assert!(named.contains("body: \"\\n\" (fn_1) \"\\n</tool_call>\"\n"), "{named}");
        assert!(!named.contains("fn_0"), "{named}");
        assert!(!named.contains("get_weather"), "{named}");
    }
}
