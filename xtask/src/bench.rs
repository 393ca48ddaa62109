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
//!
//! Every process started here is owned by a [`Proc`] guard that stops it when dropped, on
//! errors too, and dies with the bench if the bench is killed (`PR_SET_PDEATHSIG`). Everything
//! listens on 127.0.0.1 only.

use std::{
    collections::BTreeMap,
    env,
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::{
    fixtures,
    proc::{Proc, Stream},
    server::{self, Server},
    setup,
    util::{self, progress},
};

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
    /// 1: per-call cost on the synthetic target (no probe, bpftrace, llamaprobe).
    PerCall,
    /// 2 and 5: llama-server throughput and TTFT with and without llamaprobe; its footprint.
    Server,
    /// 3: probe hits per generated token, per fixture.
    Hits,
    /// 4: event capacity of llamaprobe pinned to one core.
    Capacity,
}

// ---------------------------------------------------------------------------------------------
// Settings

/// The fixed request: same prompt, same length, greedy, no prompt cache, never stops early.
const PROMPT: &str = "The people who write the first word of a long day can look at the number \
    of words they made, and then they will find that some of them were more than one time in \
    the other part of what was said.";
const N_PREDICT: u32 = 64;
/// llama-server's options besides the model and the address.
const SERVER_ARGS: &[&str] = &["-t", "2", "-c", "512", "-np", "1"];
/// The larger model must take at least this long per generated token.
const STEP_TARGET_MS: f64 = 10.0;
/// (n_layer, n_embd, n_ff) of a generated model.
type Dims = (u32, u32, u32);
/// Models that can be generated (f32, 4 heads / 2 KV heads) when LLAMAPROBE_MODEL_LARGE decodes
/// faster than STEP_TARGET_MS, smallest first: about 13, 26, 50, 93 and 156 M parameters.
const LARGE_CANDIDATES: &[Dims] = &[
    (8, 384, 1024),
    (16, 384, 1024),
    (16, 512, 1536),
    (20, 640, 1792),
    (24, 768, 2048),
];
/// A candidate is kept when its checked step is at least this; the next one is sized for
/// STEP_AIM_MS.
const STEP_ACCEPT_MS: f64 = 12.0;
const STEP_AIM_MS: f64 = 18.0;
/// make_tiny_model.py's default (LLAMAPROBE_MODEL) and `--large` preset (LLAMAPROBE_MODEL_LARGE).
const TINY_DIMS: Dims = (2, 64, 128);
const TINY_LARGE_DIMS: Dims = (4, 256, 512);
/// Goals (not assertions) the report is checked against.
const GOAL_THROUGHPUT: f64 = 0.99;
const GOAL_PER_CALL: f64 = 1.15;
const GOAL_RSS_MIB: f64 = 40.0;

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

// ---------------------------------------------------------------------------------------------
// Entry point

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
    let (lib, loop_bin) = build_synthetic(&work)?;

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
            per_call(&env)
        });
    }
    if want(Section::Capacity) {
        report.capacity = timed("4. event capacity", || capacity(&env));
    }
    if want(Section::Server) {
        report.server = timed(
            "2. llama-server throughput and latency; 5. footprint",
            || server_section(&mut env),
        );
    }
    if want(Section::Hits) {
        report.hits = timed("3. probe hits per generated token", || {
            hits_section(&mut env)
        });
    }
    report.load_end = loadavg();
    report.took = started.elapsed();

    let out = match &args.out {
        Some(out) => out.clone(),
        None if args.quick || !args.only.is_empty() => env.work.join("BENCHMARKS.md"),
        None => util::workspace_root().join("docs/BENCHMARKS.md"),
    };
    let text = render(&report);
    util::write_atomic(&out, text.as_bytes())?;
    progress!(
        "bench: wrote {} in {}",
        out.display(),
        util::format_duration(report.took)
    );
    print_summary(&report);

    let failed: Vec<&str> = [
        ("per-call", report.per_call.as_ref().map(|r| r.is_err())),
        ("capacity", report.capacity.as_ref().map(|r| r.is_err())),
        ("server", report.server.as_ref().map(|r| r.is_err())),
        ("hits", report.hits.as_ref().map(|r| r.is_err())),
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

/// Compiles the synthetic libllama.so and the loop into `work`; returns their paths.
fn build_synthetic(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let assets = util::workspace_root().join("xtask/assets/bench");
    let lib = work.join("libllama.so");
    let loop_bin = work.join("bench_loop");
    progress!(
        "compiling the synthetic target (gcc -O2) into {}",
        work.display()
    );
    util::run(
        Command::new("gcc")
            .args([
                "-O2", "-g0", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
            ])
            .arg("-Wl,-soname,libllama.so")
            .arg("-o")
            .arg(&lib)
            .arg(assets.join("libllama.c")),
    )?;
    util::run(
        Command::new("gcc")
            .args(["-O2", "-g0", "-Wall", "-Wextra", "-Werror", "-pthread"])
            .arg("-o")
            .arg(&loop_bin)
            .arg(assets.join("bench_loop.c"))
            .arg("-L")
            .arg(work)
            .arg("-lllama")
            .arg("-Wl,-rpath,$ORIGIN"),
    )?;
    Ok((lib, loop_bin))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// (VmRSS, VmHWM) in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime of a process, in milliseconds.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is the first.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 * 1000.0 / hz)
}

/// Waits until a process's CPU time stops growing (it has drained its backlog), at most `max`.
fn settle_cpu(pid: u32, max: Duration) -> Option<f64> {
    let deadline = Instant::now() + max;
    let mut last = cpu_ms(pid)?;
    loop {
        thread::sleep(Duration::from_millis(250));
        let now = cpu_ms(pid)?;
        if now == last || Instant::now() >= deadline {
            return Some(now);
        }
        last = now;
    }
}

// ---------------------------------------------------------------------------------------------
// The synthetic loop under a tracer (sections 1 and 4)

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    NoProbe,
    Empty,
    Llamaprobe,
    Hist,
}

const CASES: [Case; 4] = [Case::NoProbe, Case::Empty, Case::Llamaprobe, Case::Hist];

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::NoProbe => "(a) no probe",
            Case::Empty => "(b) empty uprobe + uretprobe (bpftrace)",
            Case::Llamaprobe => "(c) llamaprobe",
            Case::Hist => "(d) bpftrace latency histogram",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Case::NoProbe => "no probe",
            Case::Empty => "empty pair",
            Case::Llamaprobe => "llamaprobe",
            Case::Hist => "bpftrace hist",
        }
    }

    fn index(self) -> usize {
        CASES.iter().position(|c| *c == self).unwrap_or(0)
    }
}

fn bpftrace_program(case: Case, lib: &Path) -> Option<String> {
    let lib = lib.display();
    match case {
        Case::Empty => Some(format!(
            "uprobe:{lib}:llama_decode {{}} uretprobe:{lib}:llama_decode {{}}"
        )),
        Case::Hist => Some(format!(
            "uprobe:{lib}:llama_decode {{ @start[tid] = nsecs; }} \
             uretprobe:{lib}:llama_decode {{ @lat = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
        )),
        _ => None,
    }
}

enum Tracer {
    None,
    Bpftrace(String),
    Llamaprobe { cpus: Option<String> },
}

struct LoopSpec {
    iterations: u64,
    threads: u32,
    /// taskset CPU list for the loop.
    loop_cpus: Option<String>,
    tracer: Tracer,
    /// Stop llamaprobe (SIGSTOP) while the loop runs: what happens when it cannot keep up.
    pause_agent: bool,
}

/// What the loop printed.
#[derive(Clone, Debug)]
struct LoopOut {
    calls: u64,
    ns_per_call: f64,
    wall_ns: u64,
}

/// What llamaprobe reported about a loop run.
#[derive(Clone, Debug)]
struct AgentLoop {
    decode_calls: u64,
    events_lost: u64,
    /// Its own summary line: "events lost: N (ring buffer full …)".
    lost_line: String,
    /// CPU time from attached to the loop's end (backlog drained).
    cpu_ms: f64,
}

#[derive(Clone, Debug)]
struct LoopRun {
    out: LoopOut,
    agent: Option<AgentLoop>,
}

impl LoopRun {
    fn calls_per_s(&self, iterations: u64, threads: u32) -> f64 {
        (iterations * u64::from(threads)) as f64 / (self.out.wall_ns as f64 / 1e9)
    }
}

fn parse_loop_line(line: &str) -> Result<LoopOut> {
    let mut kv = BTreeMap::new();
    for part in line.split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            kv.insert(k, v);
        }
    }
    let get = |k: &str| -> Result<&str> {
        kv.get(k)
            .copied()
            .with_context(|| format!("no {k}= in the loop's line {line:?}"))
    };
    Ok(LoopOut {
        calls: get("calls")?.parse()?,
        ns_per_call: get("ns_per_call")?.parse()?,
        wall_ns: get("wall_ns")?.parse()?,
    })
}

