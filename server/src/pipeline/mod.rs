//! The protocol-neutral request pipeline between the two doors and the backends.
//!
//! A door decodes its wire format into a [`GenerateInput`] (or an embeddings / tokenize call),
//! takes the [`context::RequestContext`] the shared tower layer attached, and calls
//! [`Pipeline`]. The pipeline checks the hard limits ([`limits`]) before anything costly, picks
//! the backend by model name (the local engine, or a remote one of `[[llm.backends]]` with its
//! fallback chain: [`crate::llm::backends`]), checks the tenant's limits ([`crate::tenancy`]: cheap ones before
//! tokenization, token and budget reservations after it), runs the safety chain's input stages
//! ([`crate::safety`]: the model never sees a raw PII value), runs retrieval for RAG, lets the
//! backend tokenize (on the blocking pool) and generate, and hands back one event stream —
//! through the safety output stage — bounded by the request's deadline and
//! carrying its [`Observer`], which records the request when the stream ends or is dropped.
//! The doors only encode what comes back.
//!
//! Invariants: nothing reaches a tokenizer or a queue before the limits passed; a stream always
//! ends with `Finished` or an error (never silently); health is NOT_SERVING whenever the backend
//! cannot serve, and "shutting down" is only ever said while draining.
//!
//! Tested: the limits and the context have unit tests (`limits`, `context`); the whole path runs
//! through the real binary in `tests/e2e/pipeline.rs` (floods refused on both doors before any
//! tokenization, tenant-scoped prefix cache, control tokens kept as text, unsupported fields,
//! seeded sampling alone and batched, engine panics with recovery and with NOT_SERVING); the
//! tenant limits around tokenization in `tests/e2e/limits.rs`; the safety stages in
//! `tests/e2e/safety.rs`.

pub(crate) mod context;
pub(crate) mod limits;
pub(crate) mod sampling;
pub(crate) mod tool_calls;

use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use genai_engine::EngineEvent;
use genai_grammar::{Grammar, GrammarRequest};
use genai_models::chat_template::ChatMessage;
use genai_retrieval::index::Filter;
use genai_retrieval::rag::{Citation, RagPipeline};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::ApiError;
use crate::llm::backends::Backends;
use crate::llm::local::LocalEngine;
use crate::llm::{Embeddings, EventStream, Health, LlmBackend, Tokenized};
use crate::ops::observe::Observer;
use crate::safety::{output::Outcome, Flags, SafetyChain};
use crate::tenancy::{self, Tenancy};
use context::RequestContext;
use limits::Limits;
use sampling::SamplingInput;

/// What to generate from.
pub(crate) enum Prompt {
    /// A raw completion prompt.
    Text(String),
    /// Chat messages, rendered with the model's template.
    Chat(Vec<ChatMessage>),
}

/// How a chat request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Chat,
    /// Retrieve from the caller's tenant and answer with numbered sources.
    Rag,
}

impl Route {
    /// The `route` label of a chat request in metrics and the request log (completions are
    /// labelled "completion").
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Rag => "rag",
        }
    }
}

pub(crate) struct GenerateInput {
    pub model: String,
    pub prompt: Prompt,
    pub route: Route,
    pub sampling: SamplingInput,
    /// Structured output (`response_format`, `guided_*`, tool-call grammars): the backend
    /// compiles it on the blocking pool before anything is reserved or queued; a grammar that
    /// cannot be used is a 400 naming its field.
    pub grammar: Option<GrammarRequest>,
    /// Chat only: the tools in effect ([`tool_calls`]). Their definitions join the system prompt
    /// after the safety stages ran (they are the caller's declarations, not conversation) and
    /// their grammar constrains the answer; the door parses the answer with
    /// [`tool_calls::ToolSet::parser`].
    pub tools: Option<tool_calls::ToolSet>,
}

