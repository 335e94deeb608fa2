//! Structured output: what one token's mask costs on the SmolLM2 vocabulary (49,152 tokens), and
//! what compiling a grammar costs.
//!
//! For each grammar, a fresh constraint is compiled (timed: compile + first mask, on the server's
//! blocking pool), then a valid output is fed token by token as the engine does: `allowed()`
//! (timed: the mask the engine computes beside the forward pass) then `commit()`. The first
//! position is excluded from the mask figures (compile computed it). Repeated until each grammar
//! has ≥ 5,000 mask samples; prints p50 / p99 / max per grammar. Target: p99 ≤ 1 ms.
//!
//! Run: `cargo bench -p genai-benches --bench grammar_mask`.

use std::time::{Duration, Instant};

use genai_grammar::{json_schema_options, Grammar, GrammarCompiler, GrammarRequest};
use serde_json::json;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let (tok, end_ids) = genai_models::test_support::smollm2_tokenizer();
    let started = Instant::now();
    let compiler = GrammarCompiler::new(tok.clone(), &end_ids).expect("grammar compiler");
    println!(
        "GrammarCompiler::new (token trie + lexer slices, once per model): {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["engineer", "artist", "doctor", "teacher"]},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"],
                "additionalProperties": false
            },
            "skills": {"type": "array", "items": {"type": "string"}},
            "bio": {"type": "string"}
        },
        "required": ["name", "age", "role", "address", "skills", "bio"],
        "additionalProperties": false
    });
    let person_doc = r#"{"name":"Ada Lovelace","age":36,"role":"engineer","address":{"street":"12 St James's Square","city":"London","zip":"10115"},"skills":["mathematics","poetry","analytical engines"],"bio":"Wrote the first published algorithm intended for a machine, and imagined computers composing music."}"#;
    let args = json!({
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"}},
        "required": ["location", "unit", "days"],
        "additionalProperties": false
    });
    let tool_lark = format!(
        "start: \"<tool_call>\" call \"</tool_call>\"\ncall: \"{{\\\"name\\\":\\\"get_weather\\\",\\\"arguments\\\":\" %json {} \"}}\"\n",
        json_schema_options(args, true).unwrap()
    );
    let cases: Vec<(&str, Grammar, String)> = vec![
        (
            "json_schema (nested, enum, pattern)",
            Grammar::JsonSchema {
                schema: person,
                strict: true,
            },
            person_doc.to_string(),
        ),
        ("json_object", Grammar::JsonObject, person_doc.to_string()),
        (
            "regex (sentence)",
            Grammar::Regex(r"[A-Z][a-z]+(,? [a-z]+)*\.".into()),
            "The quick brown fox jumps over the lazy dog, then runs into the deep and quiet forest before night falls.".into(),
        ),
        (
            "regex (date + email)",
            Grammar::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [a-z0-9._]+@[a-z]+\.(com|org|net)".into()),
            "2026-11-29 ada.lovelace@example.org".into(),
        ),
        (
            "lark tool call with %json",
            Grammar::Lark(tool_lark),
            r#"<tool_call>{"name":"get_weather","arguments":{"location":"Paris, France","unit":"celsius","days":3}}</tool_call>"#.into(),
        ),
    ];

    println!("\n| grammar | tokens/output | mask p50 | mask p99 | mask max | compile+first mask p50 / p99 |");
    println!("|---|---:|---:|---:|---:|---|");
    for (name, grammar, text) in cases {
        let ids = tok.encode(text.as_str(), false).expect("tokenize").get_ids().to_vec();
        let req = GrammarRequest::new(grammar, "bench");
        let mut masks = Vec::new();
        let mut compiles = Vec::new();
        while masks.len() < 5_000 || compiles.len() < 20 {
            let t = Instant::now();
            let mut c = compiler.compile(&req).expect("compiles");
            compiles.push(t.elapsed());
            for (i, &id) in ids.iter().enumerate() {
                let t = Instant::now();
                let mask = c.allowed().expect("mask");
                if i > 0 {
                    masks.push(t.elapsed());
                }
                assert!(mask.allows(id), "{name}: token {i} refused");
                c.commit(id).expect("commit");
            }
        }
        println!(
            "| {name} | {} | {} | {} | {} | {} / {} |",
            ids.len(),
            micros(pct(&mut masks, 50.0)),
            micros(pct(&mut masks, 99.0)),
            micros(*masks.iter().max().unwrap()),
            micros(pct(&mut compiles, 50.0)),
            micros(pct(&mut compiles, 99.0)),
        );
    }
}
