//! deploy/systemd: the unit file verifies, its sample configuration is accepted, and the daemon
//! runs as a non-root user with exactly the unit's capabilities (and with no fewer).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::common::{
    daemon::{driver_copy, held_driver},
    server::{free_port, get, parse_metrics, sum_of, Probe},
    *,
};

/// The service account the unit runs as (README.md says how to create it).
const USER: &str = "llamaprobe";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn unit_text() -> String {
    std::fs::read_to_string(deploy_dir().join("llamaprobe.service")).unwrap()
}

/// The values of a `KEY=` line of the unit's [Service] section, split on whitespace.
fn unit_list(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    let lines: Vec<_> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}= line in the unit: {lines:?}");
    lines[0].split_whitespace().map(str::to_string).collect()
}

#[test]
fn systemd_unit_verifies() {
    let test = "systemd_unit_verifies";
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
            panic!("{test}: systemd-analyze is not installed");
        }
        eprintln!("SKIPPED {test}: systemd-analyze is not installed");
        return;
    }
    // `verify` checks that ExecStart's program exists: a copy of the unit, with the installed
    // path (/usr/local/bin/llamaprobe) replaced by the binary under test, is verified; the rest
    // of the file is unchanged.
    let unit = unit_text();
    let installed = "ExecStart=/usr/local/bin/llamaprobe daemon ";
    assert_eq!(
        unit.matches(installed).count(),
        1,
        "the unit starts /usr/local/bin/llamaprobe daemon"
    );
    let bin = env!("CARGO_BIN_EXE_llamaprobe");
    let dir = scratch("deploy_systemd_verify");
    let copy = dir.join("llamaprobe.service");
    std::fs::write(
        &copy,
        unit.replace(installed, &format!("ExecStart={bin} daemon ")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // Warnings (unknown keys, bad values) go to stderr even when the exit code is 0.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("llamaprobe.service:"),
        "systemd-analyze verify warns: {err}"
    );

    // What the deployment relies on.
    for key in [
        "User=llamaprobe",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == key), "{key} in the unit");
    }
    for absent in ["ProtectProc=", "ProcSubset=", "PrivateDevices="] {
        assert!(
            !unit.lines().any(|l| l.trim().starts_with(absent)),
            "{absent} would hide what the daemon reads"
        );
    }
    assert_eq!(
        unit_list(&unit, "AmbientCapabilities"),
        unit_list(&unit, "CapabilityBoundingSet"),
        "the bounding set is the ambient set"
    );
}

#[test]
fn systemd_sample_config_is_accepted() {
    let out = llamaprobe()
        .args(["daemon", "--config"])
        .arg(deploy_dir().join("llamaprobe.toml"))
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("configuration ok"), "{}", text(&out));
    assert!(stdout.contains("exclude [comm:llama-bench]"), "{stdout}");
}

/// Creates the service account when it is absent, as README.md says.
fn ensure_user() {
    let known = Command::new("id").arg(USER).output().unwrap();
    if known.status.success() {
        return;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "useradd: {}", text(&out));
}

/// `CAP_SYS_ADMIN` → `+sys_admin` (setpriv's spelling).
fn setpriv_caps(caps: &[String]) -> String {
    caps.iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `llamaprobe daemon` as the service account with exactly `caps` (inheritable, ambient and
/// bounding sets) and no new privileges, as systemd starts it from the unit.
fn daemon_as_user(caps: &[String], port: u16, include: &str) -> Probe {
    let list = setpriv_caps(caps);
    let sets = if list.is_empty() {
        "-all".to_string()
    } else {
        format!("-all,{list}")
    };
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={USER}"),
        &format!("--regid={USER}"),
        "--clear-groups",
        &format!("--inh-caps={sets}"),
        &format!("--bounding-set={sets}"),
        "--no-new-privs",
    ]);
    if !list.is_empty() {
        cmd.arg(format!("--ambient-caps={list}"));
    }
    cmd.arg(env!("CARGO_BIN_EXE_llamaprobe"))
        .args(["daemon", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--include",
            include,
            "--rescan",
            "1",
            "--series-grace",
            "300",
        ])
        // The resolver's debug lines say which process files could not be read.
        .env("LLAMAPROBE_LOG", "info,llamaprobe::resolve=debug")
        .env_remove("LLAMAPROBE_CONFIG");
    Probe::spawn(&mut cmd)
}

