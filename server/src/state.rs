//! Process-wide state shared by the gRPC and HTTP front doors.

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::ops::observe::Ops;
use crate::pipeline::Pipeline;
use crate::router::Router;
use genai_retrieval::knowledge::KnowledgeService;

pub(crate) struct AppState {
    pub config: Config,
    ops: Arc<Ops>,
    /// Embedder + vector store; loaded before the servers start.
    pub knowledge: Arc<KnowledgeService>,
    pub pipeline: Pipeline,
    /// The assistant service (mode dispatch, the agent's tools).
    pub assistant: crate::assistant::Assistant,
    /// Chooses chat / RAG / agent for assistant requests with `mode = "auto"`.
    pub router: Router,
    /// API keys; the context layer of both doors asks it about every request.
    pub auth: Arc<Authenticator>,
    /// Flips to true on SIGTERM/SIGINT: stop admitting new work.
    draining: watch::Sender<bool>,
}

impl AppState {
    pub(crate) fn new(
        config: Config,
        ops: Ops,
        knowledge: Arc<KnowledgeService>,
        auth: Arc<Authenticator>,
        assistant: crate::assistant::Assistant,
        pipeline: impl FnOnce(watch::Receiver<bool>) -> Pipeline,
    ) -> Arc<Self> {
        let draining = watch::channel(false).0;
        Arc::new(Self {
            config,
            ops: Arc::new(ops),
            router: Router::new(knowledge.clone()),
            knowledge,
            pipeline: pipeline(draining.subscribe()),
            assistant,
            auth,
            draining,
        })
    }

    pub(crate) fn ops(&self) -> &Arc<Ops> {
        &self.ops
    }

    pub(crate) fn start_draining(&self) {
        self.draining.send_replace(true);
        self.pipeline.notify_changed();
    }
}
