//! A profiling session: a set of traced processes, the probes attached for them, and the one
//! way their events go: ring buffer → [`decode`](crate::decode) → [`assemble`] (steps, then
//! requests) → every [`Sink`]. About once a second the sinks get a [`Snapshot`] (the agent's
//! counters and the resource readings); at the end, the last one.
//!
//! `attach` and `run` trace one process; the session ends when it exits (or on a signal, or
//! `--duration`). Per-process state (its plan, its name, how it ends) lives in the set and is
//! dropped with it.

use std::{
    collections::HashMap,
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use probe_common::ProcessChange;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use super::{
    cli::{ProfileOpts, SyncMode},
    launch::Held,
};
use crate::{
    assemble::{
        profile::{Attributed, CpuJoin},
        requests::Requests,
        Assembler,
    },
    attach::Probes,
    catalog::{self, Family},
    decode, discover,
    model::{
        clock, CpuSample, ExitStatus, Mode, ModelFacts, ModelInfo, Observation, ProcessEnd,
        ProcessIdentity, ProcessReading, Request, TracedProcess,
    },
    resolve::{symbolize::Symbols, Plan},
    sinks::{
        events_out::EventsOut,
        otlp,
        profile::ProfileFiles,
        prometheus::{self, MetricsAddr},
        summary::SummarySink,
        trace_file::TraceFile,
        SelfStats, Sink, Snapshot,
    },
    sources,
};

/// What to profile.
pub enum Target {
    /// A running process.
    Pid(u32),
    /// A program started by us, held before exec.
    Launched(Held),
}

impl Target {
    fn pid(&self) -> u32 {
        match self {
            Target::Pid(p) => *p,
            Target::Launched(h) => h.pid,
        }
    }

    /// The program's name, for display (a held child still runs llamaprobe's image).
    fn name(&self) -> String {
        match self {
            Target::Pid(p) => discover::comm(*p),
            Target::Launched(h) => h.name.clone(),
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How requests are reconstructed: by llama-server's task ids if its queue and slot launches
/// are probed, by timing with the queue alone, else from the batches.
pub(super) fn request_mode(plan: &Plan) -> Mode {
    match (
        plan.probes_entry(catalog::TASK_POST) || plan.probes_entry(catalog::TASK_POST_ONE),
        plan.probes_entry(catalog::SLOT_LAUNCH),
    ) {
        (true, true) => Mode::ServerTasks,
        (true, false) => Mode::ServerQueue,
        _ => Mode::BatchView,
    }
}

/// What the assembler and the request reconstruction need to know of a process's llama-server
/// era: its task types, and whether its slot release is probed (2024 builds inline it: their
/// requests then end by silence).
pub(super) fn server_era(pipe: &mut Pipeline, pid: u32, plan: &Plan) {
    pipe.assembler.set_server_era(pid, plan.server_layout);
    if request_mode(plan) != Mode::BatchView && !plan.probes_entry(catalog::SLOT_RELEASE) {
        pipe.requests.without_release(pid);
    }
}

/// Whether llama_synchronize is probed (see `--sync`).
pub(super) fn sync_probed(plan: &Plan, opts: &ProfileOpts) -> bool {
    sync_wanted(
        plan,
        if opts.no_sync {
            SyncMode::Off
        } else {
            opts.sync
        },
    )
}

/// Whether llama_synchronize is probed with `--sync mode`.
pub(super) fn sync_wanted(plan: &Plan, mode: SyncMode) -> bool {
    match mode {
        SyncMode::Off => false,
        SyncMode::On => true,
        SyncMode::Auto => plan.gpu_backend.is_some(),
    }
}

/// Prints what is traced and how, to stderr.
fn announce(t: &Traced, attached: u64, opts: &ProfileOpts, gpu_status: &str) {
    let plan = &t.plan;
    eprintln!(
        "llamaprobe: pid {} ({}): {} — {} probes attached",
        t.pid,
        t.name,
        plan.generation.describe(),
        attached
    );
    for family in plan.unmeasured_families() {
        if family == Family::Server {
            continue; // said by the requests line below
        }
        eprintln!(
            "llamaprobe: {} is not measured: none of its functions was found ({})",
            family.name(),
            plan.missing
                .iter()
                .filter(|m| m.family == family)
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!("llamaprobe: requests: {}", request_mode(plan).describe());
    if request_mode(plan) != Mode::BatchView && !plan.probes_entry(catalog::SLOT_RELEASE) {
        eprintln!(
            "llamaprobe: server_slot::release not found (inlined in this build): a request ends after 2 s without tokens, or at its slot's next request"
        );
    }
    eprintln!("llamaprobe: {gpu_status}");
    eprintln!(
        "llamaprobe: llama_synchronize {}",
        match (sync_probed(plan, opts), &plan.gpu_backend) {
            (true, Some(b)) => format!("probed (GPU backend {b}): compute time measured"),
            (true, None) => "probed (--sync on)".to_string(),
            (false, Some(_)) => "not probed (--sync off)".to_string(),
            (false, None) =>
                "not probed: no GPU backend, decode steps are synchronous (--sync on to probe it)"
                    .to_string(),
        }
    );
    if let MetricsAddr::On(addr) = opts.prometheus.addr() {
        eprintln!(
            "llamaprobe: Prometheus metrics at {}{}",
            opts.prometheus.url(addr, "/metrics"),
            web_config_line(&opts.prometheus)
        );
    }
}

/// What the web configuration makes of the endpoint, for the line that gives its address.
pub(super) fn web_config_line(opts: &prometheus::Options) -> String {
    opts.web_config.as_ref().map_or_else(String::new, |w| {
        format!(" ({}: {})", w.path().display(), w.current().describe())
    })
}

/// The programs of the sampler chain's apply (the fallback for programs that sample
/// themselves), in the order they are detached (a call caught between the two is paired by its
/// stack depth: see probe-ebpf's `enter`).
pub(super) const SAMPLE_APPLY_PROGRAMS: [&str; 2] = ["sample_apply_return", "sample_apply"];

/// How often the ring buffer is drained when the probes did not wake the agent.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// One traced process.
struct Traced {
    pid: u32,
    name: String,
    target: Target,
    plan: Plan,
}

/// Runs a session on one target to its end; returns the process exit code for llamaprobe.
pub fn run(target: Target, plan: Plan, opts: ProfileOpts) -> anyhow::Result<i32> {
    let hz = opts.cpu_profile.profile_cpu;
    let mut probes = Probes::load(hz.is_some())?;
    let traced = Traced {
        pid: target.pid(),
        name: target.name(),
        target,
        plan,
    };
    let skip: &[Family] = if sync_probed(&traced.plan, &opts) {
        &[]
    } else {
        &[Family::Synchronize]
    };
    let layout = traced.plan.process_layout();
    probes.attach(&traced.plan.probes, Some(traced.pid), &layout, skip)?;
    // How the process ends (its exit status, the calls it was inside), and its threads' entries
    // released when they end: never worth failing the session for.
    match probes
        .watch(traced.pid)
        .and_then(|()| probes.attach_exit_probe())
    {
        Ok(how) => tracing::debug!("{how}"),
        Err(e) => tracing::warn!("how the process ends will not be known: {e}"),
    }
    if let Some(hz) = hz {
        probes.profile(traced.pid)?;
        let cpus = probes.attach_cpu_sampler(hz)?;
        tracing::info!("CPU profile: {hz} Hz on {cpus} CPUs");
    }
    let ring = probes.ring_buffer()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(event_loop(traced, opts, probes, ring))
}

/// The sinks of a session's options, the summary last (it prints at the end, after the others
/// have flushed; the host agent has none: its processes come and go), and the registry the
/// Prometheus sink serves (with the host agent's health, where given).
pub(super) async fn sinks(
    opts: &ProfileOpts,
    metrics_addr: MetricsAddr,
    health: Option<Arc<prometheus::Health>>,
    summary: bool,
) -> anyhow::Result<(Vec<Box<dyn Sink>>, ::prometheus::Registry)> {
    let metrics = prometheus::Metrics::new()
        .series_grace(opts.prometheus.series_grace)
        .cpu_top(opts.cpu_profile.profile_top);
    if let MetricsAddr::On(addr) = metrics_addr {
        let listener = prometheus::bind(addr).await?;
        tokio::spawn(prometheus::serve(
            listener,
            metrics.exposition(health),
            opts.prometheus.web_config.clone(),
        ));
    }
    let registry = metrics.registry.clone();
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(metrics)];
    if let Some(p) = &opts.events_out.events_out {
        sinks.push(Box::new(EventsOut::create(p)?));
    }
    if let Some(p) = &opts.trace_file.trace_out {
        sinks.push(Box::new(TraceFile::create(p)?));
    }
    if let Some(settings) = otlp::Settings::resolve(&opts.otlp)? {
        let interval = Duration::from_secs_f64(opts.summary.interval.max(1.0));
        sinks.push(Box::new(otlp::Otlp::start(settings, &registry, interval)?));
    }
    if let Some(files) = ProfileFiles::new(&opts.cpu_profile) {
        sinks.push(Box::new(files));
    }
    if summary {
        sinks.push(Box::new(SummarySink::new(
            opts.summary.clone(),
            &opts.cpu_profile,
        )));
    }
    Ok((sinks, registry))
}

async fn event_loop(
    traced: Traced,
    opts: ProfileOpts,
    mut probes: Probes,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> anyhow::Result<i32> {
    // Created once, first: a signal that arrives while no listener exists is lost (or, before
    // any, ends llamaprobe without its summary), so they exist before 'probes attached' is
    // announced and are never re-created between turns of the loop.
    let mut sigint = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mode = request_mode(&traced.plan);
    let (sinks, _) = sinks(&opts, opts.prometheus.addr(), None, true).await?;
    let mut pipe = Pipeline::new(Requests::new(mode), &opts, sinks);
    pipe.stats.probes_attached = probes.attached();
    let mut session = Session::default();
    let (exit_tx, mut exits) = mpsc::unbounded_channel::<u32>();
    announce(&traced, probes.attached(), &opts, pipe.gpu_status());
    pipe.emit(&Observation::Traced(TracedProcess {
        pid: traced.pid,
        name: traced.name.clone(),
        generation: traced.plan.generation,
        request_mode: mode,
        probes_attached: probes.attached(),
        layouts_by: if probes.uses_cookies() {
            "attach_cookie"
        } else {
            "pid"
        },
        // The ad-hoc modes label series by pid and model only (the host agent adds who).
        identity: ProcessIdentity {
            labels: Vec::new(),
            service_name: traced.name.clone(),
        },
    }));
    server_era(&mut pipe, traced.pid, &traced.plan);
    if let Target::Pid(pid) = traced.target {
        // Attached after the load: the model is found in the process.
        pipe.recover_model(pid);
    }
    let pid = traced.pid;
    let mut apply_fallback = traced.plan.probes_entry(SAMPLE_APPLY_PROGRAMS[1]);
    session.add(traced, exit_tx);
    let launched = session.launched();

    // SAFETY: the ring buffer's fd is owned by the AsyncFd and stays open until it is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    // The probes wake the agent only once a batch of events has piled up (see
    // probe-ebpf/src/probes/mod.rs); the rest is drained on this timer.
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    let deadline = async {
        match opts.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut interrupted = false;

    let ended_by = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer")?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    pipe.handle(&item);
                }
                guard.clear_ready();
            }
            _ = drain.tick() => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    pipe.handle(&item);
                }
                if apply_fallback && pipe.assembler.samples_by_function(pid) {
                    // Its tokens come from a sampling function: the applies would only cost
                    // the traced process traps per token.
                    let n = probes.detach_programs(&SAMPLE_APPLY_PROGRAMS);
                    tracing::info!("pid {pid}: sampling seen through a sampling function; {n} sampler-chain probes detached");
                    pipe.stats.probes_attached = probes.attached();
                    apply_fallback = false;
                }
            }
            _ = ticker.tick() => {
                (pipe.stats.lost_ringbuf, pipe.stats.lost_entry) = probes.lost();
                pipe.tick(&session.pids(), None);
            }
            Some(pid) = exits.recv() => {
                // Its exit probe's report, and the last events it sent, are in the ring buffer.
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    pipe.handle(&item);
                }
                session.exited(pid);
                if session.is_empty() {
                    break "the process exited";
                }
                let _ = pipe.forget(pid);
            }
            _ = &mut deadline => break "--duration elapsed",
            _ = sigterm.recv() => break "terminated",
            _ = sigint.recv() => {
                if launched && !interrupted {
                    // The program got the same SIGINT: let it shut down and report its end.
                    interrupted = true;
                    eprintln!("llamaprobe: interrupted; waiting for the program to exit (Ctrl-C again to stop now)");
                    continue;
                }
                break "interrupted";
            }
        }
    };
    // Events still in the ring buffer belong to the run.
    {
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            pipe.handle(&item);
        }
    }
    (pipe.stats.lost_ringbuf, pipe.stats.lost_entry) = probes.lost();
    // The outputs first: detaching takes the kernel about 0.1 s a probe (see
    // `Probes::detach_all`), and events after the last drain are not read anyway.
    let finished = pipe.finish(&session.pids(), ended_by);
    if probes.attached() > 0 {
        eprintln!(
            "llamaprobe: detaching {} probes (the kernel removes them one at a time)",
            probes.attached()
        );
    }
    probes.detach_all();
    finished?;
    Ok(session.end(ended_by))
}

