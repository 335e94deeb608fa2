//! Configuration: built-in defaults, then `genai-factory.toml` (or `--config`),
//! then `GENAI_*` environment variables (`__` separates sections, e.g.
//! `GENAI_SERVER__GRPC_ADDR=0.0.0.0:50051`), then command-line flags.
//! Every key and its default is documented in `genai-factory.toml` at the
//! repository root; `genai-factory config` prints the effective values.

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
        assert_eq!(keys(&text), keys(&Config::default().to_toml().unwrap()), "a key is undocumented");
    }

    #[test]
    fn printed_config_round_trips() {
        let text = Config::default().to_toml().unwrap();
        let c = load_with(&text).unwrap();
        assert_eq!(c.engine.block_size, 16);
        assert_eq!(c.models.generation.name, "smollm2-135m-instruct");
    }
}
