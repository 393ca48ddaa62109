//! The synthetic target of sections 1 ([`super::per_call`]) and 4 ([`super::capacity`]):
//! `xtask/assets/bench/`'s `libllama.so` and `bench_loop`, compiled here with gcc -O2, and one
//! run of the loop under a tracer (none, bpftrace or llamaprobe), with what the loop and
//! llamaprobe report about it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    proc::{Proc, Stream},
    util::{self, progress},
};

use super::{
    llama_server::spawn_attached,
    procfs::{cpu_ms, settle_cpu},
    read_json, Env,
};

/// Compiles the synthetic libllama.so and the loop into `work`; returns their paths.
pub fn build(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let assets = util::workspace_root().join("xtask/assets/bench");
    let lib = work.join("libllama.so");
    let loop_bin = work.join("bench_loop");
    progress!(
        "compiling the synthetic target (gcc -O2) into {}",
        work.display()
    );
    util::run(
        Command::new("gcc")
            .args([
                "-O2", "-g0", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
            ])
            .arg("-Wl,-soname,libllama.so")
            .arg("-o")
            .arg(&lib)
            .arg(assets.join("libllama.c")),
    )?;
    util::run(
        Command::new("gcc")
            .args(["-O2", "-g0", "-Wall", "-Wextra", "-Werror", "-pthread"])
            .arg("-o")
            .arg(&loop_bin)
            .arg(assets.join("bench_loop.c"))
            .arg("-L")
            .arg(work)
            .arg("-lllama")
            .arg("-Wl,-rpath,$ORIGIN"),
    )?;
    Ok((lib, loop_bin))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Case {
    NoProbe,
    Empty,
    Llamaprobe,
    Hist,
    /// llamaprobe with `--profile-cpu` at [`PROFILE_HZ`]: (c) plus the sampler's cost.
    ProfileCpu,
    /// The same at [`PROFILE_HZ_LOW`]: with (e), the cost per sample apart from the per-call
    /// cost of profiling (the step mark the decode probes keep).
    ProfileCpuLow,
}

pub const CASES: [Case; 6] = [
    Case::NoProbe,
    Case::Empty,
    Case::Llamaprobe,
    Case::Hist,
    Case::ProfileCpu,
    Case::ProfileCpuLow,
];

/// The sampling frequency of case (e): the highest llamaprobe takes, so that the samples'
/// cost to the loop stands out of the noise.
pub const PROFILE_HZ: u32 = 10_000;
/// Case (f)'s frequency.
pub const PROFILE_HZ_LOW: u32 = 1_000;

impl Case {
    pub fn label(self) -> &'static str {
        match self {
            Case::NoProbe => "(a) no probe",
            Case::Empty => "(b) empty uprobe + uretprobe (bpftrace)",
            Case::Llamaprobe => "(c) llamaprobe",
            Case::Hist => "(d) bpftrace latency histogram",
            Case::ProfileCpu => "(e) llamaprobe --profile-cpu=10000",
            Case::ProfileCpuLow => "(f) llamaprobe --profile-cpu=1000",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Case::NoProbe => "no probe",
            Case::Empty => "empty pair",
            Case::Llamaprobe => "llamaprobe",
            Case::Hist => "bpftrace hist",
            Case::ProfileCpu => "llamaprobe prof",
            Case::ProfileCpuLow => "prof 1000 Hz",
        }
    }

    /// The `--profile-cpu` frequency of a llamaprobe case.
    pub fn profile_hz(self) -> Option<u32> {
        match self {
            Case::ProfileCpu => Some(PROFILE_HZ),
            Case::ProfileCpuLow => Some(PROFILE_HZ_LOW),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        CASES.iter().position(|c| *c == self).unwrap_or(0)
    }
}

pub fn bpftrace_program(case: Case, lib: &Path) -> Option<String> {
    let lib = lib.display();
    match case {
        Case::Empty => Some(format!(
            "uprobe:{lib}:llama_decode {{}} uretprobe:{lib}:llama_decode {{}}"
        )),
        Case::Hist => Some(format!(
            "uprobe:{lib}:llama_decode {{ @start[tid] = nsecs; }} \
             uretprobe:{lib}:llama_decode {{ @lat = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
        )),
        _ => None,
    }
}

pub enum Tracer {
    None,
    Bpftrace(String),
    /// `profile_hz`: with `--profile-cpu` at that frequency.
    Llamaprobe {
        cpus: Option<String>,
        profile_hz: Option<u32>,
    },
}

pub struct LoopSpec {
    pub iterations: u64,
    pub threads: u32,
    /// taskset CPU list for the loop.
    pub loop_cpus: Option<String>,
    pub tracer: Tracer,
    /// Stop llamaprobe (SIGSTOP) while the loop runs: what happens when it cannot keep up.
    pub pause_agent: bool,
}

/// What the loop printed.
#[derive(Clone, Debug)]
pub struct LoopOut {
    pub calls: u64,
    pub ns_per_call: f64,
    pub wall_ns: u64,
}

/// What llamaprobe reported about a loop run.
#[derive(Clone, Debug)]
pub struct AgentLoop {
    pub decode_calls: u64,
    pub events_lost: u64,
    /// Its own summary line: "events lost: N (ring buffer full …)".
    pub lost_line: String,
    /// CPU time from attached to the loop's end (backlog drained).
    pub cpu_ms: f64,
    /// CPU samples taken (with `--profile-cpu`).
    pub cpu_samples: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct LoopRun {
    pub out: LoopOut,
    pub agent: Option<AgentLoop>,
}

impl LoopRun {
    pub fn calls_per_s(&self, iterations: u64, threads: u32) -> f64 {
        (iterations * u64::from(threads)) as f64 / (self.out.wall_ns as f64 / 1e9)
    }
}

fn parse_loop_line(line: &str) -> Result<LoopOut> {
    let mut kv = BTreeMap::new();
    for part in line.split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            kv.insert(k, v);
        }
    }
    let get = |k: &str| -> Result<&str> {
        kv.get(k)
            .copied()
            .with_context(|| format!("no {k}= in the loop's line {line:?}"))
    };
    Ok(LoopOut {
        calls: get("calls")?.parse()?,
        ns_per_call: get("ns_per_call")?.parse()?,
        wall_ns: get("wall_ns")?.parse()?,
    })
}

