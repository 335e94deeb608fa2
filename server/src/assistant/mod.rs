//! The assistant service (`genai.v1.Assistant/Ask`, `POST /v1/assistant/ask`): one question,
//! answered in a mode — plain chat, RAG over the caller's knowledge base, or the ReAct agent
//! ([`agent`]) with the built-in tools ([`tools`]) — chosen by the request or by the router,
//! and streamed as typed [`AskEvent`]s: the route, the retrieved sources, the agent's thoughts,
//! tool calls and results, the answer's tokens and the final usage.
//!
//! Protocol-neutral: the doors (`api::assistant`) decode into an [`AskInput`] and encode the
//! events. Chat and RAG go through the pipeline exactly as `/v1/chat/completions` does (limits,
//! tenant limits and budget, safety chain, observer); the agent calls the pipeline once per
//! step, so each step is limited, charged and scanned the same way, and its tool outputs pass
//! the injection scanner before the model reads them.
//!
//! Invariants: the stream starts with one `route` event and ends with one `usage` event or an
//! error; a RAG answer's `retrieval` event carries every source the model was given, cited or
//! not; dropping the stream cancels the generation or the agent's running tools; one observer
//! records the whole request (route label = the mode answered in).
//!
//! Tested: the agent and the tools by unit tests (scripted model, paused clock, real local HTTP
//! server, real embedder); the whole service through the real binary and SmolLM2 in
//! `tests/e2e/assistant.rs` (agent arithmetic through `calculator` on SSE and gRPC, RAG's
//! retrieval event, chat, bad mode).

pub(crate) mod agent;
pub(crate) mod tools;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use genai_engine::{EngineEvent, Usage};
use genai_models::chat_template::ChatMessage;
use genai_retrieval::rag::Citation;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::ops::observe::Observer;
use crate::pipeline::context::RequestContext;
use crate::pipeline::sampling::SamplingInput;
use crate::pipeline::{GenerateInput, Prompt, Route};
use crate::router::Mode as RoutedMode;
use crate::state::AppState;
use agent::{Agent, AgentLimits};
use tools::{Tool, ToolContext};

/// `[agent]`: the ReAct agent and its tools.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Most model calls (Thought -> Action steps) per request; a request's `max_steps` may lower it.
    pub max_steps: u32,
    /// Consecutive steps of malformed tool calls re-prompted with the error before giving up.
    pub max_retries: u32,
    /// Longest tool output the model reads, in bytes (cut beyond).
    pub max_observation_bytes: usize,
    /// Hosts `http_get` may fetch from: `host`, `host:port` or `*.domain`; empty refuses all.
    pub http_allow_hosts: Vec<String>,
    /// Largest body `http_get` reads, in bytes.
    pub http_max_bytes: usize,
    /// `http_get`'s time limit per call (connect + whole response), ms.
    pub http_timeout_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_steps: 6,
            max_retries: 2,
            max_observation_bytes: 4096,
            http_allow_hosts: Vec::new(),
            http_max_bytes: 65_536,
            http_timeout_ms: 5_000,
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=64).contains(&self.max_steps) {
            anyhow::bail!(
                "invalid config: agent.max_steps must be in 1..=64 (got {})",
                self.max_steps
            );
        }
        if self.max_observation_bytes < 64 || self.http_max_bytes == 0 || self.http_timeout_ms == 0 {
            anyhow::bail!(
                "invalid config: agent.max_observation_bytes must be >= 64, agent.http_max_bytes and agent.http_timeout_ms > 0"
            );
        }
        if let Some(h) = self
            .http_allow_hosts
            .iter()
            .find(|h| h.trim().is_empty() || h.contains('/'))
        {
            anyhow::bail!("invalid config: agent.http_allow_hosts: {h:?} is not a host name (no scheme or path)");
        }
        Ok(())
    }
}

/// How a question is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Auto,
    Chat,
    Rag,
    Agent,
}

impl Mode {
    pub(crate) fn parse(s: &str) -> Result<Mode, ApiError> {
        match s {
            "auto" => Ok(Mode::Auto),
            "chat" => Ok(Mode::Chat),
            "rag" => Ok(Mode::Rag),
            "agent" => Ok(Mode::Agent),
            other => Err(ApiError::invalid(
                "mode",
                format!("must be \"auto\", \"chat\", \"rag\" or \"agent\", got {other:?}"),
            )),
        }
    }

