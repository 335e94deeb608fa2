//! A remote OpenAI-compatible backend (`[[llm.backends]]`, `kind = "openai"`): another GenAI
//! Factory node, vLLM, or a provider, reached over HTTP(S) with reqwest.
//!
//! A chat goes to `POST {base_url}/v1/chat/completions`, a text prompt to `/v1/completions`,
//! always with `stream: true` and `stream_options.include_usage`; the SSE chunks ([`super::sse`])
//! become the engine-neutral [`EngineEvent`]s the pipeline consumes (text deltas without token
//! ids, then `Finished`). `prepare_*` cannot tokenize with the upstream's tokenizer, so it
//! estimates the prompt's tokens ([`super::estimate_chat_tokens`]) for the tenant reservation;
//! the upstream's reported `usage` settles it at the end (an estimate stands in where the
//! upstream reports none). Embeddings and tokenization are the local models' business: asked of
//! a remote backend they are a clear 400.
//!
//! Each request runs attempts under [`RetryPolicy`] and the backend's [`Breaker`] until the
//! first text: connect errors, HTTP 408/429/5xx, the first-token timeout and a stream broken
//! before any text are retried. From the first text on the stream is committed: an upstream
//! failure or an `idle_timeout` between chunks ends it with an error event (the breaker counts
//! it), never a retry. A finish reason already received makes a late failure harmless (the
//! stream ends normally). Dropping the stream drops the HTTP response: the upstream call is
//! cancelled with it.
//!
//! Invariants: any upstream bytes yield events or a clean error, never a panic; the stream
//! always ends with `Finished` or an error; at most one attempt's text ever reaches the client.
//!
//! Tested: `tests` below, against a real HTTP server on 127.0.0.1 ([`super::fault_server`])
//! with tokio's paused clock: streaming and usage, retries and their delays, Retry-After and
//! its cap, the budget, timeouts, resets and malformed SSE before and after the first text,
//! client errors, cancellation, the breaker; the fallback chain and 1 000 randomized fault runs
//! in `fallback`'s tests; the binary in `tests/e2e/resilience.rs`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use genai_engine::{EngineEvent, FinishReason, SamplingParams, Usage};
use genai_grammar::{Grammar, GrammarRequest};
use genai_models::chat_template::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};

use super::backends::BackendConfig;
use super::breaker::Breaker;
use super::retry::{parse_retry_after, Failure, RetryPolicy};
use super::sse::{SseEvent, SseParser};
use super::{
    estimate_chat_tokens, estimate_tokens, Embeddings, EventStream, Generation, Health, LlmBackend, Prepared,
    PreparedInput, Tokenized,
};
use crate::error::ApiError;
use crate::ops::metrics::BACKEND_ATTEMPTS;
use crate::pipeline::context::{Priority, RequestContext};

/// What a remote backend sends upstream.
pub(crate) struct RemotePrompt {
    input: RemoteInput,
    /// Structured output, passed on in the fields vLLM and GenAI Factory take
    /// (`response_format`, `guided_*`): the upstream enforces it.
    grammar: Option<Grammar>,
}

