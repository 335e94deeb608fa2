//! The local backend: our engine for generation and the MiniLM embedder, in this process.
//!
//! It owns the prompt encoder (tokenizer + chat template) and the engine handle. Tokenization
//! and template rendering run once per request on tokio's blocking pool, never on an async
//! worker; a prompt that cannot fit the context is refused from its byte length alone, before
//! any tokenization. Each request's prefix-cache domain is salted with its tenant, so a tenant
//! never hits (or learns about) another tenant's cached blocks.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use genai_engine::{EngineEvent, EngineHandle, GenerateRequest, SamplingParams};
use genai_grammar::{GrammarCompiler, GrammarRequest};
use genai_models::chat_template::ChatMessage;
use genai_models::embedder::EmbedderHandle;
use genai_models::prompt::PromptEncoder;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{Embeddings, Generation, Health, LlmBackend, Prepared, PreparedInput, Tokenized};
use crate::error::ApiError;
use crate::pipeline::context::{Priority, RequestContext};

pub(crate) struct LocalEngine {
    model: String,
    embedding_model: String,
    engine: EngineHandle,
    encoder: Arc<PromptEncoder>,
    embedder: EmbedderHandle,
    /// Structured output for this model's tokenizer; None when the tokenizer is not supported.
    grammar: Option<Arc<GrammarCompiler>>,
    /// Keys the tenant → cache-salt hash, so salts cannot be predicted from tenant names.
    salt_key: RandomState,
}

impl LocalEngine {
    pub(crate) fn new(
        model: String,
        engine: EngineHandle,
        encoder: PromptEncoder,
        embedding_model: String,
        embedder: EmbedderHandle,
        grammar: Option<GrammarCompiler>,
    ) -> Self {
        Self {
            model,
            embedding_model,
            engine,
            encoder: Arc::new(encoder),
            embedder,
            grammar: grammar.map(Arc::new),
            salt_key: RandomState::new(),
        }
    }

    pub(crate) fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Refuses, from its byte length alone, a prompt that cannot fit the context.
    fn check_fits(&self, bytes: usize, field: &str) -> Result<(), ApiError> {
        let ctx = self.engine.max_context();
        if bytes > self.encoder.max_bytes_for(ctx) {
            return Err(ApiError::invalid(
                field,
                format!("{bytes} bytes cannot fit the model's context of {ctx} tokens"),
            ));
        }
        Ok(())
    }

    /// Runs tokenizer work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PromptEncoder) -> anyhow::Result<T> + Send + 'static,
        field: &'static str,
    ) -> Result<T, ApiError> {
        let enc = self.encoder.clone();
        tokio::task::spawn_blocking(move || f(&enc))
            .await
            .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
            .map_err(|e| ApiError::invalid(field, format!("{e:#}")))
    }
}

/// Engine events until the engine drops the request (after its final event, or when its thread
/// died: the pipeline reports a stream that ends unfinished).
async fn next_event(
    mut rx: UnboundedReceiver<EngineEvent>,
) -> Option<(Result<EngineEvent, ApiError>, UnboundedReceiver<EngineEvent>)> {
    rx.recv().await.map(|ev| (Ok(ev), rx))
}

#[async_trait::async_trait]
impl LlmBackend for LocalEngine {
    fn model(&self) -> &str {
        &self.model
    }

    fn embedding_model(&self) -> Option<&str> {
        Some(&self.embedding_model)
    }

    fn context_length(&self) -> usize {
        self.engine.max_context()
    }

    fn health(&self) -> Health {
        if !self.engine.is_up() {
            Health::NotServing("the generation engine has stopped".into())
        } else if !self.embedder.is_up() {
            Health::NotServing("the embedding worker has stopped".into())
        } else {
            Health::Serving
        }
    }

    async fn prepare_chat(&self, messages: Vec<ChatMessage>) -> Result<Prepared, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "must contain at least one message"));
        }
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("must be system, user, assistant or tool, got {:?}", m.role),
                ));
            }
        }
        self.check_fits(messages.iter().map(|m| m.content.len()).sum(), "messages")?;
        let p = self.blocking(move |e| e.encode_chat(&messages), "messages").await?;
        Ok(Prepared {
            prompt: p.text,
            prompt_tokens: p.tokens.len(),
            input: PreparedInput::Tokens(p.tokens),
            constraint: None,
        })
    }

    async fn prepare_text(&self, prompt: String) -> Result<Prepared, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "must not be empty"));
        }
        self.check_fits(prompt.len(), "prompt")?;
        self.blocking(
            move |e| {
                let tokens = e.encode_text(&prompt)?;
                Ok(Prepared {
                    prompt,
                    prompt_tokens: tokens.len(),
                    input: PreparedInput::Tokens(tokens),
                    constraint: None,
                })
            },
            "prompt",
        )
        .await
    }

    async fn prepare_grammar(&self, prepared: &mut Prepared, grammar: GrammarRequest) -> Result<(), ApiError> {
        let Some(compiler) = self.grammar.clone() else {
            return Err(ApiError::invalid(
                grammar.field,
                format!("structured output is not available for model {}", self.model),
            ));
        };
        let constraint = tokio::task::spawn_blocking(move || compiler.compile(&grammar))
            .await
            .map_err(|e| ApiError::Internal(format!("grammar task failed: {e}")))?
            .map_err(|e| ApiError::invalid(e.field, e.message))?;
        prepared.constraint = Some(constraint);
        Ok(())
    }

    fn submit(&self, ctx: &RequestContext, prepared: Prepared, params: SamplingParams) -> Result<Generation, ApiError> {
        let PreparedInput::Tokens(tokens) = prepared.input else {
            return Err(ApiError::Internal(
                "the local engine was handed another backend's prompt".into(),
            ));
        };
        let rx = self.engine.submit(GenerateRequest {
            request_id: ctx.request_id.clone(),
            prompt_tokens: tokens,
            params,
            cache_salt: self.salt_key.hash_one(&ctx.tenant),
            adapter: None,
            constraint: prepared.constraint,
        })?;
        Ok(Generation {
            prompt: prepared.prompt,
            events: Box::pin(futures::stream::unfold(rx, next_event)),
        })
    }

    async fn embed(&self, texts: Vec<String>, priority: Priority) -> Result<Embeddings, ApiError> {
        let priority = match priority {
            Priority::Interactive => genai_models::embedder::Priority::Interactive,
            Priority::Bulk => genai_models::embedder::Priority::Bulk,
        };
        let e = self.embedder.embed(texts, priority).await?;
        Ok(Embeddings {
            vectors: e.vectors,
            tokens: e.tokens,
        })
    }

    async fn tokenize(&self, text: String, add_special_tokens: bool) -> Result<Tokenized, ApiError> {
        self.blocking(
            move |e| {
                let enc = e
                    .tokenizer()
                    .encode(text.as_str(), add_special_tokens)
                    .map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
                Ok(Tokenized {
                    ids: enc.get_ids().to_vec(),
                    tokens: enc.get_tokens().to_vec(),
                })
            },
            "text",
        )
        .await
    }

    async fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> Result<String, ApiError> {
        let vocab = self.encoder.tokenizer().get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::invalid(
                "token_ids",
                format!("id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        self.blocking(
            move |e| {
                e.tokenizer()
                    .decode(&ids, skip_special_tokens)
                    .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
            },
            "token_ids",
        )
        .await
    }
}
