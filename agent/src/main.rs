//! `llamaprobe`: zero-instrumentation profiler for llama.cpp.
//!
//! Data flows one way: discover (files of the process) → symbols (what to probe, where) →
//! attach (eBPF programs) → events (decoder) → assemble (classified observations) → sinks
//! (Prometheus, terminal, JSON lines) and stats (summary).

mod assemble;
mod attach;
mod cli;
mod context_use;
mod discover;
mod dwarf;
mod events;
mod launch;
mod requests;
mod resources;
mod session;
mod sinks;
mod stats;
mod symbols;
mod targets;
#[cfg(test)]
mod test_support;

use std::process::ExitCode;

use clap::Parser;

use crate::{
    cli::{Cli, Command},
    symbols::Plan,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("llamaprobe: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn symbols_from(path: Option<&std::path::Path>) -> anyhow::Result<Option<symbols::SymbolsFrom>> {
    Ok(match path {
        Some(p) => Some(symbols::SymbolsFrom::load(p)?),
        None => None,
    })
}

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Attach { pid, opts } => {
            attach::preflight()?;
            let from = symbols_from(opts.symbols_from.as_deref())?;
            let files = discover::mapped_files(pid)?;
            let plan = Plan::build(
                &files,
                &format!("process {pid} ({})", discover::comm(pid)),
                from.as_ref(),
            )?;
            session::run(session::Target::Pid(pid), plan, opts)
        }
        Command::Run { opts, command } => {
            attach::preflight()?;
            let from = symbols_from(opts.symbols_from.as_deref())?;
            let program = command[0].to_string_lossy().into_owned();
            let exe = discover::which(&program)?;
            let files = discover::planned_files(&exe)?;
            let plan = Plan::build(
                &files,
                &format!("{} and its libraries", exe.display()),
                from.as_ref(),
            )?;
            let held = launch::spawn_held(&exe, &command)?;
            session::run(session::Target::Launched(held), plan, opts)
        }
        Command::Layout { path } => {
            let found = dwarf::read(&path)?;
            print!(
                "{}",
                targets::compare_with_table(&path.display().to_string(), &found)
            );
            Ok(0)
        }
        Command::Symbols {
            pid,
            path,
            symbols_from: from,
        } => {
            let from = symbols_from(from.as_deref())?;
            let (what, files) = match (pid, path) {
                (Some(pid), _) => (
                    format!("process {pid} ({})", discover::comm(pid)),
                    discover::mapped_files(pid)?,
                ),
                (None, Some(path)) => {
                    if !path.exists() {
                        anyhow::bail!("{}: no such file", path.display());
                    }
                    // The file and the libraries it would load.
                    (path.display().to_string(), discover::planned_files(&path)?)
                }
                (None, None) => unreachable!("clap requires a pid or a path"),
            };
            let plan = Plan::build(&files, &what, from.as_ref())?;
            print!("{}", symbols::render_plan(&what, &plan));
            Ok(0)
        }
    }
}
