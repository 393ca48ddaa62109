//! Loading the eBPF programs into the kernel and attaching them to the planned functions.

use std::{collections::HashMap, path::PathBuf};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
        PerfEvent, ProgramError, TracePoint, UProbe,
    },
    util::{online_cpus, KernelVersion},
    Ebpf, EbpfError, EbpfLoader,
};
use probe_common::{ProcessLayout, LOST_COUNTERS, LOST_ENTRY, LOST_RINGBUF};

use crate::{catalog::Family, resolve::PlannedProbe};

pub mod kernel_btf;

/// The eBPF object built by build.rs.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));

/// Errors of loading and attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "missing privileges to load eBPF programs: run llamaprobe as root (sudo), or give it \
         CAP_SYS_ADMIN (as non-root, uprobes need it on Linux 6.18; CAP_BPF + CAP_PERFMON may \
         do on other kernels), and CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH for other users' processes"
    )]
    Privileges,
    #[error(
        "kernel {release} is too old: llamaprobe needs Linux 5.8 or newer (BPF ring buffer, \
         uprobes); upgrade the kernel"
    )]
    KernelTooOld { release: String },
    #[error("loading the eBPF programs failed")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("eBPF program {program} is missing or failed to load")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach to {symbol} in {path}")]
    Attach {
        symbol: &'static str,
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {0} is missing")]
    Map(&'static str),
    #[error(
        "tracefs is not available at {TRACEFS} and cannot be mounted there ({reason}): the host \
         agent needs the sched tracepoints to see new processes; mount it \
         (`mount -t tracefs nodev {TRACEFS}`) or, in a container, mount the host's /sys/kernel/tracing"
    )]
    Tracefs { reason: String },
    #[error(
        "the host agent is missing {missing}: run it as root, or grant these capabilities (the \
         systemd unit's AmbientCapabilities=, the DaemonSet's securityContext.capabilities.add)"
    )]
    HostAgentCapabilities { missing: String },
    #[error(
        "the kernel refused the uprobes (EACCES): as a non-root user this kernel needs \
         CAP_SYS_ADMIN for them (CAP_BPF and CAP_PERFMON are not enough); grant it, or run as root"
    )]
    UprobesNeedSysAdmin,
    #[error(
        "process {pid} belongs to uid {uid}: reading its maps and files needs CAP_SYS_PTRACE \
         (or run llamaprobe as that user, or as root)"
    )]
    NeedsPtrace { pid: u32, uid: u32 },
    #[error("cannot open the cpu-clock perf event on CPU {cpu} for --profile-cpu: {reason}")]
    PerfEvent { cpu: u32, reason: String },
    #[error("cannot attach to the tracepoint sched/{name}")]
    TracePoint {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
}

impl AttachError {
    /// A short reason, for `llamaprobe_attach_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AttachError::Privileges
            | AttachError::HostAgentCapabilities { .. }
            | AttachError::UprobesNeedSysAdmin
            | AttachError::NeedsPtrace { .. } => "privileges",
            AttachError::KernelTooOld { .. } => "kernel",
            AttachError::Load { .. } | AttachError::Program { .. } => "program",
            AttachError::Attach { .. } => "uprobe",
            AttachError::Map(_) => "map",
            AttachError::Tracefs { .. } | AttachError::TracePoint { .. } => "tracepoint",
            AttachError::PerfEvent { .. } => "perf_event",
        }
    }
}

/// Where tracefs is expected (the sched tracepoints' ids are read from it).
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Makes sure tracefs is mounted (at [`TRACEFS`], or the older debugfs place); mounts it if
/// not. Returns what was done, for the log.
pub fn ensure_tracefs() -> Result<&'static str, AttachError> {
    let has_events = |p: &str| std::path::Path::new(p).join("events/sched").is_dir();
    if has_events(TRACEFS) || has_events("/sys/kernel/debug/tracing") {
        return Ok("tracefs mounted");
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dir, fstype) = (c("nodev"), c(TRACEFS), c("tracefs"));
    // SAFETY: valid C strings; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(AttachError::Tracefs {
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    if !has_events(TRACEFS) {
        return Err(AttachError::Tracefs {
            reason: "mounted, but it has no sched events".into(),
        });
    }
    Ok("tracefs mounted by llamaprobe")
}

