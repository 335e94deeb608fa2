//! The Prometheus exposition: one catalogue of every metric GenAI Factory
//! records (name, type, labels, unit, help, histogram buckets), the recorder
//! built from it, and small recording helpers for the API layer.
//!
//! Who records what: the engine records its own `genai_*` series with the
//! `metrics` macros (names: the constants below); the API
//! layer calls [`record_request`]; [`crate::ops::cost`], [`crate::ops::latency`]
//! and [`crate::ops::request_log`] record theirs. [`install`] installs the
//! global recorder once per process (later calls return the same handle) and
//! serves nothing itself: the HTTP server answers `/metrics` with
//! [`MetricsHandle::render`].
//!
//! Fractional counters: the `metrics` crate counts in `u64`, but money is
//! fractional, so USD counters live in a small [`FloatCounters`] registry that
//! [`MetricsHandle::render`] appends to the exporter's text (distinct family
//! names, so the exposition stays valid).
//!
//! Invariants: every histogram in the catalogue has explicit buckets (never a
//! summary); every recorded name has HELP text; label values are escaped.
//! Tests render a non-global recorder after recording every catalogue metric
//! and check it with `promtool check metrics` and a real Prometheus scrape
//! (skipped loudly when the tool is not installed, failing instead under
//! `GENAI_REQUIRE_TOOLS=1`), and check that the README tables list exactly the
//! catalogue and the Grafana dashboard names only catalogued metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

// Recorded by genai-engine and by the embedder, which own their names.
pub use genai_engine::metric_names::{
    BATCH_SIZE, DECODE_STEP, E2E_REQUEST_LATENCY, ENGINE_PANICS, ENGINE_UP, GENERATION_TOKENS, INTER_TOKEN_LATENCY,
    ITERATION_TOKENS, KV_BLOCKS_FREE, KV_BLOCKS_USED, KV_LIVE_TOKENS, KV_USAGE_RATIO, KV_WASTE_RATIO, PREEMPTIONS,
    PREFILL_STEP, PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES, PROMPT_TOKENS, REQUESTS_REJECTED, REQUESTS_RUNNING,
    REQUESTS_WAITING, REQUEST_QUEUE_TIME, TIME_TO_FIRST_TOKEN,
};
pub use genai_models::embedder::metric_names::{EMBEDDER_PANICS, EMBEDDER_UP};
// Recorded by the API layer and by `ops`.
pub const REQUESTS: &str = "genai_requests_total";
pub const REQUEST_DURATION: &str = "genai_request_duration_seconds";
pub const EMBEDDING_BATCH_SIZE: &str = "genai_embedding_batch_size";
pub const RETRIEVAL_LATENCY: &str = "genai_retrieval_latency_seconds";
pub const COST_USD: &str = "genai_cost_usd_total";
pub const TENANT_BUDGET_EXCEEDED: &str = "genai_tenant_budget_exceeded_total";
pub const TENANT_BUDGET_USED_RATIO: &str = "genai_tenant_budget_used_ratio";
// Recorded by `crate::tenancy` (hard per-tenant limits).
pub const TENANT_LIMIT_REJECTIONS: &str = "genai_tenant_limit_rejections_total";
pub const TENANT_BUDGET_USD: &str = "genai_tenant_budget_usd";
pub const TENANT_SPEND_USD: &str = "genai_tenant_spend_usd";
pub const TENANT_RESERVED_USD: &str = "genai_tenant_reserved_usd";
pub const TENANT_WINDOW_TOKENS: &str = "genai_tenant_window_tokens";
pub const TENANT_ACTIVE_STREAMS: &str = "genai_tenant_active_streams";
pub const SLO_BREACHES: &str = "genai_slo_breaches_total";
pub const ROUTE_LATENCY: &str = "genai_route_latency_seconds";
pub const PREFIX_CACHE_HIT_RATIO: &str = "genai_prefix_cache_hit_ratio";
pub const REQUEST_LOG_LINES: &str = "genai_request_log_lines_total";
pub const REQUEST_LOG_DROPPED: &str = "genai_request_log_dropped_total";
pub const REQUEST_LOG_ERRORS: &str = "genai_request_log_errors_total";
pub const BUILD_INFO: &str = "genai_build_info";
pub const AUTH_FAILURES: &str = "genai_auth_failures_total";
pub const SAFETY_VERDICTS: &str = "genai_safety_verdicts_total";
// Recorded by `crate::llm` (remote backends: retries, circuit breakers, fallback chains).
pub const BACKEND_CIRCUIT_STATE: &str = "genai_backend_circuit_state";
pub const BACKEND_ATTEMPTS: &str = "genai_backend_attempts_total";
pub const BACKEND_RETRIES: &str = "genai_backend_retries_total";
pub const BACKEND_FALLBACKS: &str = "genai_backend_fallbacks_total";
// Recorded by the assistant's agent (`crate::assistant`).
pub const AGENT_TOOL_CALLS: &str = "genai_agent_tool_calls_total";

