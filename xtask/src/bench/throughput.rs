//! Section 2, llama-server throughput and time to first token: the newest llama-server on the
//! tiny model, then on a model whose decode step is ≥ 10 ms ([`super::large_model`]), with the
//! conditions llamaprobe supports (without it, attached with its defaults, `--sync on` or
//! `--no-sync`, OTLP export to [`super::otlp`], `--profile-cpu`) in interleaved runs; runs that other processes
//! disturbed are repeated. The runs with llamaprobe attached also give section 5's figures
//! under load ([`AgentServer`]). Every run also takes the server's own CPU time per token; the
//! CPU-time runs ([`cpu_time_runs`]) take it where it resolves a 1% overhead: a one-thread
//! server on a CPU of its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    server::{self, Server},
    util::{self, progress},
};

use super::{
    fixture_vars,
    footprint::{measure_idle, Idle},
    large_model::{pick_large, LargeCheck},
    llama_server::{attach, completion, detach, start_server, Completion},
    otlp::OtlpReceiver,
    procfs::{cpu_ms, cpu_ns, machine_busy_ms, memory_kib},
    stats::{median, min_max},
    var, Env,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cond {
    Without,
    /// `llamaprobe attach` with its defaults.
    Default,
    /// `--sync on` (llamaprobe builds with `--sync`): llama_synchronize probed on the CPU too.
    SyncOn,
    /// `--no-sync` (llamaprobe builds without `--sync`).
    NoSync,
    /// Defaults plus OTLP export (HTTP/protobuf) to a local receiver.
    Otlp,
    /// Defaults plus `--profile-cpu` (99 Hz per CPU).
    ProfileCpu,
}

impl Cond {
    pub fn label(self) -> &'static str {
        match self {
            Cond::Without => "without llamaprobe",
            Cond::Default => "llamaprobe attached",
            Cond::SyncOn => "llamaprobe --sync on",
            Cond::NoSync => "llamaprobe --no-sync",
            Cond::Otlp => "llamaprobe + OTLP export",
            Cond::ProfileCpu => "llamaprobe --profile-cpu",
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
        if attach_help.contains("--profile-cpu") {
            conds.push(Cond::ProfileCpu);
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
            Cond::ProfileCpu => v(&["--profile-cpu"]),
        }
    }
}

/// llamaprobe during one run of requests.
#[derive(Clone, Debug)]
pub struct AgentServer {
    /// Start of `llamaprobe attach` → its probes attached.
    pub attach_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// CPU while the requests ran.
    pub cpu_ms: f64,
    pub window_s: f64,
    pub generated: u64,
    pub sampled: u64,
    pub events_lost: u64,
    /// OTLP requests and bytes the local receiver got during the run (OTLP condition).
    pub otlp: Option<(u64, u64)>,
    /// CPU samples llamaprobe took (`--profile-cpu` condition; its `--summary-json`).
    pub cpu_samples: Option<u64>,
}

pub struct CondRun {
    pub reqs: Vec<Completion>,
    pub agent: Option<AgentServer>,
    /// The server's own CPU time while the requests ran (all its threads, ns; NaN if its CPU
    /// clock could not be read). Uprobe handling runs on the probed thread, so it is in here.
    pub target_cpu_ns: f64,
    /// Probed calls llamaprobe counted in the run (its `--summary-json`; None without it).
    pub probed_calls: Option<u64>,
}

impl CondRun {
    fn mean(&self, f: impl Fn(&Completion) -> f64) -> f64 {
        self.reqs.iter().map(f).sum::<f64>() / self.reqs.len().max(1) as f64
    }

    fn generated(&self) -> u64 {
        self.reqs.iter().map(|r| r.predicted_n).sum()
    }

    /// The server's CPU time per generated token, µs (prompt, HTTP and sampling included:
    /// the same requests in every condition).
    pub fn target_cpu_us_per_token(&self) -> f64 {
        self.target_cpu_ns / 1000.0 / self.generated().max(1) as f64
    }

    pub fn calls_per_token(&self) -> Option<f64> {
        self.probed_calls
            .map(|c| c as f64 / self.generated().max(1) as f64)
    }
}

/// Probed calls in a `--summary-json`: every probe family's count (each call is one uprobe
/// and one uretprobe hit).
fn probed_calls(json: &serde_json::Value) -> u64 {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    n(&json["decode_calls"])
        + n(&json["sample"]["count"])
        + n(&json["synchronize"]["count"])
        + n(&json["memory_changes"])
        + n(&json["task_posts"])
        + n(&json["slot_releases"])
        + n(&json["slot_launches"])
}

pub struct ModelResult {
    pub label: String,
    pub path: PathBuf,
    pub requests: usize,
    /// The conditions measured, and their runs (same order).
    pub conds: Vec<Cond>,
    pub runs: Vec<Vec<CondRun>>,
    /// Condition runs repeated because other processes disturbed them, and disturbed runs
    /// kept after MAX_REPEATS.
    pub repeated: usize,
    pub disturbed_kept: usize,
}

impl ModelResult {
    /// Runs of each condition.
    pub fn runs_len(&self) -> usize {
        self.runs.first().map_or(0, Vec::len)
    }

    fn runs_of(&self, cond: Cond) -> &[CondRun] {
        self.conds
            .iter()
            .position(|c| *c == cond)
            .map_or(&[], |i| self.runs[i].as_slice())
    }

    /// Median over runs of the per-run mean (NaN if the condition was not measured).
    pub fn stat(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> f64 {
        median(
            &self
                .runs_of(cond)
                .iter()
                .map(|r| r.mean(f))
                .collect::<Vec<_>>(),
        )
    }

    pub fn spread(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> (f64, f64) {
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
    pub fn paired(&self, cond: Cond, f: impl Fn(&Completion) -> f64 + Copy) -> (f64, f64, f64) {
        self.paired_by(cond, |r| r.mean(f))
    }

    /// Per-run ratio of `f` of a condition's run to `f` of the run without llamaprobe next
    /// to it: (median, min, max).
    fn paired_by(&self, cond: Cond, f: impl Fn(&CondRun) -> f64) -> (f64, f64, f64) {
        self.paired_with(cond, Cond::Without, f)
    }

    /// Per-run ratio of `f` of a condition's run to `f` of `base`'s run in the same round:
    /// (median, min, max).
    pub fn paired_with(
        &self,
        cond: Cond,
        base: Cond,
        f: impl Fn(&CondRun) -> f64,
    ) -> (f64, f64, f64) {
        let ratios: Vec<f64> = self
            .runs_of(cond)
            .iter()
            .zip(self.runs_of(base))
            .map(|(r, base)| f(r) / f(base))
            .collect();
        let (lo, hi) = min_max(&ratios);
        (median(&ratios), lo, hi)
    }

    /// The server's CPU time per generated token: median over runs, [min, max].
    pub fn target_cpu(&self, cond: Cond) -> (f64, f64, f64) {
        let v: Vec<f64> = self
            .runs_of(cond)
            .iter()
            .map(CondRun::target_cpu_us_per_token)
            .collect();
        let (lo, hi) = min_max(&v);
        (median(&v), lo, hi)
    }

    /// Per-run ratio of the server's CPU time per generated token with a condition to the
    /// run without llamaprobe next to it: (median, min, max).
    pub fn target_cpu_paired(&self, cond: Cond) -> (f64, f64, f64) {
        self.paired_by(cond, CondRun::target_cpu_us_per_token)
    }

    /// Probed calls per generated token llamaprobe counted (median over runs).
    pub fn calls_per_token(&self, cond: Cond) -> f64 {
        median(
            &self
                .runs_of(cond)
                .iter()
                .filter_map(CondRun::calls_per_token)
                .collect::<Vec<_>>(),
        )
    }

    pub fn agents(&self) -> impl Iterator<Item = (Cond, &AgentServer)> {
        self.conds.iter().zip(&self.runs).flat_map(|(c, runs)| {
            runs.iter()
                .filter_map(move |r| r.agent.as_ref().map(|a| (*c, a)))
        })
    }
}

pub struct ServerResult {
    pub server: PathBuf,
    pub conds: Vec<Cond>,
    pub models: Vec<ModelResult>,
    /// The CPU-time runs ([`cpu_time_runs`]) on the larger model, and the CPU its server was
    /// pinned to.
    pub cpu_time: Option<(ModelResult, usize)>,
    pub idle: Option<Idle>,
    pub large_checks: Vec<LargeCheck>,
    pub problems: Vec<String>,
}

pub fn measure(env: &mut Env) -> Result<ServerResult> {
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
        cpu_time: None,
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
        Ok(m) => {
            let (model, label) = (m.path.clone(), m.label.clone());
            result.models.push(m);
            let mut problems = Vec::new();
            match cpu_time_runs(env, &server_bin, &model, &label, &mut problems) {
                Ok(runs) => result.cpu_time = Some(runs),
                Err(e) => {
                    progress!("the CPU-time runs failed: {e:#}");
                    problems.push(format!("the CPU-time runs failed: {e:#}"));
                }
            }
            result.problems.append(&mut problems);
        }
        Err(e) => {
            progress!("the larger model's runs failed: {e:#}");
            result
                .problems
                .push(format!("the larger model's runs failed: {e:#}"));
        }
    }
    Ok(result)
}

/// The CPU-time server's options: one thread, so that its CPU time is work and not ggml's
/// workers spinning at their barriers while another is away (with `-t 2` its CPU time is two
/// cores × the wall time, as noisy as the wall time).
pub const CPU_TIME_SERVER_ARGS: &[&str] = &["-t", "1", "-c", "512", "-np", "1"];

/// The CPU-time runs: llamaprobe attached and not, interleaved, on a one-thread server
/// ([`CPU_TIME_SERVER_ARGS`]) pinned to the last CPU, with the bench's client (and the
/// llamaprobe it starts) pinned to the first, so that neither takes the server's CPU. Returns
/// the runs and the server's CPU.
fn cpu_time_runs(
    env: &Env,
    server_bin: &Path,
    model: &Path,
    label: &str,
    problems: &mut Vec<String>,
) -> Result<(ModelResult, usize)> {
    progress!("CPU-time runs: {label} model, a one-thread server pinned to the last CPU");
    let log = env.cache.join("logs").join("bench-cpu-time.log");
    let server = server::start(server_bin, model, CPU_TIME_SERVER_ARGS, &[], &log)?;
    let cpu = env.ncpu.saturating_sub(1);
    util::run(Command::new("taskset").args([
        "-a",
        "-p",
        "-c",
        &cpu.to_string(),
        &server.proc.pid().to_string(),
    ]))?;
    let _pinned = PinnedThread::to(0)?;
    completion(&server.addr).context("warm-up request")?;
    let runs = ab_runs(
        env,
        &server,
        &[Cond::Without, Cond::Default],
        None,
        &format!("{label}, one thread"),
        model,
        env.cfg.large_requests,
        problems,
    )?;
    Ok((runs, cpu))
}

/// The calling thread pinned to one CPU (what it starts inherits it) until dropped.
struct PinnedThread(libc::cpu_set_t);

impl PinnedThread {
    fn to(cpu: usize) -> Result<PinnedThread> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is plain data; the calls read and write only the sets given.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size, &mut old) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size, &set) != 0 {
                bail!(
                    "pinning the bench to CPU {cpu}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(PinnedThread(old))
        }
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
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
pub const DISTURBED_CORES: f64 = 0.3;
pub const MAX_REPEATS: usize = 2;

/// One completion, and how many cores other processes than the server kept busy meanwhile.
pub fn undisturbed_completion(server: &Server) -> Result<(Completion, f64)> {
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
    let target0 = cpu_ns(server.proc.pid());
    let t0 = Instant::now();
    let mut reqs = Vec::new();
    for _ in 0..requests {
        reqs.push(completion(&server.addr)?);
    }
    let window_s = t0.elapsed().as_secs_f64();
    let target_cpu_ns = match (target0, cpu_ns(server.proc.pid())) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64,
        _ => f64::NAN,
    };
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
    let mut calls = None;
    let agent = match probe {
        None => None,
        Some(p) => {
            let (rss, hwm) = memory_kib(p.pid()).unwrap_or((0, 0));
            let json = detach(p, summary)?;
            calls = Some(probed_calls(&json));
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
                cpu_samples: json["cpu_profile"]["samples"].as_u64(),
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
    Ok((
        CondRun {
            reqs,
            agent,
            target_cpu_ns,
            probed_calls: calls,
        },
        other,
    ))
}
