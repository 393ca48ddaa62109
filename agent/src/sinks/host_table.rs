//! The host agent's live table: one row per traced process (pid, executable, model,
//! container, decode steps/s, tokens/s, time to first token p50, errors), redrawn every second
//! while stdout is a terminal. Elsewhere it prints nothing (the log says what is traced).

use std::{
    collections::{BTreeMap, VecDeque},
    io::{IsTerminal, Write},
    time::Instant,
};

use super::{Sink, Snapshot};
use crate::model::{DecodeResult, Observation};

/// Times to first token kept per process for its p50.
const TTFT_KEPT: usize = 256;

#[derive(Default)]
struct Row {
    exe: String,
    model: String,
    container: String,
    steps: u64,
    tokens: u64,
    errors: u64,
    /// At the last redraw: steps, tokens.
    before: (u64, u64),
    ttft: VecDeque<f64>,
}

/// The table.
pub struct HostTable {
    rows: BTreeMap<u32, Row>,
    last: Instant,
    terminal: bool,
}

impl HostTable {
    /// A table drawn only if stdout is a terminal.
    pub fn new() -> Self {
        Self::with_terminal(std::io::stdout().is_terminal())
    }

    fn with_terminal(terminal: bool) -> Self {
        Self {
            rows: BTreeMap::new(),
            last: Instant::now(),
            terminal,
        }
    }

    /// The table as text, rates over `secs`; advances the rates' baseline.
    fn render(&mut self, secs: f64) -> String {
        let mut out = format!(
            "llamaprobe daemon: {} processes traced\n{:>8}  {:<18} {:<22} {:<12} {:>8} {:>9} {:>10} {:>7}\n",
            self.rows.len(),
            "PID",
            "EXE",
            "MODEL",
            "CONTAINER",
            "STEPS/S",
            "TOKENS/S",
            "TTFT P50",
            "ERRORS"
        );
        for (pid, r) in self.rows.iter_mut() {
            let rate = |now: u64, then: u64| (now - then) as f64 / secs.max(1e-3);
            let p50 = if r.ttft.is_empty() {
                "-".to_string()
            } else {
                let mut v: Vec<f64> = r.ttft.iter().copied().collect();
                v.sort_by(f64::total_cmp);
                format!("{:.1} ms", v[v.len() / 2] * 1e3)
            };
            out.push_str(&format!(
                "{:>8}  {:<18} {:<22} {:<12} {:>8.1} {:>9.1} {:>10} {:>7}\n",
                pid,
                cut(&r.exe, 18),
                cut(&r.model, 22),
                cut(&r.container, 12),
                rate(r.steps, r.before.0),
                rate(r.tokens, r.before.1),
                p50,
                r.errors
            ));
            r.before = (r.steps, r.tokens);
        }
        out
    }
}

impl Default for HostTable {
    fn default() -> Self {
        Self::new()
    }
}

fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl Sink for HostTable {
    fn observe(&mut self, obs: &Observation) {
        match obs {
            Observation::Traced(t) => {
                let r = self.rows.entry(t.pid).or_default();
                r.exe = t.name.clone();
                r.container = t
                    .identity
                    .labels
                    .iter()
                    .find(|(k, _)| *k == "container_id")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
            }
            Observation::Released { pid } => {
                self.rows.remove(pid);
            }
            Observation::Decode(d) => {
                if let Some(r) = self.rows.get_mut(&d.origin.pid) {
                    r.steps += 1;
                    if d.result == DecodeResult::Ok {
                        r.tokens += u64::from(d.prompt_tokens + d.generated_tokens);
                    } else {
                        r.errors += 1;
                    }
                    if r.model.is_empty() {
                        r.model = d.origin.model.to_string();
                    }
                }
            }
            Observation::ModelInfo(m) => {
                if let Some(r) = self.rows.get_mut(&m.pid) {
                    r.model = m.label.to_string();
                }
            }
            Observation::Request(q) => {
                if let (Some(r), Some(t)) = (self.rows.get_mut(&q.pid), q.ttft_s()) {
                    if r.ttft.len() == TTFT_KEPT {
                        r.ttft.pop_front();
                    }
                    r.ttft.push_back(t);
                }
            }
            _ => {}
        }
    }

    fn tick(&mut self, _now: &Snapshot) {
        if !self.terminal {
            return;
        }
        let secs = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let table = self.render(secs);
        let mut out = std::io::stdout().lock();
        // Home and clear, then the table.
        let _ = write!(out, "\x1b[H\x1b[2J{table}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ProcessIdentity, TracedProcess};

    #[test]
    fn rows_follow_processes_and_their_rates() {
        let mut t = HostTable::with_terminal(false);
        t.observe(&Observation::Traced(TracedProcess {
            pid: 42,
            name: "llama-server".into(),
            generation: crate::catalog::Generation::Classic,
            request_mode: crate::model::Mode::ServerTasks,
            probes_attached: 10,
            layouts_by: "attach_cookie",
            identity: ProcessIdentity {
                labels: vec![
                    ("exe", "llama-server".into()),
                    ("container_id", "0123456789abcdef0123".into()),
                ],
                service_name: "llama-server".into(),
            },
        }));
        t.rows.get_mut(&42).unwrap().steps = 20;
        t.rows.get_mut(&42).unwrap().tokens = 100;
        let text = t.render(2.0);
        let row = text.lines().nth(2).unwrap();
        assert!(
            row.contains("llama-server") && row.contains("0123456789ab"),
            "{row}"
        );
        assert!(row.contains(" 10.0 ") && row.contains(" 50.0 "), "{row}");
        // The next rates count from here.
        assert!(t.render(1.0).lines().nth(2).unwrap().contains(" 0.0 "));
        t.observe(&Observation::Released { pid: 42 });
        assert_eq!(t.render(1.0).lines().count(), 2);
    }
}
