//! Resource use of a process from `/proc/PID/stat`: resident memory, CPU time (user + system)
//! and thread count, through the `procfs` crate. One small read per sample.

use crate::model::ProcessSample;

/// Errors of sampling a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process does not exist (any more).
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    /// `/proc/PID/stat` could not be read or parsed.
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Read {
        pid: u32,
        #[source]
        source: procfs::ProcError,
    },
}

/// Samples `pid` (`/proc/PID/stat`, parsed by the `procfs` crate): one open and one read
/// (the host agent samples every traced process every second).
pub fn sample(pid: u32) -> Result<ProcessSample, ProcError> {
    use procfs::FromRead;
    use std::io::Read;
    let path = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
    let gone = |e: &std::io::Error| {
        // ESRCH: the process ended between open and read.
        e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
    };
    // The line is at most 52 numbers and a 16-byte name: one read of the whole of it.
    let mut buf = [0u8; 4096];
    let n = std::fs::File::open(&path)
        .and_then(|mut f| f.read(&mut buf))
        .map_err(|e| {
            if gone(&e) {
                ProcError::NoSuchProcess { pid }
            } else {
                ProcError::Read {
                    pid,
                    source: procfs::ProcError::Io(e, Some(path.clone())),
                }
            }
        })?;
    let stat = procfs::process::Stat::from_read(&buf[..n])
        .map_err(|source| ProcError::Read { pid, source })?;
    Ok(of_stat(
        &stat,
        procfs::ticks_per_second(),
        procfs::page_size(),
    ))
}

/// The sample in a parsed `/proc/PID/stat`.
fn of_stat(s: &procfs::process::Stat, ticks: u64, page: u64) -> ProcessSample {
    ProcessSample {
        rss_bytes: s.rss.saturating_mul(page),
        cpu_seconds: s.utime.saturating_add(s.stime) as f64 / ticks.max(1) as f64,
        threads: s.num_threads.max(0) as u64,
    }
}

/// Parses the text of `/proc/PID/stat` (see proc(5)).
#[cfg(test)]
fn parse_stat(text: &str, ticks: u64, page: u64) -> Result<ProcessSample, procfs::ProcError> {
    use procfs::FromRead;
    procfs::process::Stat::from_read(text.as_bytes()).map(|s| of_stat(&s, ticks, page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_tricky_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
        // (the fields after rss as a kernel 6.x writes them).
        let line = "1234 (llama) server (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 123 456789 1000 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let s = parse_stat(line, 100, 4096).unwrap();
        assert_eq!(s.threads, 7);
        assert_eq!(s.rss_bytes, 1000 * 4096);
        assert!((s.cpu_seconds - 3.0).abs() < 1e-9);
    }

    #[test]
    fn bad_stat_text_is_an_error() {
        assert!(parse_stat("", 100, 4096).is_err());
        assert!(parse_stat("1 (x) S 1 2", 100, 4096).is_err());
        assert!(parse_stat(
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 a b 0 0 20 0 1 0 1 1 1",
            100,
            4096
        )
        .is_err());
    }

    #[test]
    fn samples_this_process_and_says_when_a_pid_is_gone() {
        let me = sample(std::process::id()).unwrap();
        let threads = std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
        assert!(me.threads >= 1 && me.threads <= threads + 64, "{me:?}");
        assert!(me.rss_bytes > 0);
        // Above the kernel's pid_max (4194304 at most).
        assert!(matches!(
            sample(4_194_305),
            Err(ProcError::NoSuchProcess { pid: 4_194_305 })
        ));
    }
}
