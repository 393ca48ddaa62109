//! The application: the command line ([`cli`]), the commands it runs, and the profiling
//! session ([`session`]) that drives the stages for the traced processes.

pub mod cli;
pub mod config;
pub mod daemon;
mod doctor;
mod host;
pub mod launch;
mod ps;
mod select;
pub mod session;

use crate::{
    attach, discover,
    resolve::{self, dwarf, Plan},
};
use cli::Command;

/// Runs one command; returns llamaprobe's exit code.
pub fn run(command: Command) -> anyhow::Result<i32> {
    if !matches!(
        command,
        Command::Attach { .. } | Command::Run { .. } | Command::Daemon(_)
    ) {
        // A command that prints and ends stops quietly when its reader goes
        // (`llamaprobe symbols … | head`), as other command-line tools do. The long-running ones
        // keep SIGPIPE ignored (a closed metrics connection must not end them).
        // SAFETY: no other thread runs yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match command {
        Command::Attach { pid, opts } => {
            attach::preflight()?;
            attach::check_process_access(pid)?;
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
        Command::Daemon(opts) => daemon::run(*opts),
        Command::Ps { json } => ps::run(json),
        Command::Doctor { json } => doctor::run(json),
        Command::Layout { path } => {
            let found = dwarf::read(&path)?;
            print!(
                "{}",
                dwarf::compare_with_table(&path.display().to_string(), &found)
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
            print!("{}", resolve::render_plan(&what, &plan));
            Ok(0)
        }
    }
}

fn symbols_from(path: Option<&std::path::Path>) -> anyhow::Result<Option<resolve::SymbolsFrom>> {
    Ok(match path {
        Some(p) => Some(resolve::SymbolsFrom::load(p)?),
        None => None,
    })
}
