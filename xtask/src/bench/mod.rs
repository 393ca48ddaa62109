//! `cargo xtask bench`: measures what llamaprobe costs the program it profiles and writes
//! `docs/BENCHMARKS.md`.
//!
//! 1. **Per-call cost** on a synthetic target (`xtask/assets/bench/`, built here with gcc -O2):
//!    a loop calling `llama_decode(void *ctx, struct llama_batch batch)` (56-byte struct by
//!    value, like the real one) from a small `libllama.so`, with (a) no probe, (b) an empty
//!    uprobe + uretprobe pair (bpftrace), (c) llamaprobe, (d) a bpftrace latency histogram.
//!    Interleaved runs, medians; llamaprobe's count is checked against the loop's.
//! 2. **llama-server throughput and time to first token** without llamaprobe, with it, and with
//!    `--no-sync`, interleaved, on the tiny model and on a model whose decode step is ≥ 10 ms.
//! 3. **Probe hits per generated token** from `--events-out`, for every fixture present.
//! 4. **Event capacity**: the synthetic loop as fast as it goes, llamaprobe pinned to one core.
//! 5. **llamaprobe's footprint**: RSS and CPU, idle and during 2.
//! 6. **The host agent at node scale**: `llamaprobe daemon` idle and beside 4 servers under
//!    load, discovery and rescans, OTLP export.
//!
//! One module per section: [`per_call`] (1), [`throughput`] (2, choosing its larger model in
//! [`large_model`], its OTLP condition exporting to [`otlp`]), [`hits`] (3), [`capacity`] (4)
//! [`footprint`] (5, measured with 2: idle here, under load by 2's runs) and [`daemon`] (6). What several
//! share: [`synthetic`] (the loop under a tracer, for 1 and 4), [`llama_server`] (the server,
//! the fixed request, attaching llamaprobe, for 2, 3 and 5), [`procfs`] (memory and CPU time),
//! [`stats`] (medians). [`report`] turns the results into the markdown of docs/BENCHMARKS.md
//! and the summary on stdout; [`machine`] describes where it ran. This module holds the
//! options, what every section needs ([`Env`]) and the order the sections run in.
//!
//! Every process started here is owned by a [`Proc`](crate::proc::Proc) guard that stops it
//! when dropped, on errors too, and dies with the bench if the bench is killed
//! (`PR_SET_PDEATHSIG`). Everything listens on 127.0.0.1 only.

mod capacity;
mod daemon;
mod footprint;
mod hits;
mod large_model;
mod llama_server;
mod machine;
mod markdown;
mod otlp;
mod per_call;
mod procfs;
mod report;
mod stats;
mod synthetic;
mod throughput;

use std::{
    collections::BTreeMap,
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::{
    fixtures, setup,
    util::{self, progress},
};

use machine::Machine;
use report::Report;

/// Options of `cargo xtask bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Interleaved runs of every measured case; medians are reported [default: 5, 3 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: Option<u32>,
    /// A fast smoke run: fewer runs, loop iterations and requests, a short idle period.
    #[arg(long)]
    pub quick: bool,
    /// Run only these sections (comma-separated); the report says which were left out.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION")]
    pub only: Vec<Section>,
    /// Where to write the report [default: docs/BENCHMARKS.md; with --quick or --only,
    /// target/bench/BENCHMARKS.md, so a partial run does not replace the full report]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The parts of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// 1: per-call cost on the synthetic target (no probe, bpftrace, llamaprobe, and
    /// llamaprobe --profile-cpu: the cost of one CPU sample).
    PerCall,
    /// 2 and 5: llama-server throughput and TTFT with and without llamaprobe; its footprint.
    Server,
    /// 3: probe hits per generated token, per fixture.
    Hits,
    /// 4: event capacity of llamaprobe pinned to one core.
    Capacity,
    /// 6: the host agent (`llamaprobe daemon`) idle, under load on 4 servers, discovery, OTLP.
    Daemon,
}

/// How much every section does: fewer runs, calls and requests with `--quick`.
struct Config {
    runs: usize,
    quick: bool,
    /// Timed calls per run of the per-call loop (plus its 1000 warm-up calls).
    iterations: u64,
    /// Timed calls per thread in the capacity runs.
    capacity_iterations: u64,
    tiny_requests: usize,
    large_requests: usize,
    hits_requests: usize,
    idle: Duration,
    /// Each idle window of section 6.
    daemon_idle: Duration,
    /// Each load (and rescan) window of section 6.
    daemon_load: Duration,
}

