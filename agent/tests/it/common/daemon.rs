//! `llamaprobe daemon` as the tests run it: started on a free metrics port, ready once
//! /readyz says so, its log lines and metrics at hand.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    fakes, llamaprobe,
    server::{free_port, get, parse_metrics, sum_of, Probe},
};

/// A running daemon and its metrics port.
pub struct Daemon {
    pub probe: Probe,
    pub port: u16,
}

impl Daemon {
    /// Starts `llamaprobe daemon` with `args`; returns once /readyz says ready.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, |_| {})
    }

    /// The same, with `setup` given the command (its environment) before it starts.
    pub fn start_with(args: &[&str], setup: impl FnOnce(&mut Command)) -> Self {
        let port = free_port();
        let mut cmd = llamaprobe();
        cmd.args(["daemon", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("LLAMAPROBE_LOG", "info");
        setup(&mut cmd);
        let probe = Probe::spawn(&mut cmd);
        let t0 = Instant::now();
        while get(&format!("http://127.0.0.1:{port}/readyz")).as_deref() != Some("ready\n") {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "daemon not ready after 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { probe, port }
    }

    /// The log line saying `what` (traced, released) of `pid`: one seen already, or the next.
    pub fn wait_line(&mut self, what: &str, pid: u32) -> String {
        let needle = format!("pid={pid}");
        if let Some(l) = self
            .probe
            .lines
            .iter()
            .find(|l| l.contains(what) && l.contains(&needle))
        {
            return l.clone();
        }
        loop {
            let line = self.probe.wait_for(what);
            if line.contains(&needle) {
                return line;
            }
        }
    }

    /// Returns once a whole rescan has run after this call: one that began after it, so it
    /// saw every file mapped by then (the discovery histogram counts finished scans; the one
    /// that ends first may have begun before).
    pub fn wait_rescan(&self) {
        let scans = |m: &HashMap<String, f64>| sum_of(m, "llamaprobe_discovery_seconds_count", "");
        let t0 = Instant::now();
        let before = scans(&self.metrics());
        while scans(&self.metrics()) < before + 2.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon did not rescan in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&get(&format!("http://127.0.0.1:{}/metrics", self.port)).unwrap_or_default())
    }

    /// The metrics once two reads 300 ms apart agree on the series of `names` with `filter`
    /// (the daemon drains its ring buffer on a short timer).
    pub fn settled(&self, names: &[&str], filter: &str) -> HashMap<String, f64> {
        let pick = |m: &HashMap<String, f64>| -> Vec<f64> {
            names.iter().map(|n| sum_of(m, n, filter)).collect()
        };
        let t0 = Instant::now();
        let mut prev = self.metrics();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let cur = self.metrics();
            if pick(&cur) == pick(&prev) {
                return cur;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon's counters never settled"
            );
            prev = cur;
        }
    }
}

/// The fake llama.cpp's classic driver and library copied into `dir`, the driver as `name`:
/// a file no other test's processes map (its RUNPATH is `$ORIGIN`).
pub fn driver_copy(dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    std::fs::copy(fakes().join("classic/driver_classic"), &exe).unwrap();
    std::fs::copy(fakes().join("classic/libllama.so"), dir.join("libllama.so")).unwrap();
    exe
}

/// The fake driver `exe` started and held before its first call (`FAKE_WAIT_STDIN=1`: a byte
/// on its stdin lets it go), once it said it is ready; and its pid.
pub fn held_driver(exe: &Path) -> (Child, u32) {
    let mut child = Command::new(exe)
        .arg("/models/tiny-model.gguf")
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .trim()
        .strip_prefix("ready pid=")
        .unwrap_or_else(|| panic!("driver said {line:?}"))
        .parse()
        .unwrap();
    (child, pid)
}
