//! Section 1, the cost of one probed call: the synthetic loop ([`super::synthetic`]) with (a) no
//! probe, (b) an empty uprobe + uretprobe pair (bpftrace), (c) llamaprobe, (d) a bpftrace
//! latency histogram, in interleaved runs whose order rotates; ns per call, medians, and
//! llamaprobe's count of decode calls checked against the loop's.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{bail, Result};

use crate::util::progress;

use super::{
    stats::{median, min_max},
    synthetic::{bpftrace_program, run_loop, Case, LoopRun, LoopSpec, Tracer, CASES},
    Env,
};

pub struct PerCall {
    pub iterations: u64,
    /// Runs per case, in CASES order; None when the case could not run (no bpftrace).
    pub runs: Vec<Option<Vec<LoopRun>>>,
    pub lib: PathBuf,
    /// Problems seen (count mismatches, lost events).
    pub problems: Vec<String>,
}

impl PerCall {
    pub fn median(&self, case: Case) -> Option<f64> {
        let runs = self.runs[case.index()].as_ref()?;
        Some(median(
            &runs.iter().map(|r| r.out.ns_per_call).collect::<Vec<_>>(),
        ))
    }

    pub fn spread(&self, case: Case) -> Option<(f64, f64)> {
        let runs = self.runs[case.index()].as_ref()?;
        Some(min_max(
            &runs.iter().map(|r| r.out.ns_per_call).collect::<Vec<_>>(),
        ))
    }

    /// Probe cost of a case: its ns/call minus the unprobed call's.
    pub fn overhead(&self, case: Case) -> Option<f64> {
        Some(self.median(case)? - self.median(Case::NoProbe).unwrap_or(0.0))
    }

    /// Overhead of a case relative to the empty pair's.
    pub fn ratio(&self, case: Case) -> Option<f64> {
        Some(self.overhead(case)? / self.overhead(Case::Empty)?)
    }

    /// CPU samples per run of a `--profile-cpu` case, median.
    pub fn samples_per_run(&self, case: Case) -> Option<f64> {
        let runs = self.runs[case.index()].as_ref()?;
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.agent.as_ref()?.cpu_samples.map(|n| n as f64))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    /// What one CPU sample cost the loop's thread (the perf interrupt, the eBPF program, its
    /// stack copy), ns: the difference of (e) and (f) in a run's time, over the difference
    /// in their samples (medians). The per-call cost of profiling is the same in both.
    pub fn traced_ns_per_sample(&self) -> Option<f64> {
        let (hi, lo) = (Case::ProfileCpu, Case::ProfileCpuLow);
        let extra = (self.median(hi)? - self.median(lo)?) * self.iterations as f64;
        let samples = self.samples_per_run(hi)? - self.samples_per_run(lo)?;
        (samples > 0.0).then(|| extra / samples)
    }

    /// What profiling costs a decode call apart from the samples, ns: (f) − (c) less (f)'s
    /// samples' share.
    pub fn traced_ns_per_call_profiling(&self) -> Option<f64> {
        let lo = Case::ProfileCpuLow;
        let samples = self.samples_per_run(lo)? * self.traced_ns_per_sample()?;
        Some(self.median(lo)? - self.median(Case::Llamaprobe)? - samples / self.iterations as f64)
    }

    /// llamaprobe's own CPU per sample, µs: (e) − (f) over their samples (medians).
    pub fn agent_us_per_sample(&self) -> Option<f64> {
        let cpu = |case: Case| -> Option<f64> {
            let v: Vec<f64> = self.runs[case.index()]
                .as_ref()?
                .iter()
                .filter_map(|r| r.agent.as_ref().map(|a| a.cpu_ms))
                .filter(|ms| ms.is_finite())
                .collect();
            (!v.is_empty()).then(|| median(&v))
        };
        let (hi, lo) = (Case::ProfileCpu, Case::ProfileCpuLow);
        let samples = self.samples_per_run(hi)? - self.samples_per_run(lo)?;
        let used = cpu(hi)? - cpu(lo)?;
        (samples > 0.0).then(|| used * 1000.0 / samples)
    }

