//! `llamaprobe daemon`: the host agent. Traces every llama.cpp process of the node, those
//! running at start and every new one, containers included, until it is stopped.
//!
//! New programs are seen at exec (the `sched_process_exec` tracepoint; a dynamically linked
//! program maps its libraries a moment later, so a new process is looked at again a few times
//! in its first seconds), libraries loaded later (`dlopen` by Python or Node) by a rescan of
//! every process's maps each `--rescan` seconds, and exits by the `sched_process_exit`
//! tracepoint (and the rescan). Files are probed once for all their processes ([`Host`]).
//! Events flow as in the ad-hoc modes: ring buffer → decode → assemble → sinks; the
//! Prometheus sink serves on `0.0.0.0:9464` by default, with `/healthz` and `/readyz`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use super::{
    cli::DaemonOpts,
    host::{Host, Seen},
    select::Selection,
    session::{self, Pipeline},
};
use crate::{
    assemble::requests::Requests,
    attach::{self, Probes},
    decode::Event,
    model::{ExitStatus, Mode, Observation, TracedProcess},
    sinks::prometheus::Health,
    sources::k8s::K8sMetadata,
};
use probe_common::ProcessChange;

/// The metrics address of the host agent when none is given: a scrape target.
const DAEMON_METRICS_ADDR: ([u8; 4], u16) = ([0, 0, 0, 0], 9464);

/// A process traced at its start whose model load was not seen by then: its model is looked
/// for in its maps.
const MODEL_CHECK_AFTER: Duration = Duration::from_secs(2);

/// How long a released process's late events are ignored.
const RELEASED_KEPT_SECS: u64 = 30;

/// How often the ring buffer is read besides the probes' wake-ups (they wake the agent only
/// once a batch has piled up): every 50 ms while events come, backing off to once a second on
/// an idle host, where a wake-up is most of what the agent costs.
#[derive(Debug)]
struct DrainPace {
    every: Duration,
}

impl DrainPace {
    const FAST: Duration = Duration::from_millis(50);
    const SLOW: Duration = Duration::from_secs(1);

    fn new() -> DrainPace {
        DrainPace { every: Self::FAST }
    }

    /// The wait before the next drain, after one that found work (`busy`) or none.
    fn next(&mut self, busy: bool) -> Duration {
        self.every = if busy {
            Self::FAST
        } else {
            (self.every * 2).min(Self::SLOW)
        };
        self.every
    }
}

/// Gives the heap memory freed after start-up back to the kernel (the kernel's BTF, parsed to
/// load the probes, and the first scan's buffers: glibc keeps freed memory for reuse, which an
/// agent that runs for months on every node would otherwise hold as RSS).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A new process is looked at again after these delays (its libraries are mapped after exec).
const EXEC_RECHECKS_MS: [u64; 7] = [2, 10, 40, 100, 250, 600, 1500];

/// A process just traced, or one whose probes just grew, is looked at again after these
/// delays: libraries come in bursts (gpt4all dlopens each of its llama.cpp builds in turn,
/// some 20 ms apart, and uses one), and a look in the middle of one would otherwise leave the
/// rest unprobed until the next rescan, seconds away.
const SETTLE_RECHECKS_MS: [u64; 4] = [20, 100, 400, 1500];

/// Why a process is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// Not traced yet since its exec: the `n`th of [`EXEC_RECHECKS_MS`].
    Exec(usize),
    /// Traced: the `n`th of [`SETTLE_RECHECKS_MS`].
    Settle(usize),
}

impl Recheck {
    fn delay_ms(self) -> Option<u64> {
        match self {
            Recheck::Exec(n) => EXEC_RECHECKS_MS.get(n).copied(),
            Recheck::Settle(n) => SETTLE_RECHECKS_MS.get(n).copied(),
        }
    }

    fn next(self) -> Recheck {
        match self {
            Recheck::Exec(n) => Recheck::Exec(n + 1),
            Recheck::Settle(n) => Recheck::Settle(n + 1),
        }
    }
}