enum RemoteInput {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// Bytes of an error body kept for the message.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Clone)]
pub(crate) struct RemoteBackend(Arc<Inner>);

struct Inner {
    name: String,
    upstream_model: String,
    chat_url: reqwest::Url,
    text_url: reqwest::Url,
    api_key: Option<String>,
    client: reqwest::Client,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
}

impl RemoteBackend {
    /// A backend from a validated `[[llm.backends]]` table and its API key.
    pub(crate) fn new(cfg: &BackendConfig, api_key: Option<String>) -> anyhow::Result<Self> {
        let root = cfg.base_url.trim_end_matches('/');
        let root = root.strip_suffix("/v1").unwrap_or(root);
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{root}/v1/{path}"))
                .map_err(|e| anyhow::anyhow!("llm.backends `{}`: base_url: {e}", cfg.name))
        };
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .user_agent(concat!("genai-factory/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("llm.backends `{}`: building the HTTP client: {e}", cfg.name))?;
        Ok(Self(Arc::new(Inner {
            name: cfg.name.clone(),
            upstream_model: cfg.model.clone(),
            chat_url: url("chat/completions")?,
            text_url: url("completions")?,
            api_key,
            client,
            first_token_timeout: cfg.first_token_timeout,
            idle_timeout: cfg.idle_timeout,
            retry: RetryPolicy::new(cfg),
            breaker: Arc::new(Breaker::new(
                &cfg.name,
                cfg.failure_threshold,
                cfg.failure_window,
                cfg.open_for,
            )),
        })))
    }

    #[cfg(test)]
    pub(crate) fn breaker(&self) -> &Breaker {
        &self.0.breaker
    }

    /// The upstream request body; vLLM-style extras only when set (OpenAI refuses unknown
    /// fields).
    fn body(&self, prompt: &RemotePrompt, p: &SamplingParams) -> Value {
        let mut b = json!({
            "model": self.0.upstream_model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        });
        match &prompt.input {
            RemoteInput::Chat(m) => {
                b["messages"] = m
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect();
            }
            RemoteInput::Text(t) => b["prompt"] = json!(t),
        }
        match &prompt.grammar {
            None => {}
            Some(Grammar::JsonObject) => b["response_format"] = json!({"type": "json_object"}),
            Some(Grammar::JsonSchema { schema, strict }) => {
                b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": strict}})
            }
            Some(Grammar::Regex(r)) => b["guided_regex"] = json!(r),
            Some(Grammar::Choice(c)) => b["guided_choice"] = json!(c),
            Some(Grammar::Lark(g)) => b["guided_grammar"] = json!(g),
        }
        let mut set = |k: &str, v: Value| b[k] = v;
        if !p.stop.is_empty() {
            set("stop", json!(p.stop));
        }
        if let Some(seed) = p.seed {
            set("seed", json!(seed));
        }
        if p.presence_penalty != 0.0 {
            set("presence_penalty", json!(p.presence_penalty));
        }
        if p.frequency_penalty != 0.0 {
            set("frequency_penalty", json!(p.frequency_penalty));
        }
        if p.top_k > 0 {
            set("top_k", json!(p.top_k));
        }
        if p.min_p > 0.0 {
            set("min_p", json!(p.min_p));
        }
        if p.repetition_penalty != 1.0 {
            set("repetition_penalty", json!(p.repetition_penalty));
        }
        if p.min_tokens > 0 {
            set("min_tokens", json!(p.min_tokens));
        }
        if p.ignore_eos {
            set("ignore_eos", json!(true));
        }
        if !p.stop_token_ids.is_empty() {
            set("stop_token_ids", json!(p.stop_token_ids));
        }
        b
    }

    /// One attempt, up to the first text (or the end, for an empty answer).
    async fn attempt(
        &self,
        url: &reqwest::Url,
        body: &Value,
        text: bool,
        prompt_tokens: usize,
    ) -> Result<Upstream, Failure> {
        let me = &self.0;
        let Some(permit) = me.breaker.acquire() else {
            metrics::counter!(BACKEND_ATTEMPTS, "backend" => me.name.clone(), "outcome" => "circuit_open").increment(1);
            return Err(Failure::CircuitOpen);
        };
        let r = tokio::time::timeout(me.first_token_timeout, self.open(url, body, text, prompt_tokens))
            .await
            .unwrap_or(Err(Failure::FirstTokenTimeout(me.first_token_timeout)));
        let outcome = match &r {
            Ok(_) => "ok",
            Err(f) => f.outcome(),
        };
        metrics::counter!(BACKEND_ATTEMPTS, "backend" => me.name.clone(), "outcome" => outcome).increment(1);
        match &r {
            Err(f) if f.backend_fault() => permit.failure(),
            _ => permit.success(),
        }
        r
    }

    async fn open(
        &self,
        url: &reqwest::Url,
        body: &Value,
        text: bool,
        prompt_tokens: usize,
    ) -> Result<Upstream, Failure> {
        let me = &self.0;
        let mut req = me.client.post(url.clone()).json(body);
        if let Some(key) = &me.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                Failure::Connect(error_chain(&e))
            } else {
                Failure::Stream(format!("no response: {}", error_chain(&e)))
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = parse_retry_after(resp.headers());
            return Err(Failure::Status {
                code: status.as_u16(),
                retry_after,
                message: error_message(resp).await,
            });
        }
        let mut up = Upstream {
            body: Box::pin(resp.bytes_stream()),
            decoder: Decoder::new(text, prompt_tokens),
            ended: false,
        };
        up.first().await.map_err(Failure::Stream)?;
        Ok(up)
    }

