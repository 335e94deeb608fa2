//! `genai-factory`: the one command users run.
//!
//! Data flow, top down: `cli` → `config` → `registry` (model files) →
//! `serve` (binds listeners, loads models, runs `api::grpc` and `api::http`
//! until SIGTERM).

use std::process::ExitCode;

use clap::Parser;
use genai_factory::cli::{Cli, Command, ServeArgs};
use genai_factory::config::Config;
use genai_factory::retrieval::ingest;
use genai_factory::{serve, telemetry};

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
            let config = Config::load(&args)?;
            let _telemetry = telemetry::init(&config.log, &config.ops)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(serve::run(config))
        }
        Command::Ingest(cmd) => {
            let serve_args = ServeArgs {
                config: cmd.config,
                models_dir: cmd.models_dir,
                ..Default::default()
            };
            let config = Config::load(&serve_args)?;
            let _telemetry = telemetry::init(&config.log, &config.ops)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ingest::run(cmd.args, config))
        }
        Command::Config(args) => {
            print!("{}", Config::load(&args)?.to_toml()?);
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