/// Whether `pid` maps a model file now.
fn model_mapped(pid: u32) -> bool {
    crate::sources::model_path::find(pid).is_ok_and(|found| {
        found
            .iter()
            .any(|m| m.source == crate::sources::model_path::Source::Mapped)
    })
}

/// The host agent's own series.
struct DaemonMetrics {
    files_probed: IntGauge,
    attach_errors: IntCounterVec,
    refused: IntCounter,
    discovery: Histogram,
}

impl DaemonMetrics {
    fn register(registry: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            files_probed: IntGauge::new(
                "llamaprobe_files_probed",
                "Executables and libraries probed now (each once, for all the processes that map it).",
            )?,
            attach_errors: IntCounterVec::new(
                Opts::new(
                    "llamaprobe_attach_errors_total",
                    "Files of llama.cpp processes that could not be probed, by reason.",
                ),
                &["reason"],
            )?,
            refused: IntCounter::new(
                "llamaprobe_processes_refused_total",
                "llama.cpp processes not traced because --max-processes were traced already.",
            )?,
            discovery: Histogram::with_opts(
                HistogramOpts::new(
                    "llamaprobe_discovery_seconds",
                    "Duration of one look at every process of the host (start and each rescan).",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )?,
        };
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let build = IntGaugeVec::new(
            Opts::new(
                "llamaprobe_build_info",
                "llamaprobe's version and the kernel it runs on (value 1).",
            ),
            &["version", "kernel"],
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &kernel])
            .set(1);
        registry.register(Box::new(m.files_probed.clone()))?;
        registry.register(Box::new(m.attach_errors.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.discovery.clone()))?;
        registry.register(Box::new(build))?;
        Ok(m)
    }
}

/// Runs the host agent until SIGTERM, SIGINT or `--duration`.
pub fn run(opts: DaemonOpts) -> anyhow::Result<i32> {
    if opts.check_config {
        // Parsed and checked already (the file, the variables, the flags): say what it is.
        println!(
            "configuration ok: metrics {}{}, rescan {} s, series grace {} s, at most {} processes, include [{}], exclude [{}], logs {:?}",
            match opts
                .profile
                .prometheus
                .addr_or(std::net::SocketAddr::from(DAEMON_METRICS_ADDR))
            {
                crate::sinks::prometheus::MetricsAddr::On(a) => a.to_string(),
                crate::sinks::prometheus::MetricsAddr::Off => "off".into(),
            },
            session::web_config_line(&opts.profile.prometheus),
            opts.rescan,
            opts.profile.prometheus.series_grace,
            opts.max_processes,
            opts.include.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
            opts.exclude.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
            opts.log_format,
        );
        return Ok(0);
    }
    attach::host_agent_preflight()?;
    let tracefs = attach::ensure_tracefs()?;
    let hz = opts.profile.cpu_profile.profile_cpu;
    let mut probes = Probes::load(hz.is_some())?;
    // Before the first scan: a program started while it runs is seen at its exec.
    probes.attach_exec_tracepoint()?;
    if let Some(hz) = hz {
        let cpus = probes.attach_cpu_sampler(hz)?;
        tracing::info!("CPU profile: {hz} Hz on {cpus} CPUs, traced processes only");
    }
    let exit_probe = probes.attach_exit_probe()?;
    tracing::info!("{tracefs}; exec tracepoint and {exit_probe} attached");
    let ring = probes.ring_buffer()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(event_loop(opts, probes, ring))
}

