//! A real llama-server (fixture) on loopback, and llamaprobe attached to it.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    fixtures::{self, Fixture},
    llamaprobe, root_or_skip, serial,
};

/// The server-bearing fixtures and the model, or nothing (skipped; a failure when fixtures
/// are required).
pub fn servers(test: &str) -> Vec<(Fixture, std::path::PathBuf)> {
    let Some(model) = fixtures::model(test) else {
        return vec![];
    };
    let list: Vec<_> = fixtures::all(test)
        .into_iter()
        .filter(|f| f.server.is_some())
        .map(|f| (f, model.clone()))
        .collect();
    if list.is_empty() && std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
        panic!("{test}: no llama-server fixture");
    }
    list
}

/// Runs `check` on every server-bearing fixture, one probe session at a time (skipped
/// without root or fixtures, unless they are required).
pub fn on_every_server(test: &str, check: impl Fn(&Fixture, &Path)) {
    if !root_or_skip(test) {
        return;
    }
    let _serial = serial();
    for (f, model) in servers(test) {
        eprintln!("== fixture {}", f.name);
        check(&f, &model);
    }
}

/// The first server-bearing fixture and the model, with the probe-session lock held; `None`:
/// skipped (no root, or no fixtures unless they are required).
pub fn first_server(
    test: &str,
) -> Option<(
    Fixture,
    std::path::PathBuf,
    std::sync::MutexGuard<'static, ()>,
)> {
    if !root_or_skip(test) {
        return None;
    }
    let guard = serial();
    let (f, model) = servers(test).into_iter().next()?;
    Some((f, model, guard))
}

/// `llamaprobe attach --quiet` to `server`, with the fixture's symbols and environment and
/// `extra` options; returns once the probes are attached.
pub fn attach(f: &Fixture, server: &Server, extra: &[&str]) -> Probe {
    let mut cmd = llamaprobe();
    cmd.args(["attach", "--pid", &server.child.id().to_string(), "--quiet"])
        .args(f.symbols_args())
        .args(extra);
    f.apply(&mut cmd);
    let mut probe = Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    probe
}

/// A scratch path as an argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

/// A free loopback port for a server a test starts later (llama-server, llamaprobe's metrics,
/// an OTLP receiver). Taken below the kernel's ephemeral range (`ip_local_port_range`, from
/// 32768 by default), where the tests' own client connections get their local ports, and
/// never twice in one test run: a port that was free when asked can otherwise be taken by
/// another test's connection before its server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread concurrent test runs (several test binaries or machines' CI) by process id.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(
            port < 32_000,
            "no free test port left below the ephemeral range"
        );
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A llama.cpp program's `--help` text (stdout and stderr).
pub fn help(bin: &Path) -> String {
    Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

/// llama-server's arguments for the tests: 4 slots over a 2048-token context, 2 threads,
/// --metrics for its own counters, and where this version has them, one model load (--fit off)
/// and no web UI.
pub fn server_args(bin: &Path, model: &Path, port: u16) -> Vec<String> {
    let help = help(bin);
    let mut args: Vec<String> = [
        "-m",
        &model.to_string_lossy(),
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--metrics",
        "-c",
        "2048",
        "-np",
        "4",
        "-t",
        "2",
        "-tb",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if help.contains("--fit ") {
        args.extend(["--fit".into(), "off".into()]);
    }
    if help.contains("--threads-http") {
        // Enough HTTP threads that 16 concurrent streams are all served at once.
        args.extend(["--threads-http".into(), "24".into()]);
    }
    if help.contains("--no-webui") {
        args.push("--no-webui".into());
    }
    args
}

/// The HTTP client of the tests: one connection per request. A pooled keep-alive connection
/// that llama-server closed meanwhile fails the next POST on it with "connection reset"
/// (ureq retries only idempotent requests on a stale connection), which a test must not
/// mistake for the server's answer.
pub fn http() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .max_idle_connections(0)
            .build()
            .new_agent()
    })
}

/// HTTP GET returning the body.
pub fn get(url: &str) -> Option<String> {
    let mut r = http().get(url).call().ok()?;
    r.body_mut().read_to_string().ok()
}