    /// The route label in metrics and the request log.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Chat => "chat",
            Mode::Rag => "rag",
            Mode::Agent => "agent",
        }
    }
}

/// A decoded Ask request.
pub(crate) struct AskInput {
    pub messages: Vec<ChatMessage>,
    pub mode: Mode,
    pub model: String,
    pub sampling: SamplingInput,
    /// Agent: at most `[agent] max_steps`; None = that.
    pub max_steps: Option<u32>,
    /// Agent: the tools it may use; empty = all.
    pub tools: Vec<String>,
    /// Agent: "required" (default), "auto" or a tool name (the first step).
    pub tool_choice: Option<String>,
}

/// The mode chosen and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RouteInfo {
    pub mode: Mode,
    pub reason: String,
    pub confidence: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ToolCallEvent {
    pub step: u32,
    pub id: String,
    pub name: String,
    /// JSON object text, as the model wrote it.
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ToolResultEvent {
    pub step: u32,
    pub id: String,
    pub name: String,
    pub output: String,
    pub error: Option<String>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct UsageInfo {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cost_usd: f64,
    pub steps: u32,
    /// "stop", "length", "content_filter"; the agent adds "max_steps" and "malformed".
    pub finish_reason: String,
}

/// One event of an answer, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AskEvent {
    Route(RouteInfo),
    /// Every source the model was given (RAG), in prompt order.
    Retrieval(Vec<Citation>),
    Thought {
        step: u32,
        text: String,
    },
    ToolCall(ToolCallEvent),
    ToolResult(ToolResultEvent),
    Token(String),
    Usage(UsageInfo),
}

impl AskEvent {
    /// The SSE event name.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AskEvent::Route(_) => "route",
            AskEvent::Retrieval(_) => "retrieval",
            AskEvent::Thought { .. } => "thought",
            AskEvent::ToolCall(_) => "tool_call",
            AskEvent::ToolResult(_) => "tool_result",
            AskEvent::Token(_) => "token",
            AskEvent::Usage(_) => "usage",
        }
    }

    /// The event's JSON (SSE data, and the non-streamed answer's pieces).
    pub(crate) fn data(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            AskEvent::Route(r) => json!(r),
            AskEvent::Retrieval(s) => json!({ "sources": s }),
            AskEvent::Thought { step, text } => json!({"step": step, "text": text}),
            AskEvent::ToolCall(c) => json!(c),
            AskEvent::ToolResult(r) => json!(r),
            AskEvent::Token(t) => json!({ "text": t }),
            AskEvent::Usage(u) => json!(u),
        }
    }
}

pub(crate) type AskStream = Pin<Box<dyn Stream<Item = Result<AskEvent, ApiError>> + Send>>;