/// The daemon's state between events.
struct Daemon {
    host: Host,
    probes: Probes,
    pipe: Pipeline,
    metrics: DaemonMetrics,
    /// Processes to look at again, by when.
    rechecks: BTreeMap<Instant, Vec<(u32, Recheck)>>,
    /// Processes left out (selection, refusal): their events are not for us.
    ignored: HashSet<u32>,
    /// Processes traced at their start, and when to look for their model if no load was seen
    /// by then (the first process of a file is probed a few hundred ms after its exec, and a
    /// small model loads faster).
    model_checks: Vec<(Instant, u32)>,
    /// Exec times (monotonic ns) of processes being looked at since their exec.
    exec_at: HashMap<u32, u64>,
    /// Traced processes a rescan found gone, released after the next drain.
    vanished: Vec<u32>,
    /// Traced processes whose main thread ended: released once their other threads are gone
    /// too (their ends, and the calls they were inside, are read first).
    ending: Vec<u32>,
    /// Processes released lately: an event of theirs read after the release (a rescan that
    /// saw the exit before its events were read) must not bring them back.
    released: HashMap<u32, Instant>,
    errors_counted: usize,
    /// `--profile-cpu`: traced processes are sampled.
    profile_cpu: bool,
}

async fn event_loop(
    opts: DaemonOpts,
    probes: Probes,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> anyhow::Result<i32> {
    let mut sigint = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let health = Arc::new(Health::default());
    health.turned();
    let addr = opts
        .profile
        .prometheus
        .addr_or(std::net::SocketAddr::from(DAEMON_METRICS_ADDR));
    let (mut sinks, registry) =
        session::sinks(&opts.profile, addr, Some(health.clone()), false).await?;
    // With a terminal on stdout, a live table of the traced processes.
    sinks.push(Box::new(crate::sinks::host_table::HostTable::new()));
    if let crate::sinks::prometheus::MetricsAddr::On(a) = addr {
        tracing::info!(
            "Prometheus metrics at {} (/healthz, /readyz){}",
            opts.profile.prometheus.url(a, "/metrics"),
            session::web_config_line(&opts.profile.prometheus)
        );
    }
    let metrics = DaemonMetrics::register(&registry)?;
    let (k8s, k8s_line) = K8sMetadata::start(std::env::var("NODE_NAME").ok()).await;
    tracing::info!("{k8s_line}");
    // The first scan's processes get their pod's labels if the pods are listed by then.
    if let Some(k) = k8s.as_ref() {
        if !k.wait_ready(Duration::from_secs(5)).await {
            tracing::warn!(
                "the pods of node {} are not listed after 5 s: processes traced before they are get their Kubernetes labels at a later rescan",
                k.node()
            );
        }
    }
    let selection = Selection {
        include: opts.include.clone(),
        exclude: opts.exclude.clone(),
    };
    let mut d = Daemon {
        host: Host::new(selection, opts.max_processes, opts.profile.sync, k8s),
        probes,
        pipe: Pipeline::new(Requests::new(Mode::BatchView), &opts.profile, sinks),
        metrics,
        rechecks: BTreeMap::new(),
        ignored: HashSet::new(),
        model_checks: Vec::new(),
        exec_at: HashMap::new(),
        vanished: Vec::new(),
        ending: Vec::new(),
        released: HashMap::new(),
        errors_counted: 0,
        profile_cpu: opts.profile.cpu_profile.profile_cpu.is_some(),
    };
    d.scan(true);
    release_freed_memory();
    health.set_ready();

    // SAFETY: the ring buffer's fd is owned by the AsyncFd and stays open until it is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut pace = DrainPace::new();
    let drain = tokio::time::sleep(DrainPace::FAST);
    tokio::pin!(drain);
    let mut rescan = tokio::time::interval(Duration::from_secs_f64(opts.rescan.max(0.1)));
    rescan.tick().await; // the first scan ran above
    let deadline = async {
        match opts.profile.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let ended_by = loop {
        let next_recheck = d.rechecks.keys().next().copied();
        let recheck = async {
            match next_recheck {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer")?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    d.handle(&item);
                }
                guard.clear_ready();
                // Events come: drained often again from now on.
                let soon = tokio::time::Instant::now() + pace.next(true);
                if drain.deadline() > soon {
                    drain.as_mut().reset(soon);
                }
            }
            () = &mut drain => {
                // Looked at before the ring buffer is read: every end of their threads is in it.
                let ended = d.ended_processes();
                let rb = ring.get_mut();
                let mut records = 0usize;
                while let Some(item) = rb.next() {
                    d.handle(&item);
                    records += 1;
                }
                let busy = records > 0 || !ended.is_empty() || !d.vanished.is_empty() || !d.ending.is_empty();
                for pid in std::mem::take(&mut d.vanished).into_iter().chain(ended) {
                    d.release(pid, "exited");
                }
                drain.as_mut().reset(tokio::time::Instant::now() + pace.next(busy));
                let assembler = &d.pipe.assembler;
                let n = d.host.detach_unneeded_applies(&mut d.probes, |pid| assembler.samples_by_function(pid));
                if n > 0 {
                    tracing::debug!("{n} sampler-chain probes detached (their processes sample through a sampling function)");
                }
            }
            _ = recheck => d.recheck(),
            _ = rescan.tick() => d.scan(false),
            _ = ticker.tick() => {
                health.turned();
                d.tick();
            }
            _ = &mut deadline => break "--duration elapsed",
            _ = sigterm.recv() => break "terminated",
            _ = sigint.recv() => break "interrupted",
        }
    };
    tracing::info!("stopping: {ended_by}");
    {
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            d.handle(&item);
        }
    }
    (d.pipe.stats.lost_ringbuf, d.pipe.stats.lost_entry) = d.probes.lost();
    let pids = d.host.pids();
    // The outputs first, so a stop signal's grace period is not spent before they are
    // written: detaching takes the kernel about 0.1 s a probe, some 30 per probed file (see
    // `Probes::detach_all`).
    let finished = d.pipe.finish(&pids, ended_by);
    tracing::info!("outputs written; detaching {} probes", d.probes.attached());
    d.probes.detach_all();
    finished?;
    Ok(0)
}