/// Prometheus type of a catalogued metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    /// A counter with a fractional value, kept in [`FloatCounters`].
    FloatCounter,
    Gauge,
    Histogram,
}

impl Kind {
    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter | Kind::FloatCounter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One catalogued metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    /// The label names: the catalogue documents them and the tests check the exposition against them.
    #[cfg_attr(not(test), allow(dead_code))]
    pub labels: &'static [&'static str],
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// Upper bounds of the histogram buckets (histograms only).
    pub buckets: &'static [f64],
}

/// End-to-end style latencies: 5 ms … 60 s (TTFT, e2e, request duration).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0,
];
/// Queue time: from 1 ms (idle server) to 60 s (overload).
pub const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Inter-token latency: 1 ms … 2 s.
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.0,
];
/// One engine step: 0.5 ms … 10 s.
pub const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];
/// Sequences per engine step.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, 512.0,
];
/// Tokens per engine step.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// Texts per embedding batch.
pub const EMBEDDING_BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Vector search (+ embedding of the query): 0.5 ms … 5 s.
pub const RETRIEVAL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    unit: Option<Unit>,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        labels,
        unit,
        help,
        buckets: &[],
    }
}

const fn hist(
    name: &'static str,
    labels: &'static [&'static str],
    unit: Option<Unit>,
    buckets: &'static [f64],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Histogram,
        labels,
        unit,
        help,
        buckets,
    }
}

const S: Option<Unit> = Some(Unit::Seconds);
const N: Option<Unit> = Some(Unit::Count);

