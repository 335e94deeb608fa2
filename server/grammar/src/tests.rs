//! Every grammar kind on the real SmolLM2 tokenizer: texts that satisfy a grammar pass its masks
//! token by token, texts that do not are refused at the first wrong token, and random walks
//! through the masks (biased towards closing tokens so they end) always produce output that
//! satisfies the grammar (JSON checked with the `jsonschema` crate).

use std::sync::{Arc, OnceLock};

use genai_engine::Constraint;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::*;

struct Fixture {
    tok: Arc<Tokenizer>,
    end_ids: Vec<u32>,
    compiler: GrammarCompiler,
    /// Each token's text (lossy for partial UTF-8), for the random walks.
    texts: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (tok, end_ids) = genai_models::test_support::smollm2_tokenizer();
        let compiler = GrammarCompiler::new(tok.clone(), &end_ids).unwrap();
        let n = tok.get_vocab_size(true) as u32;
        let texts = (0..n).map(|id| tok.decode(&[id], false).unwrap_or_default()).collect();
        Fixture {
            tok,
            end_ids,
            compiler,
            texts,
        }
    })
}

fn compile(grammar: Grammar, field: &str) -> Box<dyn Constraint> {
    fixture()
        .compiler
        .compile(&GrammarRequest::new(grammar, field))
        .unwrap()
}

fn compile_err(grammar: Grammar, field: &str) -> CompileError {
    fixture()
        .compiler
        .compile(&GrammarRequest::new(grammar, field))
        .map(|_| ())
        .unwrap_err()
}

/// Feeds `text`'s tokens through the constraint. Ok(ended): every token was allowed, and
/// `ended` tells whether the output may end right there (an end token allowed, or finished).
/// Err(i): token `i` was refused.
fn feed(c: &mut dyn Constraint, text: &str) -> Result<bool, usize> {
    let f = fixture();
    let ids = f.tok.encode(text, false).unwrap().get_ids().to_vec();
    for (i, &t) in ids.iter().enumerate() {
        if c.is_finished() || !c.allowed().unwrap().allows(t) {
            return Err(i);
        }
        c.commit(t).unwrap();
    }
    Ok(c.is_finished() || f.end_ids.iter().any(|&e| c.allowed().unwrap().allows(e)))
}

fn accepts(grammar: &Grammar, text: &str) -> bool {
    matches!(feed(&mut *compile(grammar.clone(), "test"), text), Ok(true))
}

fn refuses(grammar: &Grammar, text: &str) -> bool {
    feed(&mut *compile(grammar.clone(), "test"), text).is_err()
}

/// A seeded random walk through the masks: at each position an allowed token, half the time one
/// that closes something (or an end token), so walks end. Returns the text once the grammar
/// ended it.
fn walk(grammar: &Grammar, seed: u64) -> String {
    let f = fixture();
    let mut c = compile(grammar.clone(), "test");
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rand = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut out = Vec::new();
    for _ in 0..400 {
        if c.is_finished() {
            return f.tok.decode(&out, false).unwrap();
        }
        let mask = c.allowed().unwrap();
        let allowed: Vec<u32> = (0..f.texts.len() as u32).filter(|&t| mask.allows(t)).collect();
        assert!(!allowed.is_empty(), "a mask allowed nothing after {out:?}");
        let closing: Vec<u32> = allowed
            .iter()
            .copied()
            .filter(|&t| f.end_ids.contains(&t) || f.texts[t as usize].contains(['"', '}', ']', ',']))
            .collect();
        let pick = if !closing.is_empty() && rand(2) == 0 {
            closing[rand(closing.len())]
        } else {
            allowed[rand(allowed.len())]
        };
        if f.end_ids.contains(&pick) {
            return f.tok.decode(&out, false).unwrap();
        }
        c.commit(pick).unwrap();
        out.push(pick);
    }
    panic!("the walk did not end: {:?}", f.tok.decode(&out, false));
}

fn validates(schema: &Value, text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(&value) {
        panic!("{text} does not satisfy the schema: {e}");
    }
}

