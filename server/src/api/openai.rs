//! OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/models`. Field names, SSE framing (`data: {...}` … `data: [DONE]`), error bodies and
//! status codes follow OpenAI's API; vLLM's extra sampling fields (`top_k`, `min_p`,
//! `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`) are accepted too.
//! Structured output: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and
//! vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark), at most one
//! per request ([`decode_grammar`]).
//!
//! Protocol only: decode the body into a pipeline input, encode what comes back. Fields OpenAI
//! defines that we do not implement yet (`functions`, `logit_bias`, ...) are refused with
//! 400 `unsupported_parameter` naming the field, never silently dropped; unknown fields are
//! ignored with one warning line, as vLLM does.
//!
//! Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and
//! `tool` messages) is decoded into [`tool_calls`]' neutral types; the answer goes through its
//! streaming parser and is encoded as OpenAI sends it: `message.tool_calls` (with `content`
//! null when the model only called), or per call index a first `delta.tool_calls` fragment with
//! `id`, `type`, `function.name` and empty arguments, then fragments of `function.arguments`
//! only; `finish_reason: "tool_calls"`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{from_value, observer, parse_value};
use crate::llm::EventStream;
use crate::ops::observe::Observer;
use crate::pipeline::context::RequestContext;
use crate::pipeline::sampling::SamplingInput;
use crate::pipeline::tool_calls::{
    self, HistoryMessage, Tool, ToolCall, ToolCallParser, ToolChoice, ToolEvent, ToolPaths, ToolSet,
};
use crate::pipeline::{GenerateInput, Prompt, Route};
use crate::safety::output::Outcome;
use crate::state::AppState;
use genai_engine::{EngineEvent, PositionLogprobs, Usage};
use genai_grammar::{Grammar, GrammarRequest};
use genai_retrieval::rag::{self, Citation};

/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;

/// Fields of both endpoints that OpenAI defines and we do not implement (yet): a request that
/// sets one gets a 400 naming it instead of an answer that silently ignored it.
const UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "logit_bias",
    "best_of",
    "suffix",
    "echo",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
];

/// Known fields that change nothing here (bookkeeping for the caller's own records).
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier"];

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "logprobs",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "mode",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
const COMPLETION_FIELDS: &[&str] = &["prompt"];