impl Daemon {
    /// One ring-buffer record.
    fn handle(&mut self, bytes: &[u8]) {
        let Some(ev) = self.pipe.decode(bytes) else {
            return;
        };
        match ev {
            Event::Process {
                pid,
                change: ProcessChange::Exec,
                at_ns,
                ..
            } => self.exec(pid, at_ns),
            Event::Process {
                pid,
                change: change @ (ProcessChange::Exit | ProcessChange::ThreadExit),
                ..
            } => {
                tracing::debug!(pid, ?change, "exit event");
                if self.host.processes.contains_key(&pid) {
                    self.pipe.handle_event(ev);
                }
                if change == ProcessChange::Exit && !self.ending.contains(&pid) {
                    // Released once its other threads have ended too (and the calls they
                    // were inside are known).
                    self.ending.push(pid);
                }
            }
            ev => {
                let pid = ev.pid();
                if !self.ignored.contains(&pid) && !self.released.contains_key(&pid) {
                    self.pipe.handle_event(ev);
                }
            }
        }
    }

    /// A process exec'd a program: whatever it ran before is released; it is looked at now
    /// and again over its first seconds. (A scan may have found it after this exec already,
    /// before the event was read: then it stays as it is.)
    fn exec(&mut self, pid: u32, at_ns: u64) {
        if self
            .host
            .processes
            .get(&pid)
            .is_some_and(|p| p.since_ns > at_ns)
        {
            return;
        }
        self.release(pid, "exec'd another program");
        self.released.remove(&pid); // a new program: its events count
        self.ignored.remove(&pid);
        self.host.forget_other(pid);
        self.exec_at.insert(pid, at_ns);
        if !self.look(pid, false) {
            self.schedule(pid, Recheck::Exec(0));
        } else {
            self.exec_at.remove(&pid);
        }
    }

    fn schedule(&mut self, pid: u32, why: Recheck) {
        if let Some(ms) = why.delay_ms() {
            let at = Instant::now() + Duration::from_millis(ms);
            self.rechecks.entry(at).or_default().push((pid, why));
        }
    }