    /// The request's events: attempts (with retries) up to the first text, then the rest of
    /// that one upstream stream.
    fn events(&self, prompt: RemotePrompt, params: &SamplingParams, prompt_tokens: usize) -> EventStream {
        let text = matches!(prompt.input, RemoteInput::Text(_));
        let body = self.body(&prompt, params);
        let url = if text { &self.0.text_url } else { &self.0.chat_url }.clone();
        enum St {
            Start(RemoteBackend, reqwest::Url, Value),
            Flowing(RemoteBackend, Upstream),
            Done,
        }
        let start = St::Start(self.clone(), url, body);
        Box::pin(futures::stream::unfold(start, move |st| async move {
            match st {
                St::Start(me, url, body) => {
                    let (b, u, m) = (&body, &url, &me);
                    match me.0.retry.run(move || m.attempt(u, b, text, prompt_tokens)).await {
                        Ok(mut up) => {
                            let ev = up.decoder.out.pop_front().expect("an attempt ends at its first event");
                            let next = if matches!(ev, EngineEvent::Finished { .. }) {
                                St::Done
                            } else {
                                St::Flowing(me, up)
                            };
                            Some((Ok(ev), next))
                        }
                        Err(f) => Some((Err(f.into_api_error(&me.0.name)), St::Done)),
                    }
                }
                St::Flowing(me, mut up) => match up.next(Some(me.0.idle_timeout)).await {
                    Ok(ev) => {
                        let done = matches!(ev, EngineEvent::Finished { .. });
                        Some((Ok(ev), if done { St::Done } else { St::Flowing(me, up) }))
                    }
                    Err(e) => {
                        // Committed: no retry, no fallback. The breaker hears about it.
                        me.0.breaker.record_failure();
                        tracing::warn!(backend = %me.0.name, "upstream stream failed after its first text: {e}");
                        let msg = format!("backend `{}` failed mid-stream: {e}", me.0.name);
                        Some((Err(ApiError::Unavailable(msg)), St::Done))
                    }
                },
                St::Done => None,
            }
        }))
    }

    fn unsupported(&self, what: &str) -> ApiError {
        ApiError::invalid(
            "model",
            format!(
                "`{}` is a remote backend: {what} are served by this server's local models only",
                self.0.name
            ),
        )
    }
}

/// The error's message with its causes (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The upstream's error message (OpenAI's `{"error": {"message"}}`, else the body's start).
async fn error_message(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned())
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

/// One upstream response being read.
struct Upstream {
    body: Body,
    decoder: Decoder,
    ended: bool,
}

impl Upstream {
    /// Reads until the first event is decoded (the caller bounds the wait).
    async fn first(&mut self) -> Result<(), String> {
        while self.decoder.out.is_empty() {
            self.read(None).await?;
        }
        Ok(())
    }

    /// The next event, waiting at most `idle` for each piece of the body.
    async fn next(&mut self, idle: Option<Duration>) -> Result<EngineEvent, String> {
        loop {
            if let Some(ev) = self.decoder.out.pop_front() {
                return Ok(ev);
            }
            self.read(idle).await?;
        }
    }

    async fn read(&mut self, idle: Option<Duration>) -> Result<(), String> {
        if self.ended {
            return Err("the stream already ended".into());
        }
        let piece = match idle {
            Some(d) => match tokio::time::timeout(d, self.body.next()).await {
                Ok(p) => p,
                Err(_) => return self.fail(format!("no data for {} (idle_timeout)", humantime::format_duration(d))),
            },
            None => self.body.next().await,
        };
        match piece {
            Some(Ok(bytes)) => self.decoder.feed(&bytes).or_else(|e| self.fail(e)),
            Some(Err(e)) => self.fail(format!("reading the stream: {}", error_chain(&e))),
            None => {
                self.ended = true;
                self.decoder.eof()
            }
        }
    }

