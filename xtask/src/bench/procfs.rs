//! What the sections read about processes: memory (`/proc/PID/status`), CPU time in ticks
//! (`stat`) and exact ([`cpu_ns`], its CPU-time clock), and the whole machine's busy time
//! (`/proc/stat`), to tell the runs other processes disturbed; a process's wake-ups
//! ([`wakeups`]).

use std::{
    fs, thread,
    time::{Duration, Instant},
};

/// (VmRSS, VmHWM) in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
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
pub fn cpu_ms(pid: u32) -> Option<f64> {
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

/// A process's CPU time in nanoseconds, all its threads (the ended ones too): its CPU-time
/// clock (`clock_getcpuclockid`), the kernel's exact `sum_exec_runtime`, where `stat`'s utime
/// and stime come in 10 ms ticks. Uprobe handling runs on the probed thread, so it is counted.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock is a valid out-pointer; an unknown pid is an error code, not UB.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Waits until a process's CPU time stops growing (it has drained its backlog), at most `max`.
pub fn settle_cpu(pid: u32, max: Duration) -> Option<f64> {
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

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq, steal), in ms.
pub fn machine_busy_ms() -> Option<f64> {
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

/// Times the threads of `pid` were put on a CPU (`/proc/PID/task/*/schedstat`, field 3): its
/// wake-ups, about (a thread that ended takes its count with it).
pub fn wakeups(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| {
        let stat = fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
        stat.split_whitespace().nth(2)?.parse::<u64>().ok()
    })
    .sum()
}
