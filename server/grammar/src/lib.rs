//! Structured output: the grammars a request may carry ([`Grammar`]) and their compilation,
//! with llguidance, into the engine's per-sequence [`genai_engine::Constraint`].
//!
//! Owns: the request-side grammar types (both doors fill them: OpenAI `response_format` and
//! the vLLM extras `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, and the
//! gRPC equivalents; tool calling builds Lark grammars), the tokenizer adapter llguidance needs
//! (`tok_env.rs`), and [`GrammarCompiler`], built once per tokenizer at model load.
//!
//! Invariants:
//! - Compiling ([`GrammarCompiler::compile`]) is CPU work of up to tens of milliseconds for a
//!   large schema: callers run it on the blocking pool, never on an async worker or the engine
//!   thread. It also computes the first mask, so a grammar that cannot be used (bad regex,
//!   unsupported schema keyword under `strict`, nothing satisfies it) is a request error naming
//!   the field it came from ([`CompileError`]), never a failure in the middle of a stream.
//! - JSON is generated compact (no free whitespace between tokens: a small model cannot loop on
//!   newlines) and, for `strict` schemas, exactly: an unsupported keyword is an error; a
//!   non-strict schema ignores what llguidance cannot enforce (with `oneOf` read as `anyOf`).
//! - A compiled constraint allows the model's end tokens exactly where the grammar may end and
//!   reports itself finished when nothing else may follow; the engine then ends the sequence.
//!
//! Tested in `tests.rs` with the real SmolLM2 tokenizer: every grammar kind drives a matcher
//! token by token (texts that satisfy it are accepted, others refused), bad grammars name their
//! field, and the adapter's token bytes match the tokenizer's own decoding. End to end through
//! the binary in `tests/e2e/structured.rs`.

mod tok_env;

use std::sync::Arc;

use genai_engine::{Constraint, TokenMask};
use llguidance::api::TopLevelGrammar;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::Tokenizer;

use tok_env::TokEnvAdapter;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema`. `strict`: every keyword must be enforced (else an error);
    /// otherwise keywords llguidance cannot enforce are ignored.
    JsonSchema { schema: Value, strict: bool },
    /// The whole output matches this regular expression.
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar in llguidance's dialect (`start` rule; `%json { schema }` embeds a JSON
    /// schema, see [`json_schema_options`] to make it compact and strict).
    Lark(String),
}

/// A grammar as a request carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct GrammarRequest {
    pub grammar: Grammar,
    /// The request field it came from (e.g. `response_format.json_schema.schema`,
    /// `guided_regex`): compile errors name it.
    pub field: String,
}

impl GrammarRequest {
    pub fn new(grammar: Grammar, field: impl Into<String>) -> Self {
        Self {
            grammar,
            field: field.into(),
        }
    }
}

/// A grammar that cannot be used; the request is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct CompileError {
    pub field: String,
    pub message: String,
}

/// `schema` with the compile options this server uses, as llguidance reads them from the
/// schema itself (its `x-guidance` key): compact JSON, and `strict` as in [`Grammar::JsonSchema`].
/// Use it for schemas embedded in a Lark grammar (`%json { … }`) too.
pub fn json_schema_options(mut schema: Value, strict: bool) -> Result<Value, String> {
    let Value::Object(map) = &mut schema else {
        return Err("must be a JSON object (a JSON schema)".into());
    };
    let options = JsonCompileOptions {
        whitespace_flexible: false,
        lenient: !strict,
        coerce_one_of: !strict,
        ..JsonCompileOptions::default()
    };
    map.insert(
        "x-guidance".into(),
        serde_json::to_value(&options).map_err(|e| e.to_string())?,
    );
    Ok(schema)
}

/// The llguidance grammar for `g`; Err(message) when it is malformed before compiling.
fn top_level(g: &Grammar) -> Result<TopLevelGrammar, String> {
    Ok(match g {
        Grammar::JsonObject => {
            TopLevelGrammar::from_json_schema(json_schema_options(serde_json::json!({"type": "object"}), true)?)
        }
        Grammar::JsonSchema { schema, strict } => {
            TopLevelGrammar::from_json_schema(json_schema_options(schema.clone(), *strict)?)
        }
        Grammar::Regex(rx) => {
            // Checked with the regex crate first: its messages point at the error.
            regex_syntax::Parser::new().parse(rx).map_err(|e| e.to_string())?;
            TopLevelGrammar::from_regex(rx)
        }
        Grammar::Choice(choices) => {
            if choices.is_empty() {
                return Err("must list at least one choice".into());
            }
            let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&alternatives.join("|"))
        }
        Grammar::Lark(src) => {
            if src.trim().is_empty() {
                return Err("must not be empty".into());
            }
            TopLevelGrammar::from_lark(src.clone())
        }
    })
}

/// Compiles request grammars for one tokenizer. Built once at model load (the token trie and
/// llguidance's lexer slices over the vocabulary), shared by every request.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl GrammarCompiler {
    /// `end_ids`: the model's EOS and end-of-turn ids (the engine's `ModelInfo::eos_token_ids`).
    pub fn new(tokenizer: Arc<Tokenizer>, end_ids: &[u32]) -> anyhow::Result<Self> {
        let env = TokEnvAdapter::new(tokenizer, end_ids)?;
        let mut factory = ParserFactory::new_simple(&(Arc::new(env) as toktrie::TokEnv))?;
        // Errors come back as values; nothing is printed to stderr per request.
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Compiles `req` and computes its first mask. Run it on the blocking pool.
    pub fn compile(&self, req: &GrammarRequest) -> Result<Box<dyn Constraint>, CompileError> {
        let err = |message: String| CompileError {
            field: req.field.clone(),
            message,
        };
        let grammar = top_level(&req.grammar).map_err(err)?;
        let parser = self.factory.create_parser(grammar).map_err(|e| err(format!("{e:#}")))?;
        let mut matcher = Matcher::new(Ok(parser));
        let first = matcher.compute_mask().map_err(|e| err(format!("{e:#}")))?;
        if first.is_zero() {
            return Err(err("no output can satisfy it".into()));
        }
        Ok(Box::new(LlgConstraint {
            matcher,
            first: Some(TokenMask::from_words(first.as_slice().to_vec())),
        }))
    }
}

/// One sequence's llguidance matcher.
struct LlgConstraint {
    matcher: Matcher,
    /// The mask computed at compile time, handed out at the first position.
    first: Option<TokenMask>,
}

impl std::fmt::Debug for LlgConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlgConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint for LlgConstraint {
    fn allowed(&mut self) -> Result<TokenMask, String> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        let mask = self.matcher.compute_mask().map_err(|e| format!("{e:#}"))?;
        Ok(TokenMask::from_words(mask.as_slice().to_vec()))
    }

    fn commit(&mut self, token: u32) -> Result<(), String> {
        // A mask computed but not handed out no longer applies.
        self.first = None;
        self.matcher.consume_token(token).map_err(|e| format!("{e:#}"))
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

#[cfg(test)]
mod tests;