#[test]
fn token_bytes_spell_what_the_tokenizer_decodes() {
    let f = fixture();
    let bytes = tok_env::token_bytes(&f.tok).unwrap();
    assert_eq!(bytes.len(), f.texts.len());
    let mut checked = 0;
    for (id, b) in bytes.iter().enumerate() {
        if b.first() == Some(&toktrie::TokTrie::SPECIAL_TOKEN_MARKER) {
            continue;
        }
        // Partial UTF-8 pieces decode lossily; the whole-character ones must match exactly.
        if let Ok(s) = std::str::from_utf8(b) {
            assert_eq!(s, f.texts[id], "token {id}");
            checked += 1;
        }
    }
    assert!(checked > 45_000, "{checked}");
    // A leading-space piece, and the chat markers as special (never text).
    let hello = f.tok.encode(" hello", false).unwrap().get_ids()[0];
    assert_eq!(bytes[hello as usize], b" hello");
    for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        let id = f.tok.token_to_id(special).unwrap();
        assert_eq!(
            bytes[id as usize][0],
            toktrie::TokTrie::SPECIAL_TOKEN_MARKER,
            "{special}"
        );
    }
    // Multi-byte characters split over tokens reassemble.
    let ids = f.tok.encode("日本語 🙂", false).unwrap().get_ids().to_vec();
    let joined: Vec<u8> = ids.iter().flat_map(|&t| bytes[t as usize].clone()).collect();
    assert_eq!(joined, "日本語 🙂".as_bytes());
}

