//! `cargo xtask demo`: the end-to-end show. Starts the real llama-server on the tiny model,
//! attaches llamaprobe to it, sends a dozen completions and prints what both report.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    fixtures, setup,
    util::{self, progress},
};

/// Where llamaprobe serves its Prometheus metrics during the demo.
const PROBE_METRICS_ADDR: &str = "127.0.0.1:9464";
/// How long llamaprobe stays attached (seconds).
const PROBE_DURATION_SECS: u64 = 20;

/// The completions to send: (start offset in ms, prompt, n_predict). Rows with the same start
/// run concurrently (the server has 4 slots).
const REQUESTS: &[(u64, &str, u32)] = &[
    (0, "hello world", 8),
    (0, "The quick brown fox jumps over the lazy dog.", 16),
    (1500, "Once upon a time", 32),
    (3000, LONG_PROMPT, 24),
    (3000, "llama", 8),
    (3000, "What time is it now?", 48),
    (5000, "Write one word about the model server.", 16),
    (6500, LONG_PROMPT, 64),
    (6500, "people find their way", 12),
    (8000, "hello", 4),
    (
        10000,
        "a long day of work, then some time to look at the number two",
        40,
    ),
    (10000, LONG_PROMPT, 8),
];

const LONG_PROMPT: &str = "The people who write the first word of a long day can look at the \
    number of words they made, and then they will find that some of them were more than one \
    time in the other part of what was said. When we call a model server with a request, each \
    token is made from the one before it, so the time of a day of work is the time of many \
    small parts, and if you look at them you can see where the time has gone.";

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask demo` attaches eBPF probes and must run as root: run it again with sudo or as root");
    }
    setup::run()?;
    let (server_bin, model) = fixtures::prepare_demo()?;

    progress!("building llamaprobe (release)");
    util::run_inherit(
        util::cargo()
            .args(["build", "--release", "-p", "llamaprobe"])
            .current_dir(util::workspace_root())
            .env("PATH", util::path_with_tools()?),
    )?;
    let probe_bin = util::target_dir().join("release/llamaprobe");

    if TcpListener::bind(PROBE_METRICS_ADDR).is_err() {
        bail!("{PROBE_METRICS_ADDR} is in use: stop whatever listens there (an earlier llamaprobe?) and retry");
    }
    let port = free_port()?;
    let server_addr = format!("127.0.0.1:{port}");
    let log_path = util::cache_dir()?.join("logs/demo-llama-server.log");
    let mut server = start_server(&server_bin, &model, port, &log_path)?;
    progress!(
        "llama-server pid {} on http://{server_addr} (log: {})",
        server.pid(),
        log_path.display()
    );
    wait_until_healthy(&mut server, &server_addr, &log_path)?;

    progress!(
        "starting llamaprobe attach --pid {} --duration {PROBE_DURATION_SECS}",
        server.pid()
    );
    let mut probe = Guard::spawn(
        "llamaprobe",
        Command::new(&probe_bin)
            .arg("attach")
            .arg("--pid")
            .arg(server.pid().to_string())
            .arg("--duration")
            .arg(PROBE_DURATION_SECS.to_string())
            .arg("--metrics-addr")
            .arg(PROBE_METRICS_ADDR),
    )?;
    wait_for_probe(&mut probe)?;

    send_requests(&server_addr);

    println!();
    progress!("llamaprobe's metrics (http://{PROBE_METRICS_ADDR}/metrics, llamacpp_ lines, histogram buckets left out):");
    match http(PROBE_METRICS_ADDR, "GET", "/metrics", None) {
        Ok((200, body)) => print_lines(&body, |l| {
            l.starts_with("llamacpp_")
                && !l
                    .split(['{', ' '])
                    .next()
                    .unwrap_or("")
                    .ends_with("_bucket")
        }),
        Ok((status, _)) => progress!("  HTTP {status} from llamaprobe's metrics endpoint"),
        Err(err) => progress!("  could not fetch them: {err:#}"),
    }
    progress!("llama-server's own metrics (http://{server_addr}/metrics), for comparison:");
    match http(&server_addr, "GET", "/metrics", None) {
        Ok((200, body)) => print_lines(&body, |l| l.starts_with("llamacpp:")),
        Ok((status, _)) => progress!("  HTTP {status} from llama-server's metrics endpoint"),
        Err(err) => progress!("  could not fetch them: {err:#}"),
    }

    progress!("waiting for llamaprobe to finish its {PROBE_DURATION_SECS} s");
    let status = probe.wait_timeout(Duration::from_secs(PROBE_DURATION_SECS + 15))?;
    server.stop();
    match status {
        Some(status) if status.success() => {
            progress!("demo done");
            Ok(())
        }
        Some(status) => bail!("llamaprobe exited with {status}"),
        None => bail!("llamaprobe did not exit after its {PROBE_DURATION_SECS} s: stopped it"),
    }
}

fn print_lines(body: &str, keep: impl Fn(&str) -> bool) {
    let mut any = false;
    for line in body.lines().filter(|l| keep(l)) {
        println!("  {line}");
        any = true;
    }
    if !any {
        println!("  (none)");
    }
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a local port")?;
    Ok(listener.local_addr()?.port())
}

fn start_server(server_bin: &Path, model: &Path, port: u16, log_path: &Path) -> Result<Guard> {
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir)?;
    }
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(server_bin);
    cmd.arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--metrics", "-c", "2048", "-np", "4"]);
    // Newer builds load the model twice at start with the default `--fit on`.
    let help = Command::new(server_bin).arg("--help").output()?;
    if String::from_utf8_lossy(&help.stdout).contains("--fit ") {
        cmd.args(["--fit", "off"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Guard::spawn("llama-server", &mut cmd)
}

fn wait_until_healthy(server: &mut Guard, addr: &str, log_path: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = server.try_wait()? {
            bail!(
                "llama-server exited ({status}) while starting:\n{}",
                log_tail(log_path)
            );
        }
        if let Ok((200, body)) = http(addr, "GET", "/health", None) {
            if body.contains("\"ok\"") {
                progress!(
                    "llama-server is ready ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "llama-server was not ready after 60 s:\n{}",
                log_tail(log_path)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until llamaprobe serves its metrics (it has attached), for at most 15 s.
fn wait_for_probe(probe: &mut Guard) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        if let Some(status) = probe.try_wait()? {
            bail!("llamaprobe exited early ({status}); its messages are above");
        }
        if http(PROBE_METRICS_ADDR, "GET", "/metrics", None).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    progress!("llamaprobe serves no metrics on {PROBE_METRICS_ADDR} yet; sending requests anyway");
    Ok(())
}

/// Sends REQUESTS on their schedule, each from its own thread, and prints a line per answer.
fn send_requests(addr: &str) {
    progress!("sending {} completions over about 10 s", REQUESTS.len());
    let start = Instant::now();
    let handles: Vec<_> = REQUESTS
        .iter()
        .enumerate()
        .map(|(i, &(at_ms, prompt, n_predict))| {
            let addr = addr.to_string();
            thread::spawn(move || {
                let at = Duration::from_millis(at_ms);
                thread::sleep(at.saturating_sub(start.elapsed()));
                let body =
                    serde_json::json!({ "prompt": prompt, "n_predict": n_predict }).to_string();
                let sent = Instant::now();
                let line = match http(&addr, "POST", "/completion", Some(&body)) {
                    Ok((200, answer)) => describe_completion(&answer),
                    Ok((status, answer)) => format!("HTTP {status}: {}", answer.trim()),
                    Err(err) => format!("failed: {err:#}"),
                };
                progress!(
                    "request {:>2} at +{:>4.1} s, n_predict {n_predict:>2}: {line} ({} ms)",
                    i + 1,
                    at.as_secs_f64(),
                    sent.elapsed().as_millis()
                );
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}

fn describe_completion(answer: &str) -> String {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(answer) else {
        return "answer is not JSON".into();
    };
    format!(
        "{} prompt tokens, {} generated",
        json["tokens_evaluated"], json["tokens_predicted"]
    )
}

/// A minimal HTTP/1.1 client: one request per connection; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP answer from {addr}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed HTTP status line from {addr}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so an error anywhere
/// leaves nothing running.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Guard {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Guard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name} (`{}`)", util::display(cmd)))?;
        Ok(Guard { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the child to exit by itself; after `timeout`, stops it and returns None.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.stop();
        Ok(None)
    }

    /// SIGTERM, up to 5 s of grace, then SIGKILL.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        util::signal(self.pid(), libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        progress!("{} did not stop on SIGTERM: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}
