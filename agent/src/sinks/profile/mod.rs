//! `--profile-cpu`: CPU samples of the traced processes, attributed to llama.cpp's phases.
//!
//! [`Tally`] counts the samples (per phase, per leaf function of each phase, per stack) for
//! the sinks that show them: the summary and the live view (top functions per phase), and the
//! files written at the end ([`ProfileFiles`]: `--profile-out` in pprof's format,
//! `--flamegraph` as an SVG with the phase as the root frame). Prometheus keeps its own
//! counters (`llamacpp_cpu_samples_total`, `llamacpp_cpu_function_samples_total`).

mod flame;
mod pprof;

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use super::{Sink, Snapshot};
use crate::model::{CpuPhase, CpuSample, Frame, Observation};

/// Sampling frequency when `--profile-cpu` is given without one (perf's and Parca's
/// habit: not a divisor of common timer rates, so samples do not beat with periodic work).
pub const DEFAULT_HZ: u32 = 99;
/// Highest frequency accepted (the kernel's perf_event_max_sample_rate is about 100,000; a
/// sample costs the traced thread an interrupt).
pub const MAX_HZ: u32 = 10_000;

/// The CPU profile's options.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "profile_options")]
#[command(next_help_heading = "CPU profile")]
pub struct Options {
    /// Sample the traced processes' threads on every CPU HZ times a second (default 99 when
    /// given alone) and attribute each sample to what llama.cpp was doing: a prompt,
    /// generation or mixed decode step, sampling, model load, or other. Off by default.
    #[arg(
        long,
        value_name = "HZ",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "99",
        value_parser = clap::value_parser!(u32).range(1..=MAX_HZ as i64),
        env = "LLAMAPROBE_PROFILE_CPU"
    )]
    pub profile_cpu: Option<u32>,
    /// Write the CPU profile to FILE in pprof's format (gzipped protobuf; `go tool pprof`,
    /// Pyroscope, Parca and Grafana read it), each sample labelled with its `phase` and `pid`,
    /// and, inside a request's decode step, `request` (llamaprobe's request ids, `,`-joined
    /// when the step carried several).
    /// Needs --profile-cpu.
    #[arg(
        long,
        value_name = "FILE",
        requires = "profile_cpu",
        env = "LLAMAPROBE_PROFILE_OUT"
    )]
    pub profile_out: Option<PathBuf>,
    /// Write the CPU profile as a flame graph (SVG) to FILE, the phase as the root frame of each
    /// stack. Needs --profile-cpu.
    #[arg(
        long,
        value_name = "FILE",
        requires = "profile_cpu",
        env = "LLAMAPROBE_FLAMEGRAPH"
    )]
    pub flamegraph: Option<PathBuf>,
    /// Functions per phase in the summary and in
    /// `llamacpp_cpu_function_samples_total`.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        env = "LLAMAPROBE_PROFILE_TOP"
    )]
    pub profile_top: usize,
}

/// One stack's key: phase, process, the requests its step carried (ids joined by `,`; empty
/// outside requests), functions leaf first.
type StackKey = (CpuPhase, u32, Arc<str>, Vec<(Arc<str>, Arc<str>)>);

/// CPU samples counted.
#[derive(Default, Clone)]
pub struct Tally {
    pub total: u64,
    pub by_phase: HashMap<CpuPhase, u64>,
    /// Samples by (phase, leaf function).
    pub by_leaf: HashMap<(CpuPhase, Arc<str>), u64>,
    /// Samples whose user stack had more than its leaf.
    pub with_stack: u64,
    /// Samples by stack (for the files; empty unless kept).
    stacks: HashMap<StackKey, u64>,
    keep_stacks: bool,
}

impl Tally {
    pub fn new(keep_stacks: bool) -> Self {
        Self {
            keep_stacks,
            ..Default::default()
        }
    }

