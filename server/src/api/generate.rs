//! Protocol-agnostic core of Generate/Chat shared by gRPC and HTTP: model name
//! check, prompt tokenization and chat rendering, submission to the engine, and
//! a deadline-bounded event stream whose drop cancels the request.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tracing::Instrument;

use super::error::ApiError;
use crate::ops::observe::Observer;
use crate::state::{AppState, Loaded};
use genai_engine::{EngineEvent, GenerateRequest, SamplingParams};
use genai_models::chat_template::ChatMessage;
use genai_retrieval::index::Filter;
use genai_retrieval::rag::Citation;

/// Accepts the served model's name, "" and "default".
pub fn check_model(loaded: &Loaded, model: &str) -> Result<(), ApiError> {
    let _routing = tracing::info_span!("routing", model).entered();
    let name = &loaded.model_name;
    if model.is_empty() || model == "default" || model == name {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "model",
            format!("unknown model {model:?}; this server serves {name:?}"),
        ))
    }
}

/// Tokenizes a raw completion prompt (the tokenizer adds BOS when the model wants one).
pub fn prompt_tokens(loaded: &Loaded, prompt: &str) -> Result<Vec<u32>, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "must not be empty"));
    }
    encode(loaded, prompt, true, "prompt")
}

/// Renders chat messages with the model's chat template and tokenizes them;
/// returns the rendered prompt too.
pub fn chat_tokens(loaded: &Loaded, messages: &[ChatMessage]) -> Result<(String, Vec<u32>), ApiError> {
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
    let text = loaded
        .chat_template
        .render(messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("chat template failed: {e}")))?;
    // The template writes any BOS itself; the tokenizer must not add another.
    let tokens = encode(loaded, &text, false, "messages")?;
    Ok((text, tokens))
}

/// RAG: retrieves sources for the last user message (within the caller's
/// tenant) and returns the messages to render plus the numbered sources.
pub async fn rag_messages(
    state: &AppState,
    messages: &[ChatMessage],
    tenant: &str,
) -> Result<(Vec<ChatMessage>, Vec<Citation>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "must contain at least one message"));
    }
    let started = std::time::Instant::now();
    let prompt = state
        .rag
        .prepare(messages, &Filter::tenant(tenant))
        .instrument(tracing::info_span!("retrieval", tenant))
        .await?;
    crate::ops::metrics::record_retrieval(started.elapsed());
    tracing::debug!(sources = prompt.citations.len(), "retrieved");
    Ok((prompt.messages, prompt.citations))
}

/// Embeds texts with the embedding model; returns the vectors and the token count.
pub async fn embed(state: &AppState, model: &str, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let name = state.knowledge.embedding_model();
    if !(model.is_empty() || model == name) {
        return Err(ApiError::invalid(
            "model",
            format!("unknown embedding model {model:?}; this server serves {name:?}"),
        ));
    }
    if texts.is_empty() {
        return Err(ApiError::invalid("input", "at least one text is required"));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(format!("input[{i}]"), "must not be empty"));
    }
    let embedder = state.knowledge.embedder();
    let tokens = texts
        .iter()
        .map(|t| embedder.embedder().count_tokens(t))
        .sum::<Result<usize, _>>()?;
    let vectors = embedder.embed(texts).await?;
    crate::ops::metrics::record_embedding_batch(vectors.len());
    Ok((vectors, tokens))
}