/// What the exit tracepoint reports of a traced thread's end ([`Probes::attach_exit_probe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitProbe {
    /// The end and its exit status (read from the task at the offset the kernel's BTF gives).
    WithStatus,
    /// The end only: the kernel's BTF did not say where the status is (the reason).
    WithoutStatus(String),
}

impl std::fmt::Display for ExitProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitProbe::WithStatus => f.write_str("exit tracepoint (with exit statuses)"),
            ExitProbe::WithoutStatus(why) => {
                write!(f, "exit tracepoint (exit statuses not known: {why})")
            }
        }
    }
}

/// Checks the kernel version and the process's privileges before touching the kernel.
pub fn preflight() -> Result<(), AttachError> {
    kernel_check()?;
    if !has_bpf_privileges() {
        return Err(AttachError::Privileges);
    }
    Ok(())
}

/// Linux 5.8 or newer.
fn kernel_check() -> Result<(), AttachError> {
    if let Ok(v) = aya::util::KernelVersion::current() {
        if v < aya::util::KernelVersion::new(5, 8, 0) {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| format!("{v:?}"));
            return Err(AttachError::KernelTooOld { release });
        }
    }
    Ok(())
}

/// What the host agent needs on top of loading eBPF, measured on Linux 6.18 (see
/// deploy/systemd): uprobes as a non-root user need CAP_SYS_ADMIN (which covers CAP_BPF and
/// CAP_PERFMON there), and every process's files are read through /proc/PID/map_files.
const HOST_AGENT_CAPS: [(caps::Capability, &str); 3] = [
    (
        caps::Capability::CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN (uprobes and tracepoints, /proc/PID/map_files, mounting tracefs)",
    ),
    (
        caps::Capability::CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE (other users' /proc/PID/maps and map_files: without it nothing is traced)",
    ),
    (
        caps::Capability::CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH (tracefs and other users' files)",
    ),
];

/// The host agent's check before it starts: each capability it needs is in the effective set
/// (a daemon that started without one would trace nothing, silently).
pub fn host_agent_preflight() -> Result<(), AttachError> {
    kernel_check()?;
    let missing: Vec<&str> = HOST_AGENT_CAPS
        .iter()
        .filter(|(c, _)| !caps::has_cap(None, caps::CapSet::Effective, *c).unwrap_or(false))
        .map(|(_, what)| *what)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(AttachError::HostAgentCapabilities {
            missing: missing.join(", "),
        })
    }
}

/// Root, or CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON in the effective set.
fn has_bpf_privileges() -> bool {
    use caps::{CapSet, Capability};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
}

/// Whether the effective set holds `c`.
fn has(c: caps::Capability) -> bool {
    caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false)
}

