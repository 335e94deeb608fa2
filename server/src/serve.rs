//! `genai-factory serve`: binds both listeners first (a port in use fails fast),
//! starts gRPC and HTTP answering health as NOT_SERVING, loads and validates the
//! models off the async runtime, flips health to SERVING, and on SIGTERM/SIGINT
//! stops admitting, lets in-flight streams finish within the drain time, exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api;
use crate::config::Config;
use crate::llm::local::LocalEngine;
use crate::ops;
use crate::ops::observe::Ops;
use crate::pipeline::limits::Limits;
use crate::pipeline::Pipeline;
use crate::safety::detectors;
use crate::state::AppState;
use crate::tenancy::Tenancy;
use genai_engine::EngineHandle;
use genai_grammar::GrammarCompiler;
use genai_models as model;
use genai_models::prompt::PromptEncoder;
use genai_models::registry;
use genai_retrieval::knowledge::KnowledgeService;
use genai_retrieval::rag::RagPipeline;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let grpc_listener = bind(config.server.grpc_addr, "server.grpc_addr", "--grpc-addr").await?;
    let http_listener = bind(config.server.http_addr, "server.http_addr", "--http-addr").await?;
    let metrics_listener = match config.server.metrics_addr {
        Some(addr) => Some(bind(addr, "server.metrics_addr", "GENAI_SERVER__METRICS_ADDR").await?),
        None => None,
    };
    // Keys before anything loads: a keys file that cannot be read stops the start-up.
    let auth = crate::auth::Authenticator::open(&config.auth)?;
    auth.watch()?;
    let drain = Duration::from_secs(config.server.drain_timeout_secs);
    // Cheap checks of every model file first: a missing or corrupt file fails before anything loads.
    let files = registry::locate(&config.models)?;
    let ops = start_ops(&config)?;
    let latency = ops.latency.clone();
    let cfg = config.clone();
    let knowledge = Arc::new(
        tokio::task::spawn_blocking(move || KnowledgeService::load(&cfg.models, &cfg.embedding, &cfg.index, true))
            .await??,
    );
    let rag = RagPipeline::new(knowledge.clone(), &config.rag)?;
    let (limits, default_max) = (Limits::new(config.limits.clone()), config.engine.default_max_tokens);
    let tenancy = Arc::new(Tenancy::new(
        &config.tenants,
        &config.tenants_state,
        &config.ops.cost.prices,
        &config.models.generation.name,
    )?);
    let pipeline_tenancy = tenancy.clone();
    let mut safety = crate::safety::SafetyChain::new(&config.safety)?;
    if safety.uses(genai_safety::Stage::Injection) {
        let embedder = knowledge.embedder().clone();
        safety.add_detector(Arc::new(detectors::Injection::load(&config.models.dir, embedder)?));
    }
    if safety.uses(genai_safety::Stage::Toxicity) {
        safety.add_detector(Arc::new(detectors::Toxicity::load(&config.models.dir)?));
    }
    tracing::info!(target: "genai::safety", "safety policy: {}", safety.describe());
    let remotes = crate::llm::backends::Backends::from_config(&config.llm)?;
    let assistant = crate::assistant::Assistant::new(&config.agent, knowledge.clone(), &config.rag)?;
    let state = AppState::new(config, ops, knowledge, auth, assistant, |draining| {
        Pipeline::new(limits, pipeline_tenancy, rag, safety, draining, default_max).with_remotes(remotes)
    });
    tokio::spawn(latency.run(Duration::from_secs(5)));
    let tenancy_task = tokio::spawn(tenancy.clone().run());
    tokio::spawn(publish_engine_stats(state.clone()));
    // The router's exemplars are embedded (bulk queue) while the generation model loads.
    let router_state = state.clone();
    tokio::spawn(async move { router_state.router.warm().await });
    tracing::info!(
        grpc = %grpc_listener.local_addr()?,
        http = %http_listener.local_addr()?,
        "listening; loading models"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grpc = tokio::spawn(api::grpc::serve(state.clone(), grpc_listener, shutdown_rx.clone()));
    let http = tokio::spawn(api::http::serve(state.clone(), http_listener, shutdown_rx.clone()));
    if let Some(l) = metrics_listener {
        tracing::info!(metrics = %l.local_addr()?, "serving /metrics on its own listener, without authentication");
        tokio::spawn(api::http::serve_metrics(state.clone(), l, shutdown_rx));
    }

    let load_state = state.clone();
    let load = tokio::task::spawn_blocking(move || load_models(&load_state, files));
    tokio::select! {
        res = load => {
            res.context("model loading task failed")??;
            tracing::info!("models loaded; SERVING");
        }
        _ = shutdown_signal() => {
            tracing::info!("signal received while loading; exiting");
            return Ok(());
        }
    }

    shutdown_signal().await;
    tracing::info!(
        drain_secs = drain.as_secs(),
        "shutting down: no new requests, draining in-flight ones"
    );
    state.start_draining();
    if let Some(l) = state.pipeline.local() {
        l.engine().shutdown();
    }
    let _ = shutdown_tx.send(true);
    let servers = async {
        let (g, h) = tokio::join!(grpc, http);
        g??;
        h??;
        anyhow::Ok(())
    };
    match tokio::time::timeout(drain, servers).await {
        Ok(res) => res?,
        Err(_) => tracing::warn!("drain time exceeded; closing remaining streams"),
    }
    // Streams are over (or cut): their reservations are settled or refunded; save the spend.
    tenancy_task.abort();
    match tokio::task::spawn_blocking(move || tenancy.save(true)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("saving tenant spend at shutdown failed: {e:#}"),
        Err(e) => tracing::warn!("saving tenant spend at shutdown failed: {e}"),
    }
    if let Some(log) = state.ops().request_log.clone() {
        // Joins the writer thread: off the async runtime.
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    tracing::info!("bye");
    Ok(())
}

fn start_ops(config: &Config) -> anyhow::Result<Ops> {
    let metrics = ops::metrics::install()?;
    let cost = Arc::new(ops::cost::CostMonitor::new(&config.ops.cost));
    let latency = Arc::new(ops::latency::LatencyMonitor::new(&config.ops.latency));
    let log_cfg = &config.ops.request_log;
    let request_log = if log_cfg.enabled {
        Some(Arc::new(ops::request_log::RequestLog::start(log_cfg)?))
    } else {
        None
    };
    // Tenants with a budget alert or hard limits get their own label; others are "other".
    let mut tenants: Vec<String> = config.ops.cost.budgets.keys().cloned().collect();
    tenants.extend(
        config
            .tenants
            .keys()
            .filter(|t| !config.ops.cost.budgets.contains_key(*t))
            .cloned(),
    );
    Ok(Ops::new(metrics, cost, latency, request_log, tenants))
}

/// Engine-level gauges the engine cannot push itself (ratios over its counters).
async fn publish_engine_stats(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(l) = state.pipeline.local() {
            let s = l.engine().stats();
            ops::metrics::record_prefix_cache(s.prefix_cache_queries, s.prefix_cache_hits);
        }
    }
}

