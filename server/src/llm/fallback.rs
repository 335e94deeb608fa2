//! The fallback chain: a named backend and its `fallback` list (`[[llm.backends]]`), tried in
//! order until one produces its first event.
//!
//! A [`Chain`] is itself an [`LlmBackend`], so the pipeline reserves, meters and scans one
//! stream whoever answers: the tenant is charged once (the largest of the members' prompt
//! estimates is reserved, the answering member's usage is booked), never per attempt. Each
//! member prepares the prompt its own way (the local engine tokenizes, a remote one estimates);
//! a fallback member that refuses it (a prompt too long for its context) sits this request out.
//!
//! A member is skipped at once when it is not serving — a remote one whose circuit is open, the
//! local engine when stopped. Otherwise it is submitted and its first event awaited (a remote
//! member retries inside, see [`super::remote`]): text or `Finished` commits the chain to that
//! member and everything after streams from it alone; an error before it that another backend
//! may not share (unavailable, overloaded, internal) moves to the next member; the request's own
//! fault (a 400) ends the chain. Once committed a failure is the client's error event: no
//! retry, no fallback, no spliced answers. Dropping the stream drops the member's stream and
//! cancels its work.
//!
//! Tested: `tests` below, against real HTTP servers ([`super::fault_server`], paused clock):
//! order, skipping open circuits, no fallback after the first text, and 1 000 randomized fault
//! runs; through the binary (remote → local) in `tests/e2e/resilience.rs`.

use std::sync::Arc;

use futures::StreamExt;
use genai_engine::{EngineEvent, SamplingParams};
use genai_models::chat_template::ChatMessage;

use super::{Capabilities, Embeddings, EventStream, Generation, Health, LlmBackend, Prepared, PreparedInput, Tokenized};
use crate::error::ApiError;
use crate::ops::metrics::BACKEND_FALLBACKS;
use crate::pipeline::context::{Priority, RequestContext};

pub(crate) struct Chain {
    name: String,
    /// The named backend first, then its fallbacks.
    members: Vec<Arc<dyn LlmBackend>>,
}

/// An error before the first event that the next member may not share.
fn falls_back(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Unavailable(_) | ApiError::Overloaded { .. } | ApiError::Internal(_)
    )
}

impl Chain {
    pub(crate) fn new(name: String, members: Vec<Arc<dyn LlmBackend>>) -> Self {
        Self { name, members }
    }

    async fn prepare_each<F, Fut>(&self, prepare: F) -> Result<Prepared, ApiError>
    where
        F: Fn(Arc<dyn LlmBackend>) -> Fut,
        Fut: std::future::Future<Output = Result<Prepared, ApiError>>,
    {
        let mut each = Vec::with_capacity(self.members.len());
        for (i, m) in self.members.iter().enumerate() {
            match prepare(m.clone()).await {
                Ok(p) => each.push(Some(p)),
                // The named backend's verdict is the request's.
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(backend = m.model(), "fallback member refused the prompt: {}", e.message());
                    each.push(None);
                }
            }
        }
        let first = each[0].as_ref().expect("the first member prepared");
        let prompt = first.prompt.clone();
        let prompt_tokens = each.iter().flatten().map(|p| p.prompt_tokens).max().unwrap_or(0);
        Ok(Prepared {
            prompt,
            prompt_tokens,
            input: PreparedInput::Chain(each),
        })
    }
}

/// Tries the members in order; see the module doc.
fn chain_events(
    name: String,
    members: Vec<Arc<dyn LlmBackend>>,
    prepared: Vec<Option<Prepared>>,
    ctx: RequestContext,
    params: SamplingParams,
) -> EventStream {
    let start = async move {
        let mut last = None;
        let mut tried = 0;
        for (member, prepared) in members.iter().zip(prepared) {
            let Some(prepared) = prepared else { continue };
            if let Health::NotServing(why) = member.health() {
                tracing::debug!(backend = member.model(), "skipped: {why}");
                last = Some(ApiError::Unavailable(why));
                continue;
            }
            if tried > 0 || last.is_some() {
                metrics::counter!(BACKEND_FALLBACKS, "backend" => name.clone(), "to" => member.model().to_owned())
                    .increment(1);
                tracing::info!(backend = %name, to = member.model(), "falling back");
            }
            tried += 1;
            let mut events = match member.submit(&ctx, prepared, params.clone()) {
                Ok(g) => g.events,
                Err(e) if falls_back(&e) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
            };
            let err = match events.next().await {
                Some(Ok(EngineEvent::Failed { message })) => ApiError::Internal(message),
                Some(Ok(ev)) => return futures::stream::once(async { Ok(ev) }).chain(events).boxed(),
                Some(Err(e)) => e,
                None => ApiError::Internal(format!("backend `{}` ended without an event", member.model())),
            };
            if !falls_back(&err) {
                return futures::stream::once(async { Err(err) }).boxed();
            }
            tracing::info!(backend = member.model(), "failed before its first token: {}", err.message());
            last = Some(err);
        }
        let err = last.unwrap_or_else(|| ApiError::Unavailable(format!("no backend of `{name}` could serve")));
        futures::stream::once(async { Err(err) }).boxed()
    };
    Box::pin(futures::stream::once(start).flatten())
}

#[async_trait::async_trait]
impl LlmBackend for Chain {
    fn model(&self) -> &str {
        &self.name
    }

    fn embedding_model(&self) -> Option<&str> {
        None
    }

    fn context_length(&self) -> usize {
        self.members[0].context_length()
    }

    fn capabilities(&self) -> Capabilities {
        self.members[0].capabilities()
    }

    /// Serving while any member is.
    fn health(&self) -> Health {
        let mut why = None;
        for m in &self.members {
            match m.health() {
                Health::Serving => return Health::Serving,
                Health::NotServing(w) => {
                    why.get_or_insert(w);
                }
            }
        }
        Health::NotServing(why.unwrap_or_default())
    }

    async fn prepare_chat(&self, messages: Vec<ChatMessage>) -> Result<Prepared, ApiError> {
        self.prepare_each(|m| {
            let messages = messages.clone();
            async move { m.prepare_chat(messages).await }
        })
        .await
    }

    async fn prepare_text(&self, prompt: String) -> Result<Prepared, ApiError> {
        self.prepare_each(|m| {
            let prompt = prompt.clone();
            async move { m.prepare_text(prompt).await }
        })
        .await
    }

    fn submit(&self, ctx: &RequestContext, prepared: Prepared, params: SamplingParams) -> Result<Generation, ApiError> {
        let PreparedInput::Chain(each) = prepared.input else {
            return Err(ApiError::Internal(format!(
                "chain `{}` was handed another backend's prompt",
                self.name
            )));
        };
        Ok(Generation {
            prompt: prepared.prompt,
            events: chain_events(self.name.clone(), self.members.clone(), each, ctx.clone(), params),
        })
    }

    async fn embed(&self, texts: Vec<String>, priority: Priority) -> Result<Embeddings, ApiError> {
        self.members[0].embed(texts, priority).await
    }

    async fn tokenize(&self, text: String, add_special_tokens: bool) -> Result<Tokenized, ApiError> {
        self.members[0].tokenize(text, add_special_tokens).await
    }

    async fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> Result<String, ApiError> {
        self.members[0].detokenize(ids, skip_special_tokens).await
    }
}