fn encode(loaded: &Loaded, text: &str, add_special_tokens: bool, field: &str) -> Result<Vec<u32>, ApiError> {
    let enc = loaded
        .tokenizer
        .encode(text, add_special_tokens)
        .map_err(|e| ApiError::invalid(field, format!("cannot tokenize: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent, ApiError>> + Send>>;

/// Submits to the engine. The returned stream ends after `Finished`/`Failed`,
/// or with `DeadlineExceeded` once `deadline` passes; dropping it cancels the
/// request (the engine frees its KV blocks within one step).
/// The `observer` travels with the stream and records the request when the
/// stream ends or is dropped.
pub fn submit(
    loaded: &Loaded,
    mut observer: Observer,
    prompt_tokens: Vec<u32>,
    params: SamplingParams,
    deadline: Option<Duration>,
) -> Result<EventStream, ApiError> {
    let request_id = observer.request_id().to_owned();
    let span = tracing::info_span!(
        "generation",
        prompt_tokens = prompt_tokens.len(),
        max_tokens = params.max_tokens
    );
    let rx = match loaded.engine.submit(GenerateRequest {
        request_id,
        prompt_tokens,
        params,
        ..GenerateRequest::default()
    }) {
        Ok(rx) => rx,
        Err(e) => {
            let e = ApiError::from(e);
            observer.on_error(e.codes());
            return Err(e);
        }
    };
    let deadline = deadline.map(|d| Instant::now() + d);
    let events = futures::stream::unfold(
        Some(Pending {
            rx,
            deadline,
            observer,
            span,
        }),
        next_event,
    );
    Ok(Box::pin(events))
}

struct Pending {
    rx: UnboundedReceiver<EngineEvent>,
    deadline: Option<Instant>,
    observer: Observer,
    /// The request's "generation" stage span: log lines while waiting on the engine carry it.
    span: tracing::Span,
}

async fn next_event(state: Option<Pending>) -> Option<(Result<EngineEvent, ApiError>, Option<Pending>)> {
    let mut p = state?;
    // Outer None: the deadline passed; inner None: the engine dropped the request.
    let span = p.span.clone();
    let ev = async {
        match p.deadline {
            Some(d) => tokio::select! {
                ev = p.rx.recv() => Some(ev),
                _ = tokio::time::sleep_until(d) => None,
            },
            None => Some(p.rx.recv().await),
        }
    }
    .instrument(span)
    .await;
    let out = match ev {
        None => Err(ApiError::DeadlineExceeded),
        Some(None) => Err(ApiError::Internal("engine stopped".into())),
        Some(Some(EngineEvent::Failed { message })) => Err(ApiError::Internal(message)),
        Some(Some(EngineEvent::Delta {
            text,
            token_ids,
            logprobs,
        })) => {
            p.observer.on_text(&text);
            return Some((
                Ok(EngineEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                }),
                Some(p),
            ));
        }
        Some(Some(EngineEvent::Finished { reason, usage })) => {
            p.observer.on_finish(reason, &usage);
            Ok(EngineEvent::Finished { reason, usage })
        }
    };
    if let Err(e) = &out {
        p.observer.on_error(e.codes());
    }
    Some((out, None))
}

/// Parses a gRPC `grpc-timeout` header value ("100m", "5S", ...).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Sampling fields as both wire formats carry them (unset = engine default),
/// converted and validated in one place so gRPC and HTTP agree on every rule.
#[derive(Debug, Default, Clone)]
pub struct SamplingInput {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub max_tokens: Option<i64>,
    pub min_tokens: Option<i64>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Some(n): return logprobs of sampled tokens plus the top n alternatives.
    pub logprobs: Option<i64>,
}

impl SamplingInput {
    pub fn into_params(self, default_max_tokens: usize) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams {
            max_tokens: default_max_tokens,
            ..SamplingParams::default()
        };
        let float = |v: Option<f64>, name: &str, dflt: f32| -> Result<f32, ApiError> {
            match v {
                None => Ok(dflt),
                Some(x) if x.is_finite() => Ok(x as f32),
                Some(_) => Err(ApiError::invalid(name, "must be a finite number")),
            }
        };
        let count = |v: Option<i64>, name: &str, min: i64| -> Result<Option<usize>, ApiError> {
            match v {
                None => Ok(None),
                Some(x) if x < min => Err(ApiError::invalid(name, format!("must be >= {min}, got {x}"))),
                Some(x) => Ok(Some(x as usize)),
            }
        };
        p.temperature = float(self.temperature, "temperature", p.temperature)?;
        p.top_p = float(self.top_p, "top_p", p.top_p)?;
        p.min_p = float(self.min_p, "min_p", p.min_p)?;
        p.repetition_penalty = float(self.repetition_penalty, "repetition_penalty", p.repetition_penalty)?;
        p.presence_penalty = float(self.presence_penalty, "presence_penalty", p.presence_penalty)?;
        p.frequency_penalty = float(self.frequency_penalty, "frequency_penalty", p.frequency_penalty)?;
        p.top_k = count(self.top_k, "top_k", 0)?.unwrap_or(p.top_k);
        p.max_tokens = count(self.max_tokens, "max_tokens", 1)?.unwrap_or(p.max_tokens);
        p.min_tokens = count(self.min_tokens, "min_tokens", 0)?.unwrap_or(p.min_tokens);
        p.logprobs = count(self.logprobs, "top_logprobs", 0)?;
        p.seed = self.seed;
        p.ignore_eos = self.ignore_eos;
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        p.stop = self.stop;
        p.stop_token_ids = self.stop_token_ids;
        p.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
    }
}