    /// A failure, unless the upstream already said how the answer finished: then it ends here.
    fn fail(&mut self, e: String) -> Result<(), String> {
        self.ended = true;
        if self.decoder.finish.is_some() && !self.decoder.finished {
            self.decoder.finish_now();
            Ok(())
        } else {
            Err(e)
        }
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<UsageJson>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    delta: Option<DeltaJson>,
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaJson {
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: u32,
    completion_tokens: u32,
    prompt_tokens_details: Option<CachedJson>,
}

#[derive(Deserialize)]
struct CachedJson {
    cached_tokens: Option<u32>,
}

/// OpenAI stream chunks → engine events.
struct Decoder {
    sse: SseParser,
    /// `/v1/completions` (`choices[0].text`) rather than chat (`choices[0].delta.content`).
    text: bool,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    /// `Finished` was queued: anything after it is ignored.
    finished: bool,
    prompt_estimate: usize,
    completion_estimate: usize,
    out: VecDeque<EngineEvent>,
    events: Vec<SseEvent>,
}

impl Decoder {
    fn new(text: bool, prompt_estimate: usize) -> Self {
        Self {
            sse: SseParser::default(),
            text,
            finish: None,
            usage: None,
            finished: false,
            prompt_estimate,
            completion_estimate: 0,
            out: VecDeque::new(),
            events: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.finished {
            return Ok(());
        }
        let mut events = std::mem::take(&mut self.events);
        let r = self.sse.push(bytes, &mut events);
        for ev in events.drain(..) {
            if !self.finished {
                self.on_event(ev)?;
            }
        }
        self.events = events;
        r.map_err(|e| format!("malformed SSE: {e}"))
    }

    fn on_event(&mut self, ev: SseEvent) -> Result<(), String> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.finish_now();
            return Ok(());
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            let head: String = data.chars().take(80).collect();
            format!("malformed SSE: a chunk that is not an OpenAI chunk ({e}): {head:?}")
        })?;
        if ev.event == "error" || chunk.error.is_some() {
            let err = chunk.error.unwrap_or(Value::Null);
            let msg = err["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string());
            return Err(format!("the upstream reported an error: {msg}"));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_prompt_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            });
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let text = if self.text {
                choice.text
            } else {
                choice.delta.and_then(|d| d.content)
            };
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                self.completion_estimate += estimate_tokens(&text);
                self.out.push_back(EngineEvent::Delta {
                    text,
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                });
            }
            if let Some(r) = choice.finish_reason {
                self.finish = Some(match r.as_str() {
                    "length" => FinishReason::Length,
                    "content_filter" => FinishReason::ContentFilter,
                    _ => FinishReason::Stop,
                });
            }
        }
        Ok(())
    }

    /// Queues `Finished` (once) with the upstream's usage, or the estimates.
    fn finish_now(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let usage = self.usage.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate as u32,
            completion_tokens: self.completion_estimate as u32,
            cached_prompt_tokens: 0,
        });
        self.out.push_back(EngineEvent::Finished {
            reason: self.finish.unwrap_or(FinishReason::Stop),
            usage,
        });
    }

    /// The body ended: fine after `[DONE]` or a finish reason, an error otherwise.
    fn eof(&mut self) -> Result<(), String> {
        if self.finished || self.finish.is_some() {
            self.finish_now();
            Ok(())
        } else {
            Err("the upstream closed the stream before finishing".into())
        }
    }
}

#[async_trait::async_trait]
impl LlmBackend for RemoteBackend {
    fn model(&self) -> &str {
        &self.0.name
    }

    fn embedding_model(&self) -> Option<&str> {
        None
    }

    /// Unknown here: the upstream enforces its own.
    fn context_length(&self) -> usize {
        usize::MAX
    }

