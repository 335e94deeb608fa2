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

use crate::cli::ServeArgs;

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
}

/// `[embedding]`: the sentence-embedding worker (dynamic batching).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingConfig {
    /// Padded tokens (batch size x longest sequence) in one encoder forward pass.
    pub max_batch_tokens: usize,
    /// How long the worker waits for more requests after the first one arrives, in ms.
    pub max_wait_ms: u64,
    /// Most queued embed requests; beyond it `embed` fails with "overloaded".
    pub max_queue: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            max_wait_ms: 2,
            max_queue: 1024,
        }
    }
}

/// `[index]`: the FAISS vector store and the chunker that feeds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Directory holding the persisted index (created on first save).
    pub dir: PathBuf,
    /// FAISS index factory string: "Flat", "IVF{nlist},Flat" or "HNSW{M}".
    pub factory: String,
    /// IVF: inverted lists probed per query.
    pub nprobe: usize,
    /// HNSW: candidate list size at search time.
    pub ef_search: usize,
    /// With metadata filters, fetch this many times k from FAISS first (doubled until k match).
    pub overfetch: usize,
    /// Token budget of one chunk (embedder tokens, special tokens excluded); at most 254.
    pub chunk_tokens: usize,
    /// Tokens of trailing sentences repeated at the start of the next chunk.
    pub chunk_overlap_tokens: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/index"),
            factory: "Flat".into(),
            nprobe: 16,
            ef_search: 64,
            overfetch: 4,
            chunk_tokens: 200,
            chunk_overlap_tokens: 40,
        }
    }
}

/// `[rag]`: retrieval-augmented chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RagConfig {
    /// Sources put in the prompt.
    pub top_k: usize,
    /// Re-rank with maximal marginal relevance (diversity) before taking top_k.
    pub mmr: bool,
    /// MMR trade-off: 1 = relevance only, 0 = diversity only.
    pub mmr_lambda: f32,
    /// MMR candidate pool: this many times top_k.
    pub mmr_fetch_factor: usize,
    /// Sources scoring below this cosine similarity are dropped.
    pub min_score: f32,
    /// minijinja template file for the system prompt; empty = the built-in one.
    pub template: PathBuf,
}

impl Default for RagConfig {
    fn default() -> Self {
        Self {
            top_k: 4,
            mmr: false,
            mmr_lambda: 0.7,
            mmr_fetch_factor: 4,
            min_score: 0.0,
            template: PathBuf::new(),
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
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Directory the model paths below are relative to.
    pub dir: PathBuf,
    pub device: Device,
    /// CPU threads for model compute; 0 = all cores.
    pub threads: usize,
    pub generation: ModelEntry,
    pub embedding: ModelEntry,
}

/// One served model: the name clients use and where its files are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// A file or directory, relative to `models.dir` unless absolute.
    pub path: PathBuf,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models"),
            device: Device::Auto,
            threads: 0,
            generation: ModelEntry {
                name: "smollm2-135m-instruct".into(),
                path: PathBuf::from("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
            },
            embedding: ModelEntry {
                name: "all-minilm-l6-v2".into(),
                path: PathBuf::from("all-minilm-l6-v2"),
            },
        }
    }
}

impl ModelsConfig {
    pub fn resolve(&self, entry: &ModelEntry) -> PathBuf {
        if entry.path.is_absolute() {
            entry.path.clone()
        } else {
            self.dir.join(&entry.path)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Memory for the paged KV cache, in MiB (CPU). The pool is preallocated.
    pub kv_cache_mib: usize,
    /// Fraction of free GPU memory for the KV cache (CUDA).
    pub gpu_memory_fraction: f32,
    /// Token budget of one engine step (prefill chunks + decodes).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; beyond it submissions are refused.
    pub max_waiting: usize,
    /// Context length cap (0 = the model's own).
    pub max_context: usize,
    /// Default `max_tokens` when a request sets none.
    pub default_max_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_mib: 512,
            gpu_memory_fraction: 0.9,
            max_batch_tokens: 512,
            max_running: 128,
            max_waiting: 1024,
            max_context: 0,
            default_max_tokens: 256,
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
    /// Merges defaults, the config file, the environment and the flags.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
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
        fig = fig.merge(Env::prefixed("GENAI_").split("__"));
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
            fig = fig.merge(("models.device", d.as_str()));
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
        self.ops.validate()?;
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
        Config::load(&ServeArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        })
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
        let args = ServeArgs {
            config: Some(f.path().into()),
            grpc_addr: Some("127.0.0.1:4321".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(Config::load(&args).unwrap().server.grpc_addr.port(), 4321);
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
