//! Section 4, event capacity: the synthetic loop ([`super::synthetic`]) as fast as it goes on
//! one or every core, llamaprobe pinned to CPU 0, and once with llamaprobe stopped (past
//! capacity): calls per second, events counted and lost, llamaprobe's CPU per event. Also runs
//! the agent's in-process timing of its Prometheus hot path ([`HOT_PATH_TEST`]).

use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::util::{self, progress};

use super::{
    synthetic::{run_loop, LoopRun, LoopSpec, Tracer},
    Env,
};

pub struct Level {
    pub label: String,
    pub threads: u32,
    pub loop_cpus: String,
    pub agent_cpus: String,
    pub pause_agent: bool,
}

pub struct CapacityRow {
    pub level: Level,
    pub run: LoopRun,
    pub iterations: u64,
}

pub struct Capacity {
    pub rows: Vec<CapacityRow>,
    /// The agent's in-process measurement of its Prometheus hot path (see [`HOT_PATH_TEST`]).
    pub hot_path: Result<String, String>,
}

/// The agent's ignored test that times its Prometheus sink per decode step, per-event label
/// lookup (the former code) against resolved handles.
pub const HOT_PATH_TEST: &str = "sinks::prometheus::tests::measure_hot_path";

/// Runs [`HOT_PATH_TEST`] (release build) and returns the line it prints.
fn hot_path() -> Result<String> {
    let out = util::cargo()
        .args(["test", "--release", "-p", "llamaprobe", "--lib", "--"])
        .args(["--ignored", "--exact", HOT_PATH_TEST, "--nocapture"])
        .current_dir(util::workspace_root())
        .env("PATH", util::path_with_tools()?)
        .stderr(Stdio::inherit())
        .output()
        .context("running the agent's hot-path measurement")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.starts_with("hot path:")) {
        Some(l) if out.status.success() => Ok(l.trim_start_matches("hot path:").trim().to_string()),
        _ => bail!("{HOT_PATH_TEST} printed no result ({}): {text}", out.status),
    }
}

pub fn measure(env: &Env) -> Result<Capacity> {
    let n = env.ncpu;
    let last = n.saturating_sub(1);
    let mut levels = Vec::new();
    if n >= 2 {
        levels.push(Level {
            label: "1 loop thread on CPU 1".into(),
            threads: 1,
            loop_cpus: "1".into(),
            agent_cpus: "0".into(),
            pause_agent: false,
        });
        levels.push(Level {
            label: format!("{n} loop threads on CPUs 0-{last} (one shares llamaprobe's core)"),
            threads: n as u32,
            loop_cpus: format!("0-{last}"),
            agent_cpus: "0".into(),
            pause_agent: false,
        });
    }
    levels.push(Level {
        label: "1 loop thread on CPU 0, llamaprobe's own core".into(),
        threads: 1,
        loop_cpus: "0".into(),
        agent_cpus: "0".into(),
        pause_agent: false,
    });
    // Past capacity: llamaprobe reads nothing while the loop runs.
    levels.push(Level {
        label: format!(
            "1 loop thread on CPU {last}, llamaprobe stopped (SIGSTOP) until the loop ends"
        ),
        threads: 1,
        loop_cpus: last.to_string(),
        agent_cpus: "0".into(),
        pause_agent: true,
    });
    let mut rows = Vec::new();
    for level in levels {
        let spec = LoopSpec {
            iterations: env.cfg.capacity_iterations,
            threads: level.threads,
            loop_cpus: Some(level.loop_cpus.clone()),
            tracer: Tracer::Llamaprobe {
                cpus: Some(level.agent_cpus.clone()),
                profile_hz: None,
            },
            pause_agent: level.pause_agent,
        };
        let run = run_loop(env, &spec).with_context(|| format!("capacity: {}", level.label))?;
        let agent = run.agent.clone().context("no llamaprobe result")?;
        progress!(
            "  {}: {:.0} calls/s, {:.0} ns/call, llamaprobe counted {} of {}, lost {}",
            level.label,
            run.calls_per_s(env.cfg.capacity_iterations, level.threads),
            run.out.ns_per_call,
            agent.decode_calls,
            run.out.calls,
            agent.events_lost
        );
        rows.push(CapacityRow {
            level,
            run,
            iterations: env.cfg.capacity_iterations,
        });
    }
    let hot_path = hot_path().map_err(|e| format!("{e:#}"));
    Ok(Capacity { rows, hot_path })
}
