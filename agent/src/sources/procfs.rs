//! Resource use of a process from `/proc/PID/stat`: resident memory, CPU time (user + system)
//! and thread count. One small read per sample.

use std::{io, sync::OnceLock};

/// Errors of sampling a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process does not exist (any more).
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    /// `/proc/PID/stat` could not be read.
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Read {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// `/proc/PID/stat` did not have the expected fields.
    #[error("unexpected /proc/{pid}/stat: {reason}")]
    Parse { pid: u32, reason: &'static str },
}

/// One sample of a process's resource use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSample {
    /// Resident set size, bytes (anonymous, file-backed and shared pages: an mmapped model's
    /// pages count once they are touched).
    pub rss_bytes: u64,
    /// CPU time used by all its threads, user + system, seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
}

fn sysconf(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v as u64
    } else {
        fallback
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| sysconf(libc::_SC_CLK_TCK, 100))
}

/// Page size, bytes.
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf(libc::_SC_PAGESIZE, 4096))
}

/// Samples `pid`.
pub fn sample(pid: u32) -> Result<ProcessSample, ProcError> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        // ESRCH: the process ended between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(ProcError::NoSuchProcess { pid })
        }
        Err(source) => return Err(ProcError::Read { pid, source }),
    };
    parse_stat(&text, clock_ticks(), page_size()).map_err(|reason| ProcError::Parse { pid, reason })
}

/// Parses the text of `/proc/PID/stat` (see proc(5)).
fn parse_stat(text: &str, ticks: u64, page: u64) -> Result<ProcessSample, &'static str> {
    // The command name (field 2) is in parentheses and may itself contain spaces and
    // parentheses: the fields after it start after the last ')'.
    let close = text.rfind(')').ok_or("no ')' after the command name")?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): field N is rest[N - 3].
    let field = |n: usize| -> Result<u64, &'static str> {
        rest.get(n - 3)
            .ok_or("too few fields")?
            .parse::<u64>()
            .map_err(|_| "a field is not a number")
    };
    let utime = field(14)?;
    let stime = field(15)?;
    let threads = field(20)?;
    let rss_pages = field(24)?;
    Ok(ProcessSample {
        rss_bytes: rss_pages.saturating_mul(page),
        cpu_seconds: utime.saturating_add(stime) as f64 / ticks.max(1) as f64,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_tricky_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
        let line = "1234 (llama) server (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 123 456789 1000 18446744073709551615";
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
}