/// A generation under way.
pub(crate) struct Answer {
    /// The model that answers (as clients address it).
    pub model: String,
    /// RAG: the sources numbered in the prompt; empty otherwise.
    pub citations: Vec<Citation>,
    pub events: EventStream,
    /// The tenant's `x-ratelimit-*` headers as of admission (both doors send them: HTTP headers,
    /// gRPC initial metadata).
    pub ratelimit: Vec<(&'static str, String)>,
    /// Set when the output stage ended the stream (`content_filter`): its stage and reason.
    pub safety: Outcome,
}

pub(crate) struct Pipeline {
    limits: Limits,
    /// Per-tenant limits and budgets (`crate::tenancy`).
    tenancy: Arc<Tenancy>,
    rag: RagPipeline,
    /// Shared with the assistant's agent, which screens tool outputs with it.
    safety: Arc<SafetyChain>,
    local: OnceLock<Arc<LocalEngine>>,
    /// Remote backends (`[[llm.backends]]`), addressed by name.
    remotes: Backends,
    draining: watch::Receiver<bool>,
    default_max_tokens: usize,
    /// Wakes the health reporters when the models load or draining starts (a stopped engine or
    /// embedder is noticed by their polling).
    changed: Notify,
}

impl Pipeline {
    pub(crate) fn new(
        limits: Limits,
        tenancy: Arc<Tenancy>,
        rag: RagPipeline,
        safety: SafetyChain,
        draining: watch::Receiver<bool>,
        default_max_tokens: usize,
    ) -> Self {
        Self {
            limits,
            tenancy,
            rag,
            safety: Arc::new(safety),
            local: OnceLock::new(),
            remotes: Backends::default(),
            draining,
            default_max_tokens,
            changed: Notify::new(),
        }
    }

    /// The remote backends clients may address by name.
    pub(crate) fn with_remotes(mut self, remotes: Backends) -> Self {
        self.remotes = remotes;
        self
    }