/// The traced processes, by pid.
#[derive(Default)]
struct Session {
    processes: HashMap<u32, Traced>,
    /// Exited, kept until the end for their exit code (a program `run` started).
    ended: Vec<Traced>,
}

impl Session {
    /// Starts following `t`: its exit is sent on `exits`. A held program is released here,
    /// once its exit can be seen.
    fn add(&mut self, mut t: Traced, exits: mpsc::UnboundedSender<u32>) {
        let pid = t.pid;
        let watched = pidfd_open(pid).ok().and_then(|fd| {
            // SAFETY: the fd is owned by the AsyncFd and stays open until it is dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        });
        match watched {
            Some(fd) => {
                tokio::spawn(async move {
                    let _ = fd.readable().await;
                    let _ = exits.send(pid);
                });
            }
            // Without pidfds (kernels before 5.3): look every 250 ms.
            None => {
                tokio::spawn(async move {
                    while discover::process_exists(pid) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let _ = exits.send(pid);
                });
            }
        }
        if let Target::Launched(h) = &mut t.target {
            h.release();
        }
        self.processes.insert(pid, t);
    }

    fn exited(&mut self, pid: u32) {
        if let Some(t) = self.processes.remove(&pid) {
            self.ended.push(t);
        }
    }

    fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    fn pids(&self) -> Vec<u32> {
        self.processes.keys().copied().collect()
    }

    /// Whether a program `run` started is traced (it gets Ctrl-C too).
    fn launched(&self) -> bool {
        self.processes
            .values()
            .any(|t| matches!(t.target, Target::Launched(_)))
    }

    /// Ends the session: a started program still running is stopped and waited for; its exit
    /// code is llamaprobe's.
    fn end(self, ended_by: &str) -> i32 {
        let mut code = 0;
        for t in self.processes.values().chain(&self.ended) {
            if let Target::Launched(h) = &t.target {
                if ended_by != "the process exited" {
                    eprintln!("llamaprobe: stopping the program ({ended_by})");
                    h.terminate();
                }
                code = h.wait();
            }
        }
        code
    }
}

/// The one-way path of an event: decoder → assembler → requests → sinks.
pub(super) struct Pipeline {
    pub(super) assembler: Assembler,
    pub(super) requests: Requests,
    sinks: Vec<Box<dyn Sink>>,
    sampler: sources::Sampler,
    pub(super) stats: SelfStats,
    /// How traced processes ended, as their exit probe reported it, until they are released.
    ends: HashMap<u32, ProcessEnd>,
    /// `--profile-cpu`: samples waiting for their decode steps, and those attributed and
    /// waiting to be symbolized (in batches: one look at a process's maps for many samples).
    cpu_join: CpuJoin,
    cpu_ready: Vec<Attributed>,
    symbols: Symbols,
    /// `--profile-cpu`: requests closed since the last tick, held until it so that the samples
    /// of their last step read after they closed (taken on another CPU at the step's very end)
    /// still count on them.
    held: Vec<Request>,
}

/// Attributed samples symbolized at once, at most (else at the next tick).
const CPU_BATCH: usize = 512;

impl Pipeline {
    pub(super) fn new(requests: Requests, opts: &ProfileOpts, sinks: Vec<Box<dyn Sink>>) -> Self {
        Self {
            assembler: Assembler::new(),
            requests: requests
                .keep_steps(opts.otlp.otlp_step_spans)
                .count_cpu(opts.cpu_profile.profile_cpu.is_some()),
            sinks,
            sampler: sources::Sampler::new(opts.nvml_lib.clone()),
            stats: SelfStats::default(),
            ends: HashMap::new(),
            cpu_join: CpuJoin::default(),
            cpu_ready: Vec::new(),
            symbols: Symbols::new(),
            held: Vec::new(),
        }
    }

    /// Attributed CPU samples: symbolized (one lookup per process and batch) and sent on.
    pub(super) fn flush_cpu_samples(&mut self) {
        if self.cpu_ready.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.cpu_ready);
        let mut by_pid: HashMap<u32, Vec<Attributed>> = HashMap::new();
        for a in ready {
            by_pid.entry(a.sample.pid).or_default().push(a);
        }
        let mut pids: Vec<u32> = by_pid.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let batch = by_pid.remove(&pid).unwrap_or_default();
            let stacks: Vec<&[u64]> = batch.iter().map(|a| a.sample.frames.as_slice()).collect();
            let frames = self.symbols.frames(pid, &stacks);
            let model = self.assembler.model(pid);
            for (a, frames) in batch.into_iter().zip(frames) {
                let obs = Observation::CpuSample(CpuSample {
                    pid,
                    tid: a.sample.tid,
                    model: model.clone(),
                    at_ns: a.sample.at_ns,
                    phase: a.phase,
                    step: a.sample.step,
                    seqs: a.seqs,
                    requests: a.requests,
                    in_kernel: a.sample.in_kernel,
                    frames,
                });
                self.emit(&obs);
            }
        }
    }