    /// Not serving while the circuit refuses calls (the fallback chain skips it at once).
    fn health(&self) -> Health {
        if self.0.breaker.admits() {
            Health::Serving
        } else {
            Health::NotServing(format!("backend `{}`: circuit open", self.0.name))
        }
    }

    async fn prepare_chat(&self, messages: Vec<ChatMessage>) -> Result<Prepared, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "must contain at least one message"));
        }
        let prompt = messages
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Prepared {
            prompt,
            prompt_tokens: estimate_chat_tokens(&messages),
            constraint: None,
            input: PreparedInput::Remote(RemotePrompt {
                input: RemoteInput::Chat(messages),
                grammar: None,
            }),
        })
    }

    async fn prepare_text(&self, prompt: String) -> Result<Prepared, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "must not be empty"));
        }
        Ok(Prepared {
            prompt_tokens: estimate_tokens(&prompt),
            prompt: prompt.clone(),
            constraint: None,
            input: PreparedInput::Remote(RemotePrompt {
                input: RemoteInput::Text(prompt),
                grammar: None,
            }),
        })
    }

    async fn prepare_grammar(&self, prepared: &mut Prepared, grammar: GrammarRequest) -> Result<(), ApiError> {
        match &mut prepared.input {
            PreparedInput::Remote(prompt) => {
                prompt.grammar = Some(grammar.grammar);
                Ok(())
            }
            _ => Err(ApiError::Internal(format!(
                "backend `{}` was handed another backend's prompt",
                self.0.name
            ))),
        }
    }

    fn submit(
        &self,
        _ctx: &RequestContext,
        prepared: Prepared,
        params: SamplingParams,
    ) -> Result<Generation, ApiError> {
        if params.logprobs.is_some() {
            return Err(ApiError::invalid(
                "logprobs",
                format!("not supported by the remote backend `{}`", self.0.name),
            ));
        }
        let PreparedInput::Remote(prompt) = prepared.input else {
            return Err(ApiError::Internal(format!(
                "backend `{}` was handed another backend's prompt",
                self.0.name
            )));
        };
        Ok(Generation {
            prompt: prepared.prompt,
            events: self.events(prompt, &params, prepared.prompt_tokens),
        })
    }

    async fn embed(&self, _texts: Vec<String>, _priority: Priority) -> Result<Embeddings, ApiError> {
        Err(self.unsupported("embeddings"))
    }

    async fn tokenize(&self, _text: String, _add_special_tokens: bool) -> Result<Tokenized, ApiError> {
        Err(self.unsupported("tokenize and detokenize"))
    }

    async fn detokenize(&self, _ids: Vec<u32>, _skip_special_tokens: bool) -> Result<String, ApiError> {
        Err(self.unsupported("tokenize and detokenize"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::llm::breaker::CircuitState;
    use crate::llm::fault_server::{collect, event, FaultServer, Hit, Reply, Step, SSE_HEAD};

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    pub(crate) fn config(url: &str) -> BackendConfig {
        BackendConfig {
            name: "up".into(),
            base_url: url.into(),
            model: "up-model".into(),
            first_token_timeout: 5 * S,
            idle_timeout: 5 * S,
            max_retries: 3,
            initial_backoff: 100 * MS,
            max_backoff: S,
            retry_after_cap: 10 * S,
            failure_threshold: 1000,
            ..Default::default()
        }
    }

    fn backend(cfg: BackendConfig) -> RemoteBackend {
        RemoteBackend::new(&cfg, None).unwrap()
    }

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]
    }

    async fn chat(b: &RemoteBackend) -> (String, Result<Usage, ApiError>) {
        let p = b.prepare_chat(user("hi")).await.unwrap();
        let g = b
            .submit(&RequestContext::for_tests(), p, SamplingParams::default())
            .unwrap();
        collect(g.events).await
    }

    /// Time between consecutive requests (on the paused clock: exactly the waits).
    fn gaps(hits: &[Hit]) -> Vec<Duration> {
        hits.windows(2).map(|w| w[1].at - w[0].at).collect()
    }

    fn message(r: Result<Usage, ApiError>) -> String {
        r.unwrap_err().message()
    }

    #[tokio::test(start_paused = true)]
    async fn streams_chat_text_with_the_upstreams_usage() {
        let srv = FaultServer::start(vec![], Reply::chat(&["Hel", "lo", " world"])).await;
        let mut cfg = config(&format!("{}/v1/", srv.url));
        cfg.name = "peer".into();
        let b = RemoteBackend::new(&cfg, Some("sk-test".into())).unwrap();
        let p = b.prepare_chat(user("hi there")).await.unwrap();
        assert_eq!(p.prompt_tokens, estimate_chat_tokens(&user("hi there")));
        let params = SamplingParams {
            seed: Some(7),
            stop: vec!["\n\n".into()],
            ..Default::default()
        };
        let g = b.submit(&RequestContext::for_tests(), p, params).unwrap();
        let (text, usage) = collect(g.events).await;
        assert_eq!(text, "Hello world");
        let usage = usage.unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (11, 3),
            "the upstream's own usage"
        );
        let hit = &srv.hits()[0];
        assert_eq!(hit.path, "/v1/chat/completions");
        assert_eq!(hit.authorization.as_deref(), Some("Bearer sk-test"));
        let body = &hit.body;
        assert_eq!(body["model"], "up-model");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi there"}]));
        assert_eq!(
            (body["seed"].clone(), body["stop"].clone()),
            (json!(7), json!(["\n\n"]))
        );
        // vLLM extras only when set: an OpenAI upstream refuses fields it does not know.
        assert!(body.get("top_k").is_none() && body.get("ignore_eos").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn text_prompts_stream_from_completions_and_estimate_missing_usage() {
        let srv = FaultServer::start(vec![], Reply::text(&["one", " two"])).await;
        let b = backend(config(&srv.url));
        let p = b.prepare_text("count: ".into()).await.unwrap();
        let g = b
            .submit(&RequestContext::for_tests(), p, SamplingParams::default())
            .unwrap();
        let (text, usage) = collect(g.events).await;
        assert_eq!(text, "one two");
        let usage = usage.unwrap();
        assert_eq!(usage.prompt_tokens as usize, estimate_tokens("count: "));
        assert_eq!(
            usage.completion_tokens as usize,
            estimate_tokens("one") + estimate_tokens(" two")
        );
        assert_eq!(srv.hits()[0].path, "/v1/completions");
        assert_eq!(srv.hits()[0].body["prompt"], "count: ");
        // What a remote backend cannot do is a clear 400.
        assert!(matches!(
            b.tokenize("x".into(), true).await,
            Err(ApiError::Invalid { .. })
        ));
        let p = b.prepare_text("x".into()).await.unwrap();
        let lp = SamplingParams {
            logprobs: Some(1),
            ..Default::default()
        };
        let e = b.submit(&RequestContext::for_tests(), p, lp).err().unwrap();
        assert!(
            matches!(e, ApiError::Invalid { ref param, .. } if param == "logprobs"),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_429_and_5xx_with_full_jitter_and_retry_after() {
        let script = vec![
            Reply::status(429, Some("3")),
            Reply::status(500, None),
            Reply::status(503, None),
        ];
        let srv = FaultServer::start(script, Reply::chat(&["ok"])).await;
        let b = backend(config(&srv.url));
        let (text, r) = chat(&b).await;
        assert_eq!((text.as_str(), r.is_ok()), ("ok", true));
        let hits = srv.hits();
        assert_eq!(hits.len(), 4, "1 attempt + 3 retries");
        let g = gaps(&hits);
        assert_eq!(g[0], 3 * S, "Retry-After is waited as sent");
        // Full jitter: the k-th wait is drawn from [0, 100 ms × 2^(k-1)].
        assert!(g[1] <= 200 * MS, "{g:?}");
        assert!(g[2] <= 400 * MS, "{g:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_capped_and_the_last_failure_is_reported() {
        let srv = FaultServer::start(vec![Reply::status(429, Some("100"))], Reply::status(503, None)).await;
        let mut cfg = config(&srv.url);
        cfg.max_retries = 2;
        let b = backend(cfg);
        let (text, r) = chat(&b).await;
        assert_eq!(text, "");
        let e = message(r);
        assert!(e.contains("HTTP 503") && e.contains("scripted 503"), "{e}");
        let hits = srv.hits();
        assert_eq!(hits.len(), 3);
        assert_eq!(gaps(&hits)[0], 10 * S, "capped at retry_after_cap");
        assert!(gaps(&hits)[1] <= 200 * MS);

        // A rate limit that outlasts the retries is the client's 429 with the upstream's hint.
        let srv = FaultServer::start(vec![], Reply::status(429, Some("1"))).await;
        let mut cfg = config(&srv.url);
        cfg.max_retries = 1;
        let (_, r) = chat(&backend(cfg)).await;
        assert_eq!(r.unwrap_err(), ApiError::Overloaded { retry_after: S });
        assert_eq!(srv.hit_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_byte_is_retried_a_stall_after_the_first_text_is_not() {
        let srv = FaultServer::start(vec![Reply::chat(&["late"]).after(60 * S)], Reply::chat(&["on time"])).await;
        let b = backend(config(&srv.url));
        let (text, r) = chat(&b).await;
        assert_eq!((text.as_str(), r.is_ok()), ("on time", true));
        let hits = srv.hits();
        assert_eq!(hits.len(), 2);
        let g = gaps(&hits)[0];
        assert!(
            g >= 5 * S && g <= 5 * S + 100 * MS,
            "first_token_timeout, then a backoff: {g:?}"
        );

        let stall = Reply::chat_prefix(&["a", "b"]).then_step(Step::Sleep(60 * S));
        srv.script(vec![stall]);
        let (text, r) = chat(&b).await;
        assert_eq!(text, "ab");
        let e = message(r);
        assert!(e.contains("idle_timeout") && e.contains("mid-stream"), "{e}");
        assert_eq!(srv.hit_count(), 3, "no retry after the first text");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_after_the_first_text_end_the_stream_before_it_are_retried() {
        let endings = [
            ("reset", Step::Reset),
            ("malformed", Step::Write(b"data: {oops\n\n".to_vec())),
            (
                "error event",
                Step::Write(b"data: {\"error\": {\"message\": \"boom\"}}\n\n".to_vec()),
            ),
            ("close", Step::Sleep(Duration::ZERO)),
        ];
        for (what, ending) in endings {
            // The pause lets the client read the text first (a reset discards unread bytes).
            let srv = FaultServer::start(
                vec![Reply::chat_prefix(&["a", "b"])
                    .then_step(Step::Sleep(10 * MS))
                    .then_step(ending.clone())],
                Reply::chat(&["never"]),
            )
            .await;
            let b = backend(config(&srv.url));
            let (text, r) = chat(&b).await;
            assert_eq!(text, "ab", "{what}");
            let e = message(r);
            assert!(e.contains("mid-stream"), "{what}: {e}");
            if what == "error event" {
                assert!(e.contains("boom"), "{e}");
            }
            assert_eq!(srv.hit_count(), 1, "{what}: never retried after the first text");

            // The same fault before any text is retried.
            srv.script(vec![Reply::chat_prefix(&[]).then_step(ending)]);
            let (text, r) = chat(&b).await;
            assert_eq!((text.as_str(), r.is_ok()), ("never", true), "{what}");
            assert_eq!(srv.hit_count(), 3, "{what}");
        }
        // Garbage that is not SSE at all, before any text: retried too.
        let garbage = Reply(vec![Step::Write(SSE_HEAD.to_vec()), Step::Write(vec![0xff; 64])]);
        let srv = FaultServer::start(vec![garbage], Reply::chat(&["fine"])).await;
        let (text, _) = chat(&backend(config(&srv.url))).await;
        assert_eq!((text.as_str(), srv.hit_count()), ("fine", 2));
        // A finish reason already received: a late reset is harmless.
        let finish = event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}));
        let srv = FaultServer::start(
            vec![],
            Reply::chat_prefix(&["done"])
                .then_step(finish)
                .then_step(Step::Sleep(10 * MS))
                .then_step(Step::Reset),
        )
        .await;
        let (text, r) = chat(&backend(config(&srv.url))).await;
        assert_eq!((text.as_str(), r.is_ok()), ("done", true));
    }

    #[tokio::test(start_paused = true)]
    async fn request_errors_are_neither_retried_nor_held_against_the_backend() {
        let srv = FaultServer::start(vec![], Reply::status(400, None)).await;
        let mut cfg = config(&srv.url);
        cfg.failure_threshold = 1;
        let b = backend(cfg);
        for n in 1..=2 {
            let (_, r) = chat(&b).await;
            assert!(
                matches!(r, Err(ApiError::Invalid { ref param, .. }) if param == "request"),
                "{r:?}"
            );
            assert_eq!(srv.hit_count(), n);
        }
        assert_eq!(b.breaker().state(), CircuitState::Closed);
        // A refused connection is retried and reported as such.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut cfg = config(&format!("http://{closed}"));
        cfg.max_retries = 1;
        let e = message(chat(&backend(cfg)).await.1);
        assert!(e.contains("cannot connect"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_caps_retries_across_requests() {
        let srv = FaultServer::start(vec![], Reply::status(503, None)).await;
        let mut cfg = config(&srv.url);
        cfg.max_retries = 5;
        cfg.retry_budget_ratio = 0.0;
        cfg.retry_budget_burst = 2;
        let b = backend(cfg);
        chat(&b).await.1.unwrap_err();
        assert_eq!(srv.hit_count(), 3, "the burst of 2 retries");
        chat(&b).await.1.unwrap_err();
        assert_eq!(srv.hit_count(), 4, "no budget left: no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stream_cancels_the_upstream_call() {
        let srv = FaultServer::start(vec![], Reply::chat(&["a", "b", "c", "d", "e"]).gaps(S)).await;
        let b = backend(config(&srv.url));
        let p = b.prepare_chat(user("hi")).await.unwrap();
        let mut events = b
            .submit(&RequestContext::for_tests(), p, SamplingParams::default())
            .unwrap()
            .events;
        assert!(matches!(events.next().await, Some(Ok(EngineEvent::Delta { .. }))));
        drop(events);
        for _ in 0..100 {
            if srv.hits()[0].cancelled {
                break;
            }
            tokio::time::sleep(100 * MS).await;
        }
        assert!(srv.hits()[0].cancelled, "the upstream saw the connection close");
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_refuses_without_a_call_and_lets_one_probe_through() {
        let srv = FaultServer::start(
            vec![Reply::status(500, None), Reply::status(500, None)],
            Reply::chat(&["ok"]),
        )
        .await;
        let mut cfg = config(&srv.url);
        cfg.max_retries = 0;
        cfg.failure_threshold = 2;
        cfg.open_for = 30 * S;
        let b = backend(cfg);
        chat(&b).await.1.unwrap_err();
        assert_eq!(b.breaker().state(), CircuitState::Closed);
        chat(&b).await.1.unwrap_err();
        assert_eq!(b.breaker().state(), CircuitState::Open);
        assert!(matches!(b.health(), Health::NotServing(_)));
        let e = message(chat(&b).await.1);
        assert!(e.contains("circuit open"), "{e}");
        assert_eq!(srv.hit_count(), 2, "refused without a call");

        tokio::time::advance(30 * S).await;
        assert_eq!(b.health(), Health::Serving);
        // Half-open: of two concurrent requests exactly one probes; the other is refused.
        srv.script(vec![Reply::chat(&["probe"]).after(2 * S)]);
        let (r1, r2) = tokio::join!(chat(&b), chat(&b));
        let mut texts = [r1.0, r2.0];
        texts.sort();
        assert_eq!(texts, ["".to_string(), "probe".to_string()]);
        assert_eq!(srv.hit_count(), 3, "one probe");
        assert_eq!(b.breaker().state(), CircuitState::Closed);
        assert_eq!(chat(&b).await.0, "ok");
    }
}