/// Ready (true) or exited (false), within a bounded wait.
fn ready_or_exited(d: &mut Probe, port: u16) -> bool {
    let t0 = Instant::now();
    loop {
        if get(&format!("http://127.0.0.1:{port}/readyz")).as_deref() == Some("ready\n") {
            return true;
        }
        if d.child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the daemon neither became ready nor exited in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fake driver, started by root, held before its first call until `release`.
fn start_waiting(exe: &Path) -> (Child, u32) {
    held_driver(exe)
}

fn release(mut driver: Child) {
    driver.stdin.take().unwrap().write_all(b"x").unwrap();
    let out = driver.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "the driver: {}", text(&out));
}

/// A stderr line of the daemon containing both parts: one seen already, or the next.
fn wait_line(d: &mut Probe, what: &str, pid: u32) -> String {
    let needle = format!("/proc/{pid}/");
    let pid_kv = format!("pid={pid}");
    let hit = |l: &str| l.contains(what) && (l.contains(&pid_kv) || l.contains(&needle));
    if let Some(l) = d.lines.iter().find(|l| hit(l)) {
        return l.clone();
    }
    loop {
        let line = d.wait_for(what);
        if hit(&line) {
            return line;
        }
    }
}

/// The decode count of `pid` once two reads 300 ms apart agree.
fn settled_decodes(port: u16, pid: u32) -> f64 {
    let read = || {
        let m =
            parse_metrics(&get(&format!("http://127.0.0.1:{port}/metrics")).unwrap_or_default());
        sum_of(&m, "llamacpp_decode_calls_total", &format!("pid=\"{pid}\""))
    };
    let t0 = Instant::now();
    let mut prev = read();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let cur = read();
        if cur == prev {
            return cur;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the decode count never settled"
        );
        prev = cur;
    }
}

/// What the daemon does when the unit's set lacks one capability (measured on 6.18).
enum Without {
    /// Exits with this code, saying this.
    Exits(i32, String),
}

fn without(cap: &str) -> Without {
    match cap {
        // The daemon checks its capabilities before it starts and names the one missing.
        "CAP_SYS_ADMIN" | "CAP_SYS_PTRACE" | "CAP_DAC_READ_SEARCH" => {
            Without::Exits(2, format!("missing {cap}"))
        }
        other => panic!("no measured outcome for the unit's {other}: measure it and add it here"),
    }
}

#[test]
fn daemon_runs_with_exactly_the_units_capabilities() {
    if !root_or_skip("daemon_runs_with_exactly_the_units_capabilities") {
        return;
    }
    let _serial = serial();
    ensure_user();
    let caps = unit_list(&unit_text(), "AmbientCapabilities");
    assert!(!caps.is_empty(), "the unit grants capabilities");
    let dir = scratch("deploy_systemd_caps");
    // The service account runs nothing from here; root runs the driver.
    let exe = driver_copy(&dir, "unitcaps_driver");

    // Exactly the unit's set: the driver, another user's process, is traced and counted.
    let port = free_port();
    let mut d = daemon_as_user(&caps, port, "exe:unitcaps_driver");
    assert!(
        ready_or_exited(&mut d, port),
        "with {caps:?} the daemon exited: {:?}",
        d.finish()
    );
    let (driver, pid) = start_waiting(&exe);
    let line = wait_line(&mut d, "traced", pid);
    assert!(line.contains("exe=unitcaps_driver"), "{line}");
    release(driver);
    assert_eq!(settled_decodes(port, pid), 15.0, "decodes of pid {pid}");
    let (code, _) = d.terminate();
    assert_eq!(code, 0, "the daemon stops cleanly on SIGTERM");

    // Each capability is needed.
    for cap in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let port = free_port();
        let mut d = daemon_as_user(&fewer, port, "exe:unitcaps_driver");
        let ready = ready_or_exited(&mut d, port);
        match without(cap) {
            Without::Exits(want, says) => {
                assert!(!ready, "without {cap} the daemon became ready");
                let code = d.child.wait().unwrap().code().unwrap_or(-1);
                // Every stderr line: the reader ends at the exited daemon's end of file.
                let lines: Vec<String> =
                    std::iter::from_fn(|| d.stderr.recv_timeout(Duration::from_secs(30)).ok())
                        .collect();
                eprintln!("without {cap}: exit {code}: {lines:?}");
                assert_eq!(code, want, "without {cap}: {lines:?}");
                assert!(
                    lines.iter().any(|l| l.contains(&says)),
                    "without {cap} the daemon says `{says}`: {lines:?}"
                );
            }
        }
    }
}
