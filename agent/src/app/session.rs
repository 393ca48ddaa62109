//! A profiling session: plan → attach → event loop (ring buffer → decoder → assembler → sinks)
//! → detach and final summary.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use super::{
    cli::{MetricsAddr, ProfileOpts, SyncMode},
    launch::Held,
};
use crate::{
    assemble::{requests::Requests, Assembler},
    attach::Probes,
    catalog::{self as targets, Family},
    decode as events, discover,
    model::{Mode, Observation},
    resolve::Plan,
    sinks::{
        self, events_out::EventsOut, prometheus::resources::ResourceSampler, summary::Stats,
        terminal::Terminal, trace_file::TraceFile, SelfStats, Sink,
    },
    sources as resources,
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

/// Prints the plan header to stderr.
fn announce(
    pid: u32,
    name: &str,
    plan: &Plan,
    attached: u64,
    opts: &ProfileOpts,
    gpu_status: &str,
) {
    eprintln!(
        "llamaprobe: pid {pid} ({name}): {} — {} probes attached",
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
    if let MetricsAddr::On(addr) = opts.metrics_addr {
        eprintln!("llamaprobe: Prometheus metrics at http://{addr}/metrics");
    }
}

/// How requests are reconstructed: by llama-server's task ids if its queue and slot launches
/// are probed, by timing with the queue alone, else from the batches.
fn request_mode(plan: &Plan) -> Mode {
    match (
        plan.probes_entry(targets::TASK_POST),
        plan.probes_entry(targets::SLOT_LAUNCH),
    ) {
        (true, true) => Mode::ServerTasks,
        (true, false) => Mode::ServerQueue,
        _ => Mode::BatchView,
    }
}

/// Whether llama_synchronize is probed (see `--sync`).
fn sync_probed(plan: &Plan, opts: &ProfileOpts) -> bool {
    match (opts.no_sync, opts.sync) {
        (true, _) | (_, SyncMode::Off) => false,
        (_, SyncMode::On) => true,
        (_, SyncMode::Auto) => plan.gpu_backend.is_some(),
    }
}

/// How often the ring buffer is drained when the probes did not wake the agent.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Runs a session to its end; returns the process exit code for llamaprobe.
pub fn run(target: Target, plan: Plan, opts: ProfileOpts) -> anyhow::Result<i32> {
    let pid = target.pid();
    let mut probes = Probes::load()?;
    probes.set_layout(pid, &plan.process_layout())?;
    let skip: &[Family] = if sync_probed(&plan, &opts) {
        &[]
    } else {
        &[Family::Synchronize]
    };
    probes.attach(&plan.probes, Some(pid), skip)?;
    let ring = probes.ring_buffer()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(event_loop(target, plan, opts, probes, ring))
}

async fn event_loop(
    mut target: Target,
    plan: Plan,
    opts: ProfileOpts,
    probes: Probes,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> anyhow::Result<i32> {
    // Created once, first: a signal that arrives while no listener exists is lost (or, before
    // any, ends llamaprobe without its summary), so they exist before 'probes attached' is
    // announced and are never re-created between turns of the loop.
    let mut sigint = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let pid = target.pid();
    let metrics = sinks::prometheus::Metrics::new();
    let resources = ResourceSampler::new(&metrics.registry, opts.nvml_lib.clone());
    if let MetricsAddr::On(addr) = opts.metrics_addr {
        let listener = sinks::prometheus::bind(addr).await?;
        tokio::spawn(sinks::prometheus::serve(listener, metrics.registry.clone()));
    }
    // The optional file sinks.
    let mut files: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(p) = &opts.events_out {
        files.push(Box::new(EventsOut::create(p)?));
    }
    if let Some(p) = &opts.trace_out {
        files.push(Box::new(TraceFile::create(p)?));
    }
    if let Some(otlp) = sinks::otlp::Settings::resolve(&opts)? {
        let interval = Duration::from_secs_f64(opts.interval.max(1.0));
        files.push(Box::new(sinks::otlp::Otlp::start(
            otlp,
            &metrics.registry,
            interval,
            resources.gpu_feed(),
        )?));
    }
    let mut terminal = Terminal::new(
        format!("llamaprobe — pid {pid} ({})", target.name()),
        Duration::from_secs_f64(opts.interval.max(0.1)),
        opts.quiet,
    );
    let mut pipe = Pipeline {
        requests: Requests::new(request_mode(&plan)),
        assembler: Assembler::new(),
        stats: Stats::default(),
        metrics,
        files,
        resources,
    };
    pipe.stats.set_request_mode(request_mode(&plan));
    if let Target::Pid(_) = target {
        // Attached after the load: the model is found in the process.
        match resources::recover_model(pid) {
            Ok(Some((found, info))) => {
                let label = found.label();
                pipe.assembler.set_model(pid, &label);
                pipe.resources.set_model(pid, &label, &info);
                pipe.stats.note(format!(
                    "model: recovered from the process ({:?}; loaded before llamaprobe attached): {}",
                    found.source,
                    describe_model(&info)
                ));
            }
            Ok(None) => pipe.stats.note(
                "model: not seen (loaded before llamaprobe attached) and not found in the process"
                    .into(),
            ),
            Err(e) => pipe.stats.note(format!(
                "model: not seen (loaded before llamaprobe attached); recovery failed: {e}"
            )),
        }
    }
    let mut self_stats = SelfStats {
        probes_attached: probes.attached(),
        ..Default::default()
    };

    announce(
        pid,
        &target.name(),
        &plan,
        probes.attached(),
        &opts,
        pipe.resources.gpu_status(),
    );
    let exit_fd = pidfd_open(pid).map(|fd| {
        // SAFETY: the fd is owned by the AsyncFd and stays open until it is dropped.
        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
    });
    if let Target::Launched(h) = &mut target {
        h.release();
    }
    let exit_fd = match exit_fd {
        Ok(Ok(fd)) => Some(fd),
        _ => None,
    };
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
    let exited = async {
        match &exit_fd {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !discover::process_exists(pid) {
                    break;
                }
            },
        }
    };
    tokio::pin!(exited);
    let launched = matches!(target, Target::Launched(_));
    let mut interrupted = false;

    let ended_by = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer")?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    pipe.handle(&item, &mut self_stats);
                }
                guard.clear_ready();
            }
            _ = drain.tick() => {
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    pipe.handle(&item, &mut self_stats);
                }
            }
            _ = ticker.tick() => {
                (self_stats.lost_ringbuf, self_stats.lost_entry) = probes.lost();
                pipe.expire_requests(&mut self_stats);
                pipe.sample_resources(pid);
                pipe.metrics.tick(&self_stats);
                for f in pipe.files.iter_mut() { f.tick(&self_stats); }
                if let Some(t) = terminal.as_mut() { t.tick(&pipe.stats.summary(), &self_stats); }
            }
            _ = &mut exited => break "the process exited",
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
            pipe.handle(&item, &mut self_stats);
        }
    }
    (self_stats.lost_ringbuf, self_stats.lost_entry) = probes.lost();
    drop(probes); // detaches every probe
    pipe.finish_requests();
    self_stats.unserved = pipe.requests.unserved;
    self_stats.requests_active = 0;
    self_stats.probes_attached = 0;
    pipe.metrics.finish(&self_stats)?;
    for f in pipe.files.iter_mut() {
        f.finish(&self_stats)?;
    }

    pipe.stats.set_unserved(pipe.requests.unserved);
    let summary = pipe.stats.summary();
    println!(
        "\nllamaprobe summary — pid {pid} — {} — {ended_by}\n{}events lost: {} (ring buffer full {}, entry map full {}), undecodable {}",
        plan.generation.describe(),
        summary.render(),
        self_stats.lost_ringbuf + self_stats.lost_entry,
        self_stats.lost_ringbuf,
        self_stats.lost_entry,
        self_stats.undecodable
    );
    if let Some(path) = &opts.summary_json {
        let mut v = serde_json::to_value(&summary)?;
        v["pid"] = pid.into();
        v["generation"] = serde_json::to_value(plan.generation)?;
        v["ended_by"] = ended_by.into();
        v["events_lost"] = (self_stats.lost_ringbuf + self_stats.lost_entry).into();
        v["undecodable"] = self_stats.undecodable.into();
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing --summary-json {}", path.display()))?;
    }
    Ok(match &target {
        Target::Launched(h) => {
            if ended_by != "the process exited" {
                eprintln!("llamaprobe: stopping the program ({ended_by})");
                h.terminate();
            }
            h.wait()
        }
        Target::Pid(_) => 0,
    })
}