/// Every metric GenAI Factory exports.
pub const CATALOGUE: &[MetricDef] = &[
    hist(
        TIME_TO_FIRST_TOKEN,
        &[],
        S,
        LATENCY_BUCKETS,
        "Time from request arrival at the engine to its first generated token.",
    ),
    hist(
        INTER_TOKEN_LATENCY,
        &[],
        S,
        ITL_BUCKETS,
        "Time between consecutive generated tokens of one request, at engine steps.",
    ),
    hist(
        E2E_REQUEST_LATENCY,
        &[],
        S,
        LATENCY_BUCKETS,
        "Time from request arrival at the engine to its last token.",
    ),
    hist(
        REQUEST_QUEUE_TIME,
        &[],
        S,
        QUEUE_BUCKETS,
        "Time a request waited before its first scheduled step.",
    ),
    hist(
        PREFILL_STEP,
        &[],
        S,
        STEP_BUCKETS,
        "Duration of engine steps that contain prefill tokens.",
    ),
    hist(
        DECODE_STEP,
        &[],
        S,
        STEP_BUCKETS,
        "Duration of engine steps that contain only decode tokens.",
    ),
    hist(BATCH_SIZE, &[], N, BATCH_BUCKETS, "Sequences in one engine step."),
    hist(
        ITERATION_TOKENS,
        &[],
        N,
        TOKEN_BUCKETS,
        "Tokens (prefill + decode) computed in one engine step.",
    ),
    def(
        PROMPT_TOKENS,
        Kind::Counter,
        &[],
        N,
        "Prompt tokens of finished requests.",
    ),
    def(
        GENERATION_TOKENS,
        Kind::Counter,
        &[],
        N,
        "Generated (completion) tokens.",
    ),
    def(
        PREFIX_CACHE_QUERIES,
        Kind::Counter,
        &[],
        N,
        "Prompt tokens looked up in the prefix cache.",
    ),
    def(
        PREFIX_CACHE_HITS,
        Kind::Counter,
        &[],
        N,
        "Prompt tokens found in the prefix cache (not recomputed).",
    ),
    def(
        PREEMPTIONS,
        Kind::Counter,
        &[],
        N,
        "Running sequences preempted (KV blocks freed, recomputed later).",
    ),
    def(
        REQUESTS_REJECTED,
        Kind::Counter,
        &["reason"],
        N,
        "Requests the engine refused at submission, by reason.",
    ),
    def(
        REQUESTS_RUNNING,
        Kind::Gauge,
        &[],
        N,
        "Sequences currently scheduled in the engine.",
    ),
    def(
        REQUESTS_WAITING,
        Kind::Gauge,
        &[],
        N,
        "Requests queued for admission to the engine.",
    ),
    def(
        KV_BLOCKS_USED,
        Kind::Gauge,
        &[],
        N,
        "KV-cache blocks held by sequences.",
    ),
    def(
        KV_BLOCKS_FREE,
        Kind::Gauge,
        &[],
        N,
        "KV-cache blocks free (including reusable cached prefix blocks).",
    ),
    def(
        KV_USAGE_RATIO,
        Kind::Gauge,
        &[],
        None,
        "Fraction of KV-cache blocks in use, 0 to 1.",
    ),
    def(
        KV_LIVE_TOKENS,
        Kind::Gauge,
        &[],
        N,
        "KV-cache slots holding a running sequence's token (shared prefix blocks counted once).",
    ),
    def(
        KV_WASTE_RATIO,
        Kind::Gauge,
        &[],
        None,
        "Fraction of the slots in used KV-cache blocks that hold no token (paging waste), 0 to 1.",
    ),
    def(
        ENGINE_UP,
        Kind::Gauge,
        &[],
        None,
        "1 while the generation engine's thread serves, 0 once it stopped (health turns NOT_SERVING).",
    ),
    def(
        ENGINE_PANICS,
        Kind::Counter,
        &[],
        N,
        "Engine steps that panicked; their requests failed and the engine reset (or stopped).",
    ),
    def(
        EMBEDDER_UP,
        Kind::Gauge,
        &[],
        None,
        "1 while the embedding worker's thread runs, 0 once it exited (health turns NOT_SERVING).",
    ),
    def(
        EMBEDDER_PANICS,
        Kind::Counter,
        &[],
        N,
        "Embedding micro-batches whose forward pass panicked; their jobs got an error.",
    ),
    def(
        REQUESTS,
        Kind::Counter,
        &["api", "method", "status", "tenant"],
        N,
        "API requests answered, by API (grpc|http), method, status and tenant.",
    ),
    hist(
        REQUEST_DURATION,
        &["api", "method"],
        S,
        LATENCY_BUCKETS,
        "Wall time of an API request, from arrival to the last byte or message.",
    ),
    hist(
        EMBEDDING_BATCH_SIZE,
        &[],
        N,
        EMBEDDING_BATCH_BUCKETS,
        "Texts embedded in one embedding-model batch.",
    ),
    hist(
        RETRIEVAL_LATENCY,
        &[],
        S,
        RETRIEVAL_BUCKETS,
        "Time to retrieve context for a query (query embedding + vector search).",
    ),
    def(
        COST_USD,
        Kind::FloatCounter,
        &["model", "tenant", "kind"],
        None,
        "Cost in USD by model, tenant and kind (prompt|completion|gpu), from the configured price table.",
    ),
    def(
        TENANT_BUDGET_EXCEEDED,
        Kind::Counter,
        &["tenant"],
        N,
        "Times a tenant's spend crossed its budget (once per budget period).",
    ),
    def(
        TENANT_BUDGET_USED_RATIO,
        Kind::Gauge,
        &["tenant"],
        None,
        "Spend in the current budget period divided by the tenant's budget.",
    ),
    def(
        TENANT_LIMIT_REJECTIONS,
        Kind::Counter,
        &["tenant", "limit"],
        N,
        "Requests refused by a hard tenant limit, by tenant and limit (requests_per_minute, concurrent_streams, max_prompt_tokens, max_tokens, tokens_per_minute, budget_usd).",
    ),
    def(
        TENANT_BUDGET_USD,
        Kind::Gauge,
        &["tenant"],
        None,
        "A tenant's hard budget in USD per budget period ([tenants.*] budget_usd).",
    ),
    def(
        TENANT_SPEND_USD,
        Kind::Gauge,
        &["tenant"],
        None,
        "A tenant's settled spend in USD in the current budget period (token prices; survives restarts).",
    ),
    def(
        TENANT_RESERVED_USD,
        Kind::Gauge,
        &["tenant"],
        None,
        "USD reserved by a tenant's requests in flight (worst case, refunded as they end).",
    ),
    def(
        TENANT_WINDOW_TOKENS,
        Kind::Gauge,
        &["tenant"],
        N,
        "Tokens a tenant used or reserved in the sliding minute (what tokens_per_minute limits).",
    ),
    def(
        TENANT_ACTIVE_STREAMS,
        Kind::Gauge,
        &["tenant"],
        N,
        "Generations of a tenant in flight (what concurrent_streams limits).",
    ),
    def(
        SLO_BREACHES,
        Kind::Counter,
        &["route", "percentile"],
        N,
        "Times a route's rolling latency percentile (p50|p95|p99) went above its SLO threshold.",
    ),
    def(
        ROUTE_LATENCY,
        Kind::Gauge,
        &["route", "percentile"],
        S,
        "Rolling latency percentile (p50|p95|p99) per route over the latency window; NaN when the window is empty.",
    ),
    def(
        PREFIX_CACHE_HIT_RATIO,
        Kind::Gauge,
        &[],
        None,
        "Prefix-cache hits divided by queries (in tokens) since start.",
    ),
    def(
        REQUEST_LOG_LINES,
        Kind::Counter,
        &["type"],
        N,
        "Lines written to the request log, by type (request|feedback).",
    ),
    def(
        REQUEST_LOG_DROPPED,
        Kind::Counter,
        &[],
        N,
        "Request-log lines dropped because the writer queue was full or closed.",
    ),
    def(
        REQUEST_LOG_ERRORS,
        Kind::Counter,
        &[],
        N,
        "Request-log write, rotation or cleanup errors.",
    ),
    def(
        AUTH_FAILURES,
        Kind::Counter,
        &["reason"],
        N,
        "Requests refused by API-key checks, by reason (missing|malformed|unknown_id|wrong_secret|revoked|scope|tenant).",
    ),
    def(
        SAFETY_VERDICTS,
        Kind::Counter,
        &["stage", "verdict", "reason"],
        N,
        "Safety verdicts by stage (input_pii|retrieval_pii|output_pii|input_injection|input_toxicity|retrieval_injection|tool_injection), verdict (redact|block|allow) and reason code; one per value redacted.",
    ),
    def(
        AGENT_TOOL_CALLS,
        Kind::Counter,
        &["tool", "outcome"],
        N,
        "Agent tool calls by tool and outcome (ok|invalid_arguments|refused|failed|timeout); calls to unknown tools are not counted.",
    ),
    def(
        BACKEND_CIRCUIT_STATE,
        Kind::Gauge,
        &["backend"],
        None,
        "A remote backend's circuit breaker: 0 closed, 1 open, 2 half-open (one probe let through).",
    ),
    def(
        BACKEND_ATTEMPTS,
        Kind::Counter,
        &["backend", "outcome"],
        N,
        "Attempts at a remote backend up to its first token, by outcome (ok|connect_error|first_token_timeout|rate_limited|server_error|client_error|stream_error|circuit_open).",
    ),
    def(
        BACKEND_RETRIES,
        Kind::Counter,
        &["backend"],
        N,
        "Retries of a remote backend's requests before their first token.",
    ),
    def(
        BACKEND_FALLBACKS,
        Kind::Counter,
        &["backend", "to"],
        N,
        "Requests for a backend answered by the next one of its fallback chain (`to`), after a failure or an open circuit.",
    ),
    def(
        BUILD_INFO,
        Kind::Gauge,
        &["version", "cuda"],
        None,
        "Always 1; labels carry the build version and whether CUDA is compiled in.",
    ),
];

