//! `llamaprobe doctor`: as root on this machine everything the daemon needs is there; without
//! privileges it fails on the capabilities and says which and what for.

use std::process::Command;

use crate::common::*;

const CHECKS: [&str; 11] = [
    "kernel",
    "btf",
    "uprobes",
    "tracefs",
    "perf_event_paranoid",
    "lockdown",
    "memlock",
    "capabilities",
    "cgroup",
    "nvml",
    "processes",
];

fn checks(stdout: &[u8]) -> Vec<Value> {
    serde_json::from_slice::<Vec<Value>>(stdout).expect("doctor --json prints a JSON array")
}

#[test]
fn doctor_says_the_daemon_can_run_here_as_root() {
    if !root_or_skip("doctor_says_the_daemon_can_run_here_as_root") {
        return;
    }
    let out = llamaprobe().args(["doctor", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let all = checks(&out.stdout);
    assert_eq!(
        all.iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        CHECKS
    );
    let status = |name: &str| all.iter().find(|c| c["name"] == name).unwrap()["status"].clone();
    for ok in ["kernel", "uprobes", "capabilities", "lockdown", "memlock"] {
        assert_eq!(status(ok), "ok", "{ok}: {all:?}");
    }
    // No GPU here: a warning with its fix, not a failure.
    assert_eq!(status("nvml"), "warn");
    assert!(all.iter().all(|c| c["status"] != "fail"), "{all:?}");
    let table = llamaprobe().arg("doctor").output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("llamaprobe can run here."));
}

#[test]
fn doctor_without_privileges_names_the_missing_capabilities() {
    if !root_or_skip("doctor_without_privileges_names_the_missing_capabilities") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_llamaprobe"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = checks(&out.stdout);
    let caps = all.iter().find(|c| c["name"] == "capabilities").unwrap();
    assert_eq!(caps["status"], "fail", "{caps}");
    let found = caps["found"].as_str().unwrap();
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"] {
        assert!(found.contains(cap), "{found}");
    }
    assert!(caps["fix"].as_str().unwrap().contains("root"), "{caps}");
}
