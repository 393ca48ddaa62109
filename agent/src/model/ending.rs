//! How a traced process ended, as its exit probe saw it: the exit status (`wait(2)`'s, read
//! from the kernel's `do_exit`), and the probed calls its threads were inside when they ended
//! (their entries are released by the probe; the calls never return).

use probe_common::{EXIT_CODE_UNKNOWN, IN_CALL};

/// A process's exit status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called `exit` (or returned from `main`) with this status.
    Exited { status: u8 },
    /// A signal ended it.
    Killed {
        signal: i32,
        /// `SIGKILL`, … ([`signal_label`]).
        signal_name: String,
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// From `do_exit`'s code (as `wait(2)` encodes it); `None` where it was not seen.
    pub fn from_code(code: i32) -> Option<ExitStatus> {
        if code == EXIT_CODE_UNKNOWN {
            return None;
        }
        let signal = code & 0x7f;
        Some(if signal == 0 {
            ExitStatus::Exited {
                status: ((code >> 8) & 0xff) as u8,
            }
        } else {
            ExitStatus::Killed {
                signal,
                signal_name: signal_label(signal),
                core_dumped: code & 0x80 != 0,
            }
        })
    }

    /// `how` and `cause` of `llamaprobe_processes_ended_total`: `exited` with the status, or
    /// `killed` with the signal's name.
    pub fn labels(&self) -> (&'static str, String) {
        match self {
            ExitStatus::Exited { status } => ("exited", status.to_string()),
            ExitStatus::Killed { signal_name, .. } => ("killed", signal_name.clone()),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited { status } => write!(f, "exited with status {status}"),
            ExitStatus::Killed {
                signal,
                signal_name,
                core_dumped,
            } => write!(
                f,
                "was killed by {signal_name} (signal {signal}){}",
                if *core_dumped { ", core dumped" } else { "" }
            ),
        }
    }
}

/// The Linux signals by number (libc's, so they are right on every architecture).
const SIGNALS: [(i32, &str); 31] = [
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGILL, "SIGILL"),
    (libc::SIGTRAP, "SIGTRAP"),
    (libc::SIGABRT, "SIGABRT"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGFPE, "SIGFPE"),
    (libc::SIGKILL, "SIGKILL"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGPIPE, "SIGPIPE"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
    (libc::SIGCHLD, "SIGCHLD"),
    (libc::SIGCONT, "SIGCONT"),
    (libc::SIGSTOP, "SIGSTOP"),
    (libc::SIGTSTP, "SIGTSTP"),
    (libc::SIGTTIN, "SIGTTIN"),
    (libc::SIGTTOU, "SIGTTOU"),
    (libc::SIGURG, "SIGURG"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGWINCH, "SIGWINCH"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGSYS, "SIGSYS"),
];

/// A signal's name (`SIGKILL`), or `SIGRTMIN+n` / `signal n` for the others (a bounded set:
/// the number is under 128).
pub fn signal_label(signal: i32) -> String {
    if let Some((_, name)) = SIGNALS.iter().find(|(n, _)| *n == signal) {
        return (*name).to_string();
    }
    let rtmin = libc::SIGRTMIN();
    let rtmax = libc::SIGRTMAX();
    if (rtmin..=rtmax).contains(&signal) {
        format!("SIGRTMIN+{}", signal - rtmin)
    } else {
        format!("signal {signal}")
    }
}

/// How a traced process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessEnd {
    pub pid: u32,
    /// Its exit status; `None` where the exit probe could not see it (the tracepoint fallback)
    /// or its main thread's end was not seen (it ended before the others).
    pub status: Option<ExitStatus>,
    /// The probed calls its threads were inside when they ended, in [`IN_CALL`] order.
    pub interrupted: Vec<Interrupted>,
}

/// Calls of one kind a process's threads were inside when they ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Interrupted {
    /// The call ([`IN_CALL`]'s name: `decode`, `sampling`, …).
    pub call: &'static str,
    /// How many threads were inside one.
    pub threads: u32,
}

impl ProcessEnd {
    /// A thread ended inside the calls of `calls` ([`IN_CALL`] bits).
    pub fn add_interrupted(&mut self, calls: u32) {
        for (bit, name) in IN_CALL {
            if calls & bit == 0 {
                continue;
            }
            match self.interrupted.iter_mut().find(|i| i.call == name) {
                Some(i) => i.threads += 1,
                None => {
                    self.interrupted.push(Interrupted {
                        call: name,
                        threads: 1,
                    });
                    let order = |n: &str| IN_CALL.iter().position(|(_, m)| *m == n);
                    self.interrupted.sort_by_key(|i| order(i.call));
                }
            }
        }
    }
}

impl std::fmt::Display for ProcessEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.status {
            Some(s) => write!(f, "{s}")?,
            None => f.write_str("ended (its exit status was not seen)")?,
        }
        if !self.interrupted.is_empty() {
            let calls: Vec<String> = self
                .interrupted
                .iter()
                .map(|i| match i.threads {
                    1 => format!("a {} call", i.call),
                    n => format!("{n} {} calls", i.call),
                })
                .collect();
            write!(f, " inside {}", calls.join(" and "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_read_as_wait_reports_them() {
        assert_eq!(
            ExitStatus::from_code(3 << 8),
            Some(ExitStatus::Exited { status: 3 })
        );
        assert_eq!(
            ExitStatus::from_code(0),
            Some(ExitStatus::Exited { status: 0 })
        );
        let killed = ExitStatus::from_code(9).unwrap();
        assert_eq!(killed.to_string(), "was killed by SIGKILL (signal 9)");
        assert_eq!(killed.labels(), ("killed", "SIGKILL".to_string()));
        let segv = ExitStatus::from_code(11 | 0x80).unwrap();
        assert_eq!(
            segv.to_string(),
            "was killed by SIGSEGV (signal 11), core dumped"
        );
        assert_eq!(ExitStatus::from_code(EXIT_CODE_UNKNOWN), None);
        assert_eq!(signal_label(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
        assert_eq!(signal_label(127), "signal 127");
    }

    #[test]
    fn interrupted_calls_are_counted_per_call_in_a_fixed_order() {
        let mut end = ProcessEnd {
            pid: 7,
            status: ExitStatus::from_code(9),
            interrupted: Vec::new(),
        };
        end.add_interrupted(IN_CALL[3].0); // sampling
        end.add_interrupted(IN_CALL[0].0 | IN_CALL[4].0); // decode + synchronize
        end.add_interrupted(IN_CALL[0].0);
        let got: Vec<(&str, u32)> = end
            .interrupted
            .iter()
            .map(|i| (i.call, i.threads))
            .collect();
        assert_eq!(
            got,
            vec![("decode", 2), ("sampling", 1), ("synchronize", 1)]
        );
        assert_eq!(
            end.to_string(),
            "was killed by SIGKILL (signal 9) inside 2 decode calls and a sampling call and a synchronize call"
        );
    }
}
