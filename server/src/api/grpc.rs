//! tonic server: `genai.v1.Inference`, `grpc.health.v1.Health` (per service),
//! server reflection v1 and v1alpha, gzip, HTTP/2 keepalive, size limits.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};

use genai_proto::v1 as pb;
use pb::inference_server::{Inference, InferenceServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use super::error::ApiError;
use super::generate::{self, parse_grpc_timeout, SamplingInput};
use crate::ops::observe::Observer;
use crate::state::{AppState, Loaded};
use genai_engine::{EngineEvent, PositionLogprobs, SamplingParams, TokenLogprob};
use genai_models::chat_template::ChatMessage;
use genai_models::registry::WeightsFormat;
use genai_retrieval::rag;

/// Names reported by `grpc.health.v1.Health`; "" is the whole server.
const SERVICES: &[&str] = &["", "genai.v1.Inference", "genai.v1.Knowledge"];

pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for s in SERVICES {
        health.set_service_status(*s, ServingStatus::NotServing).await;
    }
    let mut ready = state.subscribe_ready();
    let mut draining = state.subscribe_draining();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            for s in SERVICES {
                health.set_service_status(*s, ServingStatus::Serving).await;
            }
        }
        if draining.wait_for(|d| *d).await.is_ok() {
            for s in SERVICES {
                health.set_service_status(*s, ServingStatus::NotServing).await;
            }
        }
    });

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limits = &state.config.server;
    let inference = InferenceServer::new(InferenceService { state: state.clone() })
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);

    tonic::transport::Server::builder()
        .layer(crate::ops::request_id::layer())
        .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_secs)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(
            super::knowledge::grpc_service(state.knowledge.clone(), limits.max_message_bytes)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

pub struct InferenceService {
    state: Arc<AppState>,
}

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl InferenceService {
    fn loaded(&self) -> Result<&Loaded, ApiError> {
        if self.state.is_draining() {
            return Err(ApiError::Unavailable("server is shutting down".into()));
        }
        self.state
            .loaded()
            .ok_or_else(|| ApiError::Unavailable("models are still loading".into()))
    }

    fn observer<T>(&self, req: &Request<T>, method: &'static str, route: &str) -> Observer {
        let md = req.metadata();
        let rid = crate::ops::request_id::from_metadata(md)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let tenant = self
            .state
            .ops()
            .tenant_label(md.get("x-tenant-id").and_then(|v| v.to_str().ok()));
        Observer::new(self.state.ops().clone(), "grpc", method, route, &rid, &tenant)
    }

    fn sampling(&self, p: Option<pb::SamplingParams>) -> Result<SamplingParams, ApiError> {
        let p = p.unwrap_or_default();
        let input = SamplingInput {
            temperature: p.temperature.map(f64::from),
            top_p: p.top_p.map(f64::from),
            top_k: p.top_k.map(i64::from),
            min_p: p.min_p.map(f64::from),
            repetition_penalty: p.repetition_penalty.map(f64::from),
            presence_penalty: p.presence_penalty.map(f64::from),
            frequency_penalty: p.frequency_penalty.map(f64::from),
            seed: p.seed,
            max_tokens: p.max_tokens.map(i64::from),
            min_tokens: p.min_tokens.map(i64::from),
            ignore_eos: p.ignore_eos,
            stop: p.stop,
            stop_token_ids: p.stop_token_ids,
            logprobs: match (p.logprobs, p.top_logprobs) {
                (_, Some(n)) => Some(i64::from(n)),
                (true, None) => Some(0),
                (false, None) => None,
            },
        };
        input.into_params(self.state.config.engine.default_max_tokens)
    }

    /// Streams the engine's events for a validated request; every outcome is recorded by
    /// the observer. RAG answers carry their sources on the first message and the ones the
    /// answer cites on the last.
    fn stream<T>(
        &self,
        req: &Request<T>,
        mut obs: Observer,
        prepared: Result<Prepared, ApiError>,
    ) -> Result<Response<GenStream>, Status> {
        let deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let (loaded, p) = match self.loaded().and_then(|l| prepared.map(|p| (l, p))) {
            Ok(x) => x,
            Err(e) => {
                obs.on_error(e.codes());
                return Err(e.into());
            }
        };
        obs.set_model(&loaded.model_name, &p.prompt);
        let events = generate::submit(loaded, obs, p.tokens, p.params, deadline)?;
        let sources = p.citations;
        let mut first = true;
        let mut answer = String::new();
        let out = events.map(move |ev| {
            let mut msg = match ev {
                Ok(EngineEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                }) => {
                    answer.push_str(&text);
                    pb::GenerateResponse {
                        text,
                        token_ids,
                        logprobs: logprobs.into_iter().map(position_logprobs).collect(),
                        ..Default::default()
                    }
                }
                Ok(EngineEvent::Finished { reason, usage }) => pb::GenerateResponse {
                    finish_reason: reason.as_str().into(),
                    usage: Some(pb::Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        cached_prompt_tokens: usage.cached_prompt_tokens,
                    }),
                    citations: rag::parse_citations(&answer, &sources)
                        .into_iter()
                        .map(citation)
                        .collect(),
                    ..Default::default()
                },
                Ok(EngineEvent::Failed { message }) => return Err(Status::internal(message)),
                Err(e) => return Err(e.into()),
            };
            if std::mem::take(&mut first) && msg.citations.is_empty() {
                msg.citations = sources.iter().cloned().map(citation).collect();
            }
            Ok(msg)
        });
        Ok(Response::new(Box::pin(out) as GenStream))
    }

    /// Runs a unary call with accounting.
    fn unary<R>(
        &self,
        mut obs: Observer,
        f: impl FnOnce(&Loaded) -> Result<R, ApiError>,
    ) -> Result<Response<R>, Status> {
        match self.loaded().and_then(f) {
            Ok(r) => {
                obs.on_ok();
                Ok(Response::new(r))
            }
            Err(e) => {
                obs.on_error(e.codes());
                Err(e.into())
            }
        }
    }
}

