//! tonic server: `genai.v1.Inference`, `genai.v1.Assistant`, `genai.v1.Knowledge`, `grpc.health.v1.Health` (per service),
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
use super::observer;
use crate::llm::Health;
use crate::ops::observe::Observer;
use crate::pipeline::context::RequestContext;
use crate::pipeline::sampling::SamplingInput;
use crate::pipeline::tool_calls::{
    self, HistoryMessage, Tool, ToolCall, ToolCallParser, ToolChoice, ToolEvent, ToolPaths, ToolSet,
};
use crate::pipeline::{GenerateInput, Prompt, Route};
use crate::state::AppState;
use genai_engine::{EngineEvent, FinishReason, PositionLogprobs, TokenLogprob};
use genai_grammar::{Grammar, GrammarRequest};
use genai_retrieval::rag;

/// Names reported by `grpc.health.v1.Health`; "" is the whole server.
const SERVICES: &[&str] = &["", "genai.v1.Inference", "genai.v1.Knowledge", "genai.v1.Assistant"];

pub(crate) async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for s in SERVICES {
        health.set_service_status(*s, ServingStatus::NotServing).await;
    }
    // Follows the pipeline's health: loading, serving, draining (notified at once), an engine or
    // embedder that stopped (noticed within a tick).
    let watched = state.clone();
    tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = watched.pipeline.changed() => {}
            }
            let serving = watched.pipeline.health() == Health::Serving;
            if last != Some(serving) {
                let status = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for s in SERVICES {
                    health.set_service_status(*s, status).await;
                }
                last = Some(serving);
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
        .layer(crate::pipeline::context::layer(state.auth.clone()))
        .layer(super::grpc_guard::EmbedGuardLayer {
            max_inputs: state.config.limits.max_embedding_inputs,
            max_message_bytes: limits.max_message_bytes,
        })
        .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_secs)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(
            super::assistant::grpc_service(state.clone(), limits.max_message_bytes)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
        )
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

pub(crate) struct InferenceService {
    state: Arc<AppState>,
}

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl InferenceService {
    fn observer<T>(&self, req: &Request<T>, method: &'static str, route: &str) -> Observer {
        let ctx = RequestContext::of(req.extensions()).ok();
        observer(&self.state, "grpc", method, route, ctx.as_ref())
    }

    /// Runs a unary call with accounting.
    async fn unary<R>(
        &self,
        mut obs: Observer,
        res: impl std::future::Future<Output = Result<R, ApiError>>,
    ) -> Result<Response<R>, Status> {
        match res.await {
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

    /// Generates through the pipeline and streams the events. RAG answers carry every source they
    /// were given on the first message (`sources`) and the ones the answer cites on the last
    /// (`citations`).
    async fn generate_stream(
        &self,
        ctx: Result<RequestContext, ApiError>,
        input: Result<GenerateInput, ApiError>,
        mut obs: Observer,
    ) -> Result<Response<GenStream>, Status> {
        let (ctx, input) = match ctx.and_then(|c| input.map(|i| (c, i))) {
            Ok(x) => x,
            Err(e) => {
                obs.on_error(e.codes());
                return Err(e.into());
            }
        };
        let mut parser: Option<ToolCallParser> = input.tools.as_ref().map(ToolSet::parser);
        let answer = self.state.pipeline.generate(&ctx, input, obs).await?;
        let ratelimit = answer.ratelimit;
        let sources = answer.citations;
        let safety = answer.safety;
        let mut first = true;
        let mut text = String::new();
        let out = answer.events.flat_map(move |ev| {
            let mut msg = match ev {
                Ok(EngineEvent::Delta {
                    text: delta,
                    token_ids,
                    logprobs,
                }) => {
                    let (delta, tool_calls) = match parser.as_mut() {
                        None => (delta, Vec::new()),
                        Some(p) => split_tool_events(p.push(&delta)),
                    };
                    text.push_str(&delta);
                    pb::GenerateResponse {
                        text: delta,
                        token_ids,
                        logprobs: logprobs.into_iter().map(position_logprobs).collect(),
                        tool_calls,
                        ..Default::default()
                    }
                }
                Ok(EngineEvent::Finished { reason, usage }) => {
                    let (rest, tool_calls, finish) = match parser.as_mut().map(|p| p.finish(reason)) {
                        None => (String::new(), Vec::new(), reason.as_str()),
                        Some(Ok((events, finish))) => {
                            let (rest, calls) = split_tool_events(events);
                            (rest, calls, finish)
                        }
                        Some(Err(why)) => {
                            let status = Status::internal(format!("the model's tool call is unusable: {why}"));
                            return futures::stream::iter(vec![Err(status)]);
                        }
                    };
                    text.push_str(&rest);
                    pb::GenerateResponse {
                        text: rest,
                        tool_calls,
                        finish_reason: finish.into(),
                        usage: Some(pb::Usage {
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                            cached_prompt_tokens: usage.cached_prompt_tokens,
                        }),
                        citations: rag::parse_citations(&text, &sources)
                            .into_iter()
                            .map(citation)
                            .collect(),
                        ..Default::default()
                    }
                }
                Ok(EngineEvent::Failed { message }) => {
                    return futures::stream::iter(vec![Err(Status::internal(message))])
                }
                Err(e) => return futures::stream::iter(vec![Err(e.into())]),
            };
            if std::mem::take(&mut first) {
                msg.sources = sources.iter().cloned().map(citation).collect();
            }
            let finished_filtered = msg.finish_reason == FinishReason::ContentFilter.as_str();
            let mut out = vec![Ok(msg)];
            match safety.blocked() {
                // The stream ends OK (finish_reason "content_filter" on the last message); the
                // stage and reason ride in the trailers, as for a blocked input.
                Some((stage, reason)) if finished_filtered => {
                    let mut md = tonic::metadata::MetadataMap::new();
                    md.insert("genai-safety-stage", tonic::metadata::MetadataValue::from_static(stage));
                    md.insert(
                        "genai-safety-reason",
                        tonic::metadata::MetadataValue::from_static(reason),
                    );
                    out.push(Err(Status::with_metadata(tonic::Code::Ok, "", md)));
                }
                _ => {}
            }
            futures::stream::iter(out)
        });
        let mut resp = Response::new(Box::pin(out) as GenStream);
        // The tenant's x-ratelimit-* as of admission, in the initial metadata (HTTP sends headers).
        for (k, v) in ratelimit {
            if let Ok(v) = v.parse() {
                resp.metadata_mut().insert(k, v);
            }
        }
        Ok(resp)
    }
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request into the tools in effect.
fn chat_tools(r: &mut pb::ChatRequest) -> Result<Option<ToolSet>, ApiError> {
    let mut tools = Vec::with_capacity(r.tools.len());
    for (i, t) in std::mem::take(&mut r.tools).into_iter().enumerate() {
        let parameters = if t.parameters_json.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&t.parameters_json).map_err(|e| {
                ApiError::invalid(format!("tools[{i}].parameters_json"), format!("malformed JSON: {e}"))
            })?)
        };
        tools.push(Tool {
            name: t.name,
            description: t.description,
            parameters,
            strict: t.strict,
        });
    }
    let choice = r.tool_choice.take().unwrap_or_default();
    let choice = match choice.mode.as_str() {
        "" | "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "required" => ToolChoice::Required,
        "function" => ToolChoice::Named(choice.name),
        other => {
            return Err(ApiError::invalid(
                "tool_choice.mode",
                format!("must be \"auto\", \"none\", \"required\" or \"function\", got {other:?}"),
            ))
        }
    };
    ToolSet::new(tools, choice, r.parallel_tool_calls.unwrap_or(true), ToolPaths::GRPC)
}

