//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

pub use serde_json::Value;

/// The llamaprobe binary under test.
pub fn llamaprobe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llamaprobe"))
}

/// True when running as root. Tests that load eBPF programs need it; without it they print why
/// they are skipped (and fail when LLAMAPROBE_REQUIRE_ROOT=1, as `cargo xtask test` sets).
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("LLAMAPROBE_REQUIRE_ROOT").is_some() {
        panic!("{test}: needs root (loads eBPF programs)");
    }
    eprintln!("SKIPPED {test}: needs root (loads eBPF programs); run `sudo cargo xtask test`");
    false
}

/// A fixture path from the environment `cargo xtask fixtures` prepares, or a skip.
pub fn fixture_or_skip(test: &str, key: &str) -> Option<PathBuf> {
    match std::env::var_os(key) {
        Some(v) if Path::new(&v).exists() => Some(PathBuf::from(v)),
        _ => {
            if std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
                panic!("{test}: fixture {key} is not set or missing; run `cargo xtask fixtures`");
            }
            eprintln!("SKIPPED {test}: fixture {key} not set; run through `cargo xtask test`");
            None
        }
    }
}

/// Builds the fake llama.cpp libraries and drivers once per test binary.
pub fn fakes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake-llama");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake/build.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run tests/fake/build.sh");
        assert!(st.success(), "building the fake llama.cpp failed");
        out
    })
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Reads a JSON file.
pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Reads a JSON-lines file.
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// stdout + stderr of an output, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Observations of one kind from an --events-out file.
pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Milliseconds of an observation.
pub fn dur_ms(e: &Value) -> f64 {
    let o = &e["origin"];
    (o["end_ns"].as_u64().unwrap() - o["start_ns"].as_u64().unwrap()) as f64 / 1e6
}
/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The project's Prometheus rules (recording rules and alerts).
pub fn rules_file() -> PathBuf {
    repo().join("dashboards/prometheus/llamaprobe.rules.yml")
}

/// True when `probe` (a program and arguments that only print its version) runs; else the test
/// says it is skipped (and fails when LLAMAPROBE_REQUIRE_FIXTURES is set: `cargo xtask setup`
/// installs it).
pub fn tool_or_skip(test: &str, probe: &[&str]) -> bool {
    let ok = Command::new(probe[0])
        .args(&probe[1..])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
        panic!("{test}: needs `{}` on PATH", probe[0]);
    }
    eprintln!("SKIPPED {test}: `{}` is not on PATH", probe[0]);
    false
}

pub mod daemon;
pub mod fixtures;
pub mod otlp_receiver;
pub mod prometheus;
pub mod server;

/// Background CPU load: `n` busy-loop processes at normal priority, as on a busy node (the
/// machines running llama.cpp are). Killed on drop.
pub struct CpuLoad(Vec<std::process::Child>);

impl CpuLoad {
    pub fn start(n: usize) -> Self {
        Self(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Rounds of a test repeated under load: `default` in the suite, `LLAMAPROBE_STRESS_ROUNDS`
/// when set (`cargo xtask test --stress` sets 20).
pub fn rounds(default: usize) -> usize {
    std::env::var("LLAMAPROBE_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Serialises the tests that attach probes: several llamaprobe sessions attaching and
/// detaching at once on 2 CPUs make the kernel's uprobe teardown (RCU grace periods) slow.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