/// `attach --pid`: another user's process can be read only with CAP_SYS_PTRACE (without it its
/// files would look missing, and the process not llama.cpp).
pub fn check_process_access(pid: u32) -> Result<(), AttachError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(format!("/proc/{pid}")) else {
        return Ok(()); // not there: discovery says so
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me != 0 && meta.uid() != me && !has(caps::Capability::CAP_SYS_PTRACE) {
        return Err(AttachError::NeedsPtrace {
            pid,
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Whether the error chain holds the OS error `errno`.
fn is_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Program `program` of the object, as the type it is declared with.
fn typed<'a, T>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(AttachError::Program {
            program,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| AttachError::Program { program, source })
}

/// A failed load of `program`: missing privileges where the kernel said EPERM.
fn load_error(program: &'static str) -> impl FnOnce(ProgramError) -> AttachError {
    move |source| {
        if is_eperm(&source) {
            AttachError::Privileges
        } else {
            AttachError::Program { program, source }
        }
    }
}

/// An EPERM from the kernel means missing privileges (the verifier rejects programs with
/// EACCES, which is not a privilege problem).
fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    is_errno(e, libc::EPERM)
}

/// Kernels with attach cookies on uprobes (`bpf_get_attach_cookie` in uprobe programs).
const COOKIES_SINCE: (u8, u8) = (5, 15);

/// Set to make the agent behave as on a kernel without attach cookies (the pid-keyed layouts
/// of kernels before 5.15), to test that path on newer kernels.
pub const NO_COOKIES_ENV: &str = "LLAMAPROBE_NO_COOKIES";

/// The loaded programs and their links.
pub struct Probes {
    ebpf: Ebpf,
    loaded: HashMap<&'static str, ()>,
    attached: u64,
    /// The probes find their process's layout by attach cookie (else by pid).
    cookies: bool,
    /// Where `task_struct.exit_code` is (the kernel's BTF), or why it is not known.
    exit_code_offset: Result<u32, String>,
    /// The layouts written into `LAYOUT_TABLE`, by id.
    layouts: Vec<ProcessLayout>,
    /// Every link, with its program's name (for detaching a family's fallback) and its group
    /// (the file it was attached for, in the host agent; 0 otherwise).
    links: Vec<(&'static str, UProbeLinkId, u64)>,
    /// Where detached links go to be closed (see `detach_links`), and how many are pending.
    reaper: Option<std::sync::mpsc::Sender<Vec<UProbeLink>>>,
    reaping: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Probes {
    /// Loads the eBPF object (maps and programs are created; nothing is attached yet).
    ///
    /// `profile_cpu`: the decode probes also mark each process's step in progress, for the
    /// CPU sampler ([`attach_cpu_sampler`](Self::attach_cpu_sampler)).
    pub fn load(profile_cpu: bool) -> Result<Self, AttachError> {
        preflight()?;
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let cookies = std::env::var_os(NO_COOKIES_ENV).is_none()
            && KernelVersion::current()
                .is_ok_and(|v| v >= KernelVersion::new(COOKIES_SINCE.0, COOKIES_SINCE.1, 0));
        // 0: the exit tracepoint reads no status.
        let exit_code_offset = kernel_btf::task_exit_code_offset();
        let ebpf = EbpfLoader::new()
            .override_global("USE_COOKIES", &u32::from(cookies), true)
            .override_global("PROFILE_CPU", &u32::from(profile_cpu), true)
            .override_global(
                "TASK_EXIT_CODE_OFFSET",
                &exit_code_offset.clone().unwrap_or(0),
                true,
            )
            .load(EBPF_OBJECT)
            .map_err(|source| {
                tracing::debug!("Ebpf::load: {source:?}");
                if is_eperm(&source) {
                    AttachError::Privileges
                } else {
                    AttachError::Load { source }
                }
            })?;
        Ok(Self {
            ebpf,
            loaded: HashMap::new(),
            attached: 0,
            cookies,
            exit_code_offset,
            layouts: Vec::new(),
            links: Vec::new(),
            reaper: None,
            reaping: Default::default(),
        })
    }

    fn program(&mut self, name: &'static str) -> Result<&mut UProbe, AttachError> {
        let first = !self.loaded.contains_key(name);
        let prog: &mut UProbe = typed(&mut self.ebpf, name)?;
        if first {
            prog.load().map_err(load_error(name))?;
            self.loaded.insert(name, ());
        }
        Ok(prog)
    }

    /// Attaches the entry and return programs of each planned probe, for process `pid`
    /// (`None`: every process that maps the file), whose structs have `layout`: with attach
    /// cookies, each link names the layout (one program then serves every process and
    /// version); without, the layout is registered under the pid.
    pub fn attach(
        &mut self,
        probes: &[PlannedProbe],
        pid: Option<u32>,
        layout: &ProcessLayout,
        skip: &[Family],
    ) -> Result<(), AttachError> {
        self.attach_group(0, probes, pid, layout, skip)
    }

    /// [`Probes::attach`], the links kept under `group` for [`Probes::detach_group`]. On an
    /// error, the links this call made are removed again (nothing half-attached stays).
    pub fn attach_group(
        &mut self,
        group: u64,
        probes: &[PlannedProbe],
        pid: Option<u32>,
        layout: &ProcessLayout,
        skip: &[Family],
    ) -> Result<(), AttachError> {
        let before = self.links.len();
        let r = self.attach_links(group, probes, pid, layout, skip);
        if r.is_err() {
            let made: Vec<_> = self.links.drain(before..).collect();
            self.detach_links(made);
        }
        r
    }

    fn attach_links(
        &mut self,
        group: u64,
        probes: &[PlannedProbe],
        pid: Option<u32>,
        layout: &ProcessLayout,
        skip: &[Family],
    ) -> Result<(), AttachError> {
        let cookie = if self.cookies {
            Some(self.layout_id(layout)? as u64 + 1)
        } else {
            // Without cookies the probes look the layout up by process: registered here for
            // one process, by the host agent per process (`register_process`) for a file's.
            if let Some(pid) = pid {
                self.set_layout(pid, layout)?;
            }
            None
        };
        let scope = match pid.and_then(std::num::NonZeroU32::new) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        for p in probes.iter().filter(|p| !skip.contains(&p.point.family)) {
            for name in std::iter::once(p.point.entry).chain(p.point.ret) {
                let prog = self.program(name)?;
                let point = UProbeAttachPoint {
                    location: p.hit.file_offset.into(),
                    cookie,
                };
                let link = prog.attach(point, &p.target, scope).map_err(|source| {
                    if is_errno(&source, libc::EACCES) && !has(caps::Capability::CAP_SYS_ADMIN) {
                        AttachError::UprobesNeedSysAdmin
                    } else {
                        AttachError::Attach {
                            symbol: p.point.symbol,
                            path: p.path.clone(),
                            source,
                        }
                    }
                })?;
                self.links.push((name, link, group));
                self.attached += 1;
            }
        }
        Ok(())
    }

    /// Detaches every link of the programs `names` (a probe that turned out not to be needed,
    /// which would only cost the traced process its trap); returns how many.
    pub fn detach_programs(&mut self, names: &[&str]) -> u64 {
        self.detach_where(|name, _| names.contains(&name))
    }

    /// Detaches the links of the programs `names` in `group` only; returns how many.
    pub fn detach_programs_in(&mut self, group: u64, names: &[&str]) -> u64 {
        self.detach_where(|name, g| g == group && names.contains(&name))
    }

    /// Detaches every link of `group` (a file whose last process is gone); returns how many.
    pub fn detach_group(&mut self, group: u64) -> u64 {
        self.detach_where(|_, g| g == group)
    }

    /// Detaches the links whose (program, group) `pred` picks; returns how many.
    fn detach_where(&mut self, pred: impl Fn(&str, u64) -> bool) -> u64 {
        let (gone, kept) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(name, _, g)| pred(name, *g));
        self.links = kept;
        self.detach_links(gone)
    }

    /// Takes `links` from their programs and hands them to the reaper thread, which closes
    /// them: the kernel's uprobe teardown waits for RCU grace periods (about 0.1 s per link
    /// on a busy 2-CPU machine), which must not stall the event loop. The count drops now.
    fn detach_links(&mut self, links: Vec<(&'static str, UProbeLinkId, u64)>) -> u64 {
        let mut taken = Vec::with_capacity(links.len());
        for (name, link, _) in links {
            match self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                .map(|p| p.take_link(link))
            {
                Some(Ok(l)) => taken.push(l),
                Some(Err(e)) => tracing::warn!("detaching {name}: {e}"),
                None => tracing::warn!("detaching {name}: no such program"),
            }
        }
        let n = taken.len() as u64;
        self.attached -= n;
        if !taken.is_empty() {
            let reaper = self.reaper.get_or_insert_with(|| {
                let (tx, rx) = std::sync::mpsc::channel::<Vec<UProbeLink>>();
                let pending = self.reaping.clone();
                std::thread::Builder::new()
                    .name("llamaprobe-detach".into())
                    .spawn(move || {
                        for links in rx {
                            let k = links.len();
                            drop(links);
                            pending.fetch_sub(k, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                    .expect("spawn the detach thread");
                tx
            });
            self.reaping
                .fetch_add(taken.len(), std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = reaper.send(taken) {
                drop(e.0); // the thread is gone: close them here
            }
        }
        n
    }

    /// Links handed to the reaper and not closed yet.
    pub fn detaching(&self) -> usize {
        self.reaping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads and attaches a `sched` tracepoint program.
    fn attach_tracepoint(
        &mut self,
        program: &'static str,
        event: &'static str,
    ) -> Result<(), AttachError> {
        let prog: &mut TracePoint = typed(&mut self.ebpf, program)?;
        prog.load().map_err(load_error(program))?;
        prog.attach("sched", event)
            .map_err(|source| AttachError::TracePoint {
                name: event,
                source,
            })?;
        Ok(())
    }

    /// Loads and attaches the host agent's exec tracepoint (tracefs must be mounted:
    /// [`ensure_tracefs`]).
    pub fn attach_exec_tracepoint(&mut self) -> Result<(), AttachError> {
        self.attach_tracepoint("process_exec", "sched_process_exec")
    }

    /// Loads and attaches the exit tracepoint of the [`watch`](Self::watch)ed processes
    /// (`sched_process_exit`; tracefs mounted): every end of one of their threads, with the
    /// exit status where the kernel's BTF says where it is, and their entries released.
    pub fn attach_exit_probe(&mut self) -> Result<ExitProbe, AttachError> {
        self.attach_tracepoint("process_exit", "sched_process_exit")?;
        Ok(match &self.exit_code_offset {
            Ok(_) => ExitProbe::WithStatus,
            Err(why) => ExitProbe::WithoutStatus(why.clone()),
        })
    }

    fn watched(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>, AttachError> {
        self.pid_set("WATCHED")
    }

    fn pid_set(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut MapData, u32, u32>, AttachError> {
        self.ebpf
            .map_mut(name)
            .ok_or(AttachError::Map(name))?
            .try_into()
            .map_err(|_| AttachError::Map(name))
    }

    /// Loads the CPU sampler and attaches it to a `cpu-clock` software perf event on every
    /// online CPU, `hz` samples a second each (it records the [`profile`](Self::profile)d
    /// processes' threads only). Returns the number of CPUs.
    pub fn attach_cpu_sampler(&mut self, hz: u32) -> Result<usize, AttachError> {
        const PROGRAM: &str = "cpu_sample";
        let prog: &mut PerfEvent = typed(&mut self.ebpf, PROGRAM)?;
        prog.load().map_err(load_error(PROGRAM))?;
        let cpus = online_cpus().map_err(|(_, e)| AttachError::PerfEvent {
            cpu: 0,
            reason: format!("cannot read the online CPUs: {e}"),
        })?;
        for &cpu in &cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(u64::from(hz)),
                false,
            )
            .map_err(|e| AttachError::PerfEvent {
                cpu,
                reason: if is_eperm(&e) || is_errno(&e, libc::EACCES) {
                    "not permitted: run as root, or grant CAP_PERFMON (or lower \
                     kernel.perf_event_paranoid)"
                        .into()
                } else if is_errno(&e, libc::EINVAL) {
                    format!(
                        "the kernel refused {hz} Hz (above kernel.perf_event_max_sample_rate?): \
                         choose a lower --profile-cpu"
                    )
                } else {
                    format!("{e}")
                },
            })?;
        }
        Ok(cpus.len())
    }

    /// Asks the CPU sampler to record `pid`'s threads.
    pub fn profile(&mut self, pid: u32) -> Result<(), AttachError> {
        self.pid_set("PROFILED")?
            .insert(pid, 1, 0)
            .map_err(|_| AttachError::Map("PROFILED (full)"))
    }

    /// Asks the exit tracepoint to report `pid`'s exit (once).
    pub fn watch(&mut self, pid: u32) -> Result<(), AttachError> {
        self.watched()?
            .insert(pid, 1, 0)
            .map_err(|_| AttachError::Map("WATCHED (full)"))
    }

    /// Forgets `pid` in the probes' per-process maps (its exit was handled).
    pub fn forget_process(&mut self, pid: u32) {
        if let Ok(mut m) = self.watched() {
            let _ = m.remove(&pid);
        }
        if let Ok(mut m) = self.pid_set("PROFILED") {
            let _ = m.remove(&pid);
        }
        if !self.cookies {
            if let Some(Ok(mut m)) = self
                .ebpf
                .map_mut("LAYOUTS")
                .map(BpfHashMap::<_, u32, ProcessLayout>::try_from)
            {
                let _ = m.remove(&pid);
            }
        }
    }

    /// Registers `pid`'s layout where the probes look without cookies (else nothing to do: the
    /// file's links name it).
    pub fn register_process(
        &mut self,
        pid: u32,
        layout: &ProcessLayout,
    ) -> Result<(), AttachError> {
        if self.cookies {
            return Ok(());
        }
        self.set_layout(pid, layout)
    }

    /// Detaches every probe (dropping them does the same) and says how long it took. The
    /// kernel closes uprobe links one at a time, each after RCU grace periods under one
    /// lock (about 85 ms a link on this project's 2-CPU 6.18 VMs: 2.7 s for a llama-server's
    /// 33 probes, closed in parallel or not), so callers write their outputs first.
    pub fn detach_all(self) -> std::time::Duration {
        let n = self.attached;
        let t = std::time::Instant::now();
        drop(self);
        let took = t.elapsed();
        tracing::info!("{n} probes detached in {:.2} s", took.as_secs_f64());
        took
    }

    pub fn attached(&self) -> u64 {
        self.attached
    }

    /// Whether the probes find layouts by attach cookie.
    pub fn uses_cookies(&self) -> bool {
        self.cookies
    }

    /// The id of `layout` in `LAYOUT_TABLE`, written there the first time.
    fn layout_id(&mut self, layout: &ProcessLayout) -> Result<u32, AttachError> {
        if let Some(i) = self.layouts.iter().position(|l| l == layout) {
            return Ok(i as u32);
        }
        let id = self.layouts.len() as u32;
        let mut table: Array<_, ProcessLayout> = self
            .ebpf
            .map_mut("LAYOUT_TABLE")
            .ok_or(AttachError::Map("LAYOUT_TABLE"))?
            .try_into()
            .map_err(|_| AttachError::Map("LAYOUT_TABLE"))?;
        table
            .set(id, layout, 0)
            .map_err(|_| AttachError::Map("LAYOUT_TABLE (full)"))?;
        self.layouts.push(*layout);
        Ok(id)
    }

    /// Tells the probes the struct layout of process `pid` (kernels without cookies).
    fn set_layout(&mut self, pid: u32, layout: &ProcessLayout) -> Result<(), AttachError> {
        let mut map: BpfHashMap<_, u32, ProcessLayout> = self
            .ebpf
            .map_mut("LAYOUTS")
            .ok_or(AttachError::Map("LAYOUTS"))?
            .try_into()
            .map_err(|_| AttachError::Map("LAYOUTS"))?;
        map.insert(pid, layout, 0)
            .map_err(|_| AttachError::Map("LAYOUTS"))
    }

    /// Takes the events ring buffer (once).
    pub fn ring_buffer(&mut self) -> Result<RingBuf<MapData>, AttachError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(AttachError::Map("EVENTS"))?;
        RingBuf::try_from(map).map_err(|_| AttachError::Map("EVENTS"))
    }

    /// (ring buffer full, entry map full) counts, summed over CPUs.
    pub fn lost(&self) -> (u64, u64) {
        let Some(map) = self.ebpf.map("LOST") else {
            return (0, 0);
        };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else {
            return (0, 0);
        };
        let sum = |i: u32| -> u64 { arr.get(&i, 0).map(|v| v.iter().copied().sum()).unwrap_or(0) };
        debug_assert_eq!(LOST_COUNTERS, 2);
        (sum(LOST_RINGBUF), sum(LOST_ENTRY))
    }
}

#[cfg(test)]
mod tests {
    use super::EBPF_OBJECT;
    use crate::catalog::PROBES;

    #[test]
    fn program_names_exist_in_the_ebpf_object() {
        let obj = EBPF_OBJECT;
        for p in PROBES {
            for prog in std::iter::once(p.entry).chain(p.ret) {
                assert!(
                    obj.windows(prog.len()).any(|w| w == prog.as_bytes()),
                    "program {prog} missing from the eBPF object"
                );
            }
        }
    }
}
