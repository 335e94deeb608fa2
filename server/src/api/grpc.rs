//! tonic server: `genai.v1.Inference`, `grpc.health.v1.Health` (per service),
//! server reflection v1 and v1alpha, gzip, HTTP/2 keepalive, size limits.

use std::sync::Arc;
use std::time::Duration;

use genai_proto::v1 as pb;
use pb::inference_server::{Inference, InferenceServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::state::AppState;

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
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            for s in SERVICES {
                health.set_service_status(*s, ServingStatus::Serving).await;
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

type GenStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl InferenceService {
    fn loaded(&self) -> Result<&crate::state::Loaded, Status> {
        if self.state.is_draining() {
            return Err(Status::unavailable("server is shutting down"));
        }
        self.state
            .loaded()
            .ok_or_else(|| Status::unavailable("models are still loading"))
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenStream;
    type ChatStream = GenStream;

    async fn generate(&self, _req: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Generate arrives with the engine"))
    }

    async fn chat(&self, _req: Request<pb::ChatRequest>) -> Result<Response<GenStream>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Chat arrives with the engine"))
    }

    async fn embed(&self, _req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Embed arrives with the embedder"))
    }

    async fn tokenize(&self, _req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Tokenize arrives with the engine"))
    }

    async fn detokenize(
        &self,
        _req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        self.loaded()?;
        Err(Status::unimplemented("Detokenize arrives with the engine"))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let loaded = self.loaded()?;
        let files = &loaded.files;
        let path = |p: &crate::registry::WeightsFormat| match p {
            crate::registry::WeightsFormat::Gguf(p) | crate::registry::WeightsFormat::Safetensors(p) => {
                p.display().to_string()
            }
        };
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![
                pb::ModelInfo {
                    name: files.generation.name.clone(),
                    kind: "generation".into(),
                    path: path(&files.generation.weights),
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
