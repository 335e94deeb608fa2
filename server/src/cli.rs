//! Command line: `genai-factory <subcommand>`. Flags override the config file
//! and the environment (see `config`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::auth::scope::Scope;
use crate::config::{Device, Overrides};

#[derive(Parser, Debug)]
#[command(name = "genai-factory", version, about = "Self-hosted LLM inference server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve gRPC and OpenAI-compatible HTTP on the configured models.
    Serve(ServeArgs),
    /// Add files (txt, md, html, pdf) to the knowledge base used by RAG: chunk, embed, index.
    Ingest(IngestCommand),
    /// Print the effective configuration (file + environment + flags) as TOML.
    Config(ServeArgs),
    /// Manage API keys (the keys file named by `auth.keys_file`). A running server follows the
    /// file: added and revoked keys count without a restart.
    Keys(KeysCommand),
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Configuration file (TOML). Default: ./genai-factory.toml when present.
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP (OpenAI-compatible) listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_addr: Option<SocketAddr>,
    /// Directory holding the models (see scripts/fetch-models.sh).
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Where to run the models.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// CPU threads for the engine (0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl ServeArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            models_dir: self.models_dir.clone(),
            device: self.device.map(|d| match d {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
            }),
            threads: self.threads,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct IngestCommand {
    /// Configuration file (TOML). Default: ./genai-factory.toml when present.
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Directory holding the models.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    #[command(flatten)]
    pub args: IngestArgs,
}

/// Arguments of the `ingest` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Files or directories (searched recursively for .txt, .md, .html, .pdf).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Tenant the documents belong to (searches only see their own tenant's).
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Tag added to every document (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Index directory (overrides `index.dir`).
    #[arg(long)]
    pub index_dir: Option<PathBuf>,
    /// Send the documents to the running server at this gRPC address (e.g. http://127.0.0.1:50051)
    /// instead of opening the index, which the server holds.
    #[arg(long, value_name = "URL", conflicts_with = "index_dir")]
    pub server: Option<String>,
    /// API key for `--server` when it has keys (needs the `knowledge:write` scope; the documents go
    /// to the key's tenant). Read from GENAI_API_KEY when unset, so it stays out of `ps`.
    #[arg(
        long,
        value_name = "KEY",
        env = "GENAI_API_KEY",
        hide_env_values = true,
        requires = "server"
    )]
    pub api_key: Option<String>,
    /// No progress bar (logs and CI).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct KeysCommand {
    /// Configuration file (TOML). Default: ./genai-factory.toml when present.
    #[arg(long, short = 'c', value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Subcommand, Debug)]
pub enum KeysAction {
    /// Create a key bound to a tenant; prints it once, on the last line (only its keyed hash is stored).
    Add {
        /// Tenant the key acts for ('' = the default tenant).
        #[arg(long)]
        tenant: String,
        /// Scope granted (repeatable): infer, knowledge:write, metrics, admin. Default: infer.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<Scope>,
        /// A label for `keys list` (who or what uses the key).
        #[arg(long)]
        name: Option<String>,
    },
    /// Show every key: id, tenant, scopes, creation and revocation times (never a key or hash).
    List,
    /// Revoke a key by id (see `keys list`); idempotent.
    Revoke {
        /// The key id (the 12 hex characters after `gf_`).
        id: String,
    },
}
