//! OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`. Field names, SSE framing (`data: {...}` … `data: [DONE]`),
//! error bodies and status codes follow OpenAI's API; vLLM's extra sampling
//! fields (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
//! `stop_token_ids`) are accepted too.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{self, SamplingInput};
use super::{from_value, parse_json, parse_value};
use crate::ops::observe::Observer;
use crate::state::{AppState, Loaded};
use genai_engine::{EngineEvent, PositionLogprobs, SamplingParams, Usage};
use genai_models::chat_template::ChatMessage;
use genai_retrieval::rag::{self, Citation};

/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;

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
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Legacy completions: an integer number of alternatives.
    pub logprobs: Option<i64>,
}

impl CommonFields {
    fn sampling(&mut self, logprobs: Option<i64>, default_max: i64) -> SamplingInput {
        SamplingInput {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: Some(self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max)),
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

fn loaded(state: &AppState) -> Result<&Loaded, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable("server is shutting down".into()));
    }
    state
        .loaded()
        .ok_or_else(|| ApiError::Unavailable("models are still loading".into()))
}

/// The request-id layer has already set `x-request-id` (the caller's or a fresh UUID).
fn observer(state: &AppState, headers: &HeaderMap, method: &'static str, route: &str) -> Observer {
    let rid = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let tenant = state
        .ops()
        .tenant_label(headers.get("x-tenant-id").and_then(|v| v.to_str().ok()));
    Observer::new(state.ops().clone(), "http", method, route, rid, &tenant)
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

struct Job {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    /// RAG sources: all of them on the first chunk, the cited ones on the answer.
    citations: Vec<Citation>,
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    // The route label is needed before the full parse (which may fail and must still be recorded).
    #[derive(Deserialize)]
    struct Mode {
        mode: Option<String>,
    }
    let rag_mode = serde_json::from_slice::<Mode>(&body).is_ok_and(|m| m.mode.as_deref() == Some("rag"));
    let obs = observer(
        &state,
        &headers,
        "/v1/chat/completions",
        if rag_mode { "rag" } else { "chat" },
    );
    let tenant = headers
        .get("x-tenant-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let res = async {
        let loaded = loaded(&state)?;
        // Two typed views of one body (no serde flatten, which would lose the field paths in errors).
        let body = parse_value(&body)?;
        let req: ChatCompletionRequest = from_value(&body)?;
        let mut common: CommonFields = from_value(&body)?;
        common.check_n()?;
        generate::check_model(loaded, &common.model)?;
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
            messages.push(ChatMessage { role: m.role, content });
        }
        let (messages, citations) = match req.mode.as_deref() {
            None | Some("chat") => (messages, Vec::new()),
            Some("rag") => generate::rag_messages(&state, &messages, &tenant).await?,
            Some(other) => {
                return Err(ApiError::invalid(
                    "mode",
                    format!("must be \"chat\" or \"rag\", got {other:?}"),
                ))
            }
        };
        let (prompt, tokens) = generate::chat_tokens(loaded, &messages)?;
        let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
        if req.top_logprobs.is_some() && !req.logprobs {
            return Err(ApiError::invalid("top_logprobs", "requires logprobs = true"));
        }
        let default_max = state.config.engine.default_max_tokens as i64;
        let params = common
            .sampling(logprobs, default_max)
            .into_params(state.config.engine.default_max_tokens)?;
        let job = Job {
            kind: Kind::Chat,
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            model: loaded.model_name.clone(),
            created: now_secs(),
            logprobs: req.logprobs,
            citations,
        };
        let include_usage = common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(Prepared {
            loaded,
            prompt,
            tokens,
            params,
            job,
            stream: common.stream,
            include_usage,
        })
    }
    .await;
    respond(obs, res).await
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let obs = observer(&state, &headers, "/v1/completions", "completion");
    let res = (|| -> Result<Prepared<'_>, ApiError> {
        let loaded = loaded(&state)?;
        let body = parse_value(&body)?;
        let req: CompletionRequest = from_value(&body)?;
        let mut common: CommonFields = from_value(&body)?;
        common.check_n()?;
        generate::check_model(loaded, &common.model)?;
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
        let tokens = generate::prompt_tokens(loaded, &prompt)?;
        let params = common
            .sampling(req.logprobs, COMPLETIONS_DEFAULT_MAX_TOKENS)
            .into_params(state.config.engine.default_max_tokens)?;
        let job = Job {
            kind: Kind::Completion,
            id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            model: loaded.model_name.clone(),
            created: now_secs(),
            logprobs: req.logprobs.is_some(),
            citations: Vec::new(),
        };
        let include_usage = common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(Prepared {
            loaded,
            prompt,
            tokens,
            params,
            job,
            stream: common.stream,
            include_usage,
        })
    })();
    respond(obs, res).await
}

