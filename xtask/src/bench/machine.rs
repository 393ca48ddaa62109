//! The machine the benchmark ran on, for the report's header: CPUs, kernel, memory, load,
//! llamaprobe's commit and bpftrace's version.

use std::{fs, process::Command, thread};

use crate::util;

pub struct Machine {
    pub ncpu: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem: String,
    pub date: String,
    pub load_start: String,
    pub commit: String,
    pub bpftrace: String,
}

impl Machine {
    pub fn read(bpftrace: Option<&str>) -> Machine {
        let cmd_out = |program: &str, args: &[&str]| -> String {
            util::output(
                Command::new(program)
                    .args(args)
                    .current_dir(util::workspace_root()),
            )
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
        };
        let ncpu = cmd_out("nproc", &[]).parse().unwrap_or_else(|_| {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let mut commit = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
        let agent_dirs = ["agent", "probe-ebpf", "probe-common"];
        let mut status = vec!["status", "--porcelain", "--"];
        status.extend(agent_dirs);
        if cmd_out("git", &status).is_empty() {
            commit.push_str(" (agent, probe-ebpf, probe-common as committed)");
        } else {
            commit.push_str(" + uncommitted changes to the agent or its probes");
        }
        Machine {
            ncpu,
            cpu_model,
            kernel: cmd_out("uname", &["-r"]),
            mem,
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_start: loadavg(),
            commit,
            bpftrace: bpftrace.unwrap_or("not installed").to_string(),
        }
    }
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
