//! LLM backends: what the pipeline generates, embeds and tokenizes with. [`LlmBackend`] is the
//! seam (as TGI's and TEI's `Backend` traits): the local engine ([`local::LocalEngine`]) is the
//! first implementation; remote OpenAI-compatible backends with retries and fallback come next.
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
//! `genai_models::prompt`.

pub(crate) mod local;

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
    pub tokens: Vec<u32>,
    /// Structured output compiled for the local engine by [`LlmBackend::prepare_grammar`].
    pub constraint: Option<Box<dyn Constraint>>,
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

/// What a backend can do beyond plain generation.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // Consulted by the router and remote backends (orchestration issue).
pub(crate) struct Capabilities {
    pub logprobs: bool,
    /// Reports `cached_prompt_tokens` in usage.
    pub cached_tokens: bool,
    pub embeddings: bool,
    pub tokenize: bool,
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
    #[allow(dead_code)] // See `Capabilities`.
    fn capabilities(&self) -> Capabilities;
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