/// Parser events into the message's content and its tool-call deltas.
fn split_tool_events(events: Vec<ToolEvent>) -> (String, Vec<pb::ToolCallDelta>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for ev in events {
        match ev {
            ToolEvent::Content(c) => text.push_str(&c),
            ToolEvent::CallStart { index, id, name } => calls.push(pb::ToolCallDelta {
                index: index as u32,
                id,
                name,
                arguments: String::new(),
            }),
            ToolEvent::Arguments { index, fragment } => calls.push(pb::ToolCallDelta {
                index: index as u32,
                arguments: fragment,
                ..Default::default()
            }),
        }
    }
    (text, calls)
}

pub(super) fn sampling(p: Option<pb::SamplingParams>) -> SamplingInput {
    let p = p.unwrap_or_default();
    SamplingInput {
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
        // The proto: `top_logprobs` 0 (or unset) without `logprobs` means no logprobs.
        logprobs: match (p.logprobs, p.top_logprobs.unwrap_or(0)) {
            (false, 0) => None,
            (_, n) => Some(i64::from(n)),
        },
    }
}

/// The request's `structured_output` as a grammar; errors name `structured_output.…` fields.
fn grammar(so: Option<pb::StructuredOutput>) -> Result<Option<GrammarRequest>, ApiError> {
    use pb::structured_output::Kind;
    let Some(kind) = so.and_then(|so| so.kind) else {
        return Ok(None);
    };
    let g = match kind {
        Kind::JsonObject(false) => return Ok(None),
        Kind::JsonObject(true) => GrammarRequest::new(Grammar::JsonObject, "structured_output.json_object"),
        Kind::JsonSchema(js) => {
            let field = "structured_output.json_schema.schema";
            let schema = serde_json::from_str(&js.schema)
                .map_err(|e| ApiError::invalid(field, format!("not valid JSON: {e}")))?;
            GrammarRequest::new(
                Grammar::JsonSchema {
                    schema,
                    strict: js.strict,
                },
                field,
            )
        }
        Kind::Regex(rx) => GrammarRequest::new(Grammar::Regex(rx), "structured_output.regex"),
        Kind::Choice(c) => GrammarRequest::new(Grammar::Choice(c.choices), "structured_output.choice"),
        Kind::Grammar(lark) => GrammarRequest::new(Grammar::Lark(lark), "structured_output.grammar"),
    };
    Ok(Some(g))
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
        let ctx = RequestContext::of(req.extensions());
        let r = req.into_inner();
        let input = grammar(r.structured_output).map(|grammar| GenerateInput {
            model: r.model,
            prompt: Prompt::Text(r.prompt),
            route: Route::Chat,
            sampling: sampling(r.sampling),
            tools: None,
            grammar,
        });
        self.generate_stream(ctx, input, obs).await
    }

    async fn chat(&self, req: Request<pb::ChatRequest>) -> Result<Response<GenStream>, Status> {
        let route = match pb::ChatMode::try_from(req.get_ref().mode) {
            Ok(pb::ChatMode::Rag) => Ok(Route::Rag),
            Ok(_) => Ok(Route::Chat),
            Err(_) => Err(ApiError::invalid(
                "mode",
                format!("unknown ChatMode value {}", req.get_ref().mode),
            )),
        };
        let label = route.as_ref().map_or("chat", |r| r.label());
        let obs = self.observer(&req, "Chat", label);
        let ctx = RequestContext::of(req.extensions());
        let mut r = req.into_inner();
        let input = route.and_then(|route| {
            let tools = chat_tools(&mut r)?;
            let grammar = grammar(r.structured_output.take())?;
            let messages = r
                .messages
                .into_iter()
                .map(|m| HistoryMessage {
                    role: m.role,
                    content: m.content,
                    tool_calls: m
                        .tool_calls
                        .into_iter()
                        .map(|c| ToolCall {
                            id: c.id,
                            name: c.name,
                            arguments: c.arguments,
                        })
                        .collect(),
                    tool_call_id: Some(m.tool_call_id).filter(|id| !id.is_empty()),
                })
                .collect();
            Ok(GenerateInput {
                model: r.model,
                prompt: Prompt::Chat(tool_calls::render_history(messages, ToolPaths::GRPC)?),
                route,
                sampling: sampling(r.sampling),
                tools,
                grammar,
            })
        });
        self.generate_stream(ctx, input, obs).await
    }

    async fn embed(&self, req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let obs = self.observer(&req, "Embed", "embedding");
        let ctx = RequestContext::of(req.extensions());
        let r = req.into_inner();
        self.unary(obs, async {
            let (model, e) = self.state.pipeline.embed(&ctx?, &r.model, r.texts).await?;
            Ok(pb::EmbedResponse {
                embeddings: e.vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
                prompt_tokens: e.tokens as u32,
                model,
            })
        })
        .await
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let obs = self.observer(&req, "Tokenize", "tokenize");
        let r = req.into_inner();
        self.unary(obs, async {
            let t = self
                .state
                .pipeline
                .tokenize(&r.model, r.text, r.add_special_tokens)
                .await?;
            Ok(pb::TokenizeResponse {
                token_ids: t.ids,
                tokens: t.tokens,
            })
        })
        .await
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let obs = self.observer(&req, "Detokenize", "tokenize");
        let r = req.into_inner();
        self.unary(obs, async {
            let text = self
                .state
                .pipeline
                .detokenize(&r.model, r.token_ids, r.skip_special_tokens)
                .await?;
            Ok(pb::DetokenizeResponse { text })
        })
        .await
    }

    async fn feedback(&self, req: Request<pb::FeedbackRequest>) -> Result<Response<pb::FeedbackResponse>, Status> {
        let obs = self.observer(&req, "Feedback", "feedback");
        let r = req.into_inner();
        self.unary(obs, async {
            let log = self.state.ops().request_log.as_ref().ok_or_else(|| {
                ApiError::Unavailable("the request log is disabled (ops.request_log.enabled = false)".into())
            })?;
            log.append_feedback(&r.request_id, r.rating, &r.comment)?;
            Ok(pb::FeedbackResponse {})
        })
        .await
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let (generation, context_length, embedding) = self.state.pipeline.models()?;
        // Names and kinds only: file paths are the operator's business (review m2).
        let mut models = vec![
            pb::ModelInfo {
                name: generation,
                kind: "generation".into(),
                context_length: context_length as u32,
                ..Default::default()
            },
            pb::ModelInfo {
                name: embedding,
                kind: "embedding".into(),
                ..Default::default()
            },
        ];
        // Remote backends ([[llm.backends]]): their context length is the upstream's (0 = unknown).
        models.extend(
            self.state
                .pipeline
                .remote_models()
                .into_iter()
                .map(|name| pb::ModelInfo {
                    name,
                    kind: "generation".into(),
                    ..Default::default()
                }),
        );
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
