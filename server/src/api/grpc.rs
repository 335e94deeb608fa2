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
use crate::engine::{EngineEvent, PositionLogprobs, SamplingParams, TokenLogprob};
use crate::model::chat_template::Message;
use crate::registry::WeightsFormat;
use crate::state::{AppState, Loaded};

/// Names reported by `grpc.health.v1.Health`; "" is the whole server.
const SERVICES: &[&str] = &["", "genai.v1.Inference"];

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
        .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_secs)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
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
    fn loaded(&self) -> Result<&Loaded, Status> {
        if self.state.is_draining() {
            return Err(Status::unavailable("server is shutting down"));
        }
        self.state.loaded().ok_or_else(|| Status::unavailable("models are still loading"))
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

    fn stream<T>(&self, req: &Request<T>, tokens: Vec<u32>, params: SamplingParams) -> Result<Response<GenStream>, Status> {
        let loaded = self.loaded()?;
        let deadline = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let request_id = request_id(req);
        let events = generate::submit(loaded, request_id.clone(), tokens, params, deadline)?;
        let out = events.map(|ev| match ev {
            Ok(EngineEvent::Delta { text, token_ids, logprobs }) => Ok(pb::GenerateResponse {
                text,
                token_ids,
                logprobs: logprobs.into_iter().map(position_logprobs).collect(),
                ..Default::default()
            }),
            Ok(EngineEvent::Finished { reason, usage }) => Ok(pb::GenerateResponse {
                finish_reason: reason.as_str().into(),
                usage: Some(pb::Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    cached_prompt_tokens: usage.cached_prompt_tokens,
                }),
                ..Default::default()
            }),
            Ok(EngineEvent::Failed { message }) => Err(Status::internal(message)),
            Err(e) => Err(e.into()),
        });
        let mut resp = Response::new(Box::pin(out) as GenStream);
        if let Ok(v) = request_id.parse() {
            resp.metadata_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }
}

/// The caller's `x-request-id`, or a fresh one.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn position_logprobs(p: PositionLogprobs) -> pb::PositionLogprobs {
    let tl = |t: TokenLogprob| pb::TokenLogprob { token_id: t.token_id, token: t.token, logprob: t.logprob };
    pb::PositionLogprobs { sampled: Some(tl(p.sampled)), top: p.top.into_iter().map(tl).collect() }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenStream;
    type ChatStream = GenStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let loaded = self.loaded()?;
        let r = req.get_ref();
        generate::check_model(loaded, &r.model)?;
        let tokens = generate::prompt_tokens(loaded, &r.prompt)?;
        let params = self.sampling(r.sampling.clone())?;
        self.stream(&req, tokens, params)
    }

    async fn chat(&self, req: Request<pb::ChatRequest>) -> Result<Response<GenStream>, Status> {
        let loaded = self.loaded()?;
        let r = req.get_ref();
        generate::check_model(loaded, &r.model)?;
        let messages: Vec<Message> =
            r.messages.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect();
        let tokens = generate::chat_tokens(loaded, &messages)?;
        let params = self.sampling(r.sampling.clone())?;
        self.stream(&req, tokens, params)
    }

    async fn embed(&self, _req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Embed arrives with the embedder"))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let loaded = self.loaded()?;
        let r = req.into_inner();
        generate::check_model(loaded, &r.model)?;
        let enc = loaded
            .tokenizer
            .encode(r.text.as_str(), r.add_special_tokens && loaded.add_bos)
            .map_err(|e| Status::invalid_argument(format!("text: cannot tokenize: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids: enc.get_ids().to_vec(), tokens: enc.get_tokens().to_vec() }))
    }

    async fn detokenize(&self, req: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let loaded = self.loaded()?;
        let r = req.into_inner();
        generate::check_model(loaded, &r.model)?;
        let vocab = loaded.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = r.token_ids.iter().find(|&&t| t >= vocab) {
            return Err(Status::invalid_argument(format!("token_ids: id {bad} is outside the vocabulary (size {vocab})")));
        }
        let text = loaded
            .tokenizer
            .decode(&r.token_ids, r.skip_special_tokens)
            .map_err(|e| Status::invalid_argument(format!("token_ids: cannot decode: {e}")))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn list_models(&self, _req: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
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