impl Config {
    fn new(args: &BenchArgs) -> Config {
        let default_runs = if args.quick { 3 } else { 5 };
        let runs = args.runs.map_or(default_runs, |r| r as usize);
        if args.quick {
            Config {
                runs,
                quick: true,
                iterations: 20_000,
                capacity_iterations: 30_000,
                tiny_requests: 2,
                large_requests: 1,
                hits_requests: 2,
                idle: Duration::from_secs(3),
                daemon_idle: Duration::from_secs(5),
                daemon_load: Duration::from_secs(5),
            }
        } else {
            Config {
                runs,
                quick: false,
                iterations: 100_000,
                capacity_iterations: 100_000,
                tiny_requests: 5,
                large_requests: 3,
                hits_requests: 3,
                idle: Duration::from_secs(10),
                daemon_idle: Duration::from_secs(60),
                daemon_load: Duration::from_secs(20),
            }
        }
    }
}

/// What every section needs.
struct Env {
    cfg: Config,
    cache: PathBuf,
    work: PathBuf,
    probe_bin: PathBuf,
    lib: PathBuf,
    loop_bin: PathBuf,
    bpftrace: Option<String>,
    ncpu: usize,
    /// fixtures.env, overridden by the process environment; loaded when first needed.
    fixture_vars: Option<BTreeMap<String, String>>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask bench` attaches eBPF probes and must run as root: run it again with sudo or as root");
    }
    let started = Instant::now();
    let cfg = Config::new(&args);
    let sections: Vec<Section> = if args.only.is_empty() {
        Section::value_variants().to_vec()
    } else {
        args.only.clone()
    };
    let command = command_line();
    progress!(
        "bench: {} interleaved run(s) per case{}; sections: {}",
        cfg.runs,
        if cfg.quick { " (--quick)" } else { "" },
        sections
            .iter()
            .map(|s| section_name(*s))
            .collect::<Vec<_>>()
            .join(", ")
    );

    setup::run()?;
    for tool in ["gcc", "taskset"] {
        if !util::command_exists(tool) {
            bail!("`{tool}` is missing: install it (Debian: gcc, util-linux)");
        }
    }
    let bpftrace = ensure_bpftrace();

    let probe_bin = util::build_llamaprobe()?;
    let work = util::target_dir().join("bench");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let (lib, loop_bin) = synthetic::build(&work)?;

    let machine = Machine::read(bpftrace.as_deref());
    let mut env = Env {
        cfg,
        cache: util::cache_dir()?,
        work,
        probe_bin,
        lib,
        loop_bin,
        bpftrace,
        ncpu: machine.ncpu,
        fixture_vars: None,
    };

    let mut report = Report {
        command,
        machine,
        quick: env.cfg.quick,
        runs: env.cfg.runs,
        per_call: None,
        capacity: None,
        server: None,
        hits: None,
        daemon: None,
        load_end: String::new(),
        took: Duration::ZERO,
    };
    let want = |s: Section| sections.contains(&s);
    /// Runs a section, prints its time; an error is kept for the report.
    fn timed<T>(title: &str, f: impl FnOnce() -> Result<T>) -> Option<Result<T, String>> {
        progress!("== {title}");
        let t = Instant::now();
        let r = f().map_err(|e| format!("{e:#}"));
        match &r {
            Ok(_) => progress!("   done in {}", util::format_duration(t.elapsed())),
            Err(e) => progress!(
                "   FAILED after {}: {e}",
                util::format_duration(t.elapsed())
            ),
        }
        Some(r)
    }
    if want(Section::PerCall) {
        report.per_call = timed("1. per-call cost on the synthetic target", || {
            per_call::measure(&env)
        });
    }
    if want(Section::Capacity) {
        report.capacity = timed("4. event capacity", || capacity::measure(&env));
    }
    if want(Section::Server) {
        report.server = timed(
            "2. llama-server throughput and latency; 5. footprint",
            || throughput::measure(&mut env),
        );
    }
    if want(Section::Hits) {
        report.hits = timed("3. probe hits per generated token", || {
            hits::measure(&mut env)
        });
    }
    if want(Section::Daemon) {
        report.daemon = timed("6. the host agent at node scale", || {
            daemon::measure(&mut env)
        });
    }
    report.load_end = machine::loadavg();
    report.took = started.elapsed();

    let out = match &args.out {
        Some(out) => out.clone(),
        None if args.quick || !args.only.is_empty() => env.work.join("BENCHMARKS.md"),
        None => util::workspace_root().join("docs/BENCHMARKS.md"),
    };
    report::write(&report, &out)?;

    let failed: Vec<&str> = [
        ("per-call", report.per_call.as_ref().map(|r| r.is_err())),
        ("capacity", report.capacity.as_ref().map(|r| r.is_err())),
        ("server", report.server.as_ref().map(|r| r.is_err())),
        ("hits", report.hits.as_ref().map(|r| r.is_err())),
        ("daemon", report.daemon.as_ref().map(|r| r.is_err())),
    ]
    .into_iter()
    .filter(|(_, failed)| *failed == Some(true))
    .map(|(name, _)| name)
    .collect();
    if !failed.is_empty() {
        bail!(
            "section(s) failed: {} (the report says why)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn section_name(s: Section) -> &'static str {
    match s {
        Section::PerCall => "per-call",
        Section::Server => "server",
        Section::Hits => "hits",
        Section::Capacity => "capacity",
        Section::Daemon => "daemon",
    }
}

/// `cargo xtask bench ARGS…` as it was called, with the LLAMAPROBE_ variables that override
/// fixtures.env.
fn command_line() -> String {
    let mut text = String::new();
    for (k, v) in env::vars() {
        if k.starts_with("LLAMAPROBE_") && !v.is_empty() {
            let _ = write!(text, "{k}={v} ");
        }
    }
    text.push_str("cargo xtask");
    for arg in env::args().skip(1) {
        text.push(' ');
        text.push_str(&arg);
    }
    text
}

/// bpftrace's version, installing the Debian package if it is missing; None if unavailable.
fn ensure_bpftrace() -> Option<String> {
    if !util::command_exists("bpftrace") && util::command_exists("apt-get") {
        progress!("installing the Debian package bpftrace (for the reference measurements)");
        let installed = util::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "bpftrace"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
        if let Err(e) = installed {
            progress!("could not install bpftrace ({e:#}): cases (b) and (d) are skipped");
        }
    }
    let version = util::output(Command::new("bpftrace").arg("--version")).ok()?;
    Some(version.trim().to_string())
}

/// fixtures.env, with the process environment taking precedence. Prepares the default matrix
/// (and the larger model) only when the newest server or the tiny model is missing, as on a
/// fresh machine: preparing rewrites fixtures.env and fixtures.json, which a fuller matrix
/// prepared earlier would lose.
fn fixture_vars(env: &mut Env) -> Result<BTreeMap<String, String>> {
    if let Some(vars) = &env.fixture_vars {
        return Ok(vars.clone());
    }
    let load = |cache: &Path| -> BTreeMap<String, String> {
        let mut vars: BTreeMap<String, String> = fs::read_to_string(cache.join("fixtures.env"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        for (k, v) in env::vars() {
            if k.starts_with("LLAMAPROBE_") && !v.is_empty() {
                vars.insert(k, v);
            }
        }
        vars
    };
    let complete = |vars: &BTreeMap<String, String>| {
        ["LLAMAPROBE_LLAMA_SERVER", "LLAMAPROBE_MODEL"]
            .iter()
            .all(|k| vars.get(*k).is_some_and(|p| Path::new(p).is_file()))
    };
    let mut vars = load(&env.cache);
    if !complete(&vars) {
        progress!("fixtures are missing: preparing them (as `cargo xtask fixtures --large`)");
        fixtures::prepare(fixtures::Matrix::Default, true)?;
        vars = load(&env.cache);
        if !complete(&vars) {
            bail!("after preparing the fixtures, fixtures.env still lacks the newest llama-server or the tiny model");
        }
    }
    env.fixture_vars = Some(vars.clone());
    Ok(vars)
}

fn var(vars: &BTreeMap<String, String>, key: &str) -> Result<PathBuf> {
    vars.get(key)
        .map(PathBuf::from)
        .with_context(|| format!("{key} is not set (fixtures.env)"))
}

/// A JSON file: llamaprobe's `--summary-json`, fixtures.json.
fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}
