//! `llamaprobe`: the command line over the library (see `lib.rs` for the stages).

use std::process::ExitCode;

use clap::Parser;
use llamaprobe::app::{self, cli::Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match app::run(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("llamaprobe: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