    fn recheck(&mut self) {
        let now = Instant::now();
        let due: Vec<Instant> = self.rechecks.range(..=now).map(|(k, _)| *k).collect();
        for at in due {
            for (pid, why) in self.rechecks.remove(&at).unwrap_or_default() {
                match why {
                    Recheck::Exec(_) => {
                        if !self.host.processes.contains_key(&pid) && !self.look(pid, false) {
                            if why.next().delay_ms().is_some() {
                                self.schedule(pid, why.next());
                            } else {
                                self.exec_at.remove(&pid);
                            }
                        } else {
                            self.exec_at.remove(&pid);
                        }
                    }
                    // A look that finds more starts the settling again (in `look`).
                    Recheck::Settle(_) => {
                        if self.host.processes.contains_key(&pid)
                            && self.look(pid, false)
                            && !self.settling(pid)
                        {
                            self.schedule(pid, why.next());
                        }
                    }
                }
            }
        }
    }

    /// Whether a settling look at `pid` is scheduled.
    fn settling(&self, pid: u32) -> bool {
        self.rechecks
            .values()
            .flatten()
            .any(|&(p, why)| p == pid && matches!(why, Recheck::Settle(_)))
    }

    /// Looks at one process; returns whether it is settled (traced, gone or left out).
    fn look(&mut self, pid: u32, running_before: bool) -> bool {
        let seen = self.host.consider(pid, &mut self.probes);
        tracing::trace!(pid, ?seen, "looked");
        self.count_errors();
        match seen {
            Seen::Traced => {
                if !self.settling(pid) {
                    self.schedule(pid, Recheck::Settle(0));
                }
                self.traced(pid, running_before);
                true
            }
            Seen::Grew(files) => {
                if let Some(p) = self.host.processes.get(&pid) {
                    tracing::info!(
                        pid,
                        exe = %p.identity.exe,
                        files,
                        "probes added: llama.cpp files mapped after it was traced"
                    );
                }
                self.rechecks.values_mut().for_each(|v| {
                    v.retain(|&(p, why)| p != pid || !matches!(why, Recheck::Settle(_)))
                });
                self.schedule(pid, Recheck::Settle(0));
                true
            }
            Seen::Unchanged | Seen::Gone => true,
            Seen::Refused => {
                self.ignored.insert(pid);
                true
            }
            Seen::Failed(_) | Seen::Other => false,
        }
    }

    fn count_errors(&mut self) {
        for reason in &self.host.attach_errors[self.errors_counted..] {
            self.metrics
                .attach_errors
                .with_label_values(&[reason])
                .inc();
        }
        self.errors_counted = self.host.attach_errors.len();
    }

    /// A process is traced from now on.
    fn traced(&mut self, pid: u32, running_before: bool) {
        let Some(p) = self.host.processes.get(&pid) else {
            return;
        };
        self.pipe.requests.set_mode(pid, p.mode);
        session::server_era(&mut self.pipe, pid, &p.plan);
        if self.profile_cpu {
            if let Err(e) = self.probes.profile(pid) {
                tracing::warn!(pid, "not CPU-profiled: {e}");
            }
        }
        let labels = &p.labels.labels;
        let label = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| *n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        // From its exec to its probes being live (0 when its files were probed already: it
        // was covered from its first instruction).
        let live_ms = self.exec_at.get(&pid).map(|at| {
            if p.newly_probed == 0 {
                0.0
            } else {
                crate::model::clock::monotonic_ns().saturating_sub(*at) as f64 / 1e6
            }
        });
        tracing::info!(
            pid,
            exe = %p.identity.exe,
            probes_live_ms = live_ms.map(|ms| format!("{ms:.1}")).unwrap_or_default(),
            container_id = label("container_id"),
            k8s_pod = label("k8s_pod"),
            generation = p.plan.generation.as_str(),
            requests = p.mode.describe(),
            "traced"
        );
        let traced = Observation::Traced(TracedProcess {
            pid,
            name: p.identity.exe.clone(),
            generation: p.plan.generation,
            request_mode: p.mode,
            probes_attached: self.probes.attached(),
            layouts_by: if self.probes.uses_cookies() {
                "attach_cookie"
            } else {
                "pid"
            },
            identity: p.labels.clone(),
        });
        self.pipe.emit(&traced);
        // A model mapped already was loaded (or is loading) before the probes were live: its
        // load is not seen, so its label is read now, before its first requests are counted
        // under an empty one. Otherwise the load probe names it, or a later check does.
        if running_before || model_mapped(pid) {
            self.pipe.recover_model(pid);
        } else {
            self.model_checks
                .push((Instant::now() + MODEL_CHECK_AFTER, pid));
        }
    }

