//! Section 6, the host agent at node scale: `llamaprobe daemon` (release build) beside the
//! newest llama-server on the tiny model, each figure with how it was taken.
//!
//! 1. **Idle**: the daemon with no llama.cpp process, then with [`SERVERS`] idle servers: its
//!    CPU (its CPU-time clock, ns exact, [`cpu_ns`]) as a share of one core, and its RSS.
//! 2. **Load**: one client thread per server sending non-streamed `/completion` requests back to
//!    back: probed calls per second (from the daemon's own counters), CPU per call and per
//!    generated token, events lost, and its decode steps against the servers' own.
//! 3. **Discovery**: exec → probes live for each server started while the daemon runs (its
//!    `traced` log lines), and the cost of a rescan with [`SLEEPERS`] more processes.
//! 4. **OTLP**: the load again with export to [`OtlpReceiver`] (request spans, then decode-step
//!    spans too): CPU per exported span and per token, spans received against exported.
//!
//! Every process is owned by a [`Proc`] guard; everything listens on 127.0.0.1.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    proc::Proc,
    server::{self, Server},
    util::{self, progress},
};

use super::{
    fixture_vars,
    markdown::{problems, table, verdict},
    otlp::{OtlpReceiver, Received},
    procfs::{cpu_ms, cpu_ns, memory_kib, wakeups},
    stats::mib,
    var, Env,
};

/// Goals (not assertions): the idle daemon's CPU as a share of one core, and its RSS.
pub const GOAL_IDLE_CORE: f64 = 0.001;
pub const GOAL_RSS_MIB: f64 = 30.0;

/// llama-servers traced at once.
pub const SERVERS: usize = 4;
/// Their options besides the model and the address (plus `--fit off` and `--no-webui` where
/// the build has them).
pub const SERVER_ARGS: &[&str] = &["-c", "2048", "-np", "4", "-t", "1", "--metrics"];
/// Tokens per request of the load.
pub const N_PREDICT: u64 = 16;
/// Extra processes on the host for the rescan measurement.
pub const SLEEPERS: usize = 500;
/// The daemon's rescan period (its `--rescan` default).
const RESCAN_S: f64 = 2.0;

/// The daemon's CPU time and memory over one window.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub secs: f64,
    /// Its CPU-time clock (every thread, ended ones too), in ns.
    pub cpu_ns: u64,
    /// utime + stime from `/proc/PID/stat` (10 ms ticks), as a cross-check.
    pub ticks_ms: f64,
    /// Times its threads were put on a CPU (`/proc/PID/task/*/schedstat` field 3): its
    /// wake-ups, about (a thread that ends in the window takes its count with it).
    pub slices: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Usage {
    /// CPU as a share of one core.
    pub fn core(&self) -> f64 {
        self.cpu_ns as f64 / 1e9 / self.secs.max(1e-9)
    }

    pub fn slices_per_s(&self) -> f64 {
        self.slices as f64 / self.secs.max(1e-9)
    }
}

/// The daemon idle beside `servers` idle llama-servers.
pub struct IdleRun {
    pub servers: usize,
    pub usage: Usage,
}

/// One process the daemon logged as `traced`.
pub struct Traced {
    pub pid: u32,
    /// Its exec → its probes live; 0 when its files were probed already; None when it ran
    /// before the daemon started.
    pub probes_live_ms: Option<f64>,
}

/// The OTLP side of a load run.
pub struct OtlpRun {
    /// `llamaprobe_otlp_spans_total` by outcome, over the run.
    pub sent: u64,
    pub exported: u64,
    pub failed: u64,
    pub received: Received,
    /// Whether every span sent was exported or failed before the run ended.
    pub flushed: bool,
}

/// The servers under load, traced by one daemon.
pub struct LoadRun {
    pub label: String,
    /// The clients' window.
    pub load_s: f64,
    /// The daemon's, from the clients' start to its last export (or a drain pause) after them.
    pub usage: Usage,
    pub completions: u64,
    /// Generated tokens by the servers' answers (`tokens_predicted`).
    pub tokens: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the daemon's counters (deltas over the run).
    pub decode: u64,
    pub generated: u64,
    pub samples: u64,
    pub syncs: u64,
    pub lost: u64,
    /// The servers' own `llamacpp:n_decode_total` (deltas over the run).
    pub servers_decode: u64,
    pub otlp: Option<OtlpRun>,
}

impl LoadRun {
    /// Probed calls the daemon handled: decode steps, samples, synchronizes.
    pub fn calls(&self) -> u64 {
        self.decode + self.samples + self.syncs
    }

    pub fn ns_per_token(&self) -> f64 {
        self.usage.cpu_ns as f64 / self.tokens.max(1) as f64
    }
}

/// Rescans of the host over a window.
pub struct RescanRun {
    pub label: String,
    /// Entries of /proc that are processes, during the window.
    pub procs: usize,
    pub scans: u64,
    pub scan_s: f64,
    pub usage: Usage,
}

