//! `llamaprobe doctor`: whether llamaprobe can run here, and if not, why and what to do.
//!
//! Each check is ok, warn (it runs, with less) or fail (the daemon cannot run), with the fix
//! in one line. Nothing is loaded or attached: the checks read /proc, /sys and the process's
//! own capabilities.

use std::path::Path;

use caps::{CapSet, Capability};

use super::host::Host;
use crate::sources;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do (empty when ok).
    pub fix: String,
}

fn check(name: &'static str, status: Status, found: String, fix: &str) -> Check {
    Check {
        name,
        status,
        found,
        fix: if status == Status::Ok {
            String::new()
        } else {
            fix.to_string()
        },
    }
}

/// The kernel's version as (major, minor).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel(release: &str) -> Check {
    let found = format!("Linux {release}");
    match kernel_version(release) {
        None => check("kernel", Status::Warn, found, "could not read the kernel version"),
        Some(v) if v < (5, 8) => check(
            "kernel",
            Status::Fail,
            found,
            "llamaprobe needs Linux 5.8 or newer (BPF ring buffer): upgrade the kernel",
        ),
        Some(v) if ((6, 11)..(6, 13)).contains(&v) => check(
            "kernel",
            Status::Warn,
            found,
            "on 6.11-6.12 before the Feb 2025 fix, container seccomp profiles block the uretprobe syscall and crash probed processes in containers: update to a fixed stable kernel",
        ),
        Some(v) => check(
            "kernel",
            Status::Ok,
            format!(
                "{found}: ring buffer and uprobes (5.8+){}",
                if v >= (5, 15) {
                    ", attach cookies (5.15+)"
                } else {
                    ""
                }
            ),
            "",
        ),
    }
}

/// The first line of a file, trimmed.
fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
}

/// The capabilities llamaprobe uses and what each is for.
const CAPS: [(Capability, &str); 5] = [
    (Capability::CAP_BPF, "load the eBPF programs and maps"),
    (Capability::CAP_PERFMON, "attach uprobes and tracepoints"),
    (
        Capability::CAP_SYS_PTRACE,
        "read other users' processes (/proc/PID/maps, their memory for the model)",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "read other users' files (their executables, libraries and models)",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "open files through /proc/PID/map_files and mount tracefs (the host agent); uprobes as non-root on some kernels",
    ),
];

fn capabilities() -> Check {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<(Capability, &str)> = CAPS
        .iter()
        .copied()
        .filter(|(c, _)| !caps::has_cap(None, CapSet::Effective, *c).unwrap_or(false))
        .collect();
    let essential = |c: &Capability| {
        matches!(c, Capability::CAP_BPF | Capability::CAP_PERFMON)
            && !caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false)
    };
    let who = if root { "root" } else { "not root" };
    if missing.is_empty() {
        return check(
            "capabilities",
            Status::Ok,
            format!("{who}, all of CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN"),
            "",
        );
    }
    let list = missing
        .iter()
        .map(|(c, why)| format!("{c} ({why})"))
        .collect::<Vec<_>>()
        .join("; ");
    let status = if missing.iter().any(|(c, _)| essential(c)) {
        Status::Fail
    } else {
        Status::Warn
    };
    check(
        "capabilities",
        status,
        format!("{who}; missing: {list}"),
        "run llamaprobe as root (sudo), or grant the missing capabilities (systemd AmbientCapabilities=, a pod's securityContext.capabilities.add)",
    )
}

fn file_check(name: &'static str, path: &str, ok: &str, missing: Status, fix: &str) -> Check {
    if Path::new(path).exists() {
        check(name, Status::Ok, ok.to_string(), "")
    } else {
        check(name, missing, format!("{path} is missing"), fix)
    }
}

/// Kernel BTF: where the exit tracepoint reads a thread's exit status.
fn btf() -> Check {
    use crate::attach::kernel_btf;
    match kernel_btf::task_exit_code_offset() {
        Ok(off) => check(
            "btf",
            Status::Ok,
            format!("kernel BTF present (task_struct.exit_code at byte {off}: exit statuses reported)"),
            "",
        ),
        Err(e) => check(
            "btf",
            Status::Warn,
            e,
            "without kernel BTF (CONFIG_DEBUG_INFO_BTF=y) a traced process's end is reported without its exit status",
        ),
    }
}

fn tracefs() -> Check {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p)
            .join("events/sched/sched_process_exec")
            .is_dir()
        {
            return check(
                "tracefs",
                Status::Ok,
                format!("mounted at {p} (sched tracepoints)"),
                "",
            );
        }
    }
    check(
        "tracefs",
        Status::Warn,
        "not mounted (or not readable by this user)".into(),
        "the daemon mounts it when it may (CAP_SYS_ADMIN); else `mount -t tracefs nodev /sys/kernel/tracing`, or in a pod mount the host's /sys/kernel/tracing",
    )
}

fn lockdown() -> Check {
    match read("/sys/kernel/security/lockdown") {
        None => check(
            "lockdown",
            Status::Ok,
            "no lockdown LSM".into(),
            "",
        ),
        Some(s) if s.contains("[confidentiality]") => check(
            "lockdown",
            Status::Fail,
            s,
            "lockdown=confidentiality forbids reading process memory from eBPF: boot without it (or with lockdown=integrity)",
        ),
        Some(s) => check("lockdown", Status::Ok, s, ""),
    }
}

