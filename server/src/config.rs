//! Configuration: built-in defaults, then `genai-factory.toml` (or `--config`),
//! then `GENAI_*` environment variables (`__` separates sections, e.g.
//! `GENAI_SERVER__GRPC_ADDR=0.0.0.0:50051`), then command-line flags.
//! Every key and its default is documented in `genai-factory.toml` at the
//! repository root; `genai-factory config` prints the effective values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::auth::AuthConfig;
pub use genai_engine::EngineConfig;
pub use genai_models::config::{Device, EmbeddingConfig, ModelsConfig};
pub use genai_retrieval::config::{IndexConfig, RagConfig};

/// What the command line sets on top of the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub models_dir: Option<PathBuf>,
    pub device: Option<Device>,
    pub threads: Option<usize>,
}

/// Default config file looked up in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "genai-factory.toml";

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub engine: EngineConfig,
    pub log: LogConfig,
    /// Observability: prices and budgets, SLOs, the request log, trace export.
    #[serde(default)]
    pub ops: OpsConfig,
    #[serde(default)]
    pub embedding: EmbeddingConfig,
    #[serde(default)]
    pub index: IndexConfig,
    #[serde(default)]
    pub rag: RagConfig,
    /// Hard per-request limits, checked before any tokenization.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// API keys (`crate::auth`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Hard per-tenant limits (`[tenants.default]`, `[tenants.<name>]`): `crate::tenancy`.
    #[serde(default)]
    pub tenants: BTreeMap<String, crate::tenancy::TenantLimits>,
    /// Where tenants' spend survives restarts.
    #[serde(default)]
    pub tenants_state: crate::tenancy::TenantsStateConfig,
    /// The safety chain: PII redaction, injection/toxicity stages, output scanning.
    #[serde(default)]
    pub safety: crate::safety::SafetyConfig,
    /// Remote backends (`[[llm.backends]]`): `crate::llm::backends`.
    #[serde(default)]
    pub llm: crate::llm::backends::LlmConfig,
    /// The assistant's ReAct agent and its tools (`crate::assistant`).
    #[serde(default)]
    pub agent: crate::assistant::AgentConfig,
}

/// `[limits]`: what one request may ask for. Checked on the raw request, before tokenization,
/// template rendering or any queueing; a violation is a 400 / INVALID_ARGUMENT naming the field
/// and the limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of a completion prompt, or of all chat message contents together.
    pub max_prompt_bytes: usize,
    /// Chat messages in one request.
    pub max_messages: usize,
    /// Inputs in one embeddings call (TEI's client batch cap is 32; 256 suits this server).
    pub max_embedding_inputs: usize,
    /// Characters of one embeddings input.
    pub max_input_chars: usize,
    /// Stop strings per request, and bytes per stop string.
    pub max_stop: usize,
    pub max_stop_bytes: usize,
    /// `stop_token_ids` per request.
    pub max_stop_token_ids: usize,
    /// Most `top_logprobs` alternatives per token (the engine's own cap is 20).
    pub max_logprobs: usize,
    /// Largest HTTP request body, in bytes (gRPC: `server.max_message_bytes`).
    pub max_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 1 << 20,
            max_messages: 1024,
            max_embedding_inputs: 256,
            max_input_chars: 32_768,
            max_stop: 16,
            max_stop_bytes: 256,
            max_stop_token_ids: 64,
            max_logprobs: genai_engine::MAX_LOGPROBS,
            max_body_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// On SIGTERM/SIGINT: seconds in-flight requests get to finish.
    pub drain_timeout_secs: u64,
    /// HTTP/2 keepalive ping interval (gRPC), seconds.
    pub keepalive_interval_secs: u64,
    /// HTTP/2 keepalive ping timeout (gRPC), seconds.
    pub keepalive_timeout_secs: u64,
    /// Serve `/metrics` on this address instead of `http_addr`, without authentication (for a
    /// network only the scraper reaches). Unset: `/metrics` is on `http_addr`, behind the
    /// `metrics` scope once API keys exist.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".parse().expect("valid literal"),
            http_addr: "127.0.0.1:8080".parse().expect("valid literal"),
            max_message_bytes: 16 << 20,
            drain_timeout_secs: 30,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 10,
            metrics_addr: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. "info" or "genai_factory=debug".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// `[ops]`: what the observability layer (`crate::ops`) needs besides `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// OTLP/gRPC collector for trace export, e.g. "http://127.0.0.1:4317". Unset = no export.
    /// Needs a binary built with the `otlp` cargo feature.
    pub otlp_endpoint: Option<String>,
    pub cost: CostConfig,
    pub latency: LatencyConfig,
    pub request_log: RequestLogConfig,
}

