//! Process-wide state shared by the gRPC and HTTP front doors.

use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

use crate::config::Config;
use crate::ops::observe::Ops;
use genai_engine::EngineHandle;
use genai_models::chat_template::ChatTemplate;
use genai_models::registry::ModelFiles;
use genai_retrieval::knowledge::KnowledgeService;
use genai_retrieval::rag::RagPipeline;

/// What exists once the models are loaded and validated.
pub struct Loaded {
    pub files: ModelFiles,
    /// The generation model's name as clients address it.
    pub model_name: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub chat_template: ChatTemplate,
}

pub struct AppState {
    pub config: Config,
    ops: Arc<Ops>,
    /// Embedder + vector store; loaded before the servers start.
    pub knowledge: Arc<KnowledgeService>,
    pub rag: RagPipeline,
    loaded: OnceLock<Loaded>,
    /// Flips to true when the models are ready; health endpoints follow it.
    ready: watch::Sender<bool>,
    /// Flips to true on SIGTERM/SIGINT: stop admitting new work.
    draining: watch::Sender<bool>,
}

impl AppState {
    pub fn new(config: Config, ops: Ops, knowledge: Arc<KnowledgeService>, rag: RagPipeline) -> Arc<Self> {
        Arc::new(Self {
            config,
            ops: Arc::new(ops),
            knowledge,
            rag,
            loaded: OnceLock::new(),
            ready: watch::channel(false).0,
            draining: watch::channel(false).0,
        })
    }

    pub fn ops(&self) -> &Arc<Ops> {
        &self.ops
    }

    pub fn set_loaded(&self, loaded: Loaded) {
        if self.loaded.set(loaded).is_ok() {
            self.ready.send_replace(true);
        }
    }

    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() && !self.is_draining()
    }

    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub fn subscribe_draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}