fn perf_paranoid() -> Check {
    let v = read("/proc/sys/kernel/perf_event_paranoid").unwrap_or_default();
    let n: i32 = v.parse().unwrap_or(2);
    let privileged = caps::has_cap(None, CapSet::Effective, Capability::CAP_PERFMON)
        .unwrap_or(false)
        || caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false);
    if n > 2 && !privileged {
        check(
            "perf_event_paranoid",
            Status::Fail,
            format!("{n}, and no CAP_PERFMON"),
            "grant CAP_PERFMON (or lower kernel.perf_event_paranoid)",
        )
    } else {
        check(
            "perf_event_paranoid",
            Status::Ok,
            format!(
                "{n}{}",
                if privileged {
                    " (CAP_PERFMON held: not limiting)"
                } else {
                    ""
                }
            ),
            "",
        )
    }
}

fn memlock(release: &str) -> Check {
    let new_accounting = kernel_version(release).is_some_and(|v| v >= (5, 11));
    if new_accounting {
        return check(
            "memlock",
            Status::Ok,
            "5.11+: BPF memory is charged to the cgroup, not RLIMIT_MEMLOCK".into(),
            "",
        );
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    let unlimited = r.rlim_max == libc::RLIM_INFINITY;
    let can_raise =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_RESOURCE).unwrap_or(false);
    if unlimited || can_raise {
        check(
            "memlock",
            Status::Ok,
            "RLIMIT_MEMLOCK can be raised".into(),
            "",
        )
    } else {
        check(
            "memlock",
            Status::Fail,
            format!("RLIMIT_MEMLOCK hard limit {} bytes", r.rlim_max),
            "before 5.11 BPF maps count against RLIMIT_MEMLOCK: LimitMEMLOCK=infinity (systemd) or CAP_SYS_RESOURCE",
        )
    }
}

fn cgroup() -> Check {
    let v2_only = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let hybrid = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
    let found = if v2_only {
        "cgroup v2 (unified)"
    } else if hybrid {
        "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    } else {
        "cgroup v1"
    };
    check("cgroup", Status::Ok, found.into(), "")
}

fn nvml() -> Check {
    let sampler = sources::Sampler::new(None);
    let status = sampler.gpu_status().to_string();
    let ok = !status.contains("off");
    check(
        "nvml",
        if ok { Status::Ok } else { Status::Warn },
        status,
        "GPU metrics need the NVIDIA driver's libnvidia-ml.so.1 (--nvml-lib PATH; in a pod, the NVIDIA container runtime)",
    )
}

fn processes() -> Check {
    let pids = Host::all_pids();
    let host_view = read("/proc/1/comm").unwrap_or_default();
    let llama = super::ps::llama_processes().len();
    let looks_isolated = pids.len() < 5;
    check(
        "processes",
        if looks_isolated {
            Status::Warn
        } else {
            Status::Ok
        },
        format!(
            "{} processes visible (pid 1 is {host_view}), {llama} of them llama.cpp",
            pids.len()
        ),
        "only this container's processes are visible: run the pod with hostPID: true (the container with --pid=host)",
    )
}

/// Every check, in the order printed.
pub fn checks() -> Vec<Check> {
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        kernel(&release),
        btf(),
        file_check(
            "uprobes",
            "/sys/bus/event_source/devices/uprobe/type",
            "uprobe PMU present",
            Status::Fail,
            "the kernel has no uprobe PMU: build it with CONFIG_UPROBE_EVENTS=y",
        ),
        tracefs(),
        perf_paranoid(),
        lockdown(),
        memlock(&release),
        capabilities(),
        cgroup(),
        nvml(),
        processes(),
    ]
}

/// Prints the checks; exit code 0 when nothing fails, 1 otherwise.
pub fn run(json: bool) -> anyhow::Result<i32> {
    let all = checks();
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for c in &all {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<20} {}", c.name, c.found);
            if !c.fix.is_empty() {
                println!("      {:<20} → {}", "", c.fix);
            }
        }
    }
    let failed = all.iter().filter(|c| c.status == Status::Fail).count();
    if !json {
        println!(
            "{}",
            if failed == 0 {
                "llamaprobe can run here.".to_string()
            } else {
                format!("{failed} check(s) failed: llamaprobe cannot run here as it is.")
            }
        );
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_judged() {
        assert_eq!(kernel("5.4.0-150-generic").status, Status::Fail);
        assert_eq!(kernel("6.12.3").status, Status::Warn);
        assert_eq!(kernel("6.18.44-fc").status, Status::Ok);
        assert!(kernel("5.10.0").found.contains("ring buffer"));
        assert!(!kernel("5.10.0").found.contains("cookies"));
        assert!(kernel("5.15.0").found.contains("cookies"));
        assert_eq!(kernel("garbage").status, Status::Warn);
    }

    #[test]
    fn every_check_has_a_fix_unless_ok() {
        for c in checks() {
            assert_eq!(c.fix.is_empty(), c.status == Status::Ok, "{c:?}");
        }
    }
}