/// Waits until llama-server's /health answers ok.
pub fn wait_healthy(port: u16, child: &mut Child) {
    let t0 = Instant::now();
    loop {
        if let Some(body) = get(&format!("http://127.0.0.1:{port}/health")) {
            if body.contains("ok") {
                return;
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("process exited before llama-server became healthy: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "llama-server not healthy after 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses Prometheus text: series (with labels) → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of the series of one metric name (any labels) whose labels contain `filter`.
pub fn sum_of(m: &HashMap<String, f64>, name: &str, filter: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{"))) && k.contains(filter)
        })
        .map(|(_, v)| v)
        .sum()
}

/// One non-streamed /completion.
pub fn completion(port: u16, prompt: &str, n_predict: u32) -> Value {
    let mut r = http()
        .post(&format!("http://127.0.0.1:{port}/completion"))
        .send_json(json!({"prompt": prompt, "n_predict": n_predict, "temperature": 0.8, "seed": 1}))
        .expect("completion request");
    r.body_mut().read_json().unwrap()
}

/// A llama-server started by the test, killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(
        bin: &Path,
        model: &Path,
        env: &std::collections::HashMap<String, String>,
    ) -> Self {
        Self::start_with(bin, model, env, &[], None)
    }

    /// With `extra` arguments after the tests' usual ones (a later `-c` or `-np` wins), and its
    /// log (stdout and stderr) in `log` if given.
    pub fn start_with(
        bin: &Path,
        model: &Path,
        env: &std::collections::HashMap<String, String>,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        let port = free_port();
        let (out, err) = match log {
            Some(p) => {
                let f = std::fs::File::create(p).expect("server log");
                (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let mut child = Command::new(bin)
            .args(server_args(bin, model, port))
            .args(extra)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start llama-server");
        wait_healthy(port, &mut child);
        Self { child, port }
    }

    /// Like [`Server::start_with`], or `None` if the server exits before it is healthy (it
    /// refuses these flags or the model).
    pub fn try_start(
        bin: &Path,
        model: &Path,
        env: &std::collections::HashMap<String, String>,
        extra: &[&str],
    ) -> Option<Self> {
        let port = free_port();
        let mut child = Command::new(bin)
            .args(server_args(bin, model, port))
            .args(extra)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llama-server");
        let t0 = Instant::now();
        loop {
            if get(&format!("http://127.0.0.1:{port}/health")).is_some_and(|b| b.contains("ok")) {
                return Some(Self { child, port });
            }
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "llama-server not healthy after 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POST a JSON body to `path`; the response's JSON.
    pub fn post(&self, path: &str, body: &Value) -> Value {
        let mut r = http()
            .post(&format!("http://127.0.0.1:{}{path}", self.port))
            .send_json(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        r.body_mut().read_json().unwrap()
    }

    /// llama-server's own /metrics.
    pub fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(
            &get(&format!("http://127.0.0.1:{}/metrics", self.port)).expect("server /metrics"),
        )
    }

    /// Waits until no request is in flight and the counters stopped moving.
    pub fn settled_metrics(&self) -> HashMap<String, f64> {
        // Gauges like n_busy_slots_per_decode can be NaN: compare the counters only.
        let counters = |m: &HashMap<String, f64>| -> Vec<f64> {
            [
                "n_decode_total",
                "prompt_tokens_total",
                "tokens_predicted_total",
            ]
            .iter()
            .map(|k| m.get(&format!("llamacpp:{k}")).copied().unwrap_or(-1.0))
            .collect()
        };
        let t0 = Instant::now();
        let mut prev = self.metrics();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let cur = self.metrics();
            if cur.get("llamacpp:requests_processing") == Some(&0.0)
                && counters(&cur) == counters(&prev)
            {
                return cur;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "llama-server's counters never settled"
            );
            prev = cur;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A llamaprobe process whose stderr is collected; killed on drop.
pub struct Probe {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
    pub lines: Vec<String>,
}

impl Probe {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llamaprobe");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[llamaprobe] {line}");
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            stderr: rx,
            lines: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "llamaprobe never printed `{needle}` ({e}); got {:?}",
                    self.lines
                ),
            }
        }
    }

    /// Sends `sig` to llamaprobe (and does not wait).
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGINT and waits; returns (exit code, stdout).
    pub fn interrupt(self) -> (i32, String) {
        self.signal(libc::SIGINT);
        self.finish()
    }

    /// Sends SIGTERM (what systemd and Kubernetes send) and waits; returns (exit code, stdout).
    pub fn terminate(self) -> (i32, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.finish()
    }

    /// Stops the program `llamaprobe run` started (SIGTERM to llamaprobe's children) and waits
    /// for llamaprobe to end with it; returns (exit code, stdout).
    pub fn stop_program(self) -> (i32, String) {
        let st = Command::new("pkill")
            .args(["-TERM", "-P", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "llamaprobe had no program to stop");
        self.finish()
    }

    /// Waits for the end; returns (exit code, stdout).
    pub fn finish(mut self) -> (i32, String) {
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed /completion; returns the final chunk (with `tokens_predicted`, `timings`).
pub fn completion_stream(port: u16, prompt: &str, n_predict: u32) -> Value {
    use std::io::BufRead;
    let resp = http()
        .post(&format!("http://127.0.0.1:{port}/completion"))
        .send_json(json!({"prompt": prompt, "n_predict": n_predict, "stream": true, "seed": 1}))
        .expect("completion request");
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut last = Value::Null;
    for line in reader.lines().map_while(Result::ok) {
        if let Some(data) = line.strip_prefix("data: ") {
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if v.get("stop") == Some(&Value::Bool(true)) {
                    last = v;
                }
            }
        }
    }
    last
}

/// llamaprobe's metrics once `ready` holds (it drains events on a short timer), at most 10 s.
pub fn wait_metrics(
    port: u16,
    ready: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let t0 = Instant::now();
    loop {
        let m =
            parse_metrics(&get(&format!("http://127.0.0.1:{port}/metrics")).unwrap_or_default());
        if ready(&m) || t0.elapsed() > Duration::from_secs(10) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