    pub fn add(&mut self, s: &CpuSample) {
        self.total += 1;
        *self.by_phase.entry(s.phase).or_default() += 1;
        *self.by_leaf.entry((s.phase, s.leaf_name())).or_default() += 1;
        if s.frames.len() > 1 {
            self.with_stack += 1;
        }
        if self.keep_stacks {
            let frames = s
                .frames
                .iter()
                .map(|f: &Frame| (f.function.clone(), f.module.clone()))
                .collect();
            let requests = s
                .requests
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            *self
                .stacks
                .entry((s.phase, s.pid, requests.into(), frames))
                .or_default() += 1;
        }
    }

    pub fn phase(&self, p: CpuPhase) -> u64 {
        self.by_phase.get(&p).copied().unwrap_or(0)
    }

    /// Samples inside decode steps, of any phase.
    pub fn in_steps(&self) -> u64 {
        CpuPhase::ALL
            .iter()
            .filter(|p| p.in_step())
            .map(|&p| self.phase(p))
            .sum()
    }

    /// The `n` leaf functions of phase `p` with the most samples, most first (ties by name).
    pub fn top(&self, p: CpuPhase, n: usize) -> Vec<(Arc<str>, u64)> {
        let mut v: Vec<(Arc<str>, u64)> = self
            .by_leaf
            .iter()
            .filter(|((ph, _), _)| *ph == p)
            .map(|((_, f), &c)| (f.clone(), c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// The files of the CPU profile, written at the end of the run.
pub struct ProfileFiles {
    tally: Tally,
    hz: u32,
    out: Option<PathBuf>,
    flamegraph: Option<PathBuf>,
    started_ns: u64,
    started_unix_ns: i64,
}

impl ProfileFiles {
    /// `None` when no file is asked for.
    pub fn new(opts: &Options) -> Option<Self> {
        let hz = opts.profile_cpu?;
        if opts.profile_out.is_none() && opts.flamegraph.is_none() {
            return None;
        }
        Some(Self {
            tally: Tally::new(true),
            hz,
            out: opts.profile_out.clone(),
            flamegraph: opts.flamegraph.clone(),
            started_ns: crate::model::clock::monotonic_ns(),
            started_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
        })
    }
}

impl Sink for ProfileFiles {
    fn observe(&mut self, obs: &Observation) {
        if let Observation::CpuSample(s) = obs {
            self.tally.add(s);
        }
    }

    fn finish(&mut self, _last: &Snapshot) -> anyhow::Result<()> {
        let duration_ns = crate::model::clock::monotonic_ns().saturating_sub(self.started_ns);
        if let Some(p) = &self.out {
            let bytes = pprof::encode(&self.tally, self.hz, self.started_unix_ns, duration_ns)?;
            std::fs::write(p, bytes)
                .map_err(|e| anyhow::anyhow!("cannot write --profile-out {}: {e}", p.display()))?;
            eprintln!(
                "llamaprobe: CPU profile ({} samples) written to {}",
                self.tally.total,
                p.display()
            );
        }
        if let Some(p) = &self.flamegraph {
            let f = std::fs::File::create(p)
                .map_err(|e| anyhow::anyhow!("cannot create --flamegraph {}: {e}", p.display()))?;
            flame::write(&self.tally, std::io::BufWriter::new(f))
                .map_err(|e| anyhow::anyhow!("writing --flamegraph {}: {e}", p.display()))?;
            eprintln!("llamaprobe: flame graph written to {}", p.display());
        }
        Ok(())
    }
}

/// A symbolized sample for the tests of the profile's outputs.
#[cfg(test)]
fn test_sample(pid: u32, phase: CpuPhase, requests: Vec<u64>, frames: &[&str]) -> CpuSample {
    CpuSample {
        pid,
        tid: pid,
        model: "m".into(),
        at_ns: 0,
        phase,
        step: None,
        seqs: Vec::new(),
        requests,
        in_kernel: false,
        frames: frames
            .iter()
            .map(|f| Frame {
                addr: 1,
                function: (*f).into(),
                module: "/bin/x".into(),
            })
            .collect(),
    }
}