#[test]
fn json_object_allows_any_object_and_nothing_else() {
    let g = Grammar::JsonObject;
    assert!(accepts(&g, r#"{"a":[1,2.5,{"b":null}],"c":"x y"}"#));
    assert!(accepts(&g, "{}"));
    assert!(refuses(&g, "[1]"));
    assert!(refuses(&g, "hello"));
    assert!(refuses(&g, " {}"), "compact: no leading whitespace");
    let schema = json!({"type": "object"});
    for seed in 0..8 {
        validates(&schema, &walk(&g, seed));
    }
}

#[test]
fn json_schema_enforces_nesting_enums_and_required_fields() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "nickname": {"type": "string"}
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": false
    });
    let g = Grammar::JsonSchema {
        schema: schema.clone(),
        strict: true,
    };
    let good = r#"{"name":"Ada","age":36,"tags":["red","blue"],"address":{"city":"London","zip":"12345"}}"#;
    assert!(accepts(&g, good));
    validates(&schema, good);
    // Optional field present.
    assert!(accepts(
        &g,
        r#"{"name":"A","age":1,"tags":[],"address":{"city":"x","zip":"00000"},"nickname":"b"}"#
    ));
    // A required field missing, an enum violated, a wrong type, a bad pattern, an extra key.
    assert!(refuses(&g, r#"{"age":36,"#));
    assert!(refuses(&g, r#"{"name":"Ada","age":36,"tags":["pink"]"#));
    assert!(refuses(&g, r#"{"name":"Ada","age":"36""#));
    assert!(refuses(
        &g,
        r#"{"name":"Ada","age":36,"tags":[],"address":{"city":"x","zip":"1234x"#
    ));
    assert!(refuses(
        &g,
        r#"{"name":"Ada","age":36,"tags":[],"address":{"city":"x","zip":"12345"},"x":1"#
    ));
    // Whatever path the model takes, the output validates.
    for seed in 0..8 {
        validates(&schema, &walk(&g, seed));
    }
}

#[test]
fn json_schema_with_refs_and_any_of_validates() {
    // The shape pydantic (the openai client's `parse`) produces: $defs and $ref, anyOf with null.
    let schema = json!({
        "$defs": {"Step": {"type": "object", "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}}, "required": ["explanation", "output"], "additionalProperties": false}},
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "maxItems": 2},
            "final_answer": {"anyOf": [{"type": "string"}, {"type": "null"}]}
        },
        "required": ["steps", "final_answer"],
        "additionalProperties": false
    });
    let g = Grammar::JsonSchema {
        schema: schema.clone(),
        strict: true,
    };
    assert!(accepts(
        &g,
        r#"{"steps":[{"explanation":"e","output":"o"}],"final_answer":null}"#
    ));
    assert!(refuses(&g, r#"{"steps":[{"output":"o""#));
    for seed in 0..6 {
        validates(&schema, &walk(&g, seed));
    }
}

#[test]
fn regex_is_matched_whole() {
    let g = Grammar::Regex(r"[0-9]{3}-[a-z]{2,4}".into());
    assert!(accepts(&g, "123-abc"));
    assert!(refuses(&g, "12-abc"));
    assert!(refuses(&g, "123-abcde"));
    assert!(!accepts(&g, "123-a"), "not complete yet");
    let re = regex::Regex::new(r"^[0-9]{3}-[a-z]{2,4}$").unwrap();
    for seed in 0..8 {
        let out = walk(&g, seed);
        assert!(re.is_match(&out), "{out:?}");
    }
}

#[test]
fn choice_is_exactly_one_option_and_finishes() {
    let options = vec![
        "yes".to_string(),
        "no".to_string(),
        "maybe so".to_string(),
        "a.b*c".to_string(),
    ];
    let g = Grammar::Choice(options.clone());
    for o in &options {
        assert!(accepts(&g, o), "{o}");
    }
    assert!(refuses(&g, "yep"));
    assert!(refuses(&g, "abbc"), "options are literal, not regexes");
    // Nothing can follow a complete option: the constraint is finished.
    let mut c = compile(g.clone(), "guided_choice");
    feed(&mut *c, "maybe so").unwrap();
    assert!(c.is_finished());
    for seed in 0..8 {
        let out = walk(&g, seed);
        assert!(options.contains(&out), "{out:?}");
    }
}

#[test]
fn lark_with_an_embedded_json_schema() {
    // The shape of a tool call: a name from a fixed set, then arguments under the tool's schema.
    let args = json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": false
    });
    let embedded = json_schema_options(args.clone(), true).unwrap();
    let lark =
        format!("start: \"<call>\" name \" \" args \"</call>\"\nname: \"add\" | \"mul\"\nargs: %json {embedded}\n");
    let g = Grammar::Lark(lark);
    assert!(accepts(&g, r#"<call>add {"a":1,"b":2}</call>"#));
    assert!(refuses(&g, r#"<call>sub "#));
    assert!(refuses(&g, r#"<call>add {"a":1}<"#));
    assert!(refuses(&g, r#"<call>add { "a""#), "compact JSON");
    for seed in 0..8 {
        let out = walk(&g, seed);
        let body = out
            .strip_prefix("<call>")
            .and_then(|s| s.strip_suffix("</call>"))
            .unwrap_or_else(|| panic!("{out:?}"));
        let (name, json) = body.split_once(' ').unwrap();
        assert!(name == "add" || name == "mul", "{out:?}");
        validates(&args, json);
    }
}

#[test]
fn bad_grammars_are_errors_naming_their_field() {
    let cases = [
        (
            Grammar::JsonSchema {
                schema: json!("string"),
                strict: true,
            },
            "response_format.json_schema.schema",
            "JSON object",
        ),
        (
            Grammar::JsonSchema {
                schema: json!({"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
                strict: true,
            },
            "guided_json",
            "frobnicate",
        ),
        (
            Grammar::JsonSchema {
                schema: json!({"type": "array", "uniqueItems": true}),
                strict: true,
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (Grammar::Regex("(abc".into()), "guided_regex", "unclosed"),
        (Grammar::Choice(vec![]), "guided_choice", "at least one"),
        (
            Grammar::Lark("start: missing_rule".into()),
            "guided_grammar",
            "missing_rule",
        ),
        (Grammar::Lark("  ".into()), "guided_grammar", "empty"),
        (
            Grammar::JsonSchema {
                schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
                strict: true,
            },
            "guided_json",
            "",
        ),
    ];
    for (grammar, field, needle) in cases {
        let e = compile_err(grammar.clone(), field);
        assert_eq!(e.field, field, "{grammar:?}");
        assert!(
            e.message.to_lowercase().contains(&needle.to_lowercase()),
            "{grammar:?}: {}",
            e.message
        );
        assert!(e.to_string().starts_with(&format!("invalid `{field}`")), "{e}");
    }
    // Not strict: what cannot be enforced is ignored instead.
    compile(
        Grammar::JsonSchema {
            schema: json!({"type": "array", "uniqueItems": true}),
            strict: false,
        },
        "guided_json",
    );
}
