//! `llamaprobe`: the command line over the library (see `lib.rs` for the stages).

use std::process::ExitCode;

use clap::Parser;
use llamaprobe::app::{
    self,
    cli::{Cli, Command, LogFormat},
    config,
};

fn main() -> ExitCode {
    // The daemon's configuration file sets its options' variables: before parsing, and
    // before any thread exists.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = match config::apply(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llamaprobe: error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let (format, default_level) = match &cli.command {
        Command::Daemon(d) => (d.log_format, "info"),
        _ => (LogFormat::Text, "warn"),
    };
    let filter = cli.log.as_deref().unwrap_or(default_level);
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if let Some(path) = config {
        tracing::info!("configuration from {}", path.display());
    }
    match app::run(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            if format == LogFormat::Json {
                tracing::error!("{e:#}");
            }
            eprintln!("llamaprobe: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
