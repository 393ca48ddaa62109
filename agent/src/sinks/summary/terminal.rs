//! Terminal output while running: a live view redrawn every second when stdout is a TTY, a
//! one-line summary every `--interval` otherwise (logs, systemd, CI).

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use super::Summary;
use crate::model::{Phase, SelfStats};

pub struct Terminal {
    live: bool,
    interval: Duration,
    last: Instant,
    title: String,
    started: Instant,
}

impl Terminal {
    pub fn new(title: String, interval: Duration, quiet: bool) -> Option<Self> {
        if quiet {
            return None;
        }
        let live = std::io::stdout().is_terminal();
        Some(Self {
            live,
            interval: if live {
                Duration::from_secs(1)
            } else {
                interval
            },
            last: Instant::now(),
            title,
            started: Instant::now(),
        })
    }

    /// Redraws or prints a line if it is time to.
    pub fn tick(&mut self, summary: &Summary, s: &SelfStats) {
        if self.last.elapsed() < self.interval {
            return;
        }
        self.last = Instant::now();
        let mut out = std::io::stdout().lock();
        if self.live {
            let _ = write!(
                out,
                "\x1b[H\x1b[2J{} — {:.0} s — {} probes — lost {} — Ctrl-C to stop\n\n{}",
                self.title,
                self.started.elapsed().as_secs_f64(),
                s.probes_attached,
                s.lost_ringbuf + s.lost_entry,
                summary.render()
            );
        } else {
            let _ = writeln!(out, "{}", one_line(summary, s));
        }
        let _ = out.flush();
    }
}

/// The periodic one-line summary.
pub fn one_line(summary: &Summary, s: &SelfStats) -> String {
    let phase = |p: Phase| {
        summary.phases.get(p.label()).map(|x| {
            format!(
                "{} {} p50 {:.2}ms p99 {:.2}ms",
                p.label(),
                x.latency.count,
                x.latency.p50_ms,
                x.latency.p99_ms
            )
        })
    };
    let phases: Vec<String> = Phase::ALL.into_iter().filter_map(phase).collect();
    // `--profile-cpu`: each step phase's top function.
    let cpu = summary.cpu_profile.as_ref().map(|c| {
        let tops: Vec<String> = Phase::ALL
            .iter()
            .filter_map(|p| {
                let ph = c.phases.get(p.label())?;
                let f = ph.top.first()?;
                Some(format!(
                    "{} {} {:.0}%",
                    p.label(),
                    f.function,
                    f.share * 100.0
                ))
            })
            .collect();
        format!(" | cpu {} samples [{}]", c.samples, tops.join("; "))
    });
    format!(
        "llamaprobe: decodes {} [{}] | tokens prompt {} generated {} | sample p50 {:.3}ms | errors {} | lost {}{}",
        summary.decode_calls,
        phases.join("; "),
        summary.prompt_tokens,
        summary.sampled_tokens,
        summary.sample.p50_ms,
        summary.decode_calls - summary.decode_results.get("ok").copied().unwrap_or(0),
        s.lost_ringbuf + s.lost_entry,
        cpu.unwrap_or_default(),
    )
}