/// Refuses unsupported fields that are actually set, and warns once per unknown field.
fn check_fields(body: &Value, own: &[&str]) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    };
    for (k, v) in obj {
        if UNSUPPORTED.contains(&k.as_str()) && !own.contains(&k.as_str()) {
            // The "off" values clients send by default are not a request for the feature.
            let off = match v {
                Value::Null => true,
                Value::Bool(b) => !b,
                Value::Object(o) => o.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Number(n) => k == "best_of" && n.as_u64() == Some(1),
                Value::String(s) => k == "tool_choice" && s == "none",
            };
            if !off {
                return Err(ApiError::Unsupported { param: k.clone() });
            }
        } else if !(COMMON_FIELDS.contains(&k.as_str()) || own.contains(&k.as_str()) || IGNORED.contains(&k.as_str())) {
            tracing::warn!(field = %k, "ignoring unknown request field");
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields common to both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct CommonFields {
    #[serde(default)]
    pub model: String,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub min_tokens: Option<i64>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
}

/// Structured-output fields of both endpoints (at most one may be set).
#[derive(Debug, Deserialize, Default)]
pub struct GrammarFields {
    pub response_format: Option<ResponseFormat>,
    /// A JSON schema, as an object or as JSON text (vLLM accepts both).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub guided_grammar: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `name` (and `description`), which OpenAI requires, are accepted and change nothing.
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub schema: Option<Value>,
    /// OpenAI's default is false.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The request's structured-output grammar, if any. Each grammar names the field it came from
/// (its compile errors do); two set at once is a 400 naming both.
fn decode_grammar(body: &Value) -> Result<Option<GrammarRequest>, ApiError> {
    let f: GrammarFields = from_value(body)?;
    // (top-level field, grammar)
    let mut set: Vec<(&str, GrammarRequest)> = Vec::new();
    if let Some(rf) = f.response_format {
        match rf.kind.as_str() {
            "text" => {}
            "json_object" => set.push((
                "response_format",
                GrammarRequest::new(Grammar::JsonObject, "response_format"),
            )),
            "json_schema" => {
                let js = rf.json_schema.ok_or_else(|| {
                    ApiError::invalid("response_format.json_schema", "required when type is \"json_schema\"")
                })?;
                let g = match js.schema {
                    // No schema: any JSON object.
                    None => GrammarRequest::new(Grammar::JsonObject, "response_format.json_schema"),
                    Some(schema) => GrammarRequest::new(
                        Grammar::JsonSchema {
                            schema,
                            strict: js.strict.unwrap_or(false),
                        },
                        "response_format.json_schema.schema",
                    ),
                };
                set.push(("response_format", g));
            }
            other => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"),
                ))
            }
        }
    }
    if let Some(v) = f.guided_json {
        let schema = match v {
            Value::String(text) => serde_json::from_str(&text)
                .map_err(|e| ApiError::invalid("guided_json", format!("not valid JSON: {e}")))?,
            v => v,
        };
        let g = Grammar::JsonSchema { schema, strict: true };
        set.push(("guided_json", GrammarRequest::new(g, "guided_json")));
    }
    if let Some(rx) = f.guided_regex {
        set.push(("guided_regex", GrammarRequest::new(Grammar::Regex(rx), "guided_regex")));
    }
    if let Some(choices) = f.guided_choice {
        set.push((
            "guided_choice",
            GrammarRequest::new(Grammar::Choice(choices), "guided_choice"),
        ));
    }
    if let Some(lark) = f.guided_grammar {
        set.push((
            "guided_grammar",
            GrammarRequest::new(Grammar::Lark(lark), "guided_grammar"),
        ));
    }
    if set.len() > 1 {
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::invalid(
            names[1],
            format!(
                "at most one of response_format, guided_json, guided_regex, guided_choice and guided_grammar may be set; got {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(set.pop().map(|(_, g)| g))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<Content>,
    /// Assistant messages: the calls it made.
    #[serde(default)]
    pub tool_calls: Vec<WireToolCall>,
    /// Tool messages: the call answered.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: WireFunction,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<WireMessage>,
    /// Extension: "chat" (default) or "rag" (answer from the knowledge base, with `citations`).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    /// "auto", "none", "required" or `{"type": "function", "function": {"name": …}}`.
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Legacy completions: an integer number of alternatives.
    pub logprobs: Option<i64>,
}

impl CommonFields {
    /// `default_max`: the endpoint's own default for an unset `max_tokens` (None: the engine's).
    fn sampling(&mut self, logprobs: Option<i64>, default_max: Option<i64>) -> SamplingInput {
        SamplingInput {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: self.max_completion_tokens.or(self.max_tokens).or(default_max),
            min_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            stop: self.stop.take().map(OneOrMany::into_vec).unwrap_or_default(),
            stop_token_ids: std::mem::take(&mut self.stop_token_ids),
            logprobs,
        }
    }

    fn check_n(&self) -> Result<(), ApiError> {
        match self.n {
            None | Some(1) => Ok(()),
            Some(n) => Err(ApiError::invalid("n", format!("only n = 1 is supported, got {n}"))),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which OpenAI endpoint a generation answers: shapes the JSON of each chunk.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

/// How the answer is encoded: the endpoint, ids and what the client asked to see.
struct ResponseShape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    /// RAG sources: all of them on the first chunk, the cited ones on the answer.
    citations: Vec<Citation>,
    /// Why the output stage ended the answer (`finish_reason: "content_filter"`), if it did.
    safety: Outcome,
    /// Chat with tools in effect: the answer goes through their parser.
    tools: Option<ToolSet>,
}

/// A decoded request: the pipeline input plus how to encode the answer.
struct Decoded {
    input: GenerateInput,
    kind: Kind,
    logprobs: bool,
    stream: bool,
    include_usage: bool,
}

/// `tools`, `tool_choice` and `parallel_tool_calls` into the tools in effect.
fn decode_tools(req: &mut ChatCompletionRequest) -> Result<Option<ToolSet>, ApiError> {
    let mut tools = Vec::new();
    for (i, t) in req.tools.take().unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!("must be \"function\", got {:?}", t.kind),
            ));
        }
        tools.push(Tool {
            name: t.function.name,
            description: t.function.description,
            parameters: t.function.parameters,
            strict: t.function.strict.unwrap_or(false),
        });
    }
    let choice = match req.tool_choice.take() {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("must be \"auto\", \"none\", \"required\" or a function, got {other:?}"),
                ))
            }
        },
        Some(v) => {
            let kind = v.get("type").and_then(Value::as_str);
            let name = v.pointer("/function/name").and_then(Value::as_str);
            match (kind, name) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_owned()),
                (Some("function"), None) => {
                    return Err(ApiError::invalid("tool_choice.function.name", "missing function name"))
                }
                _ => return Err(ApiError::invalid(
                    "tool_choice",
                    "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                )),
            }
        }
    };
    ToolSet::new(
        tools,
        choice,
        req.parallel_tool_calls.unwrap_or(true),
        ToolPaths::OPENAI,
    )
}