/// A started answer.
pub(crate) struct Asked {
    pub model: String,
    pub events: AskStream,
    /// The tenant's `x-ratelimit-*` as of admission (chat and RAG; the agent's steps are
    /// admitted one by one inside the stream).
    pub ratelimit: Vec<(&'static str, String)>,
}

/// The tools and settings of the service, built once at start-up.
pub(crate) struct Assistant {
    cfg: AgentConfig,
    tools: Vec<Arc<dyn Tool>>,
}

impl Assistant {
    pub(crate) fn new(
        cfg: &AgentConfig,
        knowledge: Arc<genai_retrieval::knowledge::KnowledgeService>,
        rag: &crate::config::RagConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            tools: tools::builtin(cfg, knowledge, rag)?,
        })
    }

    /// Routes and starts answering. `obs` records the request, whatever happens.
    pub(crate) async fn ask(
        &self,
        state: &Arc<AppState>,
        ctx: RequestContext,
        input: AskInput,
        mut obs: Observer,
    ) -> Result<Asked, ApiError> {
        let started = self.start(state, ctx, input, &mut obs).await;
        match started {
            Ok(Started::Pipeline(route, input, ctx)) => {
                let answer = state.pipeline.generate(&ctx, *input, obs).await?;
                let price = price(state, &answer.model);
                let mut head = vec![Ok(AskEvent::Route(route.clone()))];
                if route.mode == Mode::Rag {
                    head.push(Ok(AskEvent::Retrieval(answer.citations)));
                }
                let tail = answer.events.filter_map(move |ev| {
                    futures::future::ready(match ev {
                        Ok(EngineEvent::Delta { text, .. }) => (!text.is_empty()).then_some(Ok(AskEvent::Token(text))),
                        Ok(EngineEvent::Finished { reason, usage }) => {
                            Some(Ok(AskEvent::Usage(usage_info(&usage, price, 1, reason.as_str()))))
                        }
                        Ok(EngineEvent::Failed { message }) => Some(Err(ApiError::Internal(message))),
                        Err(e) => Some(Err(e)),
                    })
                });
                Ok(Asked {
                    model: answer.model,
                    events: Box::pin(futures::stream::iter(head).chain(tail)),
                    ratelimit: answer.ratelimit,
                })
            }
            Ok(Started::Agent(route, agent, messages, model)) => {
                let price = price(state, &model);
                let deadline = agent.deadline;
                let events = spawn_events(move |tx| async move {
                    let _ = tx.send(Ok(AskEvent::Route(route))).await;
                    let run = agent.run(messages, &tx);
                    let res = match deadline {
                        Some(d) => tokio::time::timeout_at(d, run)
                            .await
                            .unwrap_or(Err(ApiError::DeadlineExceeded)),
                        None => run.await,
                    };
                    match res {
                        Ok(out) => {
                            obs.set_model(&model, &out.prompt);
                            obs.on_text(&out.answer);
                            obs.on_finish(out.finish.engine_reason(), &out.usage);
                            let usage = usage_info(&out.usage, price, out.steps, out.finish.as_str());
                            let _ = tx.send(Ok(AskEvent::Usage(usage))).await;
                        }
                        Err(e) => {
                            obs.on_error(e.codes());
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                });
                Ok(Asked {
                    model: state.pipeline.models().map(|m| m.0).unwrap_or_default(),
                    events,
                    ratelimit: Vec::new(),
                })
            }
            Err(e) => {
                obs.on_error(e.codes());
                Err(e)
            }
        }
    }

    /// Validates, routes, and prepares the answer in its mode.
    async fn start(
        &self,
        state: &Arc<AppState>,
        ctx: RequestContext,
        input: AskInput,
        obs: &mut Observer,
    ) -> Result<Started, ApiError> {
        check_messages(&input.messages)?;
        let route = match input.mode {
            Mode::Auto => {
                // `check_messages` made sure the last message is the user's question.
                let query = input.messages.last().map_or("", |m| m.content.as_str());
                let d = state.router.route(&ctx.tenant, query).await;
                RouteInfo {
                    mode: match d.mode {
                        RoutedMode::Chat => Mode::Chat,
                        RoutedMode::Rag => Mode::Rag,
                        RoutedMode::Agent => Mode::Agent,
                    },
                    reason: format!("{}: {}", d.by.as_str(), d.reason),
                    confidence: d.confidence,
                }
            }
            mode => RouteInfo {
                mode,
                reason: "explicit".into(),
                confidence: 1.0,
            },
        };
        obs.set_route(route.mode.label());
        if route.mode != Mode::Agent {
            for (field, set) in [
                ("max_steps", input.max_steps.is_some()),
                ("tools", !input.tools.is_empty()),
                ("tool_choice", input.tool_choice.is_some()),
            ] {
                if set && input.mode != Mode::Auto {
                    return Err(ApiError::invalid(field, "applies to mode \"agent\" only"));
                }
            }
        }
        match route.mode {
            Mode::Chat | Mode::Rag | Mode::Auto => {
                let gen = GenerateInput {
                    model: input.model,
                    prompt: Prompt::Chat(input.messages),
                    route: if route.mode == Mode::Rag {
                        Route::Rag
                    } else {
                        Route::Chat
                    },
                    sampling: input.sampling,
                    grammar: None,
                    tools: None,
                };
                Ok(Started::Pipeline(route, Box::new(gen), ctx))
            }
            Mode::Agent => {
                let tools = tools::select(&self.tools, &input.tools)?;
                let choice = agent::tool_choice(input.tool_choice.as_deref(), &tools)?;
                let max_steps = match input.max_steps {
                    None | Some(0) => self.cfg.max_steps,
                    Some(n) if n <= self.cfg.max_steps => n,
                    Some(n) => {
                        return Err(ApiError::invalid(
                            "max_steps",
                            format!("at most {} ([agent] max_steps), got {n}", self.cfg.max_steps),
                        ))
                    }
                };
                let model = agent::PipelineModel::new(
                    state.clone(),
                    ctx.clone(),
                    input.model.clone(),
                    input.sampling,
                    obs.safety_flags(),
                );
                let model_name = state.pipeline.models().map(|m| m.0)?;
                let agent = Agent {
                    model: Arc::new(model),
                    tools,
                    safety: state.pipeline.safety().clone(),
                    flags: obs.safety_flags(),
                    ctx: ToolContext {
                        tenant: ctx.tenant.clone(),
                    },
                    limits: AgentLimits {
                        max_steps,
                        max_retries: self.cfg.max_retries,
                        max_observation_bytes: self.cfg.max_observation_bytes,
                    },
                    first_choice: choice,
                    deadline: ctx.deadline,
                };
                Ok(Started::Agent(route, agent, input.messages, model_name))
            }
        }
    }
}

enum Started {
    Pipeline(RouteInfo, Box<GenerateInput>, RequestContext),
    Agent(RouteInfo, Agent, Vec<ChatMessage>, String),
}

fn check_messages(messages: &[ChatMessage]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "must contain at least one message"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("must be \"system\", \"user\" or \"assistant\", got {:?}", m.role),
            ));
        }
    }
    match messages.last() {
        Some(m) if m.role == "user" && !m.content.trim().is_empty() => Ok(()),
        _ => Err(ApiError::invalid(
            "messages",
            "the last message must be a non-empty user message (the question)",
        )),
    }
}