    /// A process is gone (or runs another program now).
    fn release(&mut self, pid: u32, why: &str) {
        self.ignored.remove(&pid);
        self.exec_at.remove(&pid);
        if let Some(p) = self.host.release(pid, &mut self.probes) {
            match self.pipe.forget(pid) {
                Some(end)
                    if matches!(end.status, Some(ExitStatus::Killed { .. }))
                        || !end.interrupted.is_empty() =>
                {
                    tracing::warn!(pid, exe = %p.identity.exe, "released: the process {end}")
                }
                Some(end) => {
                    tracing::info!(pid, exe = %p.identity.exe, "released: the process {end}")
                }
                None => tracing::info!(pid, exe = %p.identity.exe, "released: {why}"),
            }
            self.released.insert(pid, Instant::now());
        }
    }

    /// The processes whose main thread ended that have no other thread left (the kernel lists
    /// a thread until its end was traced): taken from [`Daemon::ending`].
    fn ended_processes(&mut self) -> Vec<u32> {
        let (done, still): (Vec<u32>, Vec<u32>) = std::mem::take(&mut self.ending)
            .into_iter()
            .partition(|&pid| Host::threads_left(pid) == 0);
        self.ending = still;
        done
    }

    /// Looks at every process of the host.
    fn scan(&mut self, first: bool) {
        let t0 = Instant::now();
        let pids = Host::all_pids();
        for &pid in &pids {
            if !self.ignored.contains(&pid) {
                self.look(pid, first || !self.host.processes.contains_key(&pid));
            }
        }
        let live: HashSet<u32> = pids.into_iter().collect();
        let (traced_gone, others_gone) = self.host.vanished(&live);
        // Released at the next drain, after the events it sent before it exited (still in the
        // ring buffer now) are read.
        self.vanished.extend(traced_gone);
        for pid in others_gone {
            self.host.forget_other(pid);
            self.ignored.remove(&pid);
        }
        self.metrics.discovery.observe(t0.elapsed().as_secs_f64());
    }

    /// About once a second.
    fn tick(&mut self) {
        // Long enough for any event a released process sent before it went.
        self.released
            .retain(|_, at| at.elapsed() < Duration::from_secs(RELEASED_KEPT_SECS));
        (self.pipe.stats.lost_ringbuf, self.pipe.stats.lost_entry) = self.probes.lost();
        self.pipe.stats.probes_attached = self.probes.attached();
        self.metrics
            .files_probed
            .set(self.host.files_probed() as i64);
        let refused = self.host.refused.saturating_sub(self.metrics.refused.get());
        self.metrics.refused.inc_by(refused);
        let now = Instant::now();
        let due: Vec<u32> = self
            .model_checks
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, pid)| *pid)
            .collect();
        self.model_checks.retain(|(at, _)| *at > now);
        for pid in due {
            if self.host.processes.contains_key(&pid) && self.pipe.assembler.model(pid).is_empty() {
                self.pipe.recover_model(pid);
            }
        }
        let pids = self.host.pids();
        self.pipe.tick(&pids, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_backs_off_when_idle_and_is_fast_again_when_events_come() {
        let mut pace = DrainPace::new();
        let idle: Vec<u64> = (0..6)
            .map(|_| pace.next(false).as_millis() as u64)
            .collect();
        assert_eq!(idle, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(pace.next(true), DrainPace::FAST);
        assert_eq!(pace.next(false), Duration::from_millis(100));
    }
}