/// `[ops.cost]`: price table and tenant budgets (USD).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Model name → prices. A model missing here costs nothing (warned once).
    pub prices: BTreeMap<String, Price>,
    /// Tenant → budget in USD per budget period.
    pub budgets: BTreeMap<String, f64>,
    /// Length of a budget period in seconds; spend resets at each period start. 0 = process lifetime.
    pub budget_period_secs: u64,
}

/// Prices of one model, in USD.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Price {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
    /// Per GPU-second of engine time (local models).
    pub gpu_second: f64,
}

/// `[ops.latency]`: rolling latency window and per-route SLOs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyConfig {
    /// Samples older than this leave the window.
    pub window_secs: u64,
    /// At most this many samples per route (the oldest leave first).
    pub max_samples: usize,
    /// SLOs are judged only with at least this many samples in the window.
    pub min_samples: usize,
    /// Quantile gauges and SLOs are re-evaluated at most this often per route.
    pub eval_interval_ms: u64,
    /// Route → latency thresholds in seconds.
    pub slo: BTreeMap<String, SloThresholds>,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self {
            window_secs: 60,
            max_samples: 10_000,
            min_samples: 20,
            eval_interval_ms: 1_000,
            slo: BTreeMap::new(),
        }
    }
}

/// Upper bounds in seconds for a route's rolling quantiles; unset = not checked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SloThresholds {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// What the request log keeps of prompts, answers and feedback comments.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TextMode {
    /// SHA-256 hex digests only (default: joins and dedup without keeping text).
    #[default]
    Hash,
    /// The text itself. Only where the data may hold PII by agreement.
    Raw,
    /// Neither text nor hash.
    None,
}

/// `[ops.request_log]`: one JSON line per request, in rotating files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLogConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    /// Rotate the active file before it grows past this many bytes.
    pub max_file_bytes: u64,
    /// Rotate the active file once it is this old (seconds; 0 = never by age).
    pub max_file_age_secs: u64,
    /// Files kept, the active one included; the oldest rotated ones are deleted.
    pub max_files: usize,
    pub text_mode: TextMode,
    /// Lines queued for the writer thread; beyond it lines are dropped (and counted), never blocking a request.
    pub queue_capacity: usize,
}

impl Default for RequestLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::from("logs/requests"),
            max_file_bytes: 64 << 20,
            max_file_age_secs: 3600,
            max_files: 24,
            text_mode: TextMode::Hash,
            queue_capacity: 4096,
        }
    }
}