/// The model's token prices (USD per 1k), zero when it has none.
fn price(state: &AppState, model: &str) -> (f64, f64) {
    state
        .config
        .ops
        .cost
        .prices
        .get(model)
        .map_or((0.0, 0.0), |p| (p.prompt_per_1k, p.completion_per_1k))
}

fn usage_info(u: &Usage, (p, c): (f64, f64), steps: u32, finish: &str) -> UsageInfo {
    UsageInfo {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cost_usd: f64::from(u.prompt_tokens) / 1000.0 * p + f64::from(u.completion_tokens) / 1000.0 * c,
        steps,
        finish_reason: finish.to_owned(),
    }
}

/// Runs `work` on its own task, streaming what it sends; dropping the stream aborts the task
/// (and so cancels whatever it awaits: a model step, running tools).
pub(crate) fn spawn_events<F, Fut>(work: F) -> AskStream
where
    F: FnOnce(mpsc::Sender<Result<AskEvent, ApiError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let (tx, rx) = mpsc::channel(64);
    let guard = AbortOnDrop(tokio::spawn(work(tx)));
    Box::pin(ReceiverStream::new(rx).map(move |ev| {
        let _ = &guard;
        ev
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_ones_name_the_field() {
        for (s, m) in [
            ("auto", Mode::Auto),
            ("chat", Mode::Chat),
            ("rag", Mode::Rag),
            ("agent", Mode::Agent),
        ] {
            assert_eq!(Mode::parse(s).unwrap(), m);
            assert_eq!(m.label(), s);
        }
        let e = Mode::parse("wizard").unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { param, message } if param == "mode" && message.contains("\"wizard\""))
        );
    }

    #[test]
    fn the_question_must_come_last() {
        let m = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert!(check_messages(&[m("system", "be brief"), m("user", "hi")]).is_ok());
        for (msgs, param) in [
            (vec![], "messages"),
            (vec![m("user", "hi"), m("assistant", "hello")], "messages"),
            (vec![m("user", "  ")], "messages"),
            (vec![m("robot", "x"), m("user", "hi")], "messages[0].role"),
        ] {
            let e = check_messages(&msgs).unwrap_err();
            assert!(matches!(&e, ApiError::Invalid { param: p, .. } if p == param), "{e:?}");
        }
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(AgentConfig::default().validate().is_ok());
        let bad = AgentConfig {
            max_steps: 0,
            ..AgentConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("agent.max_steps"));
        let bad = AgentConfig {
            http_allow_hosts: vec!["https://example.com/".into()],
            ..AgentConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("agent.http_allow_hosts"));
    }
}