/// A validated generation request.
struct Prepared {
    /// The prompt as the model sees it, for the request log.
    prompt: String,
    tokens: Vec<u32>,
    params: SamplingParams,
    /// RAG sources numbered in the prompt; empty otherwise.
    citations: Vec<rag::Citation>,
}

fn citation(c: rag::Citation) -> pb::Citation {
    pb::Citation {
        index: c.index,
        chunk_id: c.chunk_id,
        source: c.source,
        text: c.text,
        score: c.score,
    }
}

fn position_logprobs(p: PositionLogprobs) -> pb::PositionLogprobs {
    let tl = |t: TokenLogprob| pb::TokenLogprob {
        token_id: t.token_id,
        token: t.token,
        logprob: t.logprob,
    };
    pb::PositionLogprobs {
        sampled: Some(tl(p.sampled)),
        top: p.top.into_iter().map(tl).collect(),
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenStream;
    type ChatStream = GenStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let obs = self.observer(&req, "Generate", "completion");
        let r = req.get_ref();
        let prepared = self.loaded().and_then(|loaded| {
            generate::check_model(loaded, &r.model)?;
            let tokens = generate::prompt_tokens(loaded, &r.prompt)?;
            let params = self.sampling(r.sampling.clone())?;
            Ok(Prepared {
                prompt: r.prompt.clone(),
                tokens,
                params,
                citations: Vec::new(),
            })
        });
        self.stream(&req, obs, prepared)
    }

    async fn chat(&self, req: Request<pb::ChatRequest>) -> Result<Response<GenStream>, Status> {
        let rag_mode = req.get_ref().mode == pb::ChatMode::Rag as i32;
        let obs = self.observer(&req, "Chat", if rag_mode { "rag" } else { "chat" });
        let tenant = req
            .metadata()
            .get("x-tenant-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let r = req.get_ref();
        let messages: Vec<ChatMessage> = r
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let prepared = async {
            let loaded = self.loaded()?;
            generate::check_model(loaded, &r.model)?;
            let params = self.sampling(r.sampling.clone())?;
            let (messages, citations) = if rag_mode {
                generate::rag_messages(&self.state, &messages, &tenant).await?
            } else {
                (messages, Vec::new())
            };
            let (prompt, tokens) = generate::chat_tokens(loaded, &messages)?;
            Ok(Prepared {
                prompt,
                tokens,
                params,
                citations,
            })
        }
        .await;
        self.stream(&req, obs, prepared)
    }

    async fn embed(&self, req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let mut obs = self.observer(&req, "Embed", "embedding");
        let r = req.into_inner();
        match generate::embed(&self.state, &r.model, r.texts).await {
            Ok((vectors, prompt_tokens)) => {
                obs.on_ok();
                Ok(Response::new(pb::EmbedResponse {
                    embeddings: vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
                    prompt_tokens: prompt_tokens as u32,
                    model: self.state.knowledge.embedding_model().to_owned(),
                }))
            }
            Err(e) => {
                obs.on_error(e.codes());
                Err(e.into())
            }
        }
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let obs = self.observer(&req, "Tokenize", "tokenize");
        let r = req.into_inner();
        self.unary(obs, |loaded| {
            generate::check_model(loaded, &r.model)?;
            let enc = loaded
                .tokenizer
                .encode(r.text.as_str(), r.add_special_tokens)
                .map_err(|e| ApiError::invalid("text", format!("cannot tokenize: {e}")))?;
            Ok(pb::TokenizeResponse {
                token_ids: enc.get_ids().to_vec(),
                tokens: enc.get_tokens().to_vec(),
            })
        })
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let obs = self.observer(&req, "Detokenize", "tokenize");
        let r = req.into_inner();
        self.unary(obs, |loaded| {
            generate::check_model(loaded, &r.model)?;
            let vocab = loaded.tokenizer.get_vocab_size(true) as u32;
            if let Some(bad) = r.token_ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::invalid(
                    "token_ids",
                    format!("id {bad} is outside the vocabulary (size {vocab})"),
                ));
            }
            let text = loaded
                .tokenizer
                .decode(&r.token_ids, r.skip_special_tokens)
                .map_err(|e| ApiError::invalid("token_ids", format!("cannot decode: {e}")))?;
            Ok(pb::DetokenizeResponse { text })
        })
    }

    async fn feedback(&self, req: Request<pb::FeedbackRequest>) -> Result<Response<pb::FeedbackResponse>, Status> {
        let obs = self.observer(&req, "Feedback", "feedback");
        let r = req.into_inner();
        self.unary(obs, |_| {
            let log = self.state.ops().request_log.as_ref().ok_or_else(|| {
                ApiError::Unavailable("the request log is disabled (ops.request_log.enabled = false)".into())
            })?;
            log.append_feedback(&r.request_id, r.rating, &r.comment)?;
            Ok(pb::FeedbackResponse {})
        })
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let loaded = self.loaded()?;
        let files = &loaded.files;
        let path = match &files.generation.weights {
            WeightsFormat::Gguf(p) | WeightsFormat::Safetensors(p) => p.display().to_string(),
        };
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![
                pb::ModelInfo {
                    name: loaded.model_name.clone(),
                    kind: "generation".into(),
                    context_length: loaded.engine.info().context_length as u32,
                    path,
                    ..Default::default()
                },
                pb::ModelInfo {
                    name: files.embedding.name.clone(),
                    kind: "embedding".into(),
                    path: files.embedding.dir.display().to_string(),
                    ..Default::default()
                },
            ],
        }))
    }
}