/// The catalogue entry of `name`.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    CATALOGUE.iter().find(|d| d.name == name)
}

/// A builder with the catalogue's buckets for every histogram (and LLM-latency
/// buckets for any histogram not catalogued, so none renders as a summary).
pub fn builder() -> anyhow::Result<PrometheusBuilder> {
    let mut b = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS)?;
    for d in CATALOGUE.iter().filter(|d| d.kind == Kind::Histogram) {
        b = b.set_buckets_for_metric(Matcher::Full(d.name.to_string()), d.buckets)?;
    }
    Ok(b)
}

/// A non-global recorder with the catalogue's buckets, for tests and embedding.
pub fn local_recorder() -> anyhow::Result<PrometheusRecorder> {
    Ok(builder()?.build_recorder())
}

/// Registers HELP text for every catalogued metric with the current recorder
/// (global, or local inside `metrics::with_local_recorder`), and sets `genai_build_info`.
pub fn describe_all() {
    for d in CATALOGUE {
        let name = d.name;
        match (d.kind, d.unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, d.help),
            (Kind::Counter, None) => metrics::describe_counter!(name, d.help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, d.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, d.help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, d.help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, d.help),
            // Rendered by FloatCounters from the catalogue directly.
            (Kind::FloatCounter, _) => {}
        }
    }
    let cuda = if cfg!(feature = "cuda") { "true" } else { "false" };
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "cuda" => cuda).set(1.0);
}

