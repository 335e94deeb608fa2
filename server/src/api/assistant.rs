//! The assistant's two doors: `POST /v1/assistant/ask` and `genai.v1.Assistant/Ask`.
//!
//! Protocol only: decode into an [`AskInput`], call [`crate::assistant::Assistant::ask`],
//! encode the events. HTTP streams SSE with one `event:` per kind (`route`, `retrieval`,
//! `thought`, `tool_call`, `tool_result`, `token`, `usage`, then `done`; `error` with an
//! OpenAI-style error body if the answer fails after it started); without `stream` it answers
//! one JSON object (`route`, `sources`, `steps`: the agent's trace, `answer`, `usage`). gRPC
//! streams one `AskEvent` per event; a failure after the start is the stream's status.
//!
//! Tested through the real binary in `tests/e2e/assistant.rs`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use genai_models::chat_template::ChatMessage;
use genai_proto::v1 as pb;
use pb::assistant_server::{Assistant as AssistantRpc, AssistantServer};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::{Request, Status};

use super::error::ApiError;
use super::{from_value, observer, parse_value};
use crate::assistant::{AskEvent, AskInput, AskStream, Mode};
use crate::pipeline::context::RequestContext;
use crate::pipeline::sampling::SamplingInput;
use crate::state::AppState;

const HTTP_PATH: &str = "/v1/assistant/ask";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    messages: Vec<BodyMessage>,
    /// Decoded first, by `decode_http`.
    #[serde(default, rename = "mode")]
    _mode: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    model: String,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    max_steps: Option<u32>,
    #[serde(default)]
    tools: Vec<String>,
    tool_choice: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyMessage {
    role: String,
    content: String,
}

fn decode_http(body: &Bytes) -> Result<(AskInput, bool), ApiError> {
    let v = parse_value(body)?;
    // The mode first: a bad one is named even when other fields are wrong too.
    let mode = match v.get("mode") {
        None | Some(Value::Null) => Mode::Auto,
        Some(Value::String(s)) => Mode::parse(s)?,
        Some(_) => return Err(ApiError::invalid("mode", "must be a string")),
    };
    let b: AskBody = from_value(&v)?;
    let input = AskInput {
        messages: b
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
        mode,
        model: b.model,
        sampling: SamplingInput {
            max_tokens: b.max_tokens,
            temperature: b.temperature,
            top_p: b.top_p,
            top_k: b.top_k,
            seed: b.seed,
            stop: b.stop,
            ..Default::default()
        },
        max_steps: b.max_steps,
        tools: b.tools,
        tool_choice: b.tool_choice,
    };
    Ok((input, b.stream))
}