    /// llamaprobe's CPU per event (µs), median over runs.
    pub fn agent_us_per_event(&self) -> Option<f64> {
        let runs = self.runs[Case::Llamaprobe.index()].as_ref()?;
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let a = r.agent.as_ref()?;
                Some(a.cpu_ms * 1000.0 / a.decode_calls.max(1) as f64)
            })
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }
}

pub fn measure(env: &Env) -> Result<PerCall> {
    let cfg = &env.cfg;
    let mut result = PerCall {
        iterations: cfg.iterations,
        runs: CASES
            .iter()
            .map(|c| match c {
                Case::Empty | Case::Hist if env.bpftrace.is_none() => None,
                _ => Some(Vec::new()),
            })
            .collect(),
        lib: env.lib.clone(),
        problems: Vec::new(),
    };
    for run in 0..cfg.runs {
        let mut order = CASES.to_vec();
        order.rotate_left(run % CASES.len());
        for case in order {
            if result.runs[case.index()].is_none() {
                continue;
            }
            let tracer = match case {
                Case::NoProbe => Tracer::None,
                Case::Llamaprobe => Tracer::Llamaprobe {
                    cpus: None,
                    profile_hz: None,
                },
                Case::ProfileCpu | Case::ProfileCpuLow => Tracer::Llamaprobe {
                    cpus: None,
                    profile_hz: case.profile_hz(),
                },
                Case::Empty | Case::Hist => {
                    Tracer::Bpftrace(bpftrace_program(case, &env.lib).expect("a bpftrace case"))
                }
            };
            let spec = LoopSpec {
                iterations: cfg.iterations,
                threads: 1,
                loop_cpus: None,
                tracer,
                pause_agent: false,
            };
            let r = match run_loop(env, &spec) {
                Ok(r) => r,
                Err(e) => {
                    // One failed run is reported, not fatal: the other runs give the median.
                    progress!(
                        "  run {}/{}: {} FAILED: {e:#}",
                        run + 1,
                        cfg.runs,
                        case.short()
                    );
                    result.problems.push(format!(
                        "run {} of {} failed and is left out: {e:#}",
                        run + 1,
                        case.label()
                    ));
                    continue;
                }
            };
            let mut note = String::new();
            if let Some(a) = &r.agent {
                let _ = write!(
                    note,
                    " (llamaprobe counted {} of {} calls, {} lost",
                    a.decode_calls, r.out.calls, a.events_lost
                );
                if let Some(n) = a.cpu_samples {
                    let _ = write!(note, ", {n} CPU samples");
                }
                note.push(')');
                if a.decode_calls != r.out.calls {
                    result.problems.push(format!(
                        "run {}: llamaprobe counted {} decode calls, the loop made {}",
                        run + 1,
                        a.decode_calls,
                        r.out.calls
                    ));
                }
                if a.events_lost != 0 {
                    result.problems.push(format!(
                        "run {}: llamaprobe lost {} events",
                        run + 1,
                        a.events_lost
                    ));
                }
            }
            progress!(
                "  run {}/{}: {:<14} {:>10.1} ns/call{note}",
                run + 1,
                cfg.runs,
                case.short(),
                r.out.ns_per_call
            );
            if let Some(runs) = result.runs[case.index()].as_mut() {
                runs.push(r);
            }
        }
    }
    for case in CASES {
        if result.runs[case.index()]
            .as_ref()
            .is_some_and(|runs| runs.is_empty())
        {
            bail!(
                "every run of {} failed: {}",
                case.label(),
                result.problems.join("; ")
            );
        }
    }
    for case in [Case::ProfileCpu, Case::ProfileCpuLow] {
        if result.samples_per_run(case).is_none_or(|n| n < 100.0) {
            result.problems.push(format!(
                "{} took {} CPU samples per run (median): too few for a cost per sample",
                case.label(),
                result.samples_per_run(case).unwrap_or(0.0)
            ));
        }
    }
    if let (Some(none), Some(empty)) = (result.median(Case::NoProbe), result.median(Case::Empty)) {
        if empty < 10.0 * none.max(1.0) {
            result.problems.push(format!(
                "the empty bpftrace pair ({empty:.0} ns/call) barely slowed the loop ({none:.1} \
                 ns/call): did bpftrace attach?"
            ));
        }
    }
    Ok(result)
}