/// What `/metrics` serves: the exporter's text plus the fractional counters.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    floats: Arc<FloatCounters>,
}

impl MetricsHandle {
    pub fn new(prometheus: PrometheusHandle, floats: Arc<FloatCounters>) -> Self {
        Self { prometheus, floats }
    }

    /// The Prometheus text exposition (content type `text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = self.prometheus.render();
        self.floats.render_into(&mut out);
        out
    }
}

static INSTALLED: OnceLock<MetricsHandle> = OnceLock::new();
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// How often the exporter's histogram buffers are drained between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder (catalogue buckets, HELP texts, build info) and
/// starts its upkeep thread. Safe to call more than once: later calls return
/// the handle of the first. Fails only if another global recorder was
/// installed by someone else.
pub fn install() -> anyhow::Result<MetricsHandle> {
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = INSTALLED.get() {
        return Ok(h.clone());
    }
    let recorder = local_recorder()?;
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| {
        anyhow::anyhow!("installing the Prometheus recorder: {e} (another metrics recorder is installed)")
    })?;
    describe_all();
    let upkeep = prometheus.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })?;
    let handle = MetricsHandle::new(prometheus, global_float_counters());
    Ok(INSTALLED.get_or_init(|| handle).clone())
}

/// Counts one answered API request and its duration.
/// `api`: "grpc" | "http"; `method`: RPC or route name; `status`: gRPC code name or HTTP status.
pub fn record_request(api: &str, method: &str, status: &str, tenant: &str, duration: Duration) {
    metrics::counter!(REQUESTS, "api" => api.to_owned(), "method" => method.to_owned(),
        "status" => status.to_owned(), "tenant" => tenant.to_owned())
    .increment(1);
    metrics::histogram!(REQUEST_DURATION, "api" => api.to_owned(), "method" => method.to_owned())
        .record(duration.as_secs_f64());
}