pub(crate) async fn ask(
    State(state): State<Arc<AppState>>,
    ctx: Result<RequestContext, ApiError>,
    body: Bytes,
) -> Response {
    let mut obs = observer(&state, "http", HTTP_PATH, "auto", ctx.as_ref().ok());
    let (ctx, (input, stream)) = match ctx.and_then(|c| decode_http(&body).map(|d| (c, d))) {
        Ok(x) => x,
        Err(e) => {
            obs.on_error(e.codes());
            return e.into_response();
        }
    };
    let asked = match state.assistant.ask(&state, ctx, input, obs).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let mut resp = if stream {
        sse(asked.events).into_response()
    } else {
        match collect(asked.model, asked.events).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => return e.into_response(),
        }
    };
    for (k, v) in asked.ratelimit {
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

fn error_json(e: &ApiError) -> Value {
    let (kind, param, code) = e.openai_fields();
    json!({"error": {"message": e.message(), "type": kind, "param": param, "code": code}})
}

fn sse(events: AskStream) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let body = events.flat_map(|ev| {
        let out = match ev {
            Ok(ev) => {
                let done = matches!(ev, AskEvent::Usage(_));
                let mut v = vec![Event::default().event(ev.kind()).data(ev.data().to_string())];
                if done {
                    v.push(Event::default().event("done").data("{}"));
                }
                v
            }
            Err(e) => vec![Event::default().event("error").data(error_json(&e).to_string())],
        };
        futures::stream::iter(out.into_iter().map(Ok))
    });
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The whole answer as one JSON object: the route, the sources, the agent's trace, the answer.
async fn collect(model: String, mut events: AskStream) -> Result<Value, ApiError> {
    let mut out = json!({
        "id": format!("ask-{}", uuid::Uuid::new_v4().simple()),
        "object": "assistant.answer",
        "model": model,
        "sources": [],
        "steps": [],
    });
    let mut answer = String::new();
    let mut steps = Vec::new();
    while let Some(ev) = events.next().await {
        match ev? {
            AskEvent::Route(r) => out["route"] = json!(r),
            AskEvent::Retrieval(s) => out["sources"] = json!(s),
            AskEvent::Token(t) => answer.push_str(&t),
            AskEvent::Usage(u) => {
                out["usage"] = json!(u);
                out["answer"] = json!(answer);
                out["steps"] = json!(steps);
                return Ok(out);
            }
            ev => {
                let mut step = ev.data();
                step["type"] = json!(ev.kind());
                steps.push(step);
            }
        }
    }
    Err(ApiError::Internal("the answer ended without its usage".into()))
}

pub(crate) fn grpc_service(state: Arc<AppState>, max_message_bytes: usize) -> AssistantServer<AssistantService> {
    AssistantServer::new(AssistantService { state })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

pub(crate) struct AssistantService {
    state: Arc<AppState>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AskEvent, Status>> + Send>>;

fn decode_grpc(r: pb::AskRequest) -> Result<AskInput, ApiError> {
    let mode = match pb::AssistantMode::try_from(r.mode) {
        Ok(pb::AssistantMode::Auto) => Mode::Auto,
        Ok(pb::AssistantMode::Chat) => Mode::Chat,
        Ok(pb::AssistantMode::Rag) => Mode::Rag,
        Ok(pb::AssistantMode::Agent) => Mode::Agent,
        Err(_) => {
            return Err(ApiError::invalid(
                "mode",
                format!("unknown AssistantMode value {}", r.mode),
            ))
        }
    };
    // The conversation is plain text: the agent makes its own tool calls.
    if let Some(i) = r
        .messages
        .iter()
        .position(|m| !m.tool_calls.is_empty() || !m.tool_call_id.is_empty())
    {
        return Err(ApiError::invalid(
            format!("messages[{i}]"),
            "tool_calls and tool_call_id are not accepted by Ask (the agent makes its own tool calls)",
        ));
    }
    Ok(AskInput {
        messages: r
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
        mode,
        model: r.model,
        sampling: super::grpc::sampling(r.sampling),
        max_steps: (r.max_steps > 0).then_some(r.max_steps),
        tools: r.tools,
        tool_choice: (!r.tool_choice.is_empty()).then_some(r.tool_choice),
    })
}

fn encode(ev: AskEvent) -> pb::AskEvent {
    use pb::ask_event::Event as E;
    let event = match ev {
        AskEvent::Route(r) => E::Route(pb::RouteEvent {
            mode: r.mode.label().into(),
            reason: r.reason,
            confidence: r.confidence,
        }),
        AskEvent::Retrieval(sources) => E::Retrieval(pb::RetrievalEvent {
            sources: sources
                .into_iter()
                .map(|c| pb::Source {
                    index: c.index,
                    chunk_id: c.chunk_id,
                    source: c.source,
                    score: c.score,
                    text: c.text,
                })
                .collect(),
        }),
        AskEvent::Thought { step, text } => E::Thought(pb::ThoughtEvent { step, text }),
        AskEvent::ToolCall(c) => E::ToolCall(pb::ToolCallEvent {
            step: c.step,
            id: c.id,
            name: c.name,
            arguments: c.arguments,
        }),
        AskEvent::ToolResult(r) => E::ToolResult(pb::ToolResultEvent {
            step: r.step,
            id: r.id,
            name: r.name,
            output: r.output,
            error: r.error.unwrap_or_default(),
            duration_ms: r.duration_ms,
        }),
        AskEvent::Token(text) => E::Token(pb::TokenEvent { text }),
        AskEvent::Usage(u) => E::Usage(pb::UsageEvent {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cost_usd: u.cost_usd,
            steps: u.steps,
            finish_reason: u.finish_reason,
        }),
    };
    pb::AskEvent { event: Some(event) }
}

#[tonic::async_trait]
impl AssistantRpc for AssistantService {
    type AskStream = EventStream;

    async fn ask(&self, req: Request<pb::AskRequest>) -> Result<tonic::Response<EventStream>, Status> {
        let ctx = RequestContext::of(req.extensions());
        let mut obs = observer(&self.state, "grpc", "Ask", "auto", ctx.as_ref().ok());
        let (ctx, input) = match ctx.and_then(|c| decode_grpc(req.into_inner()).map(|i| (c, i))) {
            Ok(x) => x,
            Err(e) => {
                obs.on_error(e.codes());
                return Err(e.into());
            }
        };
        let asked = self.state.assistant.ask(&self.state, ctx, input, obs).await?;
        let out = asked.events.map(|ev| ev.map(encode).map_err(Status::from));
        let mut resp = tonic::Response::new(Box::pin(out) as EventStream);
        for (k, v) in asked.ratelimit {
            if let Ok(v) = v.parse() {
                resp.metadata_mut().insert(k, v);
            }
        }
        Ok(resp)
    }
}