/// A validated request, ready for the engine.
struct Prepared<'a> {
    loaded: &'a Loaded,
    /// The prompt as the model sees it (rendered chat), for the request log.
    prompt: String,
    tokens: Vec<u32>,
    params: SamplingParams,
    job: Job,
    stream: bool,
    include_usage: bool,
}

async fn respond(mut obs: Observer, res: Result<Prepared<'_>, ApiError>) -> Response {
    let p = match res {
        Ok(p) => p,
        Err(e) => {
            obs.on_error(e.codes());
            return e.into_response();
        }
    };
    obs.set_model(&p.loaded.model_name, &p.prompt);
    match generate::submit(p.loaded, obs, p.tokens, p.params, None) {
        Err(e) => e.into_response(),
        Ok(events) if p.stream => stream_response(p.job, events, p.include_usage).into_response(),
        Ok(events) => match collect(p.job, events).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

impl Job {
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

async fn collect(job: Job, mut events: generate::EventStream) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = events.next().await {
        match ev? {
            EngineEvent::Delta { text: t, logprobs, .. } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            EngineEvent::Finished { reason, usage } => {
                let finish = reason.as_str();
                let choice = match job.kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": job.logprobs_json(&lps), "finish_reason": finish})
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
                return Ok(v);
            }
            EngineEvent::Failed { message } => return Err(ApiError::Internal(message)),
        }
    }
    Err(ApiError::Internal("engine ended the stream without finishing".into()))
}

fn stream_response(
    job: Job,
    events: generate::EventStream,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let data = |v: Value| Event::default().data(v.to_string());
    let mut first = true;
    let body = events
        .flat_map(move |ev| {
            let out: Vec<Event> = match ev {
                Ok(EngineEvent::Delta { text, logprobs, .. }) => {
                    let e = data(job.chunk(&text, &logprobs, None, first));
                    first = false;
                    vec![e]
                }
                Ok(EngineEvent::Finished { reason, usage }) => {
                    let mut v = vec![data(job.chunk("", &[], Some(reason.as_str()), first))];
                    if include_usage {
                        v.push(data(json!({
                            "id": job.id, "object": job.object(true), "created": job.created, "model": job.model,
                            "choices": [], "usage": usage_json(&usage),
                        })));
                    }
                    v.push(Event::default().data("[DONE]"));
                    v
                }
                Ok(EngineEvent::Failed { message }) | Err(ApiError::Internal(message)) => {
                    vec![data(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "internal_error"}}))]
                }
                Err(e) => vec![data(json!({"error": {"message": format!("{e:?}"), "type": "server_error", "param": null, "code": null}}))],
            };
            futures::stream::iter(out.into_iter().map(Ok))
        });
    Sse::new(body)
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    match loaded(&state) {
        Err(e) => e.into_response(),
        Ok(l) => Json(json!({
            "object": "list",
            "data": [
                {"id": l.model_name, "object": "model", "created": 0, "owned_by": "genai-factory"},
                {"id": l.files.embedding.name, "object": "model", "created": 0, "owned_by": "genai-factory"},
            ],
        }))
        .into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub input: OneOrMany,
    #[serde(default)]
    pub model: String,
    /// "float" (default) or "base64" (little-endian f32 bytes; the Python SDK's default).
    #[serde(default)]
    pub encoding_format: Option<String>,
}

pub async fn embeddings(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut obs = observer(&state, &headers, "/v1/embeddings", "embedding");
    let res = async {
        let req: EmbeddingRequest = parse_json(&body)?;
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
        let (vectors, tokens) = generate::embed(&state, &req.model, req.input.into_vec()).await?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": state.knowledge.embedding_model(),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }
    .await;
    match res {
        Ok(v) => {
            obs.on_ok();
            Json(v).into_response()
        }
        Err(e) => {
            obs.on_error(e.codes());
            e.into_response()
        }
    }
}