/// Sets `genai_prefix_cache_hit_ratio` from the engine's cumulative counts (`EngineStats`).
pub fn record_prefix_cache(queries: u64, hits: u64) {
    let ratio = if queries == 0 {
        0.0
    } else {
        hits as f64 / queries as f64
    };
    metrics::gauge!(PREFIX_CACHE_HIT_RATIO).set(ratio);
}

/// Texts embedded in one batch.
pub fn record_embedding_batch(size: usize) {
    metrics::histogram!(EMBEDDING_BATCH_SIZE).record(size as f64);
}

/// Time taken by one retrieval (query embedding + search).
pub fn record_retrieval(duration: Duration) {
    metrics::histogram!(RETRIEVAL_LATENCY).record(duration.as_secs_f64());
}

/// One agent tool call (`tool` is a built-in name, a bounded label set).
pub fn record_tool_call(tool: &'static str, outcome: &'static str) {
    metrics::counter!(AGENT_TOOL_CALLS, "tool" => tool, "outcome" => outcome).increment(1);
}

type LabelSet = Vec<(&'static str, String)>;

/// Monotonic counters with fractional values (USD), rendered in Prometheus
/// text format. Only catalogued [`Kind::FloatCounter`] names are accepted.
#[derive(Debug, Default)]
pub struct FloatCounters {
    families: Mutex<BTreeMap<&'static str, BTreeMap<LabelSet, f64>>>,
}

impl FloatCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` to the series; a negative or non-finite value, or a name
    /// that is not a catalogued float counter, is ignored (counters only go up).
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        if !(value.is_finite() && value >= 0.0) || find(name).map(|d| d.kind) != Some(Kind::FloatCounter) {
            return;
        }
        let key: LabelSet = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let mut fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        *fams.entry(name).or_default().entry(key).or_insert(0.0) += value;
    }

    /// Current value of one series (0 if never incremented).
    #[cfg(test)]
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        fams.get(name)
            .and_then(|series| {
                series.iter().find_map(|(k, v)| {
                    let same = k.len() == labels.len() && k.iter().zip(labels).all(|((a, x), (b, y))| a == b && x == y);
                    same.then_some(*v)
                })
            })
            .unwrap_or(0.0)
    }

    /// Appends `# HELP`, `# TYPE` and sample lines of every family.
    pub fn render_into(&self, out: &mut String) {
        let fams = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, series) in fams.iter() {
            if let Some(d) = find(name) {
                let _ = writeln!(out, "# HELP {name} {}", escape_help(d.help));
            }
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, value) in series {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            }
            out.push('\n');
        }
    }
}

