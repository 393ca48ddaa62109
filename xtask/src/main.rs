//! llamaprobe's project tasks: `cargo xtask <setup|fixtures|test|demo|bench|fuzz|compat|dashboards|image>`.
//!
//! Everything is idempotent and cached under `~/.cache/llamaprobe` (or `$LLAMAPROBE_CACHE`).

mod bench;
mod compat;
mod dashboards;
mod demo;
mod fixtures;
mod fuzz;
mod image;
mod proc;
mod server;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use fixtures::Matrix;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "llamaprobe's build, fixture, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages (cmake, compilers), nightly rust-src, bpf-linker.
    Setup,
    /// Build the matrix of real llama.cpp binaries and a tiny GGUF model; print KEY=VALUE lines
    /// (LLAMAPROBE_FIXTURES names a JSON description of every fixture).
    Fixtures {
        #[arg(long, value_enum, default_value = "default")]
        matrix: Matrix,
        /// Also generate the larger model (tiny-large.gguf, LLAMAPROBE_MODEL_LARGE).
        #[arg(long)]
        large: bool,
    },
    /// Setup, fixtures, then cargo test, a short run of every fuzz target, clippy and rustfmt
    /// over the workspace (as root).
    Test {
        #[arg(long, value_enum, default_value = "default")]
        matrix: Matrix,
        /// Repeat the tests that run rounds under CPU load (queue wait on every server
        /// fixture) 20 times instead of 3: a long run, for hunting scheduling-dependent faults.
        #[arg(long)]
        stress: bool,
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// End to end: llama-server on the tiny model, llamaprobe attached, a dozen requests (as root).
    Demo,
    /// Measure what llamaprobe costs (per-call cost, llama-server throughput and latency, probe
    /// hits per token, event capacity, footprint) and write docs/BENCHMARKS.md (as root).
    Bench(bench::BenchArgs),
    /// Fuzz every parser of what a traced process or a file controls (cargo-fuzz, nightly):
    /// each target for a while, from the committed seeds and the corpus earlier runs grew.
    Fuzz(fuzz::FuzzArgs),
    /// Print the compatibility table generated from the fixture table (markdown).
    Compat {
        /// Write it into README.md between `<!-- compat:start -->` and `<!-- compat:end -->`.
        #[arg(long)]
        write: bool,
    },
    /// Write the Grafana dashboards (dashboards/grafana/*.json) from xtask/src/dashboards.rs.
    Dashboards {
        /// Fail if a committed file differs instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// Build the node agent's OCI image `llamaprobe:<version>` from scratch with podman
    /// (deploy/Containerfile); print its id.
    Image {
        /// The image's tag instead of the workspace's version.
        #[arg(long)]
        tag: Option<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Fixtures { matrix, large } => fixtures::run(matrix, large),
        Task::Test {
            matrix,
            stress,
            cargo_args,
        } => test::run(matrix, stress, &cargo_args),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Compat { write } => compat::run(write),
        Task::Image { tag } => image::run(tag),
        Task::Dashboards { check } => dashboards::run(check),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Matrix, Task};

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_everything_after_dashes_to_cargo_test() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--matrix",
            "full",
            "--",
            "attach",
            "--",
            "--nocapture",
        ])
        .unwrap();
        let Task::Test {
            matrix, cargo_args, ..
        } = cli.command
        else {
            panic!("not the test task");
        };
        assert_eq!(matrix, Matrix::Full);
        assert_eq!(cargo_args, ["attach", "--", "--nocapture"]);
    }
}
