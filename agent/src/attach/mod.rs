//! Loading the eBPF programs into the kernel and attaching them to the planned functions.

use std::{collections::HashMap, path::PathBuf};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, UProbe},
    Ebpf, EbpfError,
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

/// The loaded programs and their links.
pub struct Probes {
    ebpf: Ebpf,
    loaded: HashMap<&'static str, ()>,
    attached: u64,
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
        let ebpf = Ebpf::load(EBPF_OBJECT).map_err(|source| {
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
    /// (`None`: every process that maps the file).
    pub fn attach(
        &mut self,
        probes: &[PlannedProbe],
        pid: Option<u32>,
        skip: &[Family],
    ) -> Result<(), AttachError> {
        for p in probes.iter().filter(|p| !skip.contains(&p.point.family)) {
            for name in std::iter::once(p.point.entry).chain(p.point.ret) {
                let prog = self.program(name)?;
                prog.attach(None, p.hit.file_offset, &p.target, pid.map(|p| p as i32))
                    .map_err(|source| AttachError::Attach {
                        symbol: p.point.symbol,
                        path: p.path.clone(),
                        source,
                    })?;
                self.attached += 1;
            }
        }
        Ok(())
    }

    pub fn attached(&self) -> u64 {
        self.attached
    }

    /// Tells the probes the struct layout of process `pid`.
    pub fn set_layout(&mut self, pid: u32, layout: &ProcessLayout) -> Result<(), AttachError> {
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
