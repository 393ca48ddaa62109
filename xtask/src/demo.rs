//! `cargo xtask demo`: the end-to-end show. Starts the real llama-server on the tiny model,
//! attaches llamaprobe to it, sends a dozen completions and prints what both report.

use std::{
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{
    fixtures,
    proc::Proc,
    server::{self, http},
    setup,
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

    let probe_bin = util::build_llamaprobe()?;

    if TcpListener::bind(PROBE_METRICS_ADDR).is_err() {
        bail!("{PROBE_METRICS_ADDR} is in use: stop whatever listens there (an earlier llamaprobe?) and retry");
    }
    let log_path = util::cache_dir()?.join("logs/demo-llama-server.log");
    let started = Instant::now();
    let server = server::start(
        &server_bin,
        &model,
        &["--metrics", "-c", "2048", "-np", "4"],
        &[],
        &log_path,
    )?;
    let server_addr = server.addr.clone();
    progress!(
        "llama-server pid {} is ready on http://{server_addr} ({:.1} s; log: {})",
        server.proc.pid(),
        started.elapsed().as_secs_f64(),
        log_path.display()
    );

    progress!(
        "starting llamaprobe attach --pid {} --duration {PROBE_DURATION_SECS}",
        server.proc.pid()
    );
    let mut probe = Proc::spawn(
        "llamaprobe",
        Command::new(&probe_bin)
            .arg("attach")
            .arg("--pid")
            .arg(server.proc.pid().to_string())
            .arg("--duration")
            .arg(PROBE_DURATION_SECS.to_string())
            .arg("--metrics-addr")
            .arg(PROBE_METRICS_ADDR),
        libc::SIGTERM,
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
    let status = probe.wait_exit(Duration::from_secs(PROBE_DURATION_SECS + 15))?;
    drop(server);
    if !status.success() {
        bail!("llamaprobe exited with {status}");
    }
    progress!("demo done");
    Ok(())
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

/// Waits until llamaprobe serves its metrics (it has attached), for at most 15 s.
fn wait_for_probe(probe: &mut Proc) -> Result<()> {
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