impl OpsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        for (model, p) in &self.cost.prices {
            for (field, v) in [
                ("prompt_per_1k", p.prompt_per_1k),
                ("completion_per_1k", p.completion_per_1k),
                ("gpu_second", p.gpu_second),
            ] {
                if !finite_nonneg(v) {
                    bail!("invalid config: ops.cost.prices.{model}.{field} must be a finite number >= 0 (got {v})");
                }
            }
        }
        for (tenant, b) in &self.cost.budgets {
            if !(b.is_finite() && *b > 0.0) {
                bail!("invalid config: ops.cost.budgets.{tenant} must be a finite number > 0 (got {b})");
            }
        }
        let l = &self.latency;
        if l.window_secs == 0 || l.max_samples == 0 || l.min_samples == 0 {
            bail!("invalid config: ops.latency.window_secs, max_samples and min_samples must be > 0");
        }
        for (route, t) in &l.slo {
            for (q, v) in [("p50", t.p50), ("p95", t.p95), ("p99", t.p99)] {
                if let Some(v) = v {
                    if !(v.is_finite() && v > 0.0) {
                        bail!("invalid config: ops.latency.slo.{route}.{q} must be a number of seconds > 0 (got {v})");
                    }
                }
            }
        }
        let r = &self.request_log;
        if r.max_file_bytes == 0 || r.max_files == 0 || r.queue_capacity == 0 {
            bail!("invalid config: ops.request_log.max_file_bytes, max_files and queue_capacity must be > 0");
        }
        if let Some(e) = &self.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("invalid config: ops.otlp_endpoint must be an http:// or https:// URL (got {e:?})");
            }
        }
        Ok(())
    }
}

impl Config {
    /// Merges defaults, the config file, the `GENAI_*` environment and the flags.
    pub fn load(args: &Overrides) -> anyhow::Result<Self> {
        Self::load_from(args, true)
    }