/// Starting [`SLEEPERS`] processes while the daemon runs: it looks at each at its exec and
/// again over its first seconds.
pub struct Burst {
    pub spawned: usize,
    pub secs: f64,
    pub cpu_ns: u64,
}

pub struct DaemonResult {
    /// The daemon's command line (the OTLP runs add their options).
    pub command: String,
    pub server_command: String,
    /// Start → `/readyz` says `ready`.
    pub ready_s: f64,
    pub idle: Vec<IdleRun>,
    pub traced: Vec<Traced>,
    pub loads: Vec<LoadRun>,
    pub rescans: Vec<RescanRun>,
    pub burst: Option<Burst>,
    pub logs: PathBuf,
}

/// The daemon's CPU from [`Meter::start`] to [`Meter::stop`].
struct Meter {
    pid: u32,
    t0: Instant,
    ns0: u64,
    ticks0: f64,
    slices0: u64,
}

impl Meter {
    fn start(pid: u32) -> Result<Meter> {
        Ok(Meter {
            pid,
            slices0: wakeups(pid),
            ticks0: cpu_ms(pid).context("reading the daemon's /proc/PID/stat")?,
            ns0: cpu_ns(pid).context("reading the daemon's CPU-time clock")?,
            t0: Instant::now(),
        })
    }

    fn stop(&self) -> Result<Usage> {
        let ns = cpu_ns(self.pid).context("reading the daemon's CPU-time clock")?;
        let secs = self.t0.elapsed().as_secs_f64();
        let ticks = cpu_ms(self.pid).context("reading the daemon's /proc/PID/stat")?;
        let (rss_kib, hwm_kib) = memory_kib(self.pid).context("reading the daemon's memory")?;
        Ok(Usage {
            secs,
            cpu_ns: ns.saturating_sub(self.ns0),
            ticks_ms: ticks - self.ticks0,
            slices: wakeups(self.pid).saturating_sub(self.slices0),
            rss_kib,
            hwm_kib,
        })
    }
}

/// A Prometheus text exposition.
struct Scrape(String);

impl Scrape {
    /// The sum of series `name` whose labels include every `key="value"` of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (n, labels) = match series.find('{') {
                Some(i) => series.split_at(i),
                None => (series, ""),
            };
            if n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            {
                total += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        total
    }
}

/// GET `/metrics` of a daemon or a llama-server.
fn scrape(addr: &str) -> Result<Scrape> {
    match server::http(addr, "GET", "/metrics", None)? {
        (200, body) => Ok(Scrape(body)),
        (status, body) => bail!("GET http://{addr}/metrics: HTTP {status}: {}", body.trim()),
    }
}

/// The daemon's counters that the section reads.
#[derive(Clone, Copy, Default)]
struct Counters {
    decode: f64,
    generated: f64,
    samples: f64,
    syncs: f64,
    lost: f64,
    scans: f64,
    scan_s: f64,
    sent: f64,
    exported: f64,
    failed: f64,
}

impl Counters {
    fn of(s: &Scrape) -> Counters {
        let spans = |o: &str| s.sum("llamaprobe_otlp_spans_total", &[("outcome", o)]);
        Counters {
            decode: s.sum("llamacpp_decode_calls_total", &[]),
            generated: s.sum("llamacpp_tokens_total", &[("kind", "generated")]),
            samples: s.sum("llamacpp_sample_duration_seconds_count", &[]),
            syncs: s.sum("llamacpp_synchronize_duration_seconds_count", &[]),
            lost: s.sum("llamaprobe_events_lost_total", &[]),
            scans: s.sum("llamaprobe_discovery_seconds_count", &[]),
            scan_s: s.sum("llamaprobe_discovery_seconds_sum", &[]),
            sent: spans("sent"),
            exported: spans("exported"),
            failed: spans("failed"),
        }
    }
}

/// A count's growth between two scrapes.
fn grew(after: f64, before: f64) -> u64 {
    (after - before).max(0.0).round() as u64
}

/// A running `llamaprobe daemon`, its log (JSON lines) in a file.
struct Daemon {
    proc: Proc,
    addr: String,
    log: PathBuf,
    ready_s: f64,
}