/// The one-way path of an event: decoder → assembler → requests → stats and sinks.
struct Pipeline {
    assembler: Assembler,
    requests: Requests,
    stats: Stats,
    metrics: sinks::prometheus::Metrics,
    files: Vec<Box<dyn Sink>>,
    resources: ResourceSampler,
}

impl Pipeline {
    /// GPU, process and model resources; called about once a second.
    fn sample_resources(&mut self, pid: u32) {
        let assembler = &self.assembler;
        self.resources
            .sample(&[pid], |p| assembler.model(p).to_string());
    }

    /// Reads the metadata of a model the process loaded.
    fn model_loaded(&mut self, obs: &Observation) {
        let Observation::ModelLoad(m) = obs else {
            return;
        };
        let (true, Some(path)) = (m.ok, m.path.as_deref()) else {
            return;
        };
        match resources::model_from_load(m.origin.pid, std::path::Path::new(path)) {
            Ok(info) => {
                self.resources
                    .set_model(m.origin.pid, &m.origin.model, &info);
                self.stats.note(format!(
                    "model: observed at load: {}",
                    describe_model(&info)
                ));
            }
            Err(e) => tracing::info!("pid {}: {e}", m.origin.pid),
        }
    }

    fn emit(&mut self, obs: &Observation) {
        self.stats.observe(obs);
        self.metrics.observe(obs);
        for f in self.files.iter_mut() {
            f.observe(obs);
        }
    }

    /// Closes silent requests; called about once a second.
    fn expire_requests(&mut self, self_stats: &mut SelfStats) {
        for r in self.requests.expire(monotonic_ns()) {
            self.emit(&Observation::Request(r));
        }
        self_stats.requests_active = self.requests.active() as u64;
        self_stats.unserved = self.requests.unserved;
        self_stats.tasks_waiting = self.requests.tasks_waiting() as u64;
    }

    /// Closes every request (end of the session).
    fn finish_requests(&mut self) {
        for r in self.requests.finish() {
            self.emit(&Observation::Request(r));
        }
    }

    fn handle(&mut self, bytes: &[u8], self_stats: &mut SelfStats) {
        match events::decode(bytes) {
            Ok(ev) => {
                let obs = self.assembler.process(&ev);
                let made = self.requests.observe(&obs);
                self.model_loaded(&obs);
                self.emit(&obs);
                for o in &made {
                    self.emit(o);
                }
            }
            Err(e) => {
                if self_stats.undecodable == 0 {
                    tracing::warn!("undecodable event (agent/probe build mismatch?): {e}");
                }
                self_stats.undecodable += 1;
            }
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of the probes' timestamps (bpf_ktime_get_ns).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One line about a model file's metadata.
fn describe_model(info: &resources::ModelInfo) -> String {
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
