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
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{self, SamplingInput};
use super::observe::Observer;
use crate::engine::{EngineEvent, PositionLogprobs, SamplingParams, Usage};
use crate::model::chat_template::ChatMessage;
use crate::state::{AppState, Loaded};

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
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Legacy completions: an integer number of alternatives.
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// Parses a JSON body, naming the offending field in the error.
pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." || path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        let msg = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {inner}")
        } else {
            inner.to_string()
        };
        ApiError::invalid(param, msg)
    })
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
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let obs = observer(&state, &headers, "/v1/chat/completions", "chat");
    let res = (|| -> Result<Prepared<'_>, ApiError> {
        let loaded = loaded(&state)?;
        let mut req: ChatCompletionRequest = parse(&body)?;
        req.common.check_n()?;
        generate::check_model(loaded, &req.common.model)?;
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
        let (prompt, tokens) = generate::chat_tokens(loaded, &messages)?;
        let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
        if req.top_logprobs.is_some() && !req.logprobs {
            return Err(ApiError::invalid("top_logprobs", "requires logprobs = true"));
        }
        let default_max = state.config.engine.default_max_tokens as i64;
        let params = req
            .common
            .sampling(logprobs, default_max)
            .into_params(state.config.engine.default_max_tokens)?;
        let job = Job {
            kind: Kind::Chat,
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            model: loaded.model_name.clone(),
            created: now_secs(),
            logprobs: req.logprobs,
        };
        let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(Prepared {
            loaded,
            prompt,
            tokens,
            params,
            job,
            stream: req.common.stream,
            include_usage,
        })
    })();
    respond(obs, res).await
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let obs = observer(&state, &headers, "/v1/completions", "completion");
    let res = (|| -> Result<Prepared<'_>, ApiError> {
        let loaded = loaded(&state)?;
        let mut req: CompletionRequest = parse(&body)?;
        req.common.check_n()?;
        generate::check_model(loaded, &req.common.model)?;
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
        let params = req
            .common
            .sampling(req.logprobs, COMPLETIONS_DEFAULT_MAX_TOKENS)
            .into_params(state.config.engine.default_max_tokens)?;
        let job = Job {
            kind: Kind::Completion,
            id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            model: loaded.model_name.clone(),
            created: now_secs(),
            logprobs: req.logprobs.is_some(),
        };
        let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(Prepared {
            loaded,
            prompt,
            tokens,
            params,
            job,
            stream: req.common.stream,
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
            obs.on_api_error(&e);
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
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
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
                return Ok(json!({
                    "id": job.id, "object": job.object(false), "created": job.created, "model": job.model,
                    "choices": [choice], "usage": usage_json(&usage),
                }));
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