/// The process-wide float counters that [`install`]'s handle renders.
pub fn global_float_counters() -> Arc<FloatCounters> {
    static GLOBAL: OnceLock<Arc<FloatCounters>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(FloatCounters::new())).clone()
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    /// Both tools the tests need come in one Debian package.
    const INSTALL: &str = "apt-get install prometheus (Debian/Ubuntu; promtool and prometheus)";

    /// Records a sample for every catalogued metric (each label set once) into `rec`.
    fn record_everything(rec: &PrometheusRecorder, floats: &FloatCounters) {
        metrics::with_local_recorder(rec, || {
            describe_all();
            for d in CATALOGUE {
                let labels: Vec<metrics::Label> = d
                    .labels
                    .iter()
                    .map(|l| metrics::Label::new(*l, format!("t\"e\\st-{l}")))
                    .collect();
                match d.kind {
                    Kind::Counter => metrics::counter!(d.name, labels).increment(3),
                    Kind::Gauge => metrics::gauge!(d.name, labels).set(0.25),
                    Kind::Histogram => {
                        let h = metrics::histogram!(d.name, labels);
                        for b in d.buckets {
                            h.record(*b * 0.9);
                        }
                    }
                    Kind::FloatCounter => {
                        let pairs: Vec<(&'static str, &str)> = d.labels.iter().map(|l| (*l, "a\"b")).collect();
                        floats.add(d.name, &pairs, 0.125);
                    }
                }
            }
            record_request(
                "http",
                "/v1/chat/completions",
                "200",
                "acme",
                Duration::from_millis(120),
            );
            record_prefix_cache(10, 4);
        });
    }

    fn full_exposition() -> String {
        let rec = local_recorder().unwrap();
        let floats = Arc::new(FloatCounters::new());
        record_everything(&rec, &floats);
        MetricsHandle::new(rec.handle(), floats).render()
    }

    /// `name`'s path on `PATH`, when `name --version` runs. Otherwise the caller skips, saying so on
    /// the real stderr (libtest captures `eprintln!` of passing tests, which would hide the skip),
    /// unless `GENAI_REQUIRE_TOOLS=1` (set by scripts/test.sh): then the test fails, so a run that is
    /// meant to check against the tool cannot pass without it.
    fn require_tool(name: &str) -> Option<PathBuf> {
        let found = std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
            .filter(|path| {
                Command::new(path)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
        if found.is_none() {
            assert!(
                std::env::var("GENAI_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "`{name} --version` did not run, and GENAI_REQUIRE_TOOLS=1 requires it; install it: {INSTALL}"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (NOT CHECKED): `{name} --version` did not run; install it: {INSTALL} \
                 (GENAI_REQUIRE_TOOLS=1 fails instead)"
            );
        }
        found
    }

    #[test]
    fn every_catalogued_metric_renders_with_help_and_type() {
        let text = full_exposition();
        for d in CATALOGUE {
            assert!(
                text.contains(&format!("# TYPE {} {}\n", d.name, d.kind.as_str())),
                "{} missing:\n{text}",
                d.name
            );
            assert!(text.contains(&format!("# HELP {} ", d.name)), "{} has no HELP", d.name);
        }
        // Histograms, never summaries, with the catalogue's buckets.
        assert!(!text.contains(" summary\n"), "{text}");
        assert!(
            text.contains("genai_inter_token_latency_seconds_bucket{le=\"0.001\"}"),
            "{text}"
        );
        assert!(
            text.contains("genai_time_to_first_token_seconds_bucket{le=\"60\"}"),
            "{text}"
        );
        assert!(text.contains("genai_prefix_cache_hit_ratio 0.4"), "{text}");
        assert!(
            text.contains("genai_cost_usd_total{model=\"a\\\"b\",tenant=\"a\\\"b\",kind=\"a\\\"b\"} 0.125"),
            "{text}"
        );
        assert!(text.contains("genai_build_info{"), "{text}");
    }

    #[test]
    fn exposition_passes_promtool() {
        let Some(promtool) = require_tool("promtool") else {
            return;
        };
        let text = full_exposition();
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed ({}):\n{}{}\n--- exposition ---\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn float_counters_only_go_up_and_only_for_catalogued_names() {
        let f = FloatCounters::new();
        f.add(COST_USD, &[("model", "m"), ("tenant", "t"), ("kind", "gpu")], 0.5);
        f.add(COST_USD, &[("model", "m"), ("tenant", "t"), ("kind", "gpu")], 0.25);
        f.add(COST_USD, &[("model", "m"), ("tenant", "t"), ("kind", "gpu")], -1.0);
        f.add(COST_USD, &[("model", "m"), ("tenant", "t"), ("kind", "gpu")], f64::NAN);
        f.add(REQUESTS, &[], 1.0);
        assert_eq!(
            f.get(COST_USD, &[("model", "m"), ("tenant", "t"), ("kind", "gpu")]),
            0.75
        );
        let mut out = String::new();
        f.render_into(&mut out);
        assert!(!out.contains(REQUESTS), "{out}");
    }

    #[test]
    fn install_is_idempotent() {
        let a = install().unwrap();
        let b = install().unwrap();
        metrics::counter!(PREEMPTIONS).increment(2);
        assert!(a.render().contains("genai_build_info{"));
        assert!(b.render().contains("genai_preemptions_total"));
    }

    #[test]
    fn readme_and_dashboard_cover_the_catalogue() {
        // Both metric tables (this module's README and the user-facing one) list exactly the catalogue.
        let catalogue: std::collections::BTreeSet<&str> = CATALOGUE.iter().map(|d| d.name).collect();
        for (which, readme) in [
            ("server/src/ops/README.md", include_str!("README.md")),
            ("README.md", include_str!("../../../README.md")),
        ] {
            // Rows whose first cell is a `genai_*` name.
            let table: std::collections::BTreeSet<&str> = readme
                .lines()
                .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
                .filter(|name| name.starts_with("genai_"))
                .collect();
            let missing: Vec<_> = catalogue.difference(&table).collect();
            let unknown: Vec<_> = table.difference(&catalogue).collect();
            assert!(
                missing.is_empty() && unknown.is_empty(),
                "{which}'s metric table: missing {missing:?}, not in the catalogue {unknown:?}"
            );
        }
        let dash_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/grafana/genai-factory.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dash_path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&dash, &mut exprs);
        assert!(exprs.len() >= 10, "dashboard has {} queries", exprs.len());
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("genai_") {
                    let name = word;
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s).filter(|b| find(b).is_some()))
                        .unwrap_or(name);
                    assert!(find(base).is_some(), "dashboard uses unknown metric {name} in {e}");
                    used.insert(base.to_owned());
                }
            }
        }
        for must in [
            TIME_TO_FIRST_TOKEN,
            INTER_TOKEN_LATENCY,
            E2E_REQUEST_LATENCY,
            KV_USAGE_RATIO,
            COST_USD,
            SLO_BREACHES,
        ] {
            assert!(used.contains(must), "dashboard does not chart {must}");
        }
        // Every query parses as PromQL: promtool checks them as recording rules.
        let Some(promtool) = require_tool("promtool") else {
            return;
        };
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, e) in exprs.iter().enumerate() {
            let e = e.replace("$__rate_interval", "1m");
            rules.push_str(&format!(
                "      - record: dashboard:q{i}\n        expr: {}\n",
                serde_json::to_string(&e).unwrap()
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.yml");
        std::fs::write(&file, rules).unwrap();
        let out = Command::new(promtool)
            .arg("check")
            .arg("rules")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dashboard PromQL rejected:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_exprs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
            _ => {}
        }
    }

    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A real Prometheus server scrapes a real axum `/metrics` endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_prometheus_scrapes_the_exposition() {
        let Some(prometheus) = require_tool("prometheus") else {
            return;
        };
        let text = Arc::new(full_exposition());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let t = text.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], (*t).clone()) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: genai\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let _prom = KillOnDrop(
            Command::new(prometheus)
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{prom_port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        let mut last = String::new();
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "target never became healthy; last /api/v1/targets: {last}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(resp) = client.get(format!("{base}/api/v1/targets")).send().await else {
                continue;
            };
            let Ok(v) = resp.json::<serde_json::Value>().await else {
                continue;
            };
            last = v.to_string();
            let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            if let Some(t) = targets.first() {
                assert_ne!(t["health"], "down", "scrape failed: {}", t["lastError"]);
                if t["health"] == "up" {
                    break;
                }
            }
        }
        // The samples were ingested, not just fetched.
        let v: serde_json::Value = client
            .get(format!("{base}/api/v1/query"))
            .query(&[("query", "genai_time_to_first_token_seconds_count")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let value = v["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(value, LATENCY_BUCKETS.len().to_string(), "query answer: {v}");
    }
}
