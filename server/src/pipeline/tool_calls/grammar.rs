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
//! Each schema gets the server's JSON options (`genai_grammar::json_schema_options`: no free
//! whitespace, since a small model given free whitespace may loop on newlines; a non-`strict`
//! tool compiled lenient, unsupported keywords ignored and the rest enforced; a `strict` one
//! exactly, or the request is refused), with `json.dumps`' separators (`", "`, `": "`) as in
//! the prompt's examples.
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
        g.push_str(&format!(
            "body: \"\\n\" ({}) {}\n",
            fns.join(" | "),
            lit(&format!("\n{CALL_CLOSE}"))
        ));
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

    /// Tool `i`'s schema with the compile options llguidance reads from its `x-guidance` key:
    /// the server's (`genai_grammar::json_schema_options`: no free whitespace, `strict` exact,
    /// otherwise lenient), with `json.dumps`' separators, the layout of the prompt's examples.
    fn guided_schema(&self, i: usize) -> String {
        let schema = &self.0.schemas[i];
        // Only fails for a non-object, which `ToolSet::new` refused.
        let mut guided = genai_grammar::json_schema_options(schema.clone(), self.0.tools[i].strict)
            .unwrap_or_else(|_| schema.clone());
        if let Some(opts) = guided.get_mut("x-guidance").and_then(Value::as_object_mut) {
            opts.insert("item_separator".into(), ", ".into());
            opts.insert("key_separator".into(), ": ".into());
        }
        guided.to_string()
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
        let args = |i: usize| -> serde_json::Value {
            let line = g.lines().find(|l| l.starts_with(&format!("args_{i}: %json "))).unwrap();
            serde_json::from_str(line.split_once("%json ").unwrap().1).unwrap()
        };
        let a0 = args(0);
        assert_eq!(a0["properties"]["city"]["type"], "string");
        assert_eq!(a0["x-guidance"]["item_separator"], ", ");
        assert_eq!(a0["x-guidance"]["key_separator"], ": ");
        assert_eq!(a0["x-guidance"]["whitespace_flexible"], false);
        assert_eq!(a0["x-guidance"]["lenient"], false, "get_weather is strict");
        // The parameterless tool: an empty object schema, lenient (not strict).
        assert!(
            g.contains("fn_1: \"{\\\"name\\\": \\\"now\\\", \\\"arguments\\\": \" args_1 \"}\"\n"),
            "{g}"
        );
        let a1 = args(1);
        assert_eq!(a1["properties"], serde_json::json!({}));
        assert_eq!(a1["x-guidance"]["lenient"], true);
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
