//! Command-line interface.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use super::select::Selector;
use crate::sinks::{events_out, otlp, profile, prometheus, summary, trace_file};

#[derive(Parser, Debug)]
#[command(
    name = "llamaprobe",
    version,
    about = "Zero-instrumentation profiler for llama.cpp",
    long_about = "Zero-instrumentation profiler for llama.cpp.\n\n\
        llamaprobe attaches eBPF uprobes to an unmodified llama.cpp (llama-server, llama-cli, or \
        any program using libllama) and measures every decode step (latency, tokens, prompt vs \
        generation, errors), sampling, llama_synchronize, model loading and context creation, \
        without rebuilding or restarting it. Results: a live terminal view, a final summary, and \
        Prometheus metrics.\n\n\
        Needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE) and Linux 5.8+.",
    after_help = "Examples:\n  \
        sudo llamaprobe attach --pid $(pgrep -n llama-server)\n  \
        sudo llamaprobe run -- llama-server -m model.gguf\n  \
        sudo llamaprobe daemon --exclude comm:llama-bench\n  \
        sudo llamaprobe ps\n  \
        llamaprobe doctor\n  \
        llamaprobe symbols /usr/local/lib/libllama.so"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter for llamaprobe's own diagnostics (e.g. info, debug; default: warn, and info
    /// for the daemon).
    #[arg(long, global = true, env = "LLAMAPROBE_LOG")]
    pub log: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to a running llama.cpp process and profile it until it exits, Ctrl-C, or --duration.
    Attach {
        /// Process id of the llama.cpp program (llama-server, llama-cli, or a libllama host).
        #[arg(long)]
        pid: u32,
        #[command(flatten)]
        opts: ProfileOpts,
    },
    /// Start a program with the probes already in place (model load and context creation are
    /// seen), profile it until it exits, and exit with its exit code.
    Run {
        #[command(flatten)]
        opts: ProfileOpts,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// The host agent: trace every llama.cpp process on this host (running now or started
    /// later, containers included) until stopped, with Prometheus metrics on 0.0.0.0:9464
    /// (`/metrics`, `/healthz`, `/readyz`). Run it as a systemd service or a DaemonSet.
    Daemon(Box<DaemonOpts>),
    /// List the llama.cpp processes on this host (pid, executable, API generation, model,
    /// container, pod) without attaching anything.
    Ps {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check whether llamaprobe can run on this machine (kernel, uprobes, tracefs, lockdown,
    /// capabilities, cgroups, NVML, visible processes), each ok / warn / fail with the fix.
    /// Exit 0 when the daemon can run, 1 when something it needs is missing.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print what llamaprobe finds in a process or a file: API generation, the functions it
    /// would probe (file, offset, symbol table) and those missing. Needs no privileges for a file.
    Symbols {
        /// A running process.
        #[arg(long, conflicts_with = "path")]
        pid: Option<u32>,
        /// Take symbols from this file: an unstripped copy of a stripped binary of the same
        /// build, or its separate debug file.
        #[arg(long, value_name = "FILE")]
        symbols_from: Option<PathBuf>,
        /// An executable or shared library (e.g. llama-server, libllama.so).
        #[arg(required_unless_present = "pid")]
        path: Option<PathBuf>,
    },
    /// Read llama.cpp's struct layouts from a build's DWARF (built with -g) and compare them with
    /// llamaprobe's layout table: how support for a new llama.cpp version is added.
    Layout {
        /// A libllama.so, llama-server or other binary built with -g.
        path: PathBuf,
    },
}

/// Options of `attach` and `run`: the session's own, then each sink's (they live with the
/// sink).
#[derive(Args, Debug, Clone)]
pub struct ProfileOpts {
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", env = "LLAMAPROBE_DURATION")]
    pub duration: Option<f64>,
    /// NVML library for GPU metrics (default: libnvidia-ml.so.1 from the loader's search path).
    /// Without one, GPU metrics are off (said once).
    #[arg(long, value_name = "PATH", env = "LLAMAPROBE_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,
    /// Probe llama_synchronize (where a GPU step completes): `auto` does when a GPU backend of
    /// ggml is mapped or installed beside it; on the CPU a decode step is synchronous and the
    /// probe would only add hits (two per call, several calls per step).
    #[arg(long, value_enum, default_value = "auto", env = "LLAMAPROBE_SYNC")]
    pub sync: SyncMode,
    /// Same as --sync off.
    #[arg(long, hide = true)]
    pub no_sync: bool,
    /// Take symbols from this file: an unstripped copy of a stripped binary of the same build,
    /// or its separate debug file (matched by GNU build id, else by file name).
    #[arg(long, value_name = "FILE", env = "LLAMAPROBE_SYMBOLS_FROM")]
    pub symbols_from: Option<PathBuf>,
    #[command(flatten)]
    pub prometheus: prometheus::Options,
    #[command(flatten)]
    pub summary: summary::Options,
    #[command(flatten)]
    pub events_out: events_out::Options,
    #[command(flatten)]
    pub trace_file: trace_file::Options,
    #[command(flatten)]
    pub otlp: otlp::Options,
    #[command(flatten)]
    pub cpu_profile: profile::Options,
}

/// Options of `llamaprobe daemon`.
#[derive(Args, Debug, Clone)]
pub struct DaemonOpts {
    /// Seconds between rescans of every process's maps: libraries loaded after a program
    /// started (dlopen by Python or Node), and exits the tracepoint did not report.
    #[arg(
        long,
        default_value_t = 2.0,
        value_name = "SECS",
        env = "LLAMAPROBE_RESCAN"
    )]
    pub rescan: f64,
    /// Trace at most this many processes; more are refused (counted, said once).
    #[arg(
        long,
        default_value_t = 256,
        value_name = "N",
        env = "LLAMAPROBE_MAX_PROCESSES"
    )]
    pub max_processes: usize,
    /// Trace only processes matching one of these selectors (comma-separated or repeated):
    /// `exe:GLOB`, `comm:NAME`, `container:ID`, `namespace:NS`, `pod-label:KEY=VALUE`.
    #[arg(
        long,
        value_name = "SELECTOR",
        value_delimiter = ',',
        env = "LLAMAPROBE_INCLUDE"
    )]
    pub include: Vec<Selector>,
    /// Never trace processes matching one of these selectors (as for --include).
    #[arg(
        long,
        value_name = "SELECTOR",
        value_delimiter = ',',
        env = "LLAMAPROBE_EXCLUDE"
    )]
    pub exclude: Vec<Selector>,
    /// Log lines as text or as one JSON object per line (for node log collectors).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "LLAMAPROBE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// A TOML file of options (keys are the long option names: `rescan = 5`,
    /// `exclude = ["comm:llama-bench"]`); default /etc/llamaprobe/llamaprobe.toml when present.
    /// A flag or a LLAMAPROBE_* variable overrides the file.
    #[arg(long, value_name = "FILE", env = "LLAMAPROBE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file, variables, flags) and exit: 0 if the daemon accepts it,
    /// 2 with the reason if not. Nothing is loaded or attached.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub profile: ProfileOpts,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// When to probe llama_synchronize.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    Auto,
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "llamaprobe",
            "run",
            "--duration",
            "3",
            "--",
            "llama-server",
            "-m",
            "x.gguf",
        ])
        .unwrap();
        match cli.command {
            Command::Run { opts, command } => {
                assert_eq!(opts.duration, Some(3.0));
                assert_eq!(command, ["llama-server", "-m", "x.gguf"]);
                assert_eq!(
                    opts.prometheus.addr(),
                    prometheus::MetricsAddr::On("127.0.0.1:9464".parse().unwrap())
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let parse = |a: &str| {
            Cli::try_parse_from(["llamaprobe", "attach", "--pid", "1", "--metrics-addr", a]).map(
                |c| match c.command {
                    Command::Attach { opts, .. } => opts.prometheus.addr(),
                    _ => unreachable!(),
                },
            )
        };
        assert_eq!(parse("off").unwrap(), prometheus::MetricsAddr::Off);
        assert!(parse("nonsense").is_err());
    }
}