fn decode_chat(body: &Value) -> Result<Decoded, ApiError> {
    check_fields(body, CHAT_FIELDS)?;
    // Two typed views of one body (no serde flatten, which would lose the field paths in errors).
    let mut req: ChatCompletionRequest = from_value(body)?;
    let mut common: CommonFields = from_value(body)?;
    common.check_n()?;
    let tools = decode_tools(&mut req)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        format!("content part type {:?} is not supported (text only)", p.kind),
                    ));
                }
                parts.into_iter().map(|p| p.text).collect::<Vec<_>>().join("")
            }
        };
        let mut calls = Vec::with_capacity(m.tool_calls.len());
        for (j, c) in m.tool_calls.into_iter().enumerate() {
            if c.kind != "function" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls[{j}].type"),
                    format!("must be \"function\", got {:?}", c.kind),
                ));
            }
            calls.push(ToolCall {
                id: c.id,
                name: c.function.name,
                arguments: c.function.arguments,
            });
        }
        messages.push(HistoryMessage {
            role: m.role,
            content,
            tool_calls: calls,
            tool_call_id: m.tool_call_id,
        });
    }
    let messages = tool_calls::render_history(messages, ToolPaths::OPENAI)?;
    let route = match req.mode.as_deref() {
        None | Some("chat") => Route::Chat,
        Some("rag") => Route::Rag,
        Some(other) => {
            return Err(ApiError::invalid(
                "mode",
                format!("must be \"chat\" or \"rag\", got {other:?}"),
            ))
        }
    };
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "requires logprobs = true"));
    }
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let sampling = common.sampling(logprobs, None);
    Ok(Decoded {
        input: GenerateInput {
            model: std::mem::take(&mut common.model),
            prompt: Prompt::Chat(messages),
            route,
            sampling,
            tools,
            grammar: decode_grammar(body)?,
        },
        kind: Kind::Chat,
        logprobs: req.logprobs,
        stream: common.stream,
        include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn decode_completion(body: &Value) -> Result<Decoded, ApiError> {
    check_fields(body, COMPLETION_FIELDS)?;
    let req: CompletionRequest = from_value(body)?;
    let mut common: CommonFields = from_value(body)?;
    common.check_n()?;
    let prompt = match req.prompt {
        OneOrMany::One(p) => p,
        OneOrMany::Many(mut v) if v.len() == 1 => v.remove(0),
        OneOrMany::Many(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request is supported, got {}", v.len()),
            ))
        }
    };
    let sampling = common.sampling(req.logprobs, Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
    Ok(Decoded {
        input: GenerateInput {
            model: std::mem::take(&mut common.model),
            prompt: Prompt::Text(prompt),
            route: Route::Chat,
            sampling,
            tools: None,
            grammar: decode_grammar(body)?,
        },
        kind: Kind::Completion,
        logprobs: req.logprobs.is_some(),
        stream: common.stream,
        include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ctx: Result<RequestContext, ApiError>,
    body: Bytes,
) -> Response {
    let parsed = parse_value(&body);
    let rag = parsed
        .as_ref()
        .is_ok_and(|v| v.get("mode").and_then(Value::as_str) == Some("rag"));
    let route = if rag { Route::Rag } else { Route::Chat };
    let obs = observer(&state, "http", "/v1/chat/completions", route.label(), ctx.as_ref().ok());
    generate(&state, ctx, parsed.and_then(|v| decode_chat(&v)), obs).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    ctx: Result<RequestContext, ApiError>,
    body: Bytes,
) -> Response {
    let obs = observer(&state, "http", "/v1/completions", "completion", ctx.as_ref().ok());
    let decoded = parse_value(&body).and_then(|v| decode_completion(&v));
    generate(&state, ctx, decoded, obs).await
}

async fn generate(
    state: &AppState,
    ctx: Result<RequestContext, ApiError>,
    decoded: Result<Decoded, ApiError>,
    mut obs: Observer,
) -> Response {
    let (ctx, d) = match ctx.and_then(|c| decoded.map(|d| (c, d))) {
        Ok(x) => x,
        Err(e) => {
            obs.on_error(e.codes());
            return e.into_response();
        }
    };
    let tools = d.input.tools.clone();
    let answer = match state.pipeline.generate(&ctx, d.input, obs).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let (prefix, kind) = match d.kind {
        Kind::Chat => ("chatcmpl", Kind::Chat),
        Kind::Completion => ("cmpl", Kind::Completion),
    };
    let shape = ResponseShape {
        kind,
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        model: answer.model,
        created: now_secs(),
        logprobs: d.logprobs,
        citations: answer.citations,
        safety: answer.safety,
        tools,
    };
    let mut resp = if d.stream {
        stream_response(shape, answer.events, d.include_usage).into_response()
    } else {
        match collect(shape, answer.events).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => return e.into_response(),
        }
    };
    // The tenant's x-ratelimit-* headers, as OpenAI sends them on every answer.
    for (k, v) in answer.ratelimit {
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

impl ResponseShape {
    fn logprobs_json(&self, lps: &[PositionLogprobs]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({"content": lps.iter().map(|p| json!({
                "token": p.sampled.token,
                "logprob": p.sampled.logprob,
                "bytes": p.sampled.token.as_bytes(),
                "top_logprobs": p.top.iter().map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes()})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
            Kind::Completion => json!({
                "tokens": lps.iter().map(|p| p.sampled.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|p| p.sampled.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|p| p.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
            }),
        }
    }

    fn chunk(&self, text: &str, lps: &[PositionLogprobs], finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": self.logprobs_json(lps), "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": self.logprobs_json(lps), "finish_reason": finish})
            }
        };
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]});
        if first && !self.citations.is_empty() {
            v["citations"] = json!(self.citations);
        }
        v
    }

    /// A chat chunk around `delta`.
    fn chat_chunk(&self, delta: Value, lps: &[PositionLogprobs]) -> Value {
        let choice = json!({"index": 0, "delta": delta, "logprobs": self.logprobs_json(lps), "finish_reason": null});
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// The chunk of one tool-parser event, as OpenAI streams calls: the first fragment of an
    /// index carries id, type and name (arguments ""), later ones only argument pieces.
    fn tool_event_chunk(&self, ev: ToolEvent, lps: &[PositionLogprobs], first: bool) -> Value {
        let mut delta = match ev {
            ToolEvent::Content(text) => json!({"content": text}),
            ToolEvent::CallStart { index, id, name } => json!({"tool_calls": [{
                "index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""},
            }]}),
            ToolEvent::Arguments { index, fragment } => {
                json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            }
        };
        if first {
            delta["role"] = json!("assistant");
            if delta.get("content").is_none() {
                delta["content"] = Value::Null;
            }
        }
        self.chat_chunk(delta, lps)
    }

    /// Adds `"safety": {"stage", "reason"}` to the last chunk or answer of a blocked stream (an
    /// extension next to OpenAI's `finish_reason: "content_filter"`).
    fn add_safety(&self, v: &mut Value) {
        if let Some((stage, reason)) = self.safety.blocked() {
            v["safety"] = json!({"stage": stage, "reason": reason});
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// A tool call the parser could not hand on (malformed, unfinished, or off its schema).
fn tool_call_error(why: String) -> ApiError {
    ApiError::Internal(format!("the model's tool call is unusable: {why}"))
}

/// Content events into `text` (the calls stay in the parser).
fn push_content(text: &mut String, events: Vec<ToolEvent>) {
    for ev in events {
        if let ToolEvent::Content(c) = ev {
            text.push_str(&c);
        }
    }
}

async fn collect(job: ResponseShape, mut events: EventStream) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut parser: Option<ToolCallParser> = job.tools.as_ref().map(ToolSet::parser);
    while let Some(ev) = events.next().await {
        match ev? {
            EngineEvent::Delta { text: t, logprobs, .. } => {
                match parser.as_mut() {
                    Some(p) => push_content(&mut text, p.push(&t)),
                    None => text.push_str(&t),
                }
                lps.extend(logprobs);
            }
            EngineEvent::Finished { reason, usage } => {
                let (finish, calls) = match parser.as_mut() {
                    None => (reason.as_str(), Vec::new()),
                    Some(p) => {
                        let (rest, finish) = p.finish(reason).map_err(tool_call_error)?;
                        push_content(&mut text, rest);
                        (finish, p.calls().to_vec())
                    }
                };
                let choice = match job.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": text});
                        if !calls.is_empty() {
                            if text.is_empty() {
                                message["content"] = Value::Null;
                            }
                            message["tool_calls"] = calls
                                .into_iter()
                                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                                .collect();
                        }
                        json!({"index": 0, "message": message, "logprobs": job.logprobs_json(&lps), "finish_reason": finish})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": text, "logprobs": job.logprobs_json(&lps), "finish_reason": finish})
                    }
                };
                let mut v = json!({
                    "id": job.id, "object": job.object(false), "created": job.created, "model": job.model,
                    "choices": [choice], "usage": usage_json(&usage),
                });
                if !job.citations.is_empty() {
                    v["citations"] = json!(rag::parse_citations(&text, &job.citations));
                }
                job.add_safety(&mut v);
                return Ok(v);
            }
            EngineEvent::Failed { message } => return Err(ApiError::Internal(message)),
        }
    }
    Err(ApiError::Internal("engine ended the stream without finishing".into()))
}

fn stream_response(
    job: ResponseShape,
    events: EventStream,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let data = |v: Value| Event::default().data(v.to_string());
    let mut first = true;
    let mut parser: Option<ToolCallParser> = job.tools.as_ref().map(ToolSet::parser);
    // With tools, logprobs of text the parser holds back ride on the next chunk sent.
    let mut held_lps: Vec<PositionLogprobs> = Vec::new();
    let body = events
        .flat_map(move |ev| {
            let out: Vec<Event> = match ev {
                Ok(EngineEvent::Delta { text, logprobs, .. }) => match parser.as_mut() {
                    None => {
                        let e = data(job.chunk(&text, &logprobs, None, first));
                        first = false;
                        vec![e]
                    }
                    Some(p) => {
                        held_lps.extend(logprobs);
                        let mut v = Vec::new();
                        for ev in p.push(&text) {
                            v.push(data(job.tool_event_chunk(ev, &std::mem::take(&mut held_lps), first)));
                            first = false;
                        }
                        v
                    }
                },
                Ok(EngineEvent::Finished { reason, usage }) => {
                    let mut v = Vec::new();
                    let finish = match parser.as_mut().map(|p| p.finish(reason)) {
                        None => Ok(reason.as_str()),
                        Some(Ok((rest, finish))) => {
                            for ev in rest {
                                v.push(data(job.tool_event_chunk(ev, &std::mem::take(&mut held_lps), first)));
                                first = false;
                            }
                            Ok(finish)
                        }
                        Some(Err(why)) => Err(why),
                    };
                    match finish {
                        Ok(finish) => {
                            let mut last = job.chunk("", &std::mem::take(&mut held_lps), Some(finish), first);
                            job.add_safety(&mut last);
                            v.push(data(last));
                            if include_usage {
                                v.push(data(json!({
                                    "id": job.id, "object": job.object(true), "created": job.created, "model": job.model,
                                    "choices": [], "usage": usage_json(&usage),
                                })));
                            }
                            v.push(Event::default().data("[DONE]"));
                            v
                        }
                        // No [DONE]: the client sees the answer did not complete.
                        Err(why) => {
                            let message = tool_call_error(why).message();
                            vec![data(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "internal_error"}}))]
                        }
                    }
                }
                Ok(EngineEvent::Failed { message }) | Err(ApiError::Internal(message)) => {
                    vec![data(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "internal_error"}}))]
                }
                Err(e) => {
                    let (kind, param, code) = e.openai_fields();
                    vec![data(json!({"error": {"message": e.message(), "type": kind, "param": param, "code": code}}))]
                }
            };
            futures::stream::iter(out.into_iter().map(Ok))
        });
    // Comments keep proxies from closing a stream that waits in the queue.
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    match state.pipeline.models() {
        Err(e) => e.into_response(),
        Ok((generation, _, embedding)) => Json(json!({
            "object": "list",
            "data": [
                {"id": generation, "object": "model", "created": 0, "owned_by": "genai-factory"},
                {"id": embedding, "object": "model", "created": 0, "owned_by": "genai-factory"},
            ],
        }))
        .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest<'a> {
    /// Kept raw: decoded under the limits, stopping at the first input over one.
    #[serde(borrow)]
    input: &'a RawValue,
    #[serde(default)]
    model: String,
    /// "float" (default) or "base64" (little-endian f32 bytes; the Python SDK's default).
    #[serde(default)]
    encoding_format: Option<String>,
    /// Only the model's own size is served.
    dimensions: Option<u64>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

/// One vector, serialized straight from its `&[f32]` (no `Value` per float).
#[derive(Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: EmbeddingRepr<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingRepr<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem<'a>>,
    model: &'a str,
    usage: Value,
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ctx: Result<RequestContext, ApiError>,
    body: Bytes,
) -> Response {
    let mut obs = observer(&state, "http", "/v1/embeddings", "embedding", ctx.as_ref().ok());
    let res = async {
        let ctx = ctx?;
        let req: EmbeddingRequest =
            serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", format!("malformed request: {e}")))?;
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("must be \"float\" or \"base64\", got {other:?}"),
                ))
            }
        };
        let texts = state.pipeline.limits().parse_inputs(req.input.get())?;
        let (model, e) = state.pipeline.embed(&ctx, &req.model, texts).await?;
        if let Some(d) = req.dimensions {
            let dim = e.vectors.first().map_or(0, Vec::len);
            if d as usize != dim {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("{model} embeds into {dim} dimensions, got {d}"),
                ));
            }
        }
        let data = e
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| EmbeddingItem {
                object: "embedding",
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    EmbeddingRepr::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    EmbeddingRepr::Floats(v)
                },
            })
            .collect();
        let list = EmbeddingList {
            object: "list",
            data,
            model: &model,
            usage: json!({"prompt_tokens": e.tokens, "total_tokens": e.tokens}),
        };
        serde_json::to_vec(&list).map_err(|e| ApiError::Internal(format!("encoding the response: {e}")))
    }
    .await;
    match res {
        Ok(bytes) => {
            obs.on_ok();
            ([(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Err(e) => {
            obs.on_error(e.codes());
            e.into_response()
        }
    }
}
