//! `genai-factory`: the one command users run.
//!
//! Data flow, top down: `cli` → `config` → `serve` (locates the model files, binds
//! listeners, loads models, runs `api::grpc` and `api::http` until SIGTERM).
//! One request, from socket to SSE frame: `ARCHITECTURE.md` at the repository root.

use std::process::ExitCode;

mod api;
mod assistant;
mod atomic_file;
mod auth;
mod cli;
mod config;
mod error;
mod ingest;
mod llm;
mod ops;
mod pipeline;
mod router;
mod safety;
mod serve;
mod state;
mod telemetry;
mod tenancy;

use clap::Parser;
use cli::{Cli, Command};
use config::Config;
use config::Overrides;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the path/key and the fix; never a panic or a backtrace.
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::load(&args.overrides())?;
            let _telemetry = telemetry::init(&config.log, &config.ops)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(serve::run(config))
        }
        Command::Ingest(cmd) => {
            let overrides = Overrides {
                config: cmd.config,
                models_dir: cmd.models_dir,
                ..Default::default()
            };
            let config = Config::load(&overrides)?;
            let _telemetry = telemetry::init(&config.log, &config.ops)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ingest::run(cmd.args, config))
        }
        Command::Keys(cmd) => {
            let overrides = Overrides {
                config: cmd.config,
                ..Default::default()
            };
            let config = Config::load(&overrides)?;
            auth::run_keys_command(&config.auth.keys_file, cmd.action)
        }
        Command::Config(args) => {
            print!("{}", Config::load(&args.overrides())?.to_toml()?);
            Ok(())
        }
    }
}

/// Flattens an error chain to one line, dropping backtrace frames that some
/// dependencies (candle) embed in their messages.
fn one_line(msg: &str) -> String {
    let is_frame = |l: &str| {
        let t = l.trim_start();
        t.starts_with("at ")
            || t.split_once(": ")
                .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
    };
    let kept: Vec<&str> = msg.lines().filter(|l| !is_frame(l)).collect();
    kept.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
}