fn taskset(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpus]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// One run of the loop with its tracer: start the loop (it waits), attach, go, collect.
pub fn run_loop(env: &Env, spec: &LoopSpec) -> Result<LoopRun> {
    let mut lp = Proc::spawn(
        "bench_loop",
        taskset(spec.loop_cpus.as_deref(), &env.loop_bin)
            .arg(spec.iterations.to_string())
            .arg(spec.threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGKILL,
    )?;
    lp.wait_line("ready", Duration::from_secs(10), |s, l| {
        s == Stream::Out && l == "ready"
    })?;

    let summary = env.work.join(format!("summary-{}.json", lp.pid()));
    let _ = fs::remove_file(&summary);
    let mut tracer = match &spec.tracer {
        Tracer::None => None,
        Tracer::Bpftrace(program) => {
            if env.bpftrace.is_none() {
                bail!("bpftrace is not installed");
            }
            // BEGIN fires once every probe is attached: the signal to start the loop.
            let mut p = Proc::spawn(
                "bpftrace",
                Command::new("bpftrace")
                    .args(["-B", "none", "-e"])
                    .arg(format!("{program} BEGIN {{ printf(\"ready\\n\"); }}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
                libc::SIGINT,
            )?;
            p.wait_line(
                "ready (its BEGIN probe)",
                Duration::from_secs(60),
                |s, l| s == Stream::Out && l.trim() == "ready",
            )?;
            Some(p)
        }
        Tracer::Llamaprobe { cpus, profile_hz } => {
            let mut cmd = taskset(cpus.as_deref(), &env.probe_bin);
            cmd.args(["attach", "--pid", &lp.pid().to_string()])
                .args(["--quiet", "--metrics-addr", "off", "--summary-json"])
                .arg(&summary);
            if let Some(hz) = profile_hz {
                cmd.arg(format!("--profile-cpu={hz}"));
            }
            Some(spawn_attached(&mut cmd)?)
        }
    };
    let agent_pid = match spec.tracer {
        Tracer::Llamaprobe { .. } => tracer.as_ref().map(Proc::pid),
        _ => None,
    };
    let cpu0 = agent_pid.and_then(cpu_ms);
    let paused = match agent_pid {
        Some(pid) if spec.pause_agent => {
            util::signal(pid, libc::SIGSTOP);
            Some(pid)
        }
        _ => None,
    };

    lp.send_byte()?;
    // Generous: 1 ms per call would be 50 times the cost seen on a slow VM.
    let timeout = Duration::from_secs(60).max(Duration::from_millis(
        spec.iterations * u64::from(spec.threads),
    ));
    let line = lp.wait_line("its result", timeout, |s, l| {
        s == Stream::Out && l.starts_with("calls=")
    })?;
    let out = parse_loop_line(&line)?;
    if let Some(pid) = paused {
        util::signal(pid, libc::SIGCONT);
    }
    let cpu1 = agent_pid.and_then(|pid| settle_cpu(pid, Duration::from_secs(10)));
    lp.close_stdin();
    let status = lp.wait_exit(Duration::from_secs(10))?;
    if !status.success() {
        bail!("the loop failed ({status}):\n{}", lp.tail());
    }

    let mut agent = None;
    if let Some(mut p) = tracer.take() {
        match spec.tracer {
            Tracer::Llamaprobe { .. } => {
                // It ends by itself when the loop exits.
                let status = p.wait_exit(Duration::from_secs(60))?;
                if !status.success() {
                    bail!("llamaprobe failed ({status}):\n{}", p.tail());
                }
                // Let the reader threads see its last lines.
                thread::sleep(Duration::from_millis(50));
                let json = read_json(&summary)?;
                let lost_line = p
                    .tail()
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("events lost:"))
                    .unwrap_or("")
                    .to_string();
                agent = Some(AgentLoop {
                    decode_calls: json["decode_calls"].as_u64().unwrap_or(0),
                    events_lost: json["events_lost"].as_u64().unwrap_or(0),
                    lost_line,
                    cpu_ms: match (cpu0, cpu1) {
                        (Some(a), Some(b)) => b - a,
                        _ => f64::NAN,
                    },
                    cpu_samples: json["cpu_profile"]["samples"].as_u64(),
                });
                let _ = fs::remove_file(&summary);
            }
            _ => {
                // The measurement is in: a slow exit (detaching uprobes can take long on a
                // busy machine) only costs the kill.
                if let Err(e) = p.finish(Duration::from_secs(30)) {
                    progress!("  warning: {e:#}");
                }
            }
        }
    }
    Ok(LoopRun { out, agent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_line_parses() {
        let out = parse_loop_line("calls=101000 threads=1 ns_per_call=43745.06 wall_ns=4374506363")
            .unwrap();
        assert_eq!(out.calls, 101_000);
        assert_eq!(out.wall_ns, 4_374_506_363);
        assert!((out.ns_per_call - 43745.06).abs() < 1e-6);
    }
}
