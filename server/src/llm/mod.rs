//! LLM backends: what the pipeline generates, embeds and tokenizes with. [`LlmBackend`] is the
//! seam (as TGI's and TEI's `Backend` traits): the local engine ([`local::LocalEngine`]) and
//! remote OpenAI-compatible servers ([`remote::RemoteBackend`], `[[llm.backends]]`), the latter
//! wrapped in retries ([`retry`]), a circuit breaker ([`breaker`]) and a fallback chain
//! ([`fallback::Chain`]); [`backends::Backends`] resolves a request's `model` to one of them.
//!
//! A backend takes messages or text, not token ids: tokenization and template rendering are its
//! own business (a remote backend has no tokenizer of ours). It does them in a separate step
//! (`prepare_*`, then `submit`), so the pipeline knows the prompt's token count before anything
//! is queued: the tenant limits reserve it in between. What it returns is a stream of
//! backend-neutral events that ends after `Finished` or an error; dropping the stream cancels
//! the generation.
//!
//! Tested through the pipeline's end-to-end tests (`tests/e2e/pipeline.rs`), which exercise the
//! local backend with the real models; the prompt encoder it relies on has its own unit tests in
//! `genai_models::prompt`. The remote backend and its resilience layers are tested against a real
//! HTTP server that injects faults (`fault_server`, paused clock) and through the binary in
//! `tests/e2e/resilience.rs`.

pub(crate) mod backends;
pub(crate) mod breaker;
pub(crate) mod fallback;
#[cfg(test)]
mod fault_server;
pub(crate) mod local;
pub(crate) mod remote;
pub(crate) mod retry;
mod sse;

use std::pin::Pin;

use futures::Stream;
use genai_engine::{Constraint, EngineEvent, SamplingParams};
use genai_grammar::GrammarRequest;
use genai_models::chat_template::ChatMessage;

use crate::error::ApiError;
use crate::pipeline::context::{Priority, RequestContext};

/// A generation's events; dropping the stream cancels the request.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent, ApiError>> + Send>>;

/// A started generation.
pub(crate) struct Generation {
    /// The prompt as the model sees it (rendered chat), for the request log.
    pub prompt: String,
    pub events: EventStream,
}

/// A prompt rendered and tokenized, not yet submitted.
pub(crate) struct Prepared {
    /// The prompt as the model sees it (rendered chat), for the request log.
    pub prompt: String,
    /// Structured output compiled for the local engine by [`LlmBackend::prepare_grammar`].
    pub constraint: Option<Box<dyn Constraint>>,
    /// What the tenant limits reserve: exact for the local engine, an estimate for a remote
    /// backend ([`estimate_chat_tokens`]), the largest of its members' for a fallback chain.
    pub prompt_tokens: usize,
    pub input: PreparedInput,
}

/// What a backend submits: its own business, so only the backend that prepared it reads it.
pub(crate) enum PreparedInput {
    /// The local engine: the token ids.
    Tokens(Vec<u32>),
    /// A remote backend: the request as its upstream takes it.
    Remote(remote::RemotePrompt),
    /// A fallback chain: one prepared prompt per member, `None` where that member refused it
    /// (it is skipped for this request).
    Chain(Vec<Option<Prepared>>),
}

/// Tokens a text is reserved as when no tokenizer of the model is at hand (remote backends,
/// deltas without token ids): one per 3 bytes, rounded up. BPE vocabularies average about 4
/// bytes a token on English text, so this errs high; the reservation is settled from the
/// upstream's own `usage` when it reports one.
pub(crate) fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(3)
}

/// [`estimate_tokens`] for a chat: each message's content plus 4 tokens of role and delimiters,
/// plus 3 that prime the reply (the overhead OpenAI documents for its chat format).
pub(crate) fn estimate_chat_tokens(messages: &[ChatMessage]) -> usize {
    messages.iter().map(|m| 4 + estimate_tokens(&m.content)).sum::<usize>() + 3
}

pub(crate) struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model processed (special tokens included, after truncation).
    pub tokens: usize,
}

pub(crate) struct Tokenized {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    Serving,
    NotServing(String),
}

#[async_trait::async_trait]
pub(crate) trait LlmBackend: Send + Sync {
    /// The generation model's name as clients address it.
    fn model(&self) -> &str;
    /// The embedding model's name, if this backend embeds.
    fn embedding_model(&self) -> Option<&str>;
    /// Longest prompt + completion, in tokens.
    fn context_length(&self) -> usize;
    fn health(&self) -> Health;

    /// Renders the chat template and tokenizes (on the blocking pool): the prompt as the model
    /// will see it. Split from [`LlmBackend::submit`] so the tenant limits can reserve the
    /// prompt's tokens in between, before the engine sees the request.
    async fn prepare_chat(&self, messages: Vec<ChatMessage>) -> Result<Prepared, ApiError>;
    /// Tokenizes a raw completion prompt; see [`LlmBackend::prepare_chat`].
    async fn prepare_text(&self, prompt: String) -> Result<Prepared, ApiError>;
    /// Compiles the request's structured-output grammar for this backend into `prepared` (on the
    /// blocking pool). Err: a grammar this backend cannot use, naming the request field.
    async fn prepare_grammar(&self, prepared: &mut Prepared, grammar: GrammarRequest) -> Result<(), ApiError>;
    /// Starts generating from a prepared prompt.
    fn submit(&self, ctx: &RequestContext, prepared: Prepared, params: SamplingParams) -> Result<Generation, ApiError>;
    async fn embed(&self, texts: Vec<String>, priority: Priority) -> Result<Embeddings, ApiError>;
    async fn tokenize(&self, text: String, add_special_tokens: bool) -> Result<Tokenized, ApiError>;
    async fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> Result<String, ApiError>;
}