fn load_models(state: &Arc<AppState>, files: registry::ModelFiles) -> anyhow::Result<()> {
    let cfg = &state.config;
    let threads = match cfg.models.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let device = genai_models::device::resolve(cfg.models.device)?;
    let model = model::load_on(&files.generation, threads, device, &cfg.engine)?;
    let mut engine_cfg = cfg.engine.clone();
    // A GPU sizes its KV pool from free device memory instead of engine.kv_cache_mib.
    engine_cfg.kv_cache_mib = model.kv_cache_mib.unwrap_or(engine_cfg.kv_cache_mib);
    let engine = EngineHandle::start(model.runner, model.tokenizer.clone(), &engine_cfg)?;
    tracing::info!(
        model = %files.generation.name,
        context = engine.info().context_length,
        %device,
        threads,
        "generation engine started"
    );
    // Built once per tokenizer (the token trie over the whole vocabulary): structured output.
    let grammar = match GrammarCompiler::new(model.tokenizer.clone(), &engine.info().eos_token_ids) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!("structured output is off for this model: {e:#}");
            None
        }
    };
    let encoder = PromptEncoder::new(model.tokenizer, model.chat_template);
    state.pipeline.set_local(LocalEngine::new(
        files.generation.name.clone(),
        engine,
        encoder,
        files.embedding.name.clone(),
        state.knowledge.embedder().clone(),
        grammar,
    ));
    Ok(())
}

async fn bind(addr: SocketAddr, key: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} ({key}): {e}; choose another address with {flag} or stop the process using it"
        )
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