    /// As [`Config::load`]; `with_env = false` ignores the process environment (tests).
    fn load_from(args: &Overrides, with_env: bool) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match &args.config {
            Some(path) => {
                if !path.is_file() {
                    bail!(
                        "config file {} not found (pass an existing --config PATH)",
                        path.display()
                    );
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        if with_env {
            // Only `GENAI_<SECTION>__<KEY>`: tools and tests keep their own GENAI_* variables.
            fig = fig.merge(
                Env::prefixed("GENAI_")
                    .filter(|k| k.as_str().contains("__"))
                    .split("__"),
            );
        }
        if let Some(a) = args.grpc_addr {
            fig = fig.merge(("server.grpc_addr", a));
        }
        if let Some(a) = args.http_addr {
            fig = fig.merge(("server.http_addr", a));
        }
        if let Some(d) = &args.models_dir {
            fig = fig.merge(("models.dir", d));
        }
        if let Some(d) = args.device {
            fig = fig.merge(("models.device", d));
        }
        if let Some(t) = args.threads {
            fig = fig.merge(("models.threads", t));
        }
        let cfg: Config = fig.extract().map_err(config_error)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let e = &self.engine;
        if e.block_size == 0 || !e.block_size.is_power_of_two() {
            bail!(
                "invalid config: engine.block_size must be a power of two (got {})",
                e.block_size
            );
        }
        if e.kv_cache_mib == 0 {
            bail!("invalid config: engine.kv_cache_mib must be > 0");
        }
        if !(e.gpu_memory_fraction > 0.0 && e.gpu_memory_fraction <= 1.0) {
            bail!("invalid config: engine.gpu_memory_fraction must be in (0, 1]");
        }
        if e.max_batch_tokens < e.block_size {
            bail!("invalid config: engine.max_batch_tokens must be >= engine.block_size");
        }
        if e.max_running == 0 || e.default_max_tokens == 0 {
            bail!("invalid config: engine.max_running and engine.default_max_tokens must be > 0");
        }
        let l = &self.limits;
        if l.max_logprobs > genai_engine::MAX_LOGPROBS {
            bail!(
                "invalid config: limits.max_logprobs must be <= {} (the engine's cap)",
                genai_engine::MAX_LOGPROBS
            );
        }
        if [
            l.max_prompt_bytes,
            l.max_messages,
            l.max_embedding_inputs,
            l.max_input_chars,
            l.max_stop_bytes,
        ]
        .contains(&0)
            || l.max_body_bytes < 1024
        {
            bail!("invalid config: limits.max_* must be > 0 (limits.max_body_bytes >= 1024)");
        }
        if e.max_waiting == 0 {
            bail!("invalid config: engine.max_waiting must be > 0");
        }
        if e.max_batch_tokens < e.max_running {
            bail!("invalid config: engine.max_batch_tokens must be >= engine.max_running (every running sequence decodes each step)");
        }
        self.ops.validate()?;
        crate::tenancy::validate(&self.tenants, &self.tenants_state)?;
        self.safety.validate()?;
        self.llm.validate(&self.models.generation.name)?;
        self.agent.validate()?;
        self.validate_retrieval()
    }

    fn validate_retrieval(&self) -> anyhow::Result<()> {
        let (m, i, r) = (&self.embedding, &self.index, &self.rag);
        if m.max_batch_tokens < 256 {
            bail!("invalid config: embedding.max_batch_tokens must be >= 256 (one full sequence)");
        }
        if m.max_queue == 0 {
            bail!("invalid config: embedding.max_queue must be > 0");
        }
        if i.factory.trim().is_empty() {
            bail!("invalid config: index.factory must not be empty");
        }
        if i.overfetch == 0 || i.nprobe == 0 || i.ef_search == 0 {
            bail!("invalid config: index.overfetch, index.nprobe and index.ef_search must be > 0");
        }
        if !(8..=254).contains(&i.chunk_tokens) {
            bail!("invalid config: index.chunk_tokens must be in 8..=254");
        }
        if i.chunk_overlap_tokens >= i.chunk_tokens {
            bail!("invalid config: index.chunk_overlap_tokens must be < index.chunk_tokens");
        }
        if r.top_k == 0 || r.mmr_fetch_factor == 0 {
            bail!("invalid config: rag.top_k and rag.mmr_fetch_factor must be > 0");
        }
        if !(0.0..=1.0).contains(&r.mmr_lambda) {
            bail!("invalid config: rag.mmr_lambda must be in [0, 1]");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("serialising the configuration")
    }
}

/// One line naming the offending key (and file) and what was expected.
fn config_error(e: figment::Error) -> anyhow::Error {
    let mut lines = Vec::new();
    for err in e {
        let key = if err.path.is_empty() {
            String::from("(top level)")
        } else {
            err.path.join(".")
        };
        let source = err
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref().map(|s| format!(" in {s}")))
            .unwrap_or_default();
        lines.push(format!("key `{key}`{source}: {}", err.kind));
    }
    anyhow::anyhow!("invalid config: {}", lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_with(toml: &str) -> anyhow::Result<Config> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Config::load_from(
            &Overrides {
                config: Some(f.path().to_path_buf()),
                ..Default::default()
            },
            false,
        )
    }

    #[test]
    fn defaults_serve_the_default_models_on_loopback() {
        let c = Config::default();
        assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.models.dir, PathBuf::from("models"));
    }

    #[test]
    fn file_then_flags_override() {
        let c = load_with("[server]\ngrpc_addr = \"127.0.0.1:1234\"\n").unwrap();
        assert_eq!(c.server.grpc_addr.port(), 1234);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"[server]\ngrpc_addr = \"127.0.0.1:1234\"\n").unwrap();
        let args = Overrides {
            config: Some(f.path().into()),
            grpc_addr: Some("127.0.0.1:4321".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(Config::load_from(&args, false).unwrap().server.grpc_addr.port(), 4321);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_with("[engine]\nblock_size = \"many\"\n").unwrap_err().to_string();
        assert!(e.contains("engine.block_size"), "{e}");
        let e = load_with("[server]\nnope = 1\n").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = load_with("[engine]\nblock_size = 3\n").unwrap_err().to_string();
        assert!(e.contains("engine.block_size"), "{e}");
    }

    /// The documented file at the repository root lists every key with its default.
    #[test]
    fn documented_config_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../genai-factory.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let documented = load_with(&text).unwrap();
        assert_eq!(documented.to_toml().unwrap(), Config::default().to_toml().unwrap());
        let keys = |t: &str| t.lines().filter(|l| !l.starts_with('#') && l.contains(" = ")).count();
        assert_eq!(
            keys(&text),
            keys(&Config::default().to_toml().unwrap()),
            "a key is undocumented"
        );
    }

    #[test]
    fn printed_config_round_trips() {
        let text = Config::default().to_toml().unwrap();
        let c = load_with(&text).unwrap();
        assert_eq!(c.engine.block_size, 16);
        assert_eq!(c.models.generation.name, "smollm2-135m-instruct");
        assert_eq!(c.index.factory, "Flat");
    }

    #[test]
    fn retrieval_sections_validate_and_name_the_key() {
        let c = load_with("[index]\nfactory = \"HNSW32\"\n[rag]\ntop_k = 6\n").unwrap();
        assert_eq!((c.index.factory.as_str(), c.rag.top_k), ("HNSW32", 6));
        let e = load_with("[index]\nchunk_overlap_tokens = 300\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("index.chunk_overlap_tokens"), "{e}");
        let e = load_with("[rag]\nmmr_lambda = 2.0\n").unwrap_err().to_string();
        assert!(e.contains("rag.mmr_lambda"), "{e}");
        let e = load_with("[embedding]\nmax_wait = 1\n").unwrap_err().to_string();
        assert!(e.contains("max_wait"), "{e}");
    }

    #[test]
    fn tenant_sections_parse_and_validate() {
        let c = load_with(
            "[tenants.default]\nrequests_per_minute = 60\nbudget_usd = 5\nbudget_period = \"month\"\n\
             [tenants.acme]\ntokens_per_minute = 1000\n[tenants_state]\npath = \"/tmp/t.json\"\n",
        )
        .unwrap();
        assert_eq!(c.tenants["default"].requests_per_minute, Some(60));
        assert_eq!(c.tenants["default"].budget_usd, Some(5.0));
        assert_eq!(c.tenants["acme"].tokens_per_minute, Some(1000));
        assert_eq!(c.tenants["acme"].budget_usd, None);
        assert_eq!(c.tenants_state.path, PathBuf::from("/tmp/t.json"));
        let e = load_with("[tenants.acme]\nbudget = 1\n").unwrap_err().to_string();
        assert!(e.contains("tenants.acme") && e.contains("budget"), "{e}");
        let e = load_with("[tenants.acme]\nbudget_period = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenants.acme.budget_period"), "{e}");
    }

    #[test]
    fn ops_section_parses_and_validates() {
        let c = load_with(
            "[ops.cost.prices.m1]\nprompt_per_1k = 0.5\ncompletion_per_1k = 1.5\n[ops.cost.budgets]\nacme = 10.0\n\
             [ops.latency.slo.chat]\np99 = 2.5\n[ops.request_log]\ntext_mode = \"none\"\nmax_files = 3\n",
        )
        .unwrap();
        assert_eq!(c.ops.cost.prices["m1"].completion_per_1k, 1.5);
        assert_eq!(c.ops.cost.prices["m1"].gpu_second, 0.0);
        assert_eq!(c.ops.cost.budgets["acme"], 10.0);
        assert_eq!(c.ops.latency.slo["chat"].p99, Some(2.5));
        assert_eq!(c.ops.latency.slo["chat"].p50, None);
        assert_eq!(c.ops.request_log.text_mode, TextMode::None);
        assert_eq!(c.ops.request_log.max_files, 3);
        let e = load_with("[ops.cost.budgets]\nacme = -1.0\n").unwrap_err().to_string();
        assert!(e.contains("ops.cost.budgets.acme"), "{e}");
        let e = load_with("[ops.latency.slo.chat]\np95 = 0.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ops.latency.slo.chat.p95"), "{e}");
        let e = load_with("[ops.request_log]\ntext_mode = \"plain\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ops.request_log.text_mode"), "{e}");
        let e = load_with("[ops]\notlp_endpoint = \"collector:4317\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ops.otlp_endpoint"), "{e}");
    }
}