fn taskset(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpus]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// One run of the loop with its tracer: start the loop (it waits), attach, go, collect.
fn run_loop(env: &Env, spec: &LoopSpec) -> Result<LoopRun> {
    let mut lp = Proc::spawn(
        "bench_loop",
        taskset(spec.loop_cpus.as_deref(), &env.loop_bin)
            .arg(spec.iterations.to_string())
            .arg(spec.threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGKILL,
    )?;
    lp.wait_line("ready", Duration::from_secs(10), |s, l| {
        s == Stream::Out && l == "ready"
    })?;

    let summary = env.work.join(format!("summary-{}.json", lp.pid()));
    let _ = fs::remove_file(&summary);
    let mut tracer = match &spec.tracer {
        Tracer::None => None,
        Tracer::Bpftrace(program) => {
            if env.bpftrace.is_none() {
                bail!("bpftrace is not installed");
            }
            // BEGIN fires once every probe is attached: the signal to start the loop.
            let mut p = Proc::spawn(
                "bpftrace",
                Command::new("bpftrace")
                    .args(["-B", "none", "-e"])
                    .arg(format!("{program} BEGIN {{ printf(\"ready\\n\"); }}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
                libc::SIGINT,
            )?;
            p.wait_line(
                "ready (its BEGIN probe)",
                Duration::from_secs(60),
                |s, l| s == Stream::Out && l.trim() == "ready",
            )?;
            Some(p)
        }
        Tracer::Llamaprobe { cpus } => Some(spawn_attached(
            taskset(cpus.as_deref(), &env.probe_bin)
                .args(["attach", "--pid", &lp.pid().to_string()])
                .args(["--quiet", "--metrics-addr", "off", "--summary-json"])
                .arg(&summary),
        )?),
    };
    let agent_pid = match spec.tracer {
        Tracer::Llamaprobe { .. } => tracer.as_ref().map(Proc::pid),
        _ => None,
    };
    let cpu0 = agent_pid.and_then(cpu_ms);
    let paused = match agent_pid {
        Some(pid) if spec.pause_agent => {
            util::signal(pid, libc::SIGSTOP);
            Some(pid)
        }
        _ => None,
    };

    lp.send_byte()?;
    // Generous: 1 ms per call would be 50 times the cost seen on a slow VM.
    let timeout = Duration::from_secs(60).max(Duration::from_millis(
        spec.iterations * u64::from(spec.threads),
    ));
    let line = lp.wait_line("its result", timeout, |s, l| {
        s == Stream::Out && l.starts_with("calls=")
    })?;
    let out = parse_loop_line(&line)?;
    if let Some(pid) = paused {
        util::signal(pid, libc::SIGCONT);
    }
    let cpu1 = agent_pid.and_then(|pid| settle_cpu(pid, Duration::from_secs(10)));
    lp.close_stdin();
    let status = lp.wait_exit(Duration::from_secs(10))?;
    if !status.success() {
        bail!("the loop failed ({status}):\n{}", lp.tail());
    }

    let mut agent = None;
    if let Some(mut p) = tracer.take() {
        match spec.tracer {
            Tracer::Llamaprobe { .. } => {
                // It ends by itself when the loop exits.
                let status = p.wait_exit(Duration::from_secs(60))?;
                if !status.success() {
                    bail!("llamaprobe failed ({status}):\n{}", p.tail());
                }
                // Let the reader threads see its last lines.
                thread::sleep(Duration::from_millis(50));
                let json = read_json(&summary)?;
                let lost_line = p
                    .tail()
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("events lost:"))
                    .unwrap_or("")
                    .to_string();
                agent = Some(AgentLoop {
                    decode_calls: json["decode_calls"].as_u64().unwrap_or(0),
                    events_lost: json["events_lost"].as_u64().unwrap_or(0),
                    lost_line,
                    cpu_ms: match (cpu0, cpu1) {
                        (Some(a), Some(b)) => b - a,
                        _ => f64::NAN,
                    },
                });
                let _ = fs::remove_file(&summary);
            }
            _ => {
                // The measurement is in: a slow exit (detaching uprobes can take long on a
                // busy machine) only costs the kill.
                if let Err(e) = p.finish(Duration::from_secs(30)) {
                    progress!("  warning: {e:#}");
                }
            }
        }
    }
    Ok(LoopRun { out, agent })
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// 1. Per-call cost

struct PerCall {
    iterations: u64,
    /// Runs per case, in CASES order; None when the case could not run (no bpftrace).
    runs: Vec<Option<Vec<LoopRun>>>,
    lib: PathBuf,
    /// Problems seen (count mismatches, lost events).
    problems: Vec<String>,
}

impl PerCall {
    fn median(&self, case: Case) -> Option<f64> {
        let runs = self.runs[case.index()].as_ref()?;
        Some(median(
            &runs.iter().map(|r| r.out.ns_per_call).collect::<Vec<_>>(),
        ))
    }

    fn spread(&self, case: Case) -> Option<(f64, f64)> {
        let runs = self.runs[case.index()].as_ref()?;
        Some(min_max(
            &runs.iter().map(|r| r.out.ns_per_call).collect::<Vec<_>>(),
        ))
    }

    /// Probe cost of a case: its ns/call minus the unprobed call's.
    fn overhead(&self, case: Case) -> Option<f64> {
        Some(self.median(case)? - self.median(Case::NoProbe).unwrap_or(0.0))
    }

    /// Overhead of a case relative to the empty pair's.
    fn ratio(&self, case: Case) -> Option<f64> {
        Some(self.overhead(case)? / self.overhead(Case::Empty)?)
    }

    /// llamaprobe's CPU per event (µs), median over runs.
    fn agent_us_per_event(&self) -> Option<f64> {
        let runs = self.runs[Case::Llamaprobe.index()].as_ref()?;
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let a = r.agent.as_ref()?;
                Some(a.cpu_ms * 1000.0 / a.decode_calls.max(1) as f64)
            })
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }
}

fn per_call(env: &Env) -> Result<PerCall> {
    let cfg = &env.cfg;
    let mut result = PerCall {
        iterations: cfg.iterations,
        runs: CASES
            .iter()
            .map(|c| match c {
                Case::Empty | Case::Hist if env.bpftrace.is_none() => None,
                _ => Some(Vec::new()),
            })
            .collect(),
        lib: env.lib.clone(),
        problems: Vec::new(),
    };
    for run in 0..cfg.runs {
        let mut order = CASES.to_vec();
        order.rotate_left(run % CASES.len());
        for case in order {
            if result.runs[case.index()].is_none() {
                continue;
            }
            let tracer = match case {
                Case::NoProbe => Tracer::None,
                Case::Llamaprobe => Tracer::Llamaprobe { cpus: None },
                Case::Empty | Case::Hist => {
                    Tracer::Bpftrace(bpftrace_program(case, &env.lib).expect("a bpftrace case"))
                }
            };
            let spec = LoopSpec {
                iterations: cfg.iterations,
                threads: 1,
                loop_cpus: None,
                tracer,
                pause_agent: false,
            };
            let r = match run_loop(env, &spec) {
                Ok(r) => r,
                Err(e) => {
                    // One failed run is reported, not fatal: the other runs give the median.
                    progress!(
                        "  run {}/{}: {} FAILED: {e:#}",
                        run + 1,
                        cfg.runs,
                        case.short()
                    );
                    result.problems.push(format!(
                        "run {} of {} failed and is left out: {e:#}",
                        run + 1,
                        case.label()
                    ));
                    continue;
                }
            };
            let mut note = String::new();
            if let Some(a) = &r.agent {
                let _ = write!(
                    note,
                    " (llamaprobe counted {} of {} calls, {} lost)",
                    a.decode_calls, r.out.calls, a.events_lost
                );
                if a.decode_calls != r.out.calls {
                    result.problems.push(format!(
                        "run {}: llamaprobe counted {} decode calls, the loop made {}",
                        run + 1,
                        a.decode_calls,
                        r.out.calls
                    ));
                }
                if a.events_lost != 0 {
                    result.problems.push(format!(
                        "run {}: llamaprobe lost {} events",
                        run + 1,
                        a.events_lost
                    ));
                }
            }
            progress!(
                "  run {}/{}: {:<14} {:>10.1} ns/call{note}",
                run + 1,
                cfg.runs,
                case.short(),
                r.out.ns_per_call
            );
            if let Some(runs) = result.runs[case.index()].as_mut() {
                runs.push(r);
            }
        }
    }
    for case in CASES {
        if result.runs[case.index()]
            .as_ref()
            .is_some_and(|runs| runs.is_empty())
        {
            bail!(
                "every run of {} failed: {}",
                case.label(),
                result.problems.join("; ")
            );
        }
    }
    if let (Some(none), Some(empty)) = (result.median(Case::NoProbe), result.median(Case::Empty)) {
        if empty < 10.0 * none.max(1.0) {
            result.problems.push(format!(
                "the empty bpftrace pair ({empty:.0} ns/call) barely slowed the loop ({none:.1} \
                 ns/call): did bpftrace attach?"
            ));
        }
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// 4. Event capacity

struct Level {
    label: String,
    threads: u32,
    loop_cpus: String,
    agent_cpus: String,
    pause_agent: bool,
}

struct CapacityRow {
    level: Level,
    run: LoopRun,
    iterations: u64,
}

struct Capacity {
    rows: Vec<CapacityRow>,
    /// The agent's in-process measurement of its Prometheus hot path (see [`HOT_PATH_TEST`]).
    hot_path: Result<String, String>,
}

/// The agent's ignored test that times its Prometheus sink per decode step, per-event label
/// lookup (the former code) against resolved handles.
const HOT_PATH_TEST: &str = "sinks::prometheus::tests::measure_hot_path";

/// Runs [`HOT_PATH_TEST`] (release build) and returns the line it prints.
fn hot_path() -> Result<String> {
    let out = util::cargo()
        .args([
            "test",
            "--release",
            "-p",
            "llamaprobe",
            "--bin",
            "llamaprobe",
            "--",
        ])
        .args(["--ignored", "--exact", HOT_PATH_TEST, "--nocapture"])
        .current_dir(util::workspace_root())
        .env("PATH", util::path_with_tools()?)
        .stderr(Stdio::inherit())
        .output()
        .context("running the agent's hot-path measurement")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.starts_with("hot path:")) {
        Some(l) if out.status.success() => Ok(l.trim_start_matches("hot path:").trim().to_string()),
        _ => bail!("{HOT_PATH_TEST} printed no result ({}): {text}", out.status),
    }
}

fn capacity(env: &Env) -> Result<Capacity> {
    let n = env.ncpu;
    let last = n.saturating_sub(1);
    let mut levels = Vec::new();
    if n >= 2 {
        levels.push(Level {
            label: "1 loop thread on CPU 1".into(),
            threads: 1,
            loop_cpus: "1".into(),
            agent_cpus: "0".into(),
            pause_agent: false,
        });
        levels.push(Level {
            label: format!("{n} loop threads on CPUs 0-{last} (one shares llamaprobe's core)"),
            threads: n as u32,
            loop_cpus: format!("0-{last}"),
            agent_cpus: "0".into(),
            pause_agent: false,
        });
    }
    levels.push(Level {
        label: "1 loop thread on CPU 0, llamaprobe's own core".into(),
        threads: 1,
        loop_cpus: "0".into(),
        agent_cpus: "0".into(),
        pause_agent: false,
    });
    // Past capacity: llamaprobe reads nothing while the loop runs.
    levels.push(Level {
        label: format!(
            "1 loop thread on CPU {last}, llamaprobe stopped (SIGSTOP) until the loop ends"
        ),
        threads: 1,
        loop_cpus: last.to_string(),
        agent_cpus: "0".into(),
        pause_agent: true,
    });
    let mut rows = Vec::new();
    for level in levels {
        let spec = LoopSpec {
            iterations: env.cfg.capacity_iterations,
            threads: level.threads,
            loop_cpus: Some(level.loop_cpus.clone()),
            tracer: Tracer::Llamaprobe {
                cpus: Some(level.agent_cpus.clone()),
            },
            pause_agent: level.pause_agent,
        };
        let run = run_loop(env, &spec).with_context(|| format!("capacity: {}", level.label))?;
        let agent = run.agent.clone().context("no llamaprobe result")?;
        progress!(
            "  {}: {:.0} calls/s, {:.0} ns/call, llamaprobe counted {} of {}, lost {}",
            level.label,
            run.calls_per_s(env.cfg.capacity_iterations, level.threads),
            run.out.ns_per_call,
            agent.decode_calls,
            run.out.calls,
            agent.events_lost
        );
        rows.push(CapacityRow {
            level,
            run,
            iterations: env.cfg.capacity_iterations,
        });
    }
    let hot_path = hot_path().map_err(|e| format!("{e:#}"));
    Ok(Capacity { rows, hot_path })
}

// ---------------------------------------------------------------------------------------------
// Fixtures

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

// ---------------------------------------------------------------------------------------------
// llama-server

/// llama-server with the bench's options (SERVER_ARGS), its log in `cache/logs/bench-NAME.log`.
fn start_server(
    env: &Env,
    server_bin: &Path,
    model: &Path,
    extra_env: &[(String, String)],
    log_name: &str,
) -> Result<Server> {
    let log = env.cache.join("logs").join(format!("bench-{log_name}.log"));
    server::start(server_bin, model, SERVER_ARGS, extra_env, &log)
}

/// One streamed completion.
#[derive(Clone, Debug)]
struct Completion {
    /// Request sent → first `data:` chunk (the first generated token).
    ttft_ms: f64,
    /// Request sent → last byte.
    total_ms: f64,
    predicted_n: u64,
    predicted_per_second: f64,
    predicted_per_token_ms: f64,
    prompt_ms: f64,
}

impl Completion {
    /// Generated tokens per second of the whole request, by the client's clock.
    fn wall_tps(&self) -> f64 {
        self.predicted_n as f64 / (self.total_ms / 1000.0)
    }
}

fn completion(addr: &str) -> Result<Completion> {
    let body = serde_json::json!({
        "prompt": PROMPT,
        "n_predict": N_PREDICT,
        "temperature": 0.0,
        "cache_prompt": false,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST /completion HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let sent = Instant::now();
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let mut first: Option<Duration> = None;
    loop {
        let n = stream.read(&mut buf).context("reading the completion")?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if first.is_none() {
            if let Some(h) = find(&raw, b"\r\n\r\n") {
                if find(&raw[h..], b"data: ").is_some() {
                    first = Some(sent.elapsed());
                }
            }
        }
    }
    let total = sent.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if server::is_chunked(head) {
        server::dechunk(rest)
    } else {
        rest.to_string()
    };
    if status != 200 {
        bail!("HTTP {status} from llama-server: {}", body.trim());
    }
    let last = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["stop"] == Value::Bool(true))
        .context("the stream had no final chunk (`stop: true`)")?;
    let t = &last["timings"];
    let num = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .with_context(|| format!("no {what} in the final chunk"))
    };
    Ok(Completion {
        ttft_ms: first.context("no data chunk")?.as_secs_f64() * 1000.0,
        total_ms: total.as_secs_f64() * 1000.0,
        predicted_n: t["predicted_n"].as_u64().unwrap_or(0),
        predicted_per_second: num(&t["predicted_per_second"], "timings.predicted_per_second")?,
        predicted_per_token_ms: num(
            &t["predicted_per_token_ms"],
            "timings.predicted_per_token_ms",
        )?,
        prompt_ms: num(&t["prompt_ms"], "timings.prompt_ms")?,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `llamaprobe attach` to a server; returns once its probes are attached.
fn attach(env: &Env, pid: u32, extra: &[&str], summary: &Path) -> Result<Proc> {
    let _ = fs::remove_file(summary);
    let metrics = format!("127.0.0.1:{}", server::free_port()?);
    spawn_attached(
        Command::new(&env.probe_bin)
            .args(["attach", "--pid", &pid.to_string(), "--quiet"])
            .args(["--metrics-addr", &metrics, "--summary-json"])
            .arg(summary)
            .args(extra),
    )
}

/// Starts a `llamaprobe attach` command line (output captured, SIGINT to stop it); returns once
/// it prints `probes attached`.
fn spawn_attached(cmd: &mut Command) -> Result<Proc> {
    let mut p = Proc::spawn(
        "llamaprobe",
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGINT,
    )?;
    p.wait_line("`probes attached`", Duration::from_secs(60), |s, l| {
        s == Stream::Err && l.contains("probes attached")
    })?;
    Ok(p)
}

/// Stops llamaprobe (SIGINT) and returns its summary JSON.
fn detach(mut p: Proc, summary: &Path) -> Result<Value> {
    let status = p.finish(Duration::from_secs(30))?;
    if !status.success() {
        bail!("llamaprobe failed ({status}):\n{}", p.tail());
    }
    let json = read_json(summary)?;
    let _ = fs::remove_file(summary);
    Ok(json)
}

// ---------------------------------------------------------------------------------------------
// 2. and 5. Server throughput, latency, footprint

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cond {
    Without,
    /// `llamaprobe attach` with its defaults.
    Default,
    /// `--sync on` (llamaprobe builds with `--sync`): llama_synchronize probed on the CPU too.
    SyncOn,
    /// `--no-sync` (llamaprobe builds without `--sync`).
    NoSync,
    /// Defaults plus OTLP export (HTTP/protobuf) to a local receiver.
    Otlp,
}

impl Cond {
    fn label(self) -> &'static str {
        match self {
            Cond::Without => "without llamaprobe",
            Cond::Default => "llamaprobe attached",
            Cond::SyncOn => "llamaprobe --sync on",
            Cond::NoSync => "llamaprobe --no-sync",
            Cond::Otlp => "llamaprobe + OTLP export",
        }
    }

    /// The conditions this llamaprobe supports, from its `attach --help`.
    fn supported(attach_help: &str) -> Vec<Cond> {
        let mut conds = vec![Cond::Without, Cond::Default];
        conds.push(if attach_help.contains("--sync <") {
            Cond::SyncOn
        } else {
            Cond::NoSync
        });
        if attach_help.contains("--otlp-endpoint") {
            conds.push(Cond::Otlp);
        }
        conds
    }

    /// `llamaprobe attach` options of the condition.
    fn args(self, otlp: Option<&str>) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
        match self {
            Cond::Without | Cond::Default => Vec::new(),
            Cond::SyncOn => v(&["--sync", "on"]),
            Cond::NoSync => v(&["--no-sync"]),
            Cond::Otlp => v(&[
                "--otlp-endpoint",
                otlp.unwrap_or("http://127.0.0.1:4318"),
                "--otlp-protocol",
                "http",
            ]),
        }
    }
}

/// llamaprobe during one run of requests.
#[derive(Clone, Debug)]
struct AgentServer {
    /// Start of `llamaprobe attach` → its probes attached.
    attach_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
    /// CPU while the requests ran.
    cpu_ms: f64,
    window_s: f64,
    generated: u64,
    sampled: u64,
    events_lost: u64,
    /// OTLP requests and bytes the local receiver got during the run (OTLP condition).
    otlp: Option<(u64, u64)>,
}

struct CondRun {
    reqs: Vec<Completion>,
    agent: Option<AgentServer>,
}

impl CondRun {
    fn mean(&self, f: impl Fn(&Completion) -> f64) -> f64 {
        self.reqs.iter().map(f).sum::<f64>() / self.reqs.len().max(1) as f64
    }
}

struct ModelResult {
    label: String,
    path: PathBuf,
    requests: usize,
    /// The conditions measured, and their runs (same order).
    conds: Vec<Cond>,
    runs: Vec<Vec<CondRun>>,
    /// Condition runs repeated because other processes disturbed them, and disturbed runs
    /// kept after MAX_REPEATS.
    repeated: usize,
    disturbed_kept: usize,
}

impl ModelResult {
    fn runs_of(&self, cond: Cond) -> &[CondRun] {
        self.conds
            .iter()
            .position(|c| *c == cond)
            .map_or(&[], |i| self.runs[i].as_slice())
    }

    /// Median over runs of the per-run mean (NaN if the condition was not measured).
    fn stat(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> f64 {
        median(
            &self
                .runs_of(cond)
                .iter()
                .map(|r| r.mean(f))
                .collect::<Vec<_>>(),
        )
    }

    fn spread(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> (f64, f64) {
        min_max(
            &self
                .runs_of(cond)
                .iter()
                .map(|r| r.mean(f))
                .collect::<Vec<_>>(),
        )
    }

    /// Per-run ratio of a condition to the run without llamaprobe next to it (the runs are
    /// interleaved, so a pair shares the machine's state): (median, min, max).
    fn paired(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> (f64, f64, f64) {
        let ratios: Vec<f64> = self
            .runs_of(cond)
            .iter()
            .zip(self.runs_of(Cond::Without))
            .map(|(r, base)| r.mean(f) / base.mean(f))
            .collect();
        let (lo, hi) = min_max(&ratios);
        (median(&ratios), lo, hi)
    }

    fn agents(&self) -> impl Iterator<Item = (Cond, &AgentServer)> {
        self.conds.iter().zip(&self.runs).flat_map(|(c, runs)| {
            runs.iter()
                .filter_map(move |r| r.agent.as_ref().map(|a| (*c, a)))
        })
    }
}

struct Idle {
    secs: f64,
    rss_kib: u64,
    hwm_kib: u64,
    cpu_ms: f64,
}

/// A candidate for the ≥ 10 ms model: what it is and its measured step.
struct LargeCheck {
    label: String,
    step_ms: f64,
}

struct ServerResult {
    server: PathBuf,
    conds: Vec<Cond>,
    models: Vec<ModelResult>,
    idle: Option<Idle>,
    large_checks: Vec<LargeCheck>,
    problems: Vec<String>,
}

fn server_section(env: &mut Env) -> Result<ServerResult> {
    let vars = fixture_vars(env)?;
    let server_bin = var(&vars, "LLAMAPROBE_LLAMA_SERVER")?;
    let tiny = var(&vars, "LLAMAPROBE_MODEL")?;
    let tiny_large = vars
        .get("LLAMAPROBE_MODEL_LARGE")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let help = util::output(Command::new(&env.probe_bin).args(["attach", "--help"]))?;
    let conds = Cond::supported(&help);
    let otlp = if conds.contains(&Cond::Otlp) {
        Some(OtlpReceiver::start()?)
    } else {
        None
    };
    let mut result = ServerResult {
        server: server_bin.clone(),
        conds: conds.clone(),
        models: Vec::new(),
        idle: None,
        large_checks: Vec::new(),
        problems: Vec::new(),
    };

    progress!("tiny model: {}", tiny.display());
    let server = start_server(env, &server_bin, &tiny, &[], "tiny")?;
    completion(&server.addr).context("warm-up request")?;
    result.idle = Some(measure_idle(env, &server)?);
    result.models.push(ab_runs(
        env,
        &server,
        &conds,
        otlp.as_ref(),
        "tiny",
        &tiny,
        env.cfg.tiny_requests,
        &mut result.problems,
    )?);
    drop(server);

    // The larger model: a failure there keeps the tiny model's results.
    let tiny_step = result.models[0].stat(Cond::Without, |c| c.predicted_per_token_ms);
    let mut problems = Vec::new();
    let large = pick_large(
        env,
        &server_bin,
        tiny_large.as_deref(),
        tiny_step,
        &mut result,
    )
    .and_then(|(server, model, label)| {
        ab_runs(
            env,
            &server,
            &conds,
            otlp.as_ref(),
            &label,
            &model,
            env.cfg.large_requests,
            &mut problems,
        )
    });
    result.problems.append(&mut problems);
    match large {
        Ok(m) => result.models.push(m),
        Err(e) => {
            progress!("the larger model's runs failed: {e:#}");
            result
                .problems
                .push(format!("the larger model's runs failed: {e:#}"));
        }
    }
    Ok(result)
}

/// A stand-in OTLP/HTTP collector on 127.0.0.1 (tiny_http): answers every request with `200
/// OK` and an empty body (an empty protobuf Export*ServiceResponse), and counts requests and
/// body bytes.
struct OtlpReceiver {
    addr: std::net::SocketAddr,
    server: Arc<tiny_http::Server>,
    counts: Arc<Mutex<(u64, u64)>>,
    serve: Option<thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    fn start() -> Result<OtlpReceiver> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| anyhow::anyhow!("binding the OTLP receiver: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("the OTLP receiver has no IP address")?;
        let server = Arc::new(server);
        let counts = Arc::new(Mutex::new((0, 0)));
        let (server2, counts2) = (server.clone(), counts.clone());
        let serve = thread::spawn(move || {
            for mut req in server2.incoming_requests() {
                let body = io::copy(req.as_reader(), &mut io::sink()).unwrap_or(0);
                if let Ok(mut c) = counts2.lock() {
                    c.0 += 1;
                    c.1 += body;
                }
                let protobuf =
                    tiny_http::Header::from_bytes("Content-Type", "application/x-protobuf")
                        .expect("a valid header");
                let _ = req.respond(tiny_http::Response::empty(200).with_header(protobuf));
            }
        });
        Ok(OtlpReceiver {
            addr,
            server,
            counts,
            serve: Some(serve),
        })
    }

    /// (requests, body bytes) so far.
    fn received(&self) -> (u64, u64) {
        self.counts.lock().map(|c| *c).unwrap_or((0, 0))
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(h) = self.serve.take() {
            let _ = h.join();
        }
    }
}

fn measure_idle(env: &Env, server: &Server) -> Result<Idle> {
    progress!(
        "idle: llamaprobe attached, no requests, {} s",
        env.cfg.idle.as_secs()
    );
    let summary = env.work.join("summary-idle.json");
    let p = attach(env, server.proc.pid(), &[], &summary)?;
    let cpu0 = cpu_ms(p.pid()).context("reading llamaprobe's CPU time")?;
    let t0 = Instant::now();
    thread::sleep(env.cfg.idle);
    let cpu1 = cpu_ms(p.pid()).context("reading llamaprobe's CPU time")?;
    let secs = t0.elapsed().as_secs_f64();
    let (rss, hwm) = memory_kib(p.pid()).context("reading llamaprobe's memory")?;
    detach(p, &summary)?;
    let idle = Idle {
        secs,
        rss_kib: rss,
        hwm_kib: hwm,
        cpu_ms: cpu1 - cpu0,
    };
    progress!(
        "  RSS {:.1} MiB (peak {:.1} MiB), CPU {:.0} ms in {:.1} s",
        mib(idle.rss_kib),
        mib(idle.hwm_kib),
        idle.cpu_ms,
        idle.secs
    );
    Ok(idle)
}

/// Weights of a model the script generates, for scaling the step: attention (q, o: E²; k, v:
/// E × E/2), feed-forward 3 × E × F per layer, plus embeddings and output (vocabulary ~600).
fn params((layers, embd, ff): Dims) -> f64 {
    let (l, e, f) = (f64::from(layers), f64::from(embd), f64::from(ff));
    l * (3.0 * e * e + 3.0 * e * f) + 2.0 * 600.0 * e
}

/// The ≥ 10 ms model: LLAMAPROBE_MODEL_LARGE if its step is long enough, else the smallest
/// generated candidate whose size, scaled from the last step measured, should reach
/// STEP_AIM_MS; at most three tries.
fn pick_large(
    env: &Env,
    server_bin: &Path,
    tiny_large: Option<&Path>,
    tiny_step_ms: f64,
    result: &mut ServerResult,
) -> Result<(Server, PathBuf, String)> {
    // The model to try, its dims (None: LLAMAPROBE_MODEL_LARGE, the script's --large preset).
    let mut next: Option<(String, Option<Dims>, PathBuf)> = tiny_large.map(|p| {
        (
            format!(
                "{} (LLAMAPROBE_MODEL_LARGE)",
                p.file_name().unwrap_or_default().to_string_lossy()
            ),
            None,
            p.to_path_buf(),
        )
    });
    // Without it, scale from the tiny model's step.
    let mut measured = (params(TINY_DIMS), tiny_step_ms);
    if next.is_none() {
        result.problems.push(
            "LLAMAPROBE_MODEL_LARGE is not prepared (`cargo xtask fixtures --large`): the larger \
             model was chosen among generated ones from the tiny model's step"
                .into(),
        );
    }
    for attempt in 0..4 {
        let (label, dims, path) = match next.take() {
            Some(n) => n,
            None => {
                let d = candidate_after(measured)
                    .context("no larger model to generate than the last one tried")?;
                let path = generate_model(env, d)?;
                (format!("generated {}", dims_label(d)), Some(d), path)
            }
        };
        let server = start_server(env, server_bin, &path, &[], "large")?;
        completion(&server.addr).context("warm-up request")?;
        // Other load only slows a step down: keep the fastest of up to 1 + MAX_REPEATS
        // requests, stopping at the first one nothing else disturbed.
        let mut step = f64::INFINITY;
        for _ in 0..=MAX_REPEATS {
            let (c, other) = undisturbed_completion(&server)?;
            step = step.min(c.predicted_per_token_ms);
            if other <= DISTURBED_CORES {
                break;
            }
            progress!("{label}: other processes used {other:.2} cores: measuring again");
        }
        progress!("{label}: {step:.1} ms per generated token");
        result.large_checks.push(LargeCheck {
            label: label.clone(),
            step_ms: step,
        });
        measured = (params(dims.unwrap_or(TINY_LARGE_DIMS)), step);
        let last_try = attempt == 3 || candidate_after(measured).is_none();
        // A margin: the runs that follow are often a little faster than this one check.
        if step >= STEP_ACCEPT_MS || last_try {
            if step < STEP_TARGET_MS {
                result.problems.push(format!(
                    "no model tried reached a {STEP_TARGET_MS:.0} ms decode step; using {label} \
                     ({step:.1} ms)"
                ));
            }
            let short = dims.map_or_else(|| "large".to_string(), dims_label);
            return Ok((server, path, short));
        }
    }
    unreachable!("the fourth try always returns")
}

/// The smallest candidate bigger than the measured model whose size, scaled by the measured
/// step, should reach STEP_AIM_MS (else the biggest, if bigger).
fn candidate_after((measured_params, step_ms): (f64, f64)) -> Option<Dims> {
    let needed = measured_params * STEP_AIM_MS / step_ms.max(0.01);
    let bigger = || {
        LARGE_CANDIDATES
            .iter()
            .copied()
            .filter(move |d| params(*d) > measured_params)
    };
    bigger()
        .find(|d| params(*d) >= needed)
        .or_else(|| bigger().next_back())
}

fn dims_label((layers, embd, ff): Dims) -> String {
    format!("{layers} layers, n_embd {embd}, ff {ff}")
}

/// Generates `cache/models/bench-L<layers>-E<embd>-F<ff>.gguf` with the fixtures' script.
fn generate_model(env: &Env, dims: Dims) -> Result<PathBuf> {
    let (layers, embd, ff) = dims;
    let script = util::workspace_root().join("xtask/assets/make_tiny_model.py");
    let script_text = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let models = env.cache.join("models");
    fs::create_dir_all(&models)?;
    let path = models.join(format!("bench-L{layers}-E{embd}-F{ff}.gguf"));
    let stamp_path = path.with_extension("gguf.stamp");
    let stamp = format!("{:016x} {layers} {embd} {ff}\n", util::fnv1a(&script_text));
    if path.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(path);
    }
    let (python, pythonpath) = model_python(&env.cache)?;
    progress!("generating {} ({})", path.display(), dims_label(dims));
    let partial = path.with_extension("gguf.part");
    let mut cmd = Command::new(&python);
    if let Some(dir) = &pythonpath {
        cmd.env("PYTHONPATH", dir);
    }
    util::run(
        cmd.arg(&script)
            .args(["--n-layer", &layers.to_string()])
            .args(["--n-embd", &embd.to_string()])
            .args(["--n-ff", &ff.to_string()])
            .arg(&partial),
    )?;
    fs::rename(&partial, &path)?;
    fs::write(&stamp_path, stamp)?;
    Ok(path)
}

/// The Python that `cargo xtask fixtures` set up for the model script (venv, else pip --target).
fn model_python(cache: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let candidates = [
        (cache.join("venv/bin/python"), None),
        (PathBuf::from("python3"), Some(cache.join("pylib"))),
    ];
    for (python, pythonpath) in candidates {
        let mut cmd = Command::new(&python);
        if let Some(dir) = &pythonpath {
            cmd.env("PYTHONPATH", dir);
        }
        let ok = cmd
            .args(["-c", "import gguf, numpy"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok((python, pythonpath));
        }
    }
    bail!("no Python with gguf and numpy: run `cargo xtask fixtures --large` first")
}

/// Interleaved runs of the conditions on one server.
#[allow(clippy::too_many_arguments)]
fn ab_runs(
    env: &Env,
    server: &Server,
    conds: &[Cond],
    otlp: Option<&OtlpReceiver>,
    label: &str,
    model: &Path,
    requests: usize,
    problems: &mut Vec<String>,
) -> Result<ModelResult> {
    let mut result = ModelResult {
        label: label.to_string(),
        path: model.to_path_buf(),
        requests,
        conds: conds.to_vec(),
        runs: conds.iter().map(|_| Vec::new()).collect(),
        repeated: 0,
        disturbed_kept: 0,
    };
    let summary = env.work.join("summary-server.json");
    for run in 0..env.cfg.runs {
        let mut order: Vec<usize> = (0..conds.len()).collect();
        order.rotate_left(run % conds.len());
        for ci in order {
            let cond = conds[ci];
            let mut attempt = 0;
            let r = loop {
                let (r, other) =
                    condition_run(env, server, cond, otlp, label, requests, &summary, problems)?;
                let disturbed = other > DISTURBED_CORES;
                progress!(
                    "  {label} run {}/{}: {:<25} {:>7.1} tok/s (server), {:>7.1} tok/s (wall), TTFT {:>6.1} ms{}",
                    run + 1,
                    env.cfg.runs,
                    cond.label(),
                    r.mean(|c| c.predicted_per_second),
                    r.mean(Completion::wall_tps),
                    r.mean(|c| c.ttft_ms),
                    if disturbed {
                        format!(" — other processes used {other:.2} cores")
                    } else {
                        String::new()
                    }
                );
                if !disturbed {
                    break r;
                }
                if attempt == MAX_REPEATS {
                    result.disturbed_kept += 1;
                    break r;
                }
                attempt += 1;
                result.repeated += 1;
                progress!("  … repeating it");
            };
            result.runs[ci].push(r);
        }
    }
    Ok(result)
}

/// A run is repeated when other processes used more than this many cores while its requests
/// ran (this machine is shared); at most MAX_REPEATS times.
const DISTURBED_CORES: f64 = 0.3;
const MAX_REPEATS: usize = 2;

/// One completion, and how many cores other processes than the server kept busy meanwhile.
fn undisturbed_completion(server: &Server) -> Result<(Completion, f64)> {
    let busy0 = machine_busy_ms();
    let server0 = cpu_ms(server.proc.pid());
    let t0 = Instant::now();
    let c = completion(&server.addr)?;
    let window = t0.elapsed().as_secs_f64();
    let other = match (busy0, machine_busy_ms(), server0, cpu_ms(server.proc.pid())) {
        (Some(b0), Some(b1), Some(s0), Some(s1)) => {
            ((b1 - b0) - (s1 - s0)).max(0.0) / 1000.0 / window
        }
        _ => 0.0,
    };
    Ok((c, other))
}

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq, steal), in ms.
fn machine_busy_ms() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy * 1000.0 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// One condition of one run: attach (if any), the requests, detach. Also returns how many
/// cores other processes (not the server, not llamaprobe) kept busy meanwhile.
#[allow(clippy::too_many_arguments)]
fn condition_run(
    env: &Env,
    server: &Server,
    cond: Cond,
    otlp: Option<&OtlpReceiver>,
    label: &str,
    requests: usize,
    summary: &Path,
    problems: &mut Vec<String>,
) -> Result<(CondRun, f64)> {
    let attach_started = Instant::now();
    let otlp_url = otlp.map(|o| format!("http://{}", o.addr));
    let args = cond.args(otlp_url.as_deref());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let probe = match cond {
        Cond::Without => None,
        _ => Some(attach(env, server.proc.pid(), &args, summary)?),
    };
    let otlp0 = otlp.map(OtlpReceiver::received);
    let attach_s = attach_started.elapsed().as_secs_f64();
    let cpu0 = probe.as_ref().and_then(|p| cpu_ms(p.pid()));
    let server0 = cpu_ms(server.proc.pid());
    let busy0 = machine_busy_ms();
    let t0 = Instant::now();
    let mut reqs = Vec::new();
    for _ in 0..requests {
        reqs.push(completion(&server.addr)?);
    }
    let window_s = t0.elapsed().as_secs_f64();
    let busy1 = machine_busy_ms();
    let server1 = cpu_ms(server.proc.pid());
    let cpu1 = probe.as_ref().and_then(|p| cpu_ms(p.pid()));
    let agent_ms = match (cpu0, cpu1) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let other = match (busy0, busy1, server0, server1) {
        (Some(b0), Some(b1), Some(s0), Some(s1)) => {
            ((b1 - b0) - (s1 - s0) - agent_ms).max(0.0) / 1000.0 / window_s
        }
        _ => 0.0,
    };
    let agent = match probe {
        None => None,
        Some(p) => {
            let (rss, hwm) = memory_kib(p.pid()).unwrap_or((0, 0));
            let json = detach(p, summary)?;
            // Detaching flushes what the exporter still held.
            let otlp_delta = match (cond, otlp, otlp0) {
                (Cond::Otlp, Some(o), Some((r0, b0))) => {
                    let (r1, b1) = o.received();
                    Some((r1 - r0, b1 - b0))
                }
                _ => None,
            };
            let generated: u64 = reqs.iter().map(|r| r.predicted_n).sum();
            let a = AgentServer {
                attach_s,
                rss_kib: rss,
                hwm_kib: hwm,
                cpu_ms: match (cpu0, cpu1) {
                    (Some(a), Some(b)) => b - a,
                    _ => f64::NAN,
                },
                window_s,
                generated,
                sampled: json["sampled_tokens"].as_u64().unwrap_or(0),
                events_lost: json["events_lost"].as_u64().unwrap_or(0),
                otlp: otlp_delta,
            };
            if a.sampled != generated {
                problems.push(format!(
                    "{label}, {}: llamaprobe saw {} sampled tokens, the server generated {generated}",
                    cond.label(),
                    a.sampled
                ));
            }
            if a.events_lost != 0 {
                problems.push(format!(
                    "{label}, {}: {} events lost",
                    cond.label(),
                    a.events_lost
                ));
            }
            Some(a)
        }
    };
    Ok((CondRun { reqs, agent }, other))
}

// ---------------------------------------------------------------------------------------------
// 3. Hits per generated token

struct HitsRow {
    fixture: String,
    llama_cpp: String,
    generation: String,
    via: String,
    generated: u64,
    /// Events by kind (decode, synchronize, sample, model_load, context_create).
    events: BTreeMap<String, u64>,
    skipped: Option<String>,
}

impl HitsRow {
    fn count(&self, kind: &str) -> u64 {
        self.events.get(kind).copied().unwrap_or(0)
    }

    /// Probed calls while generating (every probe event but the one-off model loads and
    /// context creations), per generated token.
    fn events_per_token(&self) -> f64 {
        self.events
            .iter()
            .filter(|(kind, _)| !ONE_OFF_KINDS.contains(&kind.as_str()))
            .map(|(_, n)| n)
            .sum::<u64>() as f64
            / self.generated.max(1) as f64
    }
}

/// Observations of `--events-out` that come from one probed call each, once per model or
/// context; and those that come from no probe at all (requests are reconstructed from the others).
const ONE_OFF_KINDS: &[&str] = &["model_load", "context_create"];
const DERIVED_KINDS: &[&str] = &["request"];
/// Probe families with a column of their own in the table.
const HIT_COLUMNS: &[&str] = &["decode", "synchronize", "sample", "memory"];

/// The extra row: the newest server with `llama_synchronize` probed as well.
const NEWEST_SYNC_ON: &str = "newest, --sync on";

struct Hits {
    rows: Vec<HitsRow>,
    fixtures_json: PathBuf,
}

fn hits_section(env: &mut Env) -> Result<Hits> {
    let vars = fixture_vars(env)?;
    let model = var(&vars, "LLAMAPROBE_MODEL")?;
    let json_path = vars
        .get("LLAMAPROBE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| env.cache.join("fixtures.json"));
    let list: Vec<Value> = match read_json(&json_path) {
        Ok(Value::Array(list)) => list,
        _ => {
            // No description: the newest server alone.
            vec![serde_json::json!({
                "name": "newest",
                "server": var(&vars, "LLAMAPROBE_LLAMA_SERVER")?,
                "generation": "",
                "llama_cpp": "",
                "env": {},
            })]
        }
    };
    let help = util::output(Command::new(&env.probe_bin).args(["attach", "--help"]))?;
    let sync_option = help.contains("--sync <");
    let mut jobs: Vec<(String, Vec<String>, &Value)> = Vec::new();
    for f in &list {
        let name = f["name"].as_str().unwrap_or("?").to_string();
        let newest = name == "newest";
        jobs.push((name, Vec::new(), f));
        if newest && sync_option {
            jobs.push((NEWEST_SYNC_ON.into(), vec!["--sync".into(), "on".into()], f));
        }
    }
    let mut rows = Vec::new();
    for (name, extra_args, f) in jobs {
        let mut row = HitsRow {
            fixture: name.clone(),
            llama_cpp: f["llama_cpp"].as_str().unwrap_or("").to_string(),
            generation: f["generation"].as_str().unwrap_or("").to_string(),
            via: String::new(),
            generated: 0,
            events: BTreeMap::new(),
            skipped: None,
        };
        let fixture_env: Vec<(String, String)> = f["env"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let symbols_from = f["symbols_from"].as_str().map(PathBuf::from);
        let server = f["server"].as_str().map(PathBuf::from);
        let driver = f["driver"].as_str().map(PathBuf::from);
        let present = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.is_file());
        let outcome = if present(&server) {
            row.via = "llama-server".into();
            hits_server(
                env,
                &name,
                server.as_deref().unwrap_or(Path::new("")),
                &model,
                &fixture_env,
                symbols_from.as_deref(),
                &extra_args,
                &mut row,
            )
        } else if present(&driver) {
            row.via = "driver (llamaprobe run)".into();
            hits_driver(
                env,
                driver.as_deref().unwrap_or(Path::new("")),
                &model,
                &fixture_env,
                symbols_from.as_deref(),
                &mut row,
            )
        } else {
            row.skipped = Some("not built here (no llama-server or driver file)".into());
            Ok(())
        };
        if let Err(e) = outcome {
            row.skipped = Some(format!("failed: {e:#}"));
        }
        match &row.skipped {
            Some(why) => progress!("  {name}: skipped: {why}"),
            None => progress!(
                "  {name}: {} generated tokens; events {:?}: {:.2} probed calls = {:.2} probe hits per token",
                row.generated,
                row.events,
                row.events_per_token(),
                2.0 * row.events_per_token()
            ),
        }
        rows.push(row);
    }
    Ok(Hits {
        rows,
        fixtures_json: json_path,
    })
}

fn count_events(path: &Path) -> Result<BTreeMap<String, u64>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("parsing a line of {}", path.display()))?;
        let kind = v["kind"].as_str().unwrap_or("unknown").to_string();
        if !DERIVED_KINDS.contains(&kind.as_str()) {
            *counts.entry(kind).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

#[allow(clippy::too_many_arguments)]
fn hits_server(
    env: &Env,
    name: &str,
    server_bin: &Path,
    model: &Path,
    fixture_env: &[(String, String)],
    symbols_from: Option<&Path>,
    extra_args: &[String],
    row: &mut HitsRow,
) -> Result<()> {
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let server = start_server(env, server_bin, model, fixture_env, &format!("hits-{slug}"))?;
    completion(&server.addr).context("warm-up request")?;
    let events = env.work.join(format!("events-{slug}.jsonl"));
    let summary = env.work.join(format!("summary-hits-{slug}.json"));
    let mut extra = extra_args.to_vec();
    extra.extend(["--events-out".to_string(), events.display().to_string()]);
    if let Some(from) = symbols_from {
        extra.push("--symbols-from".into());
        extra.push(from.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let p = attach(env, server.proc.pid(), &extra, &summary)?;
    for _ in 0..env.cfg.hits_requests {
        row.generated += completion(&server.addr)?.predicted_n;
    }
    detach(p, &summary)?;
    row.events = count_events(&events)?;
    Ok(())
}

fn hits_driver(
    env: &Env,
    driver: &Path,
    model: &Path,
    fixture_env: &[(String, String)],
    symbols_from: Option<&Path>,
    row: &mut HitsRow,
) -> Result<()> {
    let events = env.work.join(format!("events-{}.jsonl", row.fixture));
    let mut cmd = Command::new(&env.probe_bin);
    cmd.args(["run", "--quiet", "--metrics-addr", "off", "--events-out"])
        .arg(&events);
    if let Some(from) = symbols_from {
        cmd.arg("--symbols-from").arg(from);
    }
    cmd.arg("--")
        .arg(driver)
        .arg(model)
        .envs(fixture_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("DRIVER_WAIT_STDIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn("llamaprobe run (driver)", &mut cmd, libc::SIGINT)?;
    let line = p.wait_line("the driver's report", Duration::from_secs(120), |s, l| {
        s == Stream::Out && l.starts_with("driver ")
    })?;
    let status = p.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("llamaprobe run failed ({status}):\n{}", p.tail());
    }
    row.generated = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("generated="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no generated= in the driver's line {line:?}"))?;
    row.events = count_events(&events)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Machine

struct Machine {
    ncpu: usize,
    cpu_model: String,
    kernel: String,
    mem: String,
    date: String,
    load_start: String,
    commit: String,
    bpftrace: String,
}

impl Machine {
    fn read(bpftrace: Option<&str>) -> Machine {
        let cmd_out = |program: &str, args: &[&str]| -> String {
            util::output(
                Command::new(program)
                    .args(args)
                    .current_dir(util::workspace_root()),
            )
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
        };
        let ncpu = cmd_out("nproc", &[]).parse().unwrap_or_else(|_| {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let mut commit = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
        let agent_dirs = ["agent", "probe-ebpf", "probe-common"];
        let mut status = vec!["status", "--porcelain", "--"];
        status.extend(agent_dirs);
        if cmd_out("git", &status).is_empty() {
            commit.push_str(" (agent, probe-ebpf, probe-common as committed)");
        } else {
            commit.push_str(" + uncommitted changes to the agent or its probes");
        }
        Machine {
            ncpu,
            cpu_model,
            kernel: cmd_out("uname", &["-r"]),
            mem,
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_start: loadavg(),
            commit,
            bpftrace: bpftrace.unwrap_or("not installed").to_string(),
        }
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// ns with a sensible precision.
fn ns(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// CPU per event; the CPU times are whole clock ticks (10 ms), so a smaller total is a bound.
fn us_per_event(cpu_ms: f64, events: u64) -> String {
    let events = events.max(1) as f64;
    if cpu_ms.is_nan() {
        "–".into()
    } else if cpu_ms < 10.0 {
        format!("< {:.2} µs", 10_000.0 / events)
    } else {
        format!("{:.1} µs", cpu_ms * 1000.0 / events)
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**missed**"
    }
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report {
    command: String,
    machine: Machine,
    quick: bool,
    runs: usize,
    per_call: Option<Result<PerCall, String>>,
    capacity: Option<Result<Capacity, String>>,
    server: Option<Result<ServerResult, String>>,
    hits: Option<Result<Hits, String>>,
    load_end: String,
    took: Duration,
}

fn ok<T>(section: &Option<Result<T, String>>) -> Option<&T> {
    section.as_ref().and_then(|r| r.as_ref().ok())
}

/// Writes a section's heading and returns its results; for a section without results, writes
/// "not run" or the error instead.
fn section<'a, T>(
    o: &mut String,
    heading: &str,
    section: &'a Option<Result<T, String>>,
) -> Option<&'a T> {
    let _ = writeln!(o, "## {heading}\n");
    match section {
        None => {
            let _ = writeln!(o, "Not measured in this run (left out with `--only`).\n");
            None
        }
        Some(Err(e)) => {
            let _ = writeln!(o, "**Failed:** `{}`\n", e.replace('`', "'"));
            None
        }
        Some(Ok(results)) => Some(results),
    }
}

/// A section's problems as a list (and the blank line after it), if there are any.
fn problems(o: &mut String, problems: &[String]) {
    for problem in problems {
        let _ = writeln!(o, "- **Problem:** {problem}");
    }
    if !problems.is_empty() {
        let _ = writeln!(o);
    }
}

/// A markdown table: the header, the `|---|` rule, the rows, then a blank line. A row shorter
/// than the header ends in empty cells; `|` in a cell is escaped, a line break becomes a space.
fn table(o: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let line = |o: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        o.push('|');
        for cell in cells.chain(std::iter::repeat("")).take(header.len()) {
            if cell.is_empty() {
                o.push_str(" |");
            } else {
                let _ = write!(o, " {} |", cell.replace('|', "\\|").replace('\n', " "));
            }
        }
        o.push('\n');
    };
    line(o, &mut header.iter().copied());
    let _ = writeln!(o, "|{}", "---|".repeat(header.len()));
    for row in rows {
        line(o, &mut row.iter().map(String::as_str));
    }
    o.push('\n');
}

/// What the benchmark led to: each change with the figures measured before and after it (by
/// the runs named; the "after" of the latest is this report). Appended by hand when a change
/// moves a number; the figures are those the named runs printed, not re-measured here.
const HISTORY: &[[&str; 4]] = &[
    [
        "memory-map ELF files instead of reading them, skip the rest (ab84332)",
        "peak RSS on attach = the model's size: 363 MiB with a 363 MiB model (bench run on 2e35077)",
        "41 MB with a 627 MB model (debug build), 34.4 MiB peak under load (run on 3b3b51e)",
        "section 5",
    ],
    [
        "`--sync auto`: `llama_synchronize` probed only with a GPU backend (20ceba5)",
        "8.06 probe hits per generated token (newest, CPU build)",
        "4.06 (the `--sync on` row of section 3 is the former default)",
        "section 3",
    ],
    [
        "ring-buffer wake-ups batched: at 256 KiB, plus a 50 ms drain timer (70e330b)",
        "per-call cost 1.56 × the empty uprobe + uretprobe pair (run on 2e35077)",
        "1.07 × (run on 3b3b51e); this report: section 1",
        "section 1",
    ],
    [
        "Prometheus series handles resolved once per process: no `pid` formatting or label \
         hashing per event (6190424, 6ed8fdf)",
        "336 ns per decode step of 4 sequences in the sink (label lookup per event, the former \
         code, timed beside the new one)",
        "125 ns (run on 8df66b9)",
        "section 4, last line",
    ],
];

/// The before/after table of [`HISTORY`].
fn render_history(o: &mut String) {
    let _ = writeln!(o, "## What the benchmark changed\n");
    let rows: Vec<Vec<String>> = HISTORY
        .iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
    table(o, &["change", "before", "after", "where now"], &rows);
}

fn render(r: &Report) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# llamaprobe benchmarks\n");
    let _ = writeln!(
        o,
        "<!-- Generated by `cargo xtask bench` (xtask/src/bench.rs); rerun it rather than \
         editing by hand. -->\n"
    );
    let _ = writeln!(
        o,
        "What llamaprobe costs the program it profiles, measured by `{}` on {}.{}\n",
        r.command,
        m.date,
        if r.quick {
            " **`--quick` run: fewer iterations and requests; rough numbers.**"
        } else {
            ""
        }
    );
    table(
        &mut o,
        &["", ""],
        &[
            vec![
                "machine".into(),
                format!("`nproc` {}, {}, {} RAM", m.ncpu, m.cpu_model, m.mem),
            ],
            vec!["kernel (`uname -r`)".into(), m.kernel.clone()],
            vec![
                "load average (1/5/15 min)".into(),
                format!("{} at the start, {} at the end", m.load_start, r.load_end),
            ],
            vec![
                "llamaprobe".into(),
                format!("commit {} (release build)", m.commit),
            ],
            vec!["bpftrace".into(), m.bpftrace.clone()],
            vec![
                "runs".into(),
                format!(
                    "{} interleaved runs per case (the order rotates each run); medians, with \
                     the [min–max] of the runs",
                    r.runs
                ),
            ],
            vec!["took".into(), util::format_duration(r.took)],
        ],
    );
    let _ = writeln!(
        o,
        "Everything ran on this one machine, with whatever else it was running (see the load \
         average and the [min–max] spreads): on a shared VM, differences of a few percent \
         between runs are noise. Uprobes are expensive on virtual machines: the project's \
         toolchain notes put a probed call at about 10–15 µs on this kind of VM and 1–3 µs on \
         bare metal; every number here is this machine's.\n"
    );

    render_goals(&mut o, r);
    render_per_call(&mut o, r);
    render_server(&mut o, r);
    render_hits(&mut o, r);
    render_capacity(&mut o, r);
    render_footprint(&mut o, r);
    render_history(&mut o);
    let _ = writeln!(o, "## Not measured\n");
    let otlp_measured = ok(&r.server).is_some_and(|s| s.conds.contains(&Cond::Otlp));
    if !otlp_measured {
        let _ = writeln!(
            o,
            "- OTLP export: not measured (this llamaprobe has none, or section 2 did not run)."
        );
    } else {
        let _ = writeln!(
            o,
            "- OTLP export to a real collector over a network (only llamaprobe's side, against \
             a local stand-in, is measured), and the gRPC transport."
        );
    }
    let _ = writeln!(
        o,
        "- GPU builds: these fixtures are CPU-only. With a GPU, `--sync auto` probes \
         `llama_synchronize` (where a GPU step completes); each probed call costs about what \
         section 1 measures.\n"
    );
    o
}

fn render_goals(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Goals\n");
    let mut rows: Vec<Vec<String>> = Vec::new();
    // Throughput on the ≥ 10 ms model.
    match ok(&r.server).and_then(|s| s.models.get(1)) {
        Some(large) => {
            let base = large.stat(Cond::Without, |c| c.predicted_per_second);
            let with = large.stat(Cond::Default, |c| c.predicted_per_second);
            let step = large.stat(Cond::Without, |c| c.predicted_per_token_ms);
            let (ratio, lo, hi) = large.paired(Cond::Default, |c| c.predicted_per_second);
            let others: Vec<String> = large
                .conds
                .iter()
                .filter(|c| !matches!(c, Cond::Without | Cond::Default))
                .map(|c| {
                    let (r, _, _) = large.paired(*c, |x| x.predicted_per_second);
                    format!(
                        "{}: {}",
                        c.label().trim_start_matches("llamaprobe "),
                        pct(r)
                    )
                })
                .collect();
            let step_note = if step < STEP_TARGET_MS {
                " — **the step was below 10 ms in these runs**"
            } else {
                ""
            };
            rows.push(vec![
                format!(
                    "generation throughput with llamaprobe ≥ {} of without, on a model with a \
                     ≥ {STEP_TARGET_MS:.0} ms decode step",
                    pct(GOAL_THROUGHPUT)
                ),
                format!(
                    "{} [{}–{}] of without (medians {with:.1} vs {base:.1} tok/s; step \
                     {step:.1} ms{step_note}); {}",
                    pct(ratio),
                    pct(lo),
                    pct(hi),
                    others.join("; ")
                ),
                if lo < GOAL_THROUGHPUT && hi >= GOAL_THROUGHPUT {
                    format!(
                        "{} by the median; within this machine's noise (the paired runs \
                         straddle {})",
                        verdict(ratio >= GOAL_THROUGHPUT),
                        pct(GOAL_THROUGHPUT)
                    )
                } else {
                    verdict(ratio >= GOAL_THROUGHPUT).to_string()
                },
            ]);
        }
        None => rows.push(vec![
            format!(
                "generation throughput ≥ {} of without",
                pct(GOAL_THROUGHPUT)
            ),
            "not measured".into(),
        ]),
    }
    match ok(&r.per_call) {
        Some(p) => {
            match p.ratio(Case::Llamaprobe) {
                Some(ratio) => rows.push(vec![
                    format!(
                        "per-call cost ≤ {GOAL_PER_CALL:.2} × the empty uprobe + uretprobe pair"
                    ),
                    format!(
                        "{ratio:.2} × ({} vs {} ns)",
                        ns(p.overhead(Case::Llamaprobe).unwrap_or(f64::NAN)),
                        ns(p.overhead(Case::Empty).unwrap_or(f64::NAN))
                    ),
                    verdict(ratio <= GOAL_PER_CALL).into(),
                ]),
                None => rows.push(vec![
                    format!("per-call cost ≤ {GOAL_PER_CALL:.2} × the empty pair"),
                    "not measured (no bpftrace)".into(),
                ]),
            }
            if let (Some(c), Some(d)) = (p.median(Case::Llamaprobe), p.median(Case::Hist)) {
                rows.push(vec![
                    "per-call cost below bpftrace's latency histogram".into(),
                    format!("{} vs {} ns/call", ns(c), ns(d)),
                    verdict(c < d).into(),
                ]);
            }
        }
        None => rows.push(vec!["per-call cost".into(), "not measured".into()]),
    }
    let hwm = ok(&r.server).and_then(|s| {
        s.models
            .iter()
            .flat_map(|m| m.agents())
            .map(|(_, a)| a.hwm_kib)
            .max()
    });
    match hwm {
        Some(hwm) => rows.push(vec![
            format!("llamaprobe RSS ≤ {GOAL_RSS_MIB:.0} MiB under load"),
            format!("peak (VmHWM) {:.1} MiB", mib(hwm)),
            verdict(mib(hwm) <= GOAL_RSS_MIB).into(),
        ]),
        None => rows.push(vec!["RSS under load".into(), "not measured".into()]),
    }
    table(o, &["goal", "measured", ""], &rows);
    render_reasons(o, r);
}

/// The first obvious reasons for missed goals, computed from the numbers.
fn render_reasons(o: &mut String, r: &Report) {
    let mut lines = Vec::new();
    let per_call = ok(&r.per_call);
    let newest = ok(&r.hits).and_then(|h| {
        h.rows
            .iter()
            .find(|row| row.fixture == "newest" && row.skipped.is_none())
    });
    if let (Some(p), Some(large)) = (per_call, ok(&r.server).and_then(|s| s.models.get(1))) {
        let (ratio, lo, hi) = large.paired(Cond::Default, |c| c.predicted_per_second);
        let step_ms = large.stat(Cond::Without, |c| c.predicted_per_token_ms);
        let sync_on = ok(&r.hits).and_then(|h| {
            h.rows
                .iter()
                .find(|row| row.fixture == NEWEST_SYNC_ON && row.skipped.is_none())
        });
        if let (Some(over), Some(row)) = (p.overhead(Case::Llamaprobe), newest) {
            let per_token_us = row.events_per_token() * over / 1000.0;
            let expected = step_ms / (step_ms + per_token_us / 1000.0);
            let verdict_text = if ratio < expected - 0.005 {
                format!(
                    "The measured loss is larger than expected: the rest is noise (see the \
                     spreads in section 2) or contention: the server runs `-t 2` on {} CPUs, so \
                     llamaprobe's wake-ups and CPU time (section 5) take a core from a ggml \
                     worker, and ggml's threads wait for each other at every step.",
                    r.machine.ncpu
                )
            } else {
                "The measured ratio is at or above the expected one: on this model the cost is \
                 below this machine's run-to-run noise."
                    .to_string()
            };
            lines.push(format!(
                "Expected cost per generated token: {:.2} probed calls per token on the newest \
                 llama-server (section 3) × {:.1} µs per probed call (section 1, case c) = \
                 {per_token_us:.0} µs, i.e. {} of the {step_ms:.1} ms step (a throughput of \
                 about {} of without); measured: {} (median of the paired runs, [{}–{}]). \
                 {verdict_text} On the tiny model the same per-token cost is a large share of a \
                 sub-millisecond step (section 2). The number of probed calls per token (and \
                 the cost of one) is what moves this{}.",
                row.events_per_token(),
                over / 1000.0,
                pct(per_token_us / 1000.0 / step_ms),
                pct(expected),
                pct(ratio),
                pct(lo),
                pct(hi),
                sync_on
                    .map(|s| format!(
                        ": probing `llama_synchronize` too (`--sync on`) makes it {:.2} per token",
                        s.events_per_token()
                    ))
                    .unwrap_or_default(),
            ));
        }
    }
    if let Some(p) = per_call {
        if let (Some(c), Some(b), Some(ratio)) = (
            p.overhead(Case::Llamaprobe),
            p.overhead(Case::Empty),
            p.ratio(Case::Llamaprobe),
        ) {
            if ratio > GOAL_PER_CALL {
                let paused = ok(&r.capacity)
                    .and_then(|cap| cap.rows.iter().find(|row| row.level.pause_agent))
                    .map(|row| row.run.out.ns_per_call);
                let delivery = match (paused, p.median(Case::Llamaprobe)) {
                    (Some(stopped), Some(live)) if live > 1.15 * stopped => format!(
                        " Delivering the events to llamaprobe is a large part of it: with \
                         llamaprobe stopped (section 4, last row: nothing reads, nothing is \
                         woken, and once the ring buffer is full nothing is copied) the same \
                         loop under the same probes ran at {} ns/call against {} here; waking \
                         the reader less often is the first thing to try.",
                        ns(stopped),
                        ns(live)
                    ),
                    (Some(stopped), Some(live)) => format!(
                        " Delivery to llamaprobe is not the difference: with llamaprobe stopped \
                         (section 4, last row) the loop ran at {} ns/call against {} here, so \
                         the cost is in the programs themselves.",
                        ns(stopped),
                        ns(live)
                    ),
                    _ => String::new(),
                };
                lines.push(format!(
                    "Per call, llamaprobe's programs add {} ns to the empty pair's {} ns. Besides \
                     the two hits, each call does a hash-map insert (entry) and a lookup and \
                     delete (return) keyed by thread, reads the 56-byte batch with \
                     `bpf_probe_read_user`, and writes one event to the ring buffer; bpftrace's \
                     histogram (case d) also updates and deletes a map entry per call but sends \
                     nothing to user space.{delivery}",
                    ns(c - b),
                    ns(b)
                ));
            }
        }
    }
    if let Some(p) = per_call {
        if let (Some(c), Some(d), Some((c_lo, c_hi)), Some((d_lo, d_hi))) = (
            p.median(Case::Llamaprobe),
            p.median(Case::Hist),
            p.spread(Case::Llamaprobe),
            p.spread(Case::Hist),
        ) {
            if c >= d {
                let overlap = c_lo <= d_hi && d_lo <= c_hi;
                lines.push(format!(
                    "llamaprobe's probed call costs {} ns more than bpftrace's latency histogram \
                     ({} vs {} ns, {}). Both pay the two traps and a per-thread map update and \
                     delete; llamaprobe also reads the 56-byte batch from user memory and writes \
                     an event to the ring buffer on every call, where the histogram only bumps a \
                     bucket.{}",
                    ns(c - d),
                    ns(c),
                    ns(d),
                    pct(c / d - 1.0).replace('%', "% more"),
                    if overlap {
                        " The [min–max] ranges of the two cases overlap: the difference is about \
                         this machine's run-to-run noise."
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if let Some(s) = ok(&r.server) {
        let worst = s
            .models
            .iter()
            .flat_map(|m| m.agents().map(move |(_, a)| (m, a)))
            .max_by_key(|(_, a)| a.hwm_kib);
        if let Some((m, a)) = worst.filter(|(_, a)| mib(a.hwm_kib) > GOAL_RSS_MIB) {
            let model_mib = fs::metadata(&m.path).map_or(0.0, |md| md.len() as f64 / 1048576.0);
            let above = mib(a.hwm_kib) - mib(a.rss_kib);
            let explained = model_mib > 1.0 && (above - model_mib).abs() < 0.25 * model_mib;
            lines.push(format!(
                "The peak RSS ({:.1} MiB, {} model) is {above:.0} MiB above llamaprobe's RSS at the \
                 end of the same run ({:.1} MiB){}",
                mib(a.hwm_kib),
                m.label,
                mib(a.rss_kib),
                if explained {
                    format!(
                        ", about the size of the model file ({model_mib:.0} MiB): when attaching, \
                         llamaprobe reads each file the process maps whole to find symbols \
                         (`fs::read` in `resolve_file`, agent/src/symbols.rs), the mmapped GGUF \
                         model included. A multi-GiB model would make that peak (and the attach \
                         time) that large; reading only ELF files, and only their headers and \
                         symbol tables, removes it."
                    )
                } else {
                    ".".to_string()
                }
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(o, "Analysis (the first reasons for what is missed):\n");
        for l in lines {
            let _ = writeln!(o, "- {l}");
        }
        let _ = writeln!(o);
    }
}

fn render_per_call(o: &mut String, r: &Report) {
    let Some(p) = section(
        o,
        "1. Cost of one probed call (synthetic target)",
        &r.per_call,
    ) else {
        return;
    };
    let root = util::workspace_root();
    let lib = p.lib.strip_prefix(&root).unwrap_or(&p.lib).display();
    let _ = writeln!(
        o,
        "`xtask/assets/bench/`: `libllama.so` (gcc -O2) exports `int32_t llama_decode(void *ctx, \
         struct llama_batch batch)` with the real 56-byte `llama_batch` passed by value (pointers \
         NULL, `n_tokens` = 1; returns 0), plus `llama_synchronize` and `llama_sampler_sample` so \
         llamaprobe accepts it as a classic-API libllama. `bench_loop N` waits for a byte on \
         stdin (so every probe is attached first), makes 1000 warm-up calls, then times N = {} \
         calls with `clock_gettime(CLOCK_MONOTONIC)`. One probed call = 2 probe hits (entry + \
         return).\n",
        p.iterations
    );
    let mut rows = Vec::new();
    for case in CASES {
        let what = match case {
            Case::NoProbe => "nothing".to_string(),
            Case::Llamaprobe => {
                "`llamaprobe attach --pid <loop> --quiet --metrics-addr off --summary-json F`"
                    .to_string()
            }
            _ => format!(
                "`bpftrace -e '{}'`",
                bpftrace_program(case, Path::new("LIB")).unwrap_or_default()
            ),
        };
        rows.push(match (p.median(case), p.spread(case)) {
            (Some(med), Some((lo, hi))) => {
                let (cost, ratio) = if case == Case::NoProbe {
                    ("–".to_string(), "–".to_string())
                } else {
                    (
                        ns(p.overhead(case).unwrap_or(f64::NAN)),
                        p.ratio(case).map_or("–".to_string(), |x| format!("{x:.2}")),
                    )
                };
                vec![
                    case.label().into(),
                    what,
                    format!("**{}**", ns(med)),
                    format!("{}–{}", ns(lo), ns(hi)),
                    cost,
                    ratio,
                ]
            }
            _ => vec![case.label().into(), what, "not run (no bpftrace)".into()],
        });
    }
    table(
        o,
        &[
            "case",
            "what runs",
            "ns/call (median)",
            "[min–max]",
            "probe cost (− a)",
            "÷ empty pair (b)",
        ],
        &rows,
    );
    let _ = writeln!(
        o,
        "`LIB` = `{lib}`. The bpftrace programs also have `BEGIN {{ printf(\"ready\\n\"); }}`, \
         which fires once their probes are attached: the signal to start the loop. bpftrace \
         attaches system-wide to the file, llamaprobe to the loop's pid only.\n"
    );
    if let Some(runs) = p.runs[Case::Llamaprobe.index()].as_ref() {
        let exact = runs.iter().all(|r| {
            r.agent
                .as_ref()
                .is_some_and(|a| a.decode_calls == r.out.calls)
        });
        let lost: u64 = runs
            .iter()
            .filter_map(|r| r.agent.as_ref().map(|a| a.events_lost))
            .sum();
        let _ = writeln!(
            o,
            "Check: in every llamaprobe run, `--summary-json`'s `decode_calls` {} the loop's \
             calls (N + 1000 warm-up); events lost: {lost}.{}\n",
            if exact {
                "equals"
            } else {
                "**does not always equal**"
            },
            p.agent_us_per_event()
                .map(|us| format!(
                    " llamaprobe itself used {us:.1} µs of CPU per event (median; its own CPU \
                     time, not the loop's)."
                ))
                .unwrap_or_default()
        );
    }
    problems(o, &p.problems);
}

fn render_server(o: &mut String, r: &Report) {
    let Some(s) = section(
        o,
        "2. llama-server throughput and time to first token",
        &r.server,
    ) else {
        return;
    };
    let _ = writeln!(
        o,
        "The newest fixture's llama-server (`{}`), started as `llama-server -m MODEL --host \
         127.0.0.1 --port P {}` (plus `--fit off` where it exists), one warm-up request, then per \
         run and condition a series of streamed `/completion` requests, one at a time: the same \
         {}-character prompt, `n_predict` {N_PREDICT}, `temperature` 0, `cache_prompt` false, \
         `ignore_eos` true. Conditions, interleaved (the order rotates each run), llamaprobe \
         attached for the run only:\n",
        s.server.display(),
        SERVER_ARGS.join(" "),
        PROMPT.len()
    );
    for cond in &s.conds {
        let what = match cond {
            Cond::Without => "no probe".to_string(),
            Cond::Default => "`llamaprobe attach --pid <server> --quiet --metrics-addr \
                              127.0.0.1:<port> --summary-json F` (its defaults: on these \
                              CPU-only builds `--sync auto` leaves `llama_synchronize` unprobed, \
                              as `--no-sync` does)"
                .to_string(),
            Cond::SyncOn => "the same with `--sync on`: `llama_synchronize` probed too (the \
                             default of earlier llamaprobe versions)"
                .to_string(),
            Cond::NoSync => "the same with `--no-sync`".to_string(),
            Cond::Otlp => "the defaults plus `--otlp-endpoint http://127.0.0.1:<port> \
                           --otlp-protocol http`: OTLP traces and metrics exported to a \
                           stand-in collector of the bench's own, which answers every request \
                           `200 OK` at once (so this is llamaprobe's side of the export only)"
                .to_string(),
        };
        let _ = writeln!(o, "- **{}**: {what};", cond.label());
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "- **tok/s (server)**: `timings.predicted_per_second` of the final chunk (generation \
         only);\n- **tok/s (wall)**: generated tokens ÷ the request's wall time (prompt \
         included), by the client;\n- **TTFT**: request sent → first `data:` chunk (the first \
         generated token), by the client; **prompt ms**: `timings.prompt_ms`.\n\nEach value: \
         median over runs of the run's mean over its requests, [min–max] over runs. **Ratio**: in \
         each run, the condition's value ÷ the value without llamaprobe measured next to it in \
         the same run; median [min–max] over runs. The spread of the runs without llamaprobe is \
         the noise floor: differences inside it are not resolved here.\n"
    );
    for checks in [&s.large_checks] {
        if !checks.is_empty() {
            let _ = writeln!(o, "Choosing the ≥ {STEP_TARGET_MS:.0} ms model (ms per generated token, one request after a warm-up):\n");
            for c in checks {
                let _ = writeln!(o, "- {}: {:.1} ms", c.label, c.step_ms);
            }
            let _ = writeln!(o);
        }
    }
    for m in &s.models {
        let step = m.stat(Cond::Without, |c| c.predicted_per_token_ms);
        let _ = writeln!(
            o,
            "### {} model (`{}`): {:.1} ms per generated token, {} request(s) per run\n",
            m.label,
            m.path.file_name().unwrap_or_default().to_string_lossy(),
            step,
            m.requests
        );
        if m.repeated > 0 || m.disturbed_kept > 0 {
            let _ = writeln!(
                o,
                "{} condition run(s) were repeated because other processes kept more than \
                 {DISTURBED_CORES} of a core busy (outside the server and llamaprobe) while they \
                 ran{}.\n",
                m.repeated,
                if m.disturbed_kept > 0 {
                    format!(
                        "; {} still disturbed after {MAX_REPEATS} repeats were kept",
                        m.disturbed_kept
                    )
                } else {
                    String::new()
                }
            );
        }
        let mut rows = Vec::new();
        for &cond in &m.conds {
            let cell = |f: fn(&Completion) -> f64, digits: usize| {
                let med = m.stat(cond, f);
                let (lo, hi) = m.spread(cond, f);
                format!("**{med:.digits$}** [{lo:.digits$}–{hi:.digits$}]")
            };
            let ratio = |f: fn(&Completion) -> f64| {
                if cond == Cond::Without {
                    return "–".to_string();
                }
                let (med, lo, hi) = m.paired(cond, f);
                format!("**{}** [{}–{}]", pct(med), pct(lo), pct(hi))
            };
            rows.push(vec![
                cond.label().into(),
                cell(|c| c.predicted_per_second, 1),
                ratio(|c| c.predicted_per_second),
                cell(Completion::wall_tps, 1),
                ratio(Completion::wall_tps),
                cell(|c| c.ttft_ms, 1),
                cell(|c| c.prompt_ms, 1),
            ]);
        }
        table(
            o,
            &[
                "condition",
                "tok/s (server)",
                "ratio",
                "tok/s (wall)",
                "ratio",
                "TTFT ms",
                "prompt ms",
            ],
            &rows,
        );
    }
    let otlp: Vec<&AgentServer> = s
        .models
        .iter()
        .flat_map(|m| m.agents())
        .filter(|(c, _)| *c == Cond::Otlp)
        .map(|(_, a)| a)
        .collect();
    if otlp.is_empty() {
        let _ = writeln!(
            o,
            "This llamaprobe has no OTLP export (no `--otlp-endpoint`): there is no \"with OTLP\" \
             condition.\n"
        );
    } else {
        let (reqs, bytes) = otlp.iter().fold((0, 0), |(r, b), a| {
            let (r1, b1) = a.otlp.unwrap_or((0, 0));
            (r + r1, b + b1)
        });
        let generated: u64 = otlp.iter().map(|a| a.generated).sum();
        let _ = writeln!(
            o,
            "OTLP: over the runs with export on, the stand-in collector received {reqs} requests, \
             {:.1} KiB in all ({:.0} bytes per generated token; metrics are exported every 10 s \
             and at detach).\n",
            bytes as f64 / 1024.0,
            bytes as f64 / generated.max(1) as f64
        );
    }
    problems(o, &s.problems);
}

fn render_hits(o: &mut String, r: &Report) {
    let Some(h) = section(o, "3. Probe hits per generated token", &r.hits) else {
        return;
    };
    let _ = writeln!(
        o,
        "Every fixture of `{}` that is built here, on the tiny model: a llama-server (same \
         options and request as section 2, after a warm-up) with `llamaprobe attach \
         --events-out F` for the requests, or for a library-only fixture our driver under \
         `llamaprobe run --events-out F`. Each event is one probed call = 2 probe hits (entry + \
         return); a nested call of the same family (a deprecated wrapper calling its \
         replacement) would be 2 more hits for one event, which only happens at model load and \
         context creation.\n",
        h.fixtures_json.display()
    );
    let mut header = vec!["fixture", "llama.cpp", "via", "generated tokens"];
    header.extend(HIT_COLUMNS);
    header.extend(["other", "probed calls / token", "**probe hits / token**"]);
    let rows: Vec<Vec<String>> = h
        .rows
        .iter()
        .map(|row| {
            let mut cells = vec![row.fixture.clone()];
            if let Some(why) = &row.skipped {
                cells.extend([row.llama_cpp.clone(), format!("skipped: {why}")]);
                return cells;
            }
            let per = |k: &str| row.count(k) as f64 / row.generated.max(1) as f64;
            cells.extend([
                format!("{} ({})", row.llama_cpp, row.generation),
                row.via.clone(),
                row.generated.to_string(),
            ]);
            for kind in HIT_COLUMNS {
                cells.push(format!("{} ({:.2}/tok)", row.count(kind), per(kind)));
            }
            let other: Vec<String> = row
                .events
                .iter()
                .filter(|(k, _)| !HIT_COLUMNS.contains(&k.as_str()))
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            cells.extend([
                if other.is_empty() {
                    "–".to_string()
                } else {
                    other.join(", ")
                },
                format!("{:.2}", row.events_per_token()),
                format!("**{:.2}**", 2.0 * row.events_per_token()),
            ]);
            cells
        })
        .collect();
    table(o, &header, &rows);
    let _ = writeln!(
        o,
        "What each hit is for:\n\n\
         - **decode**: one decode step (one batch): `llama_context::decode(llama_batch_ext \
         const&)` on the newest API, `llama_decode` on the classic one. During generation one \
         step feeds back one sampled token per busy slot; the prompt is one step per `n_batch` \
         chunk.\n\
         - **synchronize**: `llama_synchronize`, the wait for the backend to finish a step. \
         The newest llama-server calls it after a step and again when it reads the logits to \
         sample (see the `--sync on` row, if any). A count of 0 means it is not probed \
         (llamaprobe's `--sync auto` default leaves it out when no GPU backend is mapped, as \
         on these CPU-only builds; `--no-sync` in older versions) or that the program never \
         calls the exported function.\n\
         - **sample**: `common_sampler_sample` (llama-server, libllama-common) or \
         `llama_sampler_sample` (programs using the sampler API directly): one per generated \
         token.\n\
         - **memory**: `llama_memory_seq_rm` / `seq_cp` / `clear` (KV-cache edits; llama-server \
         clears a slot's cache when a request starts): per request, not per token.\n\
         - **other**: model load and context creation (driver rows only: the servers were warmed \
         up before attaching), one-off and left out of the per-token figures.\n"
    );
}

fn render_capacity(o: &mut String, r: &Report) {
    let Some(c) = section(o, "4. Event capacity", &r.capacity) else {
        return;
    };
    let base = ok(&r.per_call).and_then(|p| p.median(Case::Llamaprobe));
    let _ = writeln!(
        o,
        "The synthetic loop as fast as it goes (`taskset`-pinned threads, each making N calls), \
         llamaprobe pinned to CPU 0 with `taskset -c 0 llamaprobe attach --pid <loop> --quiet \
         --metrics-addr off --summary-json F`. Lost events are llamaprobe's \
         `llamaprobe_events_lost_total` (its `--summary-json` `events_lost` and summary line). \
         One run per row.\n"
    );
    let rows: Vec<Vec<String>> = c
        .rows
        .iter()
        .map(|row| {
            let a = row.run.agent.as_ref();
            vec![
                row.level.label.clone(),
                row.iterations.to_string(),
                format!(
                    "{:.0}",
                    row.run.calls_per_s(row.iterations, row.level.threads)
                ),
                ns(row.run.out.ns_per_call),
                base.map_or("–".to_string(), |b| {
                    format!("{:.2} ×", row.run.out.ns_per_call / b)
                }),
                format!(
                    "{} / {}",
                    a.map_or(0, |a| a.decode_calls),
                    row.run.out.calls
                ),
                a.map_or("–".to_string(), |a| {
                    if a.events_lost == 0 {
                        "0".to_string()
                    } else {
                        a.lost_line.trim_start_matches("events lost: ").to_string()
                    }
                }),
                a.map_or("–".to_string(), |a| {
                    us_per_event(a.cpu_ms, a.decode_calls)
                }),
            ]
        })
        .collect();
    table(
        o,
        &[
            "loop",
            "N per thread",
            "calls/s",
            "loop ns/call",
            "vs case (c)",
            "counted / made",
            "events lost",
            "llamaprobe CPU per event",
        ],
        &rows,
    );
    let per_event = |row: &CapacityRow| {
        row.run
            .agent
            .as_ref()
            .map(|a| a.cpu_ms * 1000.0 / a.decode_calls.max(1) as f64)
    };
    let live: Vec<&CapacityRow> = c.rows.iter().filter(|r| !r.level.pause_agent).collect();
    let best_clean = live
        .iter()
        .filter(|row| row.run.agent.as_ref().is_some_and(|a| a.events_lost == 0))
        .max_by(|a, b| {
            a.run
                .calls_per_s(a.iterations, a.level.threads)
                .total_cmp(&b.run.calls_per_s(b.iterations, b.level.threads))
        });
    if let Some(row) = best_clean {
        let _ = writeln!(
            o,
            "- Highest rate with no event lost: **{:.0} calls/s**, {}{}.",
            row.run.calls_per_s(row.iterations, row.level.threads),
            row.level.label,
            per_event(row)
                .map(|us| format!(", llamaprobe using {us:.1} µs of CPU per event"))
                .unwrap_or_default()
        );
    }
    if live
        .iter()
        .any(|row| row.run.agent.as_ref().is_some_and(|a| a.events_lost > 0))
    {
        let _ = writeln!(
            o,
            "- Some rows with llamaprobe running lost events: its reader fell behind the probes \
             at those rates (see the rows)."
        );
    } else {
        let fastest = live
            .iter()
            .map(|row| row.run.out.ns_per_call)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            o,
            "- No row with llamaprobe running lost an event: on this machine the probes slow the \
             traced threads (at best {} ns per probed call) before llamaprobe falls behind.",
            ns(fastest)
        );
    }
    if let Some(row) = c.rows.iter().find(|r| r.level.pause_agent) {
        if let Some(a) = &row.run.agent {
            let made = row.run.out.calls;
            let _ = writeln!(
                o,
                "- Past capacity (llamaprobe stopped while the loop ran): the ring buffer held \
                 {} events of {made} calls; {} were dropped and counted (`{}`). The loop ran at \
                 {} ns/call{}: probes never wait for the reader, so the target is not slowed when \
                 llamaprobe falls behind. Draining that backlog took llamaprobe {} of CPU per \
                 event (no wake-up per event when they arrive in bulk).",
                a.decode_calls,
                a.events_lost,
                a.lost_line.trim(),
                ns(row.run.out.ns_per_call),
                base.map(|b| format!(" ({:.2} × case (c))", row.run.out.ns_per_call / b))
                    .unwrap_or_default(),
                us_per_event(a.cpu_ms, a.decode_calls)
            );
        }
    }
    let _ = match &c.hot_path {
        Ok(line) => writeln!(
            o,
            "- The agent's own hot path, in process (`cargo test --release -p llamaprobe --bin \
             llamaprobe -- --ignored --exact {HOT_PATH_TEST} --nocapture`): {line}. Before, \
             every event formatted its `pid` and looked each series up by its labels; each \
             process's series handles are now resolved once."
        ),
        Err(e) => writeln!(o, "- The agent's hot-path measurement failed: {e}"),
    };
    let _ = writeln!(o);
}

fn render_footprint(o: &mut String, r: &Report) {
    let Some(s) = section(o, "5. llamaprobe's footprint", &r.server) else {
        return;
    };
    let _ = writeln!(
        o,
        "VmRSS and VmHWM (peak) from `/proc/PID/status`, CPU = utime + stime from \
         `/proc/PID/stat` (10 ms ticks), of the llamaprobe process attached to the llama-server \
         of section 2 (Prometheus endpoint on).\n"
    );
    let mut rows = Vec::new();
    if let Some(i) = &s.idle {
        rows.push(vec![
            format!("idle: attached, no requests, {:.0} s", i.secs),
            format!("{:.1}", mib(i.rss_kib)),
            format!("{:.1}", mib(i.hwm_kib)),
            if i.cpu_ms < 10.0 {
                "< 10 ms (below one clock tick)".to_string()
            } else {
                format!(
                    "{:.0} ms ({} of one core)",
                    i.cpu_ms,
                    pct(i.cpu_ms / 1000.0 / i.secs)
                )
            },
            "–".into(),
            "–".into(),
        ]);
    }
    for m in &s.models {
        for &cond in m.conds.iter().filter(|c| **c != Cond::Without) {
            let agents: Vec<&AgentServer> = m
                .agents()
                .filter(|(c, _)| *c == cond)
                .map(|(_, a)| a)
                .collect();
            if agents.is_empty() {
                continue;
            }
            let rss = median(&agents.iter().map(|a| mib(a.rss_kib)).collect::<Vec<_>>());
            let hwm = agents.iter().map(|a| a.hwm_kib).max().unwrap_or(0);
            let attach_s = median(&agents.iter().map(|a| a.attach_s).collect::<Vec<_>>());
            // Pooled over the runs: each window is short next to the 10 ms CPU tick.
            let cpu: f64 = agents.iter().map(|a| a.cpu_ms).sum();
            let window: f64 = agents.iter().map(|a| a.window_s).sum();
            let generated: u64 = agents.iter().map(|a| a.generated).sum();
            // Whole 10 ms ticks: below one tick only a bound is known.
            let (cpu_text, per_token) = if cpu < 10.0 {
                (
                    format!("< 10 ms in {window:.1} s (< {})", pct(0.01 / window)),
                    format!("< {:.0} µs", 10_000.0 / generated.max(1) as f64),
                )
            } else {
                (
                    format!(
                        "{cpu:.0} ms in {window:.1} s ({} of one core)",
                        pct(cpu / 1000.0 / window)
                    ),
                    format!("{:.0} µs", cpu * 1000.0 / generated.max(1) as f64),
                )
            };
            rows.push(vec![
                format!(
                    "under load: {} model, {}",
                    m.label,
                    cond.label().trim_start_matches("llamaprobe ")
                ),
                format!("{rss:.1}"),
                format!("{:.1}", mib(hwm)),
                cpu_text,
                per_token,
                format!("{attach_s:.2} s"),
            ]);
        }
    }
    table(
        o,
        &[
            "when",
            "RSS MiB",
            "peak RSS MiB",
            "CPU",
            "CPU per generated token",
            "attach took",
        ],
        &rows,
    );
    let _ = writeln!(
        o,
        "RSS: median at the end of the runs; peak: the highest VmHWM of any run; CPU: summed \
         over the runs' request windows (attach and detach excluded); attach took: `llamaprobe \
         attach` started → `probes attached` printed (median).\n"
    );
}

fn print_summary(r: &Report) {
    println!("llamaprobe bench ({}):", r.machine.date);
    if let Some(p) = ok(&r.per_call) {
        for case in CASES {
            if let Some(med) = p.median(case) {
                println!("  per-call {:<40} {:>10} ns/call", case.label(), ns(med));
            }
        }
    }
    if let Some(s) = ok(&r.server) {
        for m in &s.models {
            let base = m.stat(Cond::Without, |c| c.predicted_per_second);
            for &cond in &m.conds {
                let tps = m.stat(cond, |c| c.predicted_per_second);
                println!(
                    "  {:<28} {:<25} {:>8.1} tok/s ({})",
                    m.label,
                    cond.label(),
                    tps,
                    pct(tps / base)
                );
            }
        }
    }
    if let Some(h) = ok(&r.hits) {
        for row in h.rows.iter().filter(|r| r.skipped.is_none()) {
            println!(
                "  hits/token {:<16} {:.2}",
                row.fixture,
                2.0 * row.events_per_token()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_line_parses() {
        let out = parse_loop_line("calls=101000 threads=1 ns_per_call=43745.06 wall_ns=4374506363")
            .unwrap();
        assert_eq!(out.calls, 101_000);
        assert_eq!(out.wall_ns, 4_374_506_363);
        assert!((out.ns_per_call - 43745.06).abs() < 1e-6);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
