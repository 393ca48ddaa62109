//! Loading the eBPF programs into the kernel and attaching them to the planned functions.

use std::{collections::HashMap, path::PathBuf};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachPoint, UProbeLinkId, UProbeScope},
        ProgramError, UProbe,
    },
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};
use probe_common::{ProcessLayout, LOST_COUNTERS, LOST_ENTRY, LOST_RINGBUF};

use crate::{catalog::Family, resolve::PlannedProbe};

/// The eBPF object built by build.rs.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));

/// Errors of loading and attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "missing privileges to load eBPF programs: run llamaprobe as root (sudo), or give it \
         CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (CAP_SYS_ADMIN on kernels before 5.8)"
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
}

/// Checks the kernel version and the process's privileges before touching the kernel.
pub fn preflight() -> Result<(), AttachError> {
    if let Ok(v) = aya::util::KernelVersion::current() {
        if v < aya::util::KernelVersion::new(5, 8, 0) {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| format!("{v:?}"));
            return Err(AttachError::KernelTooOld { release });
        }
    }
    if !has_bpf_privileges() {
        return Err(AttachError::Privileges);
    }
    Ok(())
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

/// An EPERM from the kernel means missing privileges (the verifier rejects programs with
/// EACCES, which is not a privilege problem).
fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        cur = err.source();
    }
    false
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
    /// The layouts written into `LAYOUT_TABLE`, by id.
    layouts: Vec<ProcessLayout>,
    /// Every link, with its program's name (for detaching a family's fallback).
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl Probes {
    /// Loads the eBPF object (maps and programs are created; nothing is attached yet).
    pub fn load() -> Result<Self, AttachError> {
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
        let ebpf = EbpfLoader::new()
            .override_global("USE_COOKIES", &u32::from(cookies), true)
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
            layouts: Vec::new(),
            links: Vec::new(),
        })
    }

    fn program(&mut self, name: &'static str) -> Result<&mut UProbe, AttachError> {
        let first = !self.loaded.contains_key(name);
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .ok_or(AttachError::Program {
                program: name,
                source: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| AttachError::Program {
                program: name,
                source,
            })?;
        if first {
            prog.load().map_err(|source| {
                if is_eperm(&source) {
                    AttachError::Privileges
                } else {
                    AttachError::Program {
                        program: name,
                        source,
                    }
                }
            })?;
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
        let cookie = if self.cookies {
            Some(self.layout_id(layout)? as u64 + 1)
        } else {
            let pid = pid.ok_or(AttachError::Map(
                "LAYOUTS (a pid is needed without cookies)",
            ))?;
            self.set_layout(pid, layout)?;
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
                let link =
                    prog.attach(point, &p.target, scope)
                        .map_err(|source| AttachError::Attach {
                            symbol: p.point.symbol,
                            path: p.path.clone(),
                            source,
                        })?;
                self.links.push((name, link));
                self.attached += 1;
            }
        }
        Ok(())
    }

    /// Detaches every link of the programs `names` (a probe that turned out not to be needed,
    /// which would only cost the traced process its trap); returns how many.
    pub fn detach_programs(&mut self, names: &[&str]) -> u64 {
        let mut n = 0;
        for want in names {
            let links = std::mem::take(&mut self.links);
            for (name, link) in links {
                if name != *want {
                    self.links.push((name, link));
                    continue;
                }
                match self
                    .ebpf
                    .program_mut(name)
                    .and_then(|p| <&mut UProbe>::try_from(p).ok())
                    .map(|p| p.detach(link))
                {
                    Some(Ok(())) => n += 1,
                    Some(Err(e)) => tracing::warn!("detaching {name}: {e}"),
                    None => tracing::warn!("detaching {name}: no such program"),
                }
            }
        }
        self.attached -= n;
        n
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