impl Daemon {
    /// Starts the daemon with `extra` options; returns once `/readyz` says `ready`.
    fn start(env: &Env, extra: &[String], log: &Path) -> Result<(Daemon, String)> {
        let addr = format!("127.0.0.1:{}", server::free_port()?);
        let mut cmd = Command::new(&env.probe_bin);
        cmd.args(["daemon", "--include", "exe:llama-server", "--metrics-addr"])
            .arg(&addr)
            .args(["--log-format", "json"])
            .args(extra);
        let shown = format!(
            "llamaprobe daemon --include exe:llama-server --metrics-addr 127.0.0.1:<free port> \
             --log-format json{}",
            extra
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>()
                .replace(&addr, "127.0.0.1:<free port>")
        );
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let started = Instant::now();
        let mut proc = Proc::spawn("llamaprobe daemon", &mut cmd, libc::SIGTERM)?;
        loop {
            if let Some(status) = proc.try_wait()? {
                bail!(
                    "`{}` exited ({status}) before it was ready; its log:\n{}",
                    util::display(&cmd),
                    server::log_tail(log)
                );
            }
            if let Ok((200, body)) = server::http(&addr, "GET", "/readyz", None) {
                if body.trim() == "ready" {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the daemon was not ready after 60 s; its log:\n{}",
                    server::log_tail(log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let d = Daemon {
            proc,
            addr,
            log: log.to_path_buf(),
            ready_s: started.elapsed().as_secs_f64(),
        };
        Ok((d, shown))
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn counters(&self) -> Result<Counters> {
        Ok(Counters::of(&scrape(&self.addr)?))
    }

    /// The processes its log says it traced, in order.
    fn traced(&self) -> Vec<Traced> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "traced")
            .filter_map(|v| {
                Some(Traced {
                    pid: u32::try_from(v["pid"].as_u64()?).ok()?,
                    probes_live_ms: v["probes_live_ms"].as_str().and_then(|s| s.parse().ok()),
                })
            })
            .collect()
    }

    /// Waits for the `traced` line of `pid`.
    fn wait_traced(&self, pid: u32, timeout: Duration) -> Result<Traced> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.traced().into_iter().find(|t| t.pid == pid) {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the daemon logged no `traced` line for pid {pid} within {} s; its log:\n{}",
                    timeout.as_secs(),
                    server::log_tail(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM; fails if it does not exit cleanly.
    fn stop(mut self) -> Result<()> {
        let status = self.proc.finish(Duration::from_secs(30))?;
        if !status.success() {
            bail!(
                "the daemon ended with {status}; its log:\n{}",
                server::log_tail(&self.log)
            );
        }
        Ok(())
    }
}

/// A llama-server with [`SERVER_ARGS`] (and `optional`), waited for until `/health` says ok.
/// Started by [`server::start_exact`] rather than [`server::start`], which runs
/// `llama-server --help` first: the daemon would see that process too, and probe the files
/// before the server is exec'd.
fn start_llama_server(bin: &Path, model: &Path, optional: &[&str], log: &Path) -> Result<Server> {
    server::start_exact(bin, model, &[SERVER_ARGS, optional].concat(), &[], log)
}

/// What the clients did.
#[derive(Default)]
struct Clients {
    completions: u64,
    tokens: u64,
    errors: u64,
    first_error: Option<String>,
}

/// One client thread per server, each sending non-streamed completions back to back for
/// `secs`.
fn drive(servers: &[Server], secs: Duration) -> Clients {
    let deadline = Instant::now() + secs;
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    let per_server: Vec<Clients> = thread::scope(|s| {
        let handles: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(k, addr)| {
                s.spawn(move || {
                    let mut c = Clients::default();
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let body = serde_json::json!({
                            "prompt": format!("Client {k}, request {i}: tell me about the sea"),
                            "n_predict": N_PREDICT,
                            "temperature": 0.0,
                            "ignore_eos": true,
                            "cache_prompt": false,
                        })
                        .to_string();
                        i += 1;
                        let answer = server::http(addr, "POST", "/completion", Some(&body));
                        let tokens = match &answer {
                            Ok((200, text)) => serde_json::from_str::<Value>(text)
                                .ok()
                                .and_then(|v| v["tokens_predicted"].as_u64()),
                            _ => None,
                        };
                        match tokens {
                            Some(n) => {
                                c.completions += 1;
                                c.tokens += n;
                            }
                            None => {
                                c.errors += 1;
                                c.first_error.get_or_insert_with(|| match answer {
                                    Ok((status, text)) => format!("HTTP {status}: {text}"),
                                    Err(e) => format!("{e:#}"),
                                });
                            }
                        }
                    }
                    c
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    per_server
        .into_iter()
        .fold(Clients::default(), |mut all, c| {
            all.completions += c.completions;
            all.tokens += c.tokens;
            all.errors += c.errors;
            if all.first_error.is_none() {
                all.first_error = c.first_error;
            }
            all
        })
}

/// The servers' own decode steps (`llamacpp:n_decode_total`), summed.
fn servers_decode(servers: &[Server]) -> Result<f64> {
    let mut total = 0.0;
    for s in servers {
        total += scrape(&s.addr)?.sum("llamacpp:n_decode_total", &[]);
    }
    Ok(total)
}

/// The load on every server, traced by `d`; with `otlp`, waits after it until every span sent
/// is exported (or failed), at most 30 s.
fn load_run(
    d: &Daemon,
    servers: &[Server],
    secs: Duration,
    label: &str,
    otlp: Option<&OtlpReceiver>,
) -> Result<LoadRun> {
    progress!(
        "  load, {label}: {} clients, {} s",
        servers.len(),
        secs.as_secs()
    );
    let c0 = d.counters()?;
    let srv0 = servers_decode(servers)?;
    let received0 = otlp.map(|r| r.counts()).unwrap_or_default();
    let meter = Meter::start(d.pid())?;
    let t0 = Instant::now();
    let clients = drive(servers, secs);
    let load_s = t0.elapsed().as_secs_f64();
    // The last steps drained (the daemon reads its ring buffer every 50 ms at the latest).
    thread::sleep(Duration::from_millis(500));
    let mut flushed = true;
    if otlp.is_some() {
        // The batch exporter sends every few seconds: until sent = exported + failed, and the
        // count of sent spans has stopped growing.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_sent = -1.0;
        loop {
            thread::sleep(Duration::from_millis(500));
            let c = d.counters()?;
            if c.sent == last_sent && c.exported + c.failed >= c.sent {
                break;
            }
            last_sent = c.sent;
            if Instant::now() >= deadline {
                flushed = false;
                break;
            }
        }
    }
    let usage = meter.stop()?;
    let c1 = d.counters()?;
    let srv1 = servers_decode(servers)?;
    let run = LoadRun {
        label: label.to_string(),
        load_s,
        usage,
        completions: clients.completions,
        tokens: clients.tokens,
        errors: clients.errors,
        first_error: clients.first_error,
        decode: grew(c1.decode, c0.decode),
        generated: grew(c1.generated, c0.generated),
        samples: grew(c1.samples, c0.samples),
        syncs: grew(c1.syncs, c0.syncs),
        lost: grew(c1.lost, c0.lost),
        servers_decode: grew(srv1, srv0),
        otlp: otlp.map(|r| {
            let now = r.counts();
            OtlpRun {
                sent: grew(c1.sent, c0.sent),
                exported: grew(c1.exported, c0.exported),
                failed: grew(c1.failed, c0.failed),
                received: Received {
                    requests: now.requests - received0.requests,
                    body_bytes: now.body_bytes - received0.body_bytes,
                    trace_requests: now.trace_requests - received0.trace_requests,
                    spans: now.spans - received0.spans,
                    undecodable: now.undecodable - received0.undecodable,
                },
                flushed,
            }
        }),
    };
    progress!(
        "    {} completions, {} tokens ({} errors); daemon: {} decode steps (servers: {}), {} \
         generated, {} lost, {} of one core, {:.1} µs per token{}",
        run.completions,
        run.tokens,
        run.errors,
        run.decode,
        run.servers_decode,
        run.generated,
        run.lost,
        core_pct(run.usage.core()),
        run.ns_per_token() / 1000.0,
        run.otlp
            .as_ref()
            .map(|o| format!(
                "; spans sent {}, exported {}, received {}",
                o.sent, o.exported, o.received.spans
            ))
            .unwrap_or_default()
    );
    Ok(run)
}

/// The daemon idle for `secs`.
fn idle_run(d: &Daemon, servers: usize, secs: Duration) -> Result<IdleRun> {
    progress!("  idle: {servers} llama-server(s), {} s", secs.as_secs());
    let meter = Meter::start(d.pid())?;
    thread::sleep(secs);
    let usage = meter.stop()?;
    progress!(
        "    {} of one core ({:.1} wake-ups/s), RSS {:.1} MiB (peak {:.1} MiB)",
        core_pct(usage.core()),
        usage.slices_per_s(),
        mib(usage.rss_kib),
        mib(usage.hwm_kib)
    );
    Ok(IdleRun { servers, usage })
}

/// Entries of /proc that are processes.
fn proc_count() -> usize {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(0)
}

/// The daemon's rescans over `secs`.
fn rescan_run(d: &Daemon, secs: Duration, label: &str) -> Result<RescanRun> {
    let c0 = d.counters()?;
    let meter = Meter::start(d.pid())?;
    let procs = proc_count();
    thread::sleep(secs);
    let usage = meter.stop()?;
    let c1 = d.counters()?;
    let run = RescanRun {
        label: label.to_string(),
        procs,
        scans: grew(c1.scans, c0.scans),
        scan_s: (c1.scan_s - c0.scan_s).max(0.0),
        usage,
    };
    progress!(
        "  rescans, {label}: {} processes, {} rescans, {:.2} ms each, {} of one core",
        run.procs,
        run.scans,
        run.scan_s * 1000.0 / run.scans.max(1) as f64,
        core_pct(run.usage.core())
    );
    Ok(run)
}

/// `sleep 1000` × `n`, each owned by a guard.
fn sleepers(n: usize) -> Result<Vec<Proc>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(Proc::spawn(
            "sleep",
            Command::new("sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGKILL,
        )?);
    }
    Ok(v)
}

/// Stops them all at once (each guard would otherwise wait for its own).
fn stop_all(procs: Vec<Proc>) {
    for p in &procs {
        util::signal(p.pid(), libc::SIGKILL);
    }
    thread::sleep(Duration::from_millis(200));
    drop(procs);
}

pub fn measure(env: &mut Env) -> Result<DaemonResult> {
    let vars = fixture_vars(env)?;
    let server_bin = var(&vars, "LLAMAPROBE_LLAMA_SERVER")?;
    let model = var(&vars, "LLAMAPROBE_MODEL")?;
    // Asked before the daemon starts: this run of llama-server is not one it should see.
    let help = server::help(&server_bin, &[])?;
    let mut optional: Vec<&str> = Vec::new();
    if help.contains("--fit ") {
        optional.extend(["--fit", "off"]);
    }
    if help.contains("--no-webui") {
        optional.push("--no-webui");
    }
    let server_command = format!(
        "{} -m {} --host 127.0.0.1 --port <free port> {} {}",
        server_bin.display(),
        model.display(),
        SERVER_ARGS.join(" "),
        optional.join(" ")
    );
    let logs = env.work.join("daemon-logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let (idle_s, load_s) = (env.cfg.daemon_idle, env.cfg.daemon_load);

    progress!("daemon: starting `llamaprobe daemon` with no llama.cpp process running");
    let (d, command) = Daemon::start(env, &[], &logs.join("daemon.log"))?;
    let ready_s = d.ready_s;
    // Its first scan and start-up are over before anything is measured.
    thread::sleep(Duration::from_secs(2));
    let mut idle = vec![idle_run(&d, 0, idle_s)?];

    progress!("  starting {SERVERS} llama-servers while the daemon runs");
    let mut servers = Vec::new();
    let mut traced = Vec::new();
    for i in 0..SERVERS {
        let s = start_llama_server(
            &server_bin,
            &model,
            &optional,
            &logs.join(format!("llama-server-{i}.log")),
        )?;
        let t = d.wait_traced(s.proc.pid(), Duration::from_secs(15))?;
        progress!(
            "    pid {}: probes live {} ms after its exec",
            t.pid,
            t.probes_live_ms
                .map_or("?".to_string(), |ms| format!("{ms:.1}"))
        );
        traced.push(t);
        servers.push(s);
    }
    // Past the daemon's looks at a new process (its first 2.5 s) and its model check (2 s).
    thread::sleep(Duration::from_secs(3));
    idle.push(idle_run(&d, SERVERS, idle_s)?);

    let mut loads = vec![load_run(&d, &servers, load_s, "no export", None)?];

    let mut rescans = vec![rescan_run(&d, load_s, &format!("{SERVERS} idle servers"))?];
    progress!("  starting {SLEEPERS} sleeping processes");
    let meter = Meter::start(d.pid())?;
    let sleeping = sleepers(SLEEPERS)?;
    // Past the daemon's looks at each new process (its first 2.5 s).
    thread::sleep(Duration::from_secs(3));
    let spent = meter.stop()?;
    let burst = Burst {
        spawned: sleeping.len(),
        secs: spent.secs,
        cpu_ns: spent.cpu_ns,
    };
    let with_sleepers = rescan_run(
        &d,
        load_s,
        &format!("{SERVERS} idle servers + {SLEEPERS} `sleep` processes"),
    );
    stop_all(sleeping);
    rescans.push(with_sleepers?);
    d.stop()?;

    for (step_spans, label, name) in [
        (false, "OTLP export", "otlp"),
        (true, "OTLP export with --otlp-step-spans", "otlp-steps"),
    ] {
        let receiver = OtlpReceiver::start()?;
        let mut extra = vec![
            "--otlp-endpoint".to_string(),
            format!("http://{}", receiver.addr),
            "--otlp-protocol".to_string(),
            "http".to_string(),
        ];
        if step_spans {
            extra.push("--otlp-step-spans".to_string());
        }
        progress!("  restarting the daemon with {}", extra.join(" "));
        let (d, _) = Daemon::start(env, &extra, &logs.join(format!("daemon-{name}.log")))?;
        for s in &servers {
            d.wait_traced(s.proc.pid(), Duration::from_secs(15))?;
        }
        thread::sleep(Duration::from_secs(2));
        loads.push(load_run(&d, &servers, load_s, label, Some(&receiver))?);
        d.stop()?;
    }
    drop(servers);

    Ok(DaemonResult {
        command,
        server_command,
        ready_s,
        idle,
        traced,
        loads,
        rescans,
        burst: Some(burst),
        logs,
    })
}

/// A share of one core, with the precision small shares need.
fn core_pct(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x < 0.01 {
        format!("{:.3}%", x * 100.0)
    } else {
        format!("{:.1}%", x * 100.0)
    }
}

/// µs with a sensible precision.
fn us(ns: f64) -> String {
    let us = ns / 1000.0;
    if us.is_nan() || us.is_infinite() {
        "–".into()
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// The section's rows of the report's Goals table; "not measured" rows without results.
pub fn goal_rows(r: Option<&DaemonResult>) -> Vec<Vec<String>> {
    let cpu_goal = format!(
        "host agent (`llamaprobe daemon`) idle CPU < {} of one core",
        core_pct(GOAL_IDLE_CORE)
    );
    let rss_goal = format!("host agent RSS < {GOAL_RSS_MIB:.0} MiB, idle");
    let Some(r) = r.filter(|r| !r.idle.is_empty()) else {
        return vec![
            vec![cpu_goal, "not measured".into()],
            vec![rss_goal, "not measured".into()],
        ];
    };
    let each = |f: &dyn Fn(&Usage) -> String| {
        r.idle
            .iter()
            .map(|i| format!("{} servers: {}", i.servers, f(&i.usage)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let worst_cpu = r.idle.iter().map(|i| i.usage.core()).fold(0.0, f64::max);
    let worst_rss = r.idle.iter().map(|i| i.usage.rss_kib).max().unwrap_or(0);
    let peak = r.idle.iter().map(|i| i.usage.hwm_kib).max().unwrap_or(0);
    vec![
        vec![
            cpu_goal,
            format!("{} (section 6)", each(&|u| core_pct(u.core()))),
            verdict(worst_cpu < GOAL_IDLE_CORE).into(),
        ],
        vec![
            rss_goal,
            format!(
                "VmRSS {}; peak (VmHWM) {:.1} MiB (section 6)",
                each(&|u| format!("{:.1} MiB", mib(u.rss_kib))),
                mib(peak)
            ),
            verdict(mib(worst_rss) < GOAL_RSS_MIB).into(),
        ],
    ]
}

/// Lines of the summary on stdout.
pub fn summary_lines(r: &DaemonResult) -> Vec<String> {
    let mut lines: Vec<String> = r
        .idle
        .iter()
        .map(|i| {
            format!(
                "daemon idle, {} servers        {:>8} of one core, RSS {:.1} MiB",
                i.servers,
                core_pct(i.usage.core()),
                mib(i.usage.rss_kib)
            )
        })
        .collect();
    for l in &r.loads {
        lines.push(format!(
            "daemon load, {:<34} {:>8.0} calls/s, {} per token, lost {}",
            l.label,
            l.calls() as f64 / l.usage.secs,
            us(l.ns_per_token()),
            l.lost
        ));
    }
    lines
}

/// The problems the figures show: counts that should agree and do not.
fn found_problems(r: &DaemonResult) -> Vec<String> {
    let mut p = Vec::new();
    for l in &r.loads {
        if l.decode != l.servers_decode {
            p.push(format!(
                "{}: the daemon counted {} decode steps, the servers {} (`llamacpp:n_decode_total`)",
                l.label, l.decode, l.servers_decode
            ));
        }
        if l.generated != l.tokens {
            p.push(format!(
                "{}: the daemon counted {} generated tokens, the servers' answers {} \
                 (`tokens_predicted`)",
                l.label, l.generated, l.tokens
            ));
        }
        if l.lost > 0 {
            p.push(format!("{}: {} events lost", l.label, l.lost));
        }
        if l.errors > 0 {
            p.push(format!(
                "{}: {} requests failed; the first: {}",
                l.label,
                l.errors,
                l.first_error.as_deref().unwrap_or("?")
            ));
        }
        if let Some(o) = &l.otlp {
            if o.received.spans != o.exported {
                p.push(format!(
                    "{}: the receiver got {} spans, the daemon counts {} exported",
                    l.label, o.received.spans, o.exported
                ));
            }
            if o.sent != o.exported {
                p.push(format!(
                    "{}: {} spans sent to the exporter, {} exported, {} failed{}",
                    l.label,
                    o.sent,
                    o.exported,
                    o.failed,
                    if o.flushed {
                        ""
                    } else {
                        " (still not flushed 30 s after the load)"
                    }
                ));
            }
            if o.received.undecodable > 0 {
                p.push(format!(
                    "{}: {} trace exports did not decode as OTLP/protobuf",
                    l.label, o.received.undecodable
                ));
            }
        }
    }
    let first = r.traced.first();
    if first.is_some_and(|t| t.probes_live_ms.unwrap_or(0.0) <= 0.0) {
        p.push(
            "the first llama-server's exec → probes live was not positive: its files were \
             probed before it started"
                .into(),
        );
    }
    p
}

/// The section's markdown (after its heading).
pub fn markdown(r: &DaemonResult, o: &mut String) {
    let _ = writeln!(
        o,
        "The host agent, `{}` (release build), beside {SERVERS} llama-servers (newest fixture, \
         tiny model: `{}`), each started here while the daemon ran. The daemon's CPU is its \
         CPU-time clock (`clock_getcpuclockid`: every thread, the ended ones too, ns exact; the \
         10 ms ticks of utime + stime in `/proc/PID/stat` are shown beside it), as a share of \
         one core over the window; wake-ups are the times its threads were put on a CPU \
         (`/proc/PID/task/*/schedstat` field 3); RSS is VmRSS and VmHWM (peak) from \
         `/proc/PID/status` at the end of the window. It was ready (`/readyz` says `ready`) \
         {:.2} s after it started. Its logs: `{}`.\n",
        r.command,
        r.server_command.trim(),
        r.ready_s,
        r.logs.display()
    );
    let _ = writeln!(o, "### Idle\n");
    let rows: Vec<Vec<String>> = r
        .idle
        .iter()
        .map(|i| {
            let u = &i.usage;
            vec![
                if i.servers == 0 {
                    "no llama.cpp process".to_string()
                } else {
                    format!("{} idle llama-servers traced", i.servers)
                },
                format!("{:.0} s", u.secs),
                format!(
                    "{} ({:.1} ms; ticks: {:.0} ms)",
                    core_pct(u.core()),
                    u.cpu_ns as f64 / 1e6,
                    u.ticks_ms
                ),
                format!("{:.1}", u.slices_per_s()),
                format!("{:.1}", mib(u.rss_kib)),
                format!("{:.1}", mib(u.hwm_kib)),
                verdict(u.core() < GOAL_IDLE_CORE && mib(u.rss_kib) < GOAL_RSS_MIB).into(),
            ]
        })
        .collect();
    table(
        o,
        &[
            "daemon beside",
            "window",
            "CPU, share of one core",
            "wake-ups/s",
            "RSS MiB",
            "peak RSS MiB",
            &format!(
                "goals: < {} of a core, < {GOAL_RSS_MIB:.0} MiB",
                core_pct(GOAL_IDLE_CORE)
            ),
        ],
        &rows,
    );

    let _ = writeln!(o, "### Under load\n");
    let _ = writeln!(
        o,
        "One client thread per server sending non-streamed `/completion` requests back to back \
         (`n_predict` {N_PREDICT}, `temperature` 0, `ignore_eos`, `cache_prompt` false). Probed \
         calls are the daemon's own counters (`llamacpp_decode_calls_total` + \
         `llamacpp_sample_duration_seconds_count` + `llamacpp_synchronize_duration_seconds_count`, \
         each two probe hits), lost events its `llamaprobe_events_lost_total`; generated tokens \
         are the servers' answers' `tokens_predicted` (the daemon's `llamacpp_tokens_total{{kind=\
         \"generated\"}}` beside them), decode steps the daemon's against the servers' own \
         `llamacpp:n_decode_total` (their `/metrics`). All are deltas over the run; the daemon's \
         CPU window runs from the clients' start to 0.5 s after them (with OTLP, to its last \
         export). For the rate the agent can take before it loses events, see section 4 \
         (synthetic target, one core).\n"
    );
    let rows: Vec<Vec<String>> = r
        .loads
        .iter()
        .map(|l| {
            let u = &l.usage;
            vec![
                l.label.clone(),
                format!("{} in {:.1} s", l.completions, l.load_s),
                format!("{} / {}", l.tokens, l.generated),
                format!("{} / {}", l.decode, l.servers_decode),
                format!("{:.0}", l.calls() as f64 / l.load_s.max(1e-9)),
                l.lost.to_string(),
                core_pct(u.core()),
                us(u.cpu_ns as f64 / l.calls().max(1) as f64),
                us(l.ns_per_token()),
                format!("{:.1} / {:.1}", mib(u.rss_kib), mib(u.hwm_kib)),
            ]
        })
        .collect();
    table(
        o,
        &[
            "run",
            "completions",
            "generated tokens: servers / daemon",
            "decode steps: daemon / servers",
            "probed calls/s",
            "lost",
            "daemon CPU",
            "CPU per probed call",
            "CPU per generated token",
            "RSS / peak MiB",
        ],
        &rows,
    );

    let _ = writeln!(o, "### Discovery\n");
    let lines: Vec<String> = r
        .traced
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "server {} (pid {}): {}",
                i + 1,
                t.pid,
                match t.probes_live_ms {
                    Some(ms) if ms > 0.0 => format!("**{ms:.1} ms**"),
                    Some(_) => "0 ms (its files were probed already)".to_string(),
                    None => "? (no exec seen)".to_string(),
                }
            )
        })
        .collect();
    let _ = writeln!(
        o,
        "Exec → probes live, from the daemon's `traced` log line (`probes_live_ms`) for each \
         server started while it ran: {}. The first was exec'd with no file of it probed yet \
         (the daemon sees the exec by the `sched_process_exec` tracepoint, then looks at the \
         process again after 2, 10, 40, 100, 250, 600 and 1500 ms, until its libraries are \
         mapped and probed); the others run the same files, probed already, so they are \
         covered from their first instruction (0 ms).\n",
        lines.join("; ")
    );
    let rows: Vec<Vec<String>> = r
        .rescans
        .iter()
        .map(|s| {
            vec![
                s.label.clone(),
                s.procs.to_string(),
                format!("{} in {:.0} s", s.scans, s.usage.secs),
                format!("{:.2} ms", s.scan_s * 1000.0 / s.scans.max(1) as f64),
                core_pct(s.usage.core()),
                format!("{:.1}", s.usage.slices_per_s()),
                format!("{:.1}", mib(s.usage.rss_kib)),
            ]
        })
        .collect();
    let _ = writeln!(
        o,
        "A rescan (every {RESCAN_S:.0} s, the `--rescan` default) looks at every process: its \
         mapped size (`/proc/PID/statm`), and its maps only when that changed (or at every \
         30th look). Its duration is the daemon's `llamaprobe_discovery_seconds` histogram (sum / \
         count over the window); the processes are the numeric entries of `/proc` during the \
         window, with {SLEEPERS} `sleep 1000` children of the bench added in the second row.\n"
    );
    table(
        o,
        &[
            "host",
            "processes in /proc",
            "rescans",
            "mean rescan",
            "daemon CPU",
            "wake-ups/s",
            "RSS MiB",
        ],
        &rows,
    );
    if let Some(b) = &r.burst {
        let _ = writeln!(
            o,
            "Starting the {} `sleep` processes (each exec'd, seen by the tracepoint, looked at \
             and rechecked over its first 2.5 s, then left out: not `exe:llama-server`) cost \
             the daemon {:.0} ms of CPU over {:.1} s, {} per process.\n",
            b.spawned,
            b.cpu_ns as f64 / 1e6,
            b.secs,
            us(b.cpu_ns as f64 / b.spawned.max(1) as f64)
        );
    }
    if let [base, with, ..] = r.rescans.as_slice() {
        let extra = with.scan_s / with.scans.max(1) as f64 - base.scan_s / base.scans.max(1) as f64;
        let more = with.procs.saturating_sub(base.procs);
        let _ = writeln!(
            o,
            "- {} more processes made each rescan {:.2} ms longer ({} per process); the \
             daemon's CPU went from {} to {} of one core.\n",
            more,
            extra * 1000.0,
            us(extra * 1e9 / more.max(1) as f64),
            core_pct(base.usage.core()),
            core_pct(with.usage.core())
        );
    }

    let _ = writeln!(o, "### OTLP export\n");
    let base = r.loads.iter().find(|l| l.otlp.is_none());
    let rows: Vec<Vec<String>> = r
        .loads
        .iter()
        .filter_map(|l| {
            let x = l.otlp.as_ref()?;
            let extra_ns = base.map(|b| l.ns_per_token() - b.ns_per_token());
            Some(vec![
                l.label.clone(),
                format!("{} / {} / {}", x.sent, x.exported, x.failed),
                format!(
                    "{} in {} requests",
                    x.received.spans, x.received.trace_requests
                ),
                format!("{:.1}", x.exported as f64 / l.tokens.max(1) as f64),
                us(l.ns_per_token()),
                extra_ns.map_or("–".into(), |e| {
                    format!(
                        "{} ({:+.0}%)",
                        us(e),
                        100.0 * e / base.map_or(1.0, |b| b.ns_per_token())
                    )
                }),
                us(l.usage.cpu_ns as f64 / x.exported.max(1) as f64),
                extra_ns.map_or("–".into(), |e| {
                    us(e * l.tokens as f64 / x.exported.max(1) as f64)
                }),
            ])
        })
        .collect();
    let _ = writeln!(
        o,
        "The same load with the daemon restarted with `--otlp-endpoint http://127.0.0.1:<port> \
         --otlp-protocol http` (then `--otlp-step-spans` too), exporting to the bench's stand-in \
         collector, which decodes each `/v1/traces` body (`ExportTraceServiceRequest`) and \
         counts its spans. Spans by outcome are the daemon's `llamaprobe_otlp_spans_total`. The \
         extra CPU is against the run without export above, per generated token.\n"
    );
    table(
        o,
        &[
            "run",
            "spans sent / exported / failed",
            "spans received",
            "spans per token",
            "CPU per token",
            "extra per token",
            "CPU per exported span",
            "extra per exported span",
        ],
        &rows,
    );
    problems(o, &found_problems(r));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name_and_labels() {
        let s = Scrape(
            "# HELP x\nllamacpp_decode_calls_total{pid=\"1\",result=\"ok\"} 10\n\
             llamacpp_decode_calls_total{pid=\"2\",result=\"ok\"} 5\n\
             llamacpp_decode_calls_total_x 7\n\
             llamacpp:n_decode_total 3\n\
             llamaprobe_otlp_spans_total{outcome=\"exported\"} 4\n\
             llamaprobe_otlp_spans_total{outcome=\"sent\"} 6\n"
                .into(),
        );
        assert_eq!(s.sum("llamacpp_decode_calls_total", &[]), 15.0);
        assert_eq!(s.sum("llamacpp:n_decode_total", &[]), 3.0);
        assert_eq!(
            s.sum("llamaprobe_otlp_spans_total", &[("outcome", "exported")]),
            4.0
        );
    }
}