    /// The remote backends' names (listed by `/v1/models` next to the local models).
    pub(crate) fn remote_models(&self) -> Vec<String> {
        self.remotes.names().map(str::to_owned).collect()
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn safety(&self) -> &Arc<SafetyChain> {
        &self.safety
    }

    /// Called once, when the models are loaded.
    pub(crate) fn set_local(&self, local: LocalEngine) {
        let _ = self.local.set(Arc::new(local));
        self.changed.notify_one();
    }

    /// Health may have changed (draining started).
    pub(crate) fn notify_changed(&self) {
        self.changed.notify_one();
    }

    /// Resolves at the next [`Pipeline::notify_changed`] (or model load); one waiter.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }

    pub(crate) fn local(&self) -> Option<&Arc<LocalEngine>> {
        self.local.get()
    }

    /// Serving, or why not.
    pub(crate) fn health(&self) -> Health {
        if *self.draining.borrow() {
            return Health::NotServing("draining".into());
        }
        match self.local.get() {
            None => Health::NotServing("loading".into()),
            Some(b) => b.health(),
        }
    }

    /// The backend serving `model` ("" and "default" name the local one; a remote backend's
    /// name its fallback chain, which needs no local model unless it falls back to it).
    fn backend(&self, model: &str) -> Result<Arc<dyn LlmBackend>, ApiError> {
        let local = self.local.get().map(|l| l.clone() as Arc<dyn LlmBackend>);
        if let Some(chain) = self.remotes.chain(model, local) {
            if *self.draining.borrow() {
                return Err(ApiError::Unavailable("server is shutting down".into()));
            }
            // Every member's circuit open (or the local engine down): a 503 before any stream.
            if let Health::NotServing(why) = chain.health() {
                return Err(ApiError::Unavailable(why));
            }
            return Ok(chain);
        }
        let b = self.serving()?;
        let name = b.model();
        if model.is_empty() || model == "default" || model == name {
            Ok(b)
        } else {
            let mut names = vec![format!("{name:?}")];
            names.extend(self.remotes.names().map(|n| format!("{n:?}")));
            Err(ApiError::invalid(
                "model",
                format!("unknown model {model:?}; this server serves {}", names.join(", ")),
            ))
        }
    }

    fn serving(&self) -> Result<Arc<dyn LlmBackend>, ApiError> {
        if *self.draining.borrow() {
            return Err(ApiError::Unavailable("server is shutting down".into()));
        }
        let b = self
            .local
            .get()
            .ok_or_else(|| ApiError::Unavailable("models are still loading".into()))?;
        if let Health::NotServing(why) = b.health() {
            return Err(ApiError::Unavailable(why));
        }
        Ok(b.clone() as Arc<dyn LlmBackend>)
    }

    /// Validates, routes and starts a generation. Every outcome is recorded by `obs`, which
    /// travels with the returned stream.
    pub(crate) async fn generate(
        &self,
        ctx: &RequestContext,
        input: GenerateInput,
        mut obs: Observer,
    ) -> Result<Answer, ApiError> {
        match self.start(ctx, input, obs.safety_flags()).await {
            Ok((mut answer, prompt)) => {
                obs.set_model(&answer.model, &prompt);
                answer.events = observed(answer.events, obs, ctx.deadline);
                Ok(answer)
            }
            Err(e) => {
                obs.on_error(e.codes());
                Err(e)
            }
        }
    }

    /// The answer with the backend's raw events, and the prompt as the model sees it (for the
    /// request log). Unobserved: [`Pipeline::generate`] adds the observer; the assistant's agent
    /// calls it once per step and records the request as a whole.
    pub(crate) async fn start(
        &self,
        ctx: &RequestContext,
        mut input: GenerateInput,
        flags: Flags,
    ) -> Result<(Answer, String), ApiError> {
        self.limits.check_sampling(&input.sampling)?;
        if let Some(tools) = &input.tools {
            if !(input.route == Route::Chat && matches!(input.prompt, Prompt::Chat(_))) {
                return Err(ApiError::invalid(
                    "tools",
                    "tools are for plain chat (not RAG, not completions)",
                ));
            }
            if input.grammar.is_some() {
                return Err(ApiError::invalid(
                    "tools",
                    "cannot be combined with structured output (response_format, guided_*)",
                ));
            }
            // Every call's arguments are constrained by its tool's schema (see `tool_calls`).
            input.grammar = Some(GrammarRequest::new(Grammar::Lark(tools.lark()), "tools"));
        }
        match &input.prompt {
            Prompt::Text(p) => self.limits.check_prompt(p)?,
            Prompt::Chat(m) => self.limits.check_messages(m)?,
        }
        let backend = self.backend(&input.model)?;
        // Tenant limits that need no tokens (max_tokens, requests per minute, streams) first.
        let entry = self
            .tenancy
            .enter(&ctx.tenant, &mut input.sampling.max_tokens, self.default_max_tokens)?;
        let params = input.sampling.into_params(self.default_max_tokens)?;
        // Safety: PII redacted in place before the backend tokenizes; classifiers start here.
        let mut scan = self.safety.scan_input(&ctx.tenant, &mut input.prompt, flags).await?;
        let (mut prepared, citations) = match (input.prompt, input.route) {
            (Prompt::Text(p), _) => (backend.prepare_text(p).await?, Vec::new()),
            (Prompt::Chat(mut messages), Route::Chat) => {
                if let Some(tools) = &input.tools {
                    tools.inject(&mut messages);
                }
                (backend.prepare_chat(messages).await?, Vec::new())
            }
            (Prompt::Chat(messages), Route::Rag) => {
                let (mut messages, citations) = self.retrieve(ctx, &messages).await?;
                let chunks: Vec<&str> = citations.iter().map(|c| c.text.as_str()).collect();
                self.safety.scan_retrieved(&mut scan, &mut messages, &chunks).await?;
                (backend.prepare_chat(messages).await?, citations)
            }
        };
        if let Some(grammar) = input.grammar {
            backend.prepare_grammar(&mut prepared, grammar).await?;
        }
        // Reserve prompt + max_tokens (tokens and worst-case spend) before the engine sees it;
        // the meter goes with the stream and refunds what is not used.
        let prompt_tokens = prepared.prompt_tokens;
        let meter = self
            .tenancy
            .admit(entry, prompt_tokens, params.max_tokens, backend.model())?;
        let ratelimit = meter.headers();
        let generation = backend.submit(ctx, prepared, params)?;
        // The classifier verdicts, computed while the engine prefills (a block drops the stream).
        scan.settle().await?;
        // The meter sees every engine delta; the output stage may end the stream early.
        let (events, safety) = scan.output(tenancy::metered(generation.events, meter), prompt_tokens as u32);
        let answer = Answer {
            model: backend.model().to_owned(),
            citations,
            events,
            ratelimit,
            safety,
        };
        Ok((answer, generation.prompt))
    }

    /// RAG: sources for the last user message, from the caller's tenant only.
    async fn retrieve(
        &self,
        ctx: &RequestContext,
        messages: &[ChatMessage],
    ) -> Result<(Vec<ChatMessage>, Vec<Citation>), ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "must contain at least one message"));
        }
        let started = std::time::Instant::now();
        let tenant = ctx.tenant.as_str();
        let prompt = self
            .rag
            .prepare(messages, &Filter::tenant(tenant))
            .instrument(tracing::info_span!("retrieval", tenant))
            .await?;
        crate::ops::metrics::record_retrieval(started.elapsed());
        tracing::debug!(sources = prompt.citations.len(), "retrieved");
        Ok((prompt.messages, prompt.citations))
    }

    /// Embeds `texts` (already within the limits) with the embedding model `model` names.
    pub(crate) async fn embed(
        &self,
        ctx: &RequestContext,
        model: &str,
        texts: Vec<String>,
    ) -> Result<(String, Embeddings), ApiError> {
        self.limits.check_inputs(&texts)?;
        let backend = self.serving()?;
        let name = backend.embedding_model().unwrap_or_default().to_owned();
        if !(model.is_empty() || model == name) {
            return Err(ApiError::invalid(
                "model",
                format!("unknown embedding model {model:?}; this server serves {name:?}"),
            ));
        }
        let mut meter = self.tenancy.embeddings(&ctx.tenant, &name, &texts)?;
        let e = backend.embed(texts, ctx.priority).await?;
        meter.record(e.tokens as u64, 0);
        crate::ops::metrics::record_embedding_batch(e.vectors.len());
        Ok((name, e))
    }

    pub(crate) async fn tokenize(&self, model: &str, text: String, add_special: bool) -> Result<Tokenized, ApiError> {
        self.limits.check_prompt(&text).map_err(|_| {
            ApiError::invalid(
                "text",
                format!(
                    "at most {} bytes (limits.max_prompt_bytes)",
                    self.limits.config().max_prompt_bytes
                ),
            )
        })?;
        self.backend(model)?.tokenize(text, add_special).await
    }

    pub(crate) async fn detokenize(&self, model: &str, ids: Vec<u32>, skip_special: bool) -> Result<String, ApiError> {
        let backend = self.backend(model)?;
        let max = backend.context_length();
        if ids.len() > max {
            return Err(ApiError::invalid(
                "token_ids",
                format!("{} ids; at most the context length, {max}", ids.len()),
            ));
        }
        backend.detokenize(ids, skip_special).await
    }

    /// (generation model, context length, embedding model) once loaded.
    pub(crate) fn models(&self) -> Result<(String, usize, String), ApiError> {
        let b = self
            .local
            .get()
            .ok_or_else(|| ApiError::Unavailable("models are still loading".into()))?;
        Ok((
            b.model().to_owned(),
            b.context_length(),
            b.embedding_model().unwrap_or_default().to_owned(),
        ))
    }
}