    /// Attributed samples: those of steps counted on their requests (open, or closed and
    /// held), then queued for symbolizing.
    fn cpu_attributed(&mut self, a: Vec<Attributed>) {
        for a in &a {
            if a.requests.is_empty() {
                continue;
            }
            let closed = self
                .requests
                .cpu_sample(a.sample.pid, a.ctx, &a.seqs, &a.requests);
            for id in closed {
                if let Some(r) = self.held.iter_mut().find(|r| r.id == id) {
                    let n = r.cpu_samples.get_or_insert(0);
                    *n = n.saturating_add(1);
                }
            }
        }
        self.cpu_ready.extend(a);
        if self.cpu_ready.len() >= CPU_BATCH {
            self.flush_cpu_samples();
        }
    }

    /// A request the request stage closed: to the sinks, or, with `--profile-cpu`, held until
    /// the next tick (see [`Pipeline::held`]).
    fn closed(&mut self, r: Request) {
        if self.requests.counts_cpu() {
            self.held.push(r);
        } else {
            self.emit(&Observation::Request(r));
        }
    }

    /// The held requests, to the sinks (those of `pid` only, if given).
    fn release_held(&mut self, pid: Option<u32>) {
        let (go, keep): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|r| pid.is_none_or(|p| p == r.pid));
        self.held = keep;
        for r in go {
            self.emit(&Observation::Request(r));
        }
    }

    pub(super) fn gpu_status(&self) -> &str {
        self.sampler.gpu_status()
    }

    pub(super) fn emit(&mut self, obs: &Observation) {
        for s in self.sinks.iter_mut() {
            s.observe(obs);
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        if let Some(ev) = self.decode(bytes) {
            self.handle_event(ev);
        }
    }

    /// One record decoded (an undecodable one counted, warned of once).
    pub(super) fn decode(&mut self, bytes: &[u8]) -> Option<decode::Event> {
        match decode::decode(bytes) {
            Ok(ev) => Some(ev),
            Err(e) => {
                if self.stats.undecodable == 0 {
                    tracing::warn!("undecodable event (agent/probe build mismatch?): {e}");
                }
                self.stats.undecodable += 1;
                None
            }
        }
    }

    pub(super) fn handle_event(&mut self, ev: decode::Event) {
        if let decode::Event::Process {
            pid,
            change: change @ (ProcessChange::Exit | ProcessChange::ThreadExit),
            calls,
            exit_code,
            ..
        } = ev
        {
            let end = self.ends.entry(pid).or_insert_with(|| ProcessEnd {
                pid,
                ..Default::default()
            });
            if change == ProcessChange::Exit {
                end.status = ExitStatus::from_code(exit_code);
            }
            end.add_interrupted(calls);
            return;
        }
        let ev = match ev {
            decode::Event::CpuSample(s) => {
                self.stats.cpu_samples += 1;
                let a = self.cpu_join.sample(s);
                return self.cpu_attributed(a);
            }
            ev => ev,
        };
        let Some(obs) = self.assembler.process(&ev) else {
            return;
        };
        // The step's requests open before its samples are counted on them.
        let made = self.requests.observe(&obs);
        // Hot path: only a profiling run joins steps to samples.
        if let (Observation::Decode(step), true) = (&obs, self.requests.counts_cpu()) {
            let o = &step.origin;
            let seqs: Vec<i32> = step.parts.iter().map(|p| p.seq_id).collect();
            let ids = self.requests.open_ids(o.pid, step.ctx, &seqs);
            let a = self.cpu_join.step(step, ids);
            self.cpu_attributed(a);
        }
        self.emit(&obs);
        self.model_loaded(&obs);
        for o in made {
            match o {
                Observation::Request(r) => self.closed(r),
                o => self.emit(&o),
            }
        }
    }

    /// A traced process is gone (others are still traced): its requests close, its state goes,
    /// the sinks hear of it, and how it ended (where its exit probe saw it) is returned.
    pub(super) fn forget(&mut self, pid: u32) -> Option<ProcessEnd> {
        let a = self.cpu_join.forget(pid);
        self.cpu_attributed(a);
        self.flush_cpu_samples();
        self.symbols.forget(pid);
        self.release_held(Some(pid));
        for r in self.requests.forget(pid) {
            self.emit(&Observation::Request(r));
        }
        self.assembler.forget(pid);
        let end = self.ends.remove(&pid);
        if let Some(e) = &end {
            self.emit(&Observation::Ended(e.clone()));
        }
        self.emit(&Observation::Released { pid });
        end
    }

    /// The metadata of a model the process loaded, read from its file.
    fn model_loaded(&mut self, obs: &Observation) {
        let Observation::ModelLoad(m) = obs else {
            return;
        };
        let (true, Some(path)) = (m.ok, m.path.as_deref()) else {
            return;
        };
        match sources::model_from_load(m.origin.pid, std::path::Path::new(path)) {
            Ok(info) => self.emit(&Observation::ModelInfo(ModelFacts {
                pid: m.origin.pid,
                label: m.origin.model.clone(),
                fact: format!("model: observed at load: {}", describe_model(&info)),
                info: Some(info),
            })),
            Err(e) => tracing::info!("pid {}: {e}", m.origin.pid),
        }
    }

    /// The model of a process that loaded it before llamaprobe attached.
    pub(super) fn recover_model(&mut self, pid: u32) {
        let (label, fact, info) = match sources::recover_model(pid) {
            Ok(Some((found, info))) => {
                let label = found.label();
                self.assembler.set_model(pid, &label);
                let fact = format!(
                    "model: recovered from the process ({:?}; loaded before llamaprobe attached): {}",
                    found.source,
                    describe_model(&info)
                );
                (label, fact, Some(info))
            }
            Ok(None) => (
                String::new(),
                "model: not seen (loaded before llamaprobe attached) and not found in the process"
                    .into(),
                None,
            ),
            Err(e) => (
                String::new(),
                format!(
                    "model: not seen (loaded before llamaprobe attached); recovery failed: {e}"
                ),
                None,
            ),
        };
        self.emit(&Observation::ModelInfo(ModelFacts {
            pid,
            label: label.into(),
            fact,
            info,
        }));
    }

    /// The state of things now: the agent's counters and one round of readings.
    fn snapshot(&mut self, pids: &[u32], ended_by: Option<&'static str>) -> Snapshot {
        self.stats.requests_active = self.requests.active() as u64;
        self.stats.unserved = self.requests.unserved;
        self.stats.tasks_waiting = self.requests.tasks_waiting() as u64;
        self.stats.warmups = self.requests.warmups;
        let (gpus, processes) = self.sampler.sample(pids);
        let counts = self.requests.counts_by_pid();
        Snapshot {
            stats: self.stats,
            gpus: Arc::new(gpus),
            processes: processes
                .into_iter()
                .map(|(pid, sample)| {
                    let (requests_active, tasks_waiting) =
                        counts.get(&pid).copied().unwrap_or_default();
                    ProcessReading {
                        pid,
                        model: self.assembler.model(pid),
                        sample,
                        requests_active,
                        tasks_waiting,
                    }
                })
                .collect(),
            ended_by,
        }
    }

    /// About once a second: requests silent too long are closed, then every sink ticks.
    pub(super) fn tick(&mut self, pids: &[u32], ended_by: Option<&'static str>) {
        self.flush_cpu_samples();
        self.release_held(None);
        for r in self.requests.expire(clock::monotonic_ns()) {
            self.emit(&Observation::Request(r));
        }
        let now = self.snapshot(pids, ended_by);
        for s in self.sinks.iter_mut() {
            s.tick(&now);
        }
    }

    /// The end: every request closes, every sink finishes with the last snapshot.
    pub(super) fn finish(&mut self, pids: &[u32], ended_by: &'static str) -> anyhow::Result<()> {
        let a = self.cpu_join.finish();
        self.cpu_attributed(a);
        self.flush_cpu_samples();
        self.release_held(None);
        for r in self.requests.finish() {
            self.emit(&Observation::Request(r));
        }
        let mut ends: Vec<ProcessEnd> = std::mem::take(&mut self.ends).into_values().collect();
        ends.sort_by_key(|e| e.pid);
        for e in ends {
            self.emit(&Observation::Ended(e));
        }
        if self.requests.steps_dropped > 0 {
            tracing::info!(
                "{} decode steps not kept for step spans (over {} in one request)",
                self.requests.steps_dropped,
                crate::assemble::requests::MAX_STEPS_PER_REQUEST
            );
        }
        self.stats.probes_attached = 0;
        let mut last = self.snapshot(pids, Some(ended_by));
        last.stats.requests_active = 0;
        for p in &mut last.processes {
            (p.requests_active, p.tasks_waiting) = (0, 0);
        }
        for s in self.sinks.iter_mut() {
            s.finish(&last)?;
        }
        Ok(())
    }
}

/// One line about a model file's metadata.
fn describe_model(info: &ModelInfo) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{} — {}, {} parameters, {}, trained context {}, {} bytes",
        info.path.display(),
        opt(info.architecture.clone()),
        info.parameters,
        opt(info.file_type.map(|f| f.to_string())),
        opt(info.context_length.map(|c| c.to_string())),
        info.size_bytes
    )
}