/// The backend's events, bounded by the deadline, recorded by the observer; a stream that ends
/// without a final event becomes an internal error instead of a silent end.
fn observed(events: EventStream, observer: Observer, deadline: Option<Instant>) -> EventStream {
    struct State {
        events: EventStream,
        observer: Observer,
        deadline: Option<Instant>,
        /// The request's "generation" span: log lines while waiting carry it.
        span: tracing::Span,
    }
    let state = State {
        events,
        observer,
        deadline,
        span: tracing::info_span!("generation"),
    };
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        let span = s.span.clone();
        let next = async {
            match s.deadline {
                Some(d) => tokio::select! {
                    ev = s.events.next() => Some(ev),
                    _ = tokio::time::sleep_until(d) => None,
                },
                None => Some(s.events.next().await),
            }
        }
        .instrument(span)
        .await;
        let out = match next {
            None => Err(ApiError::DeadlineExceeded),
            Some(None) => Err(ApiError::Internal(
                "the generation ended without finishing (the engine stopped)".into(),
            )),
            Some(Some(Err(e))) => Err(e),
            Some(Some(Ok(EngineEvent::Failed { message }))) => Err(ApiError::Internal(message)),
            Some(Some(Ok(EngineEvent::Delta {
                text,
                token_ids,
                logprobs,
            }))) => {
                s.observer.on_text(&text);
                let ev = EngineEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                };
                return Some((Ok(ev), Some(s)));
            }
            Some(Some(Ok(EngineEvent::Finished { reason, usage }))) => {
                s.observer.on_finish(reason, &usage);
                Ok(EngineEvent::Finished { reason, usage })
            }
        };
        if let Err(e) = &out {
            s.observer.on_error(e.codes());
        }
        Some((out, None))
    }))
}
