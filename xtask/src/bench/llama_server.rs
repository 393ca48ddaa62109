//! What sections 2, 3 and 5 share: llama-server started with the bench's options, the fixed
//! streamed `/completion` request with its timings (time to first token by the client's clock),
//! and attaching llamaprobe to a process and detaching it (its `--summary-json`).

use std::{
    fs,
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    proc::{Proc, Stream},
    server::{self, Server},
};

use super::{read_json, Env};

/// The fixed request: same prompt, same length, greedy, no prompt cache, never stops early.
pub const PROMPT: &str =
    "The people who write the first word of a long day can look at the number \
    of words they made, and then they will find that some of them were more than one time in \
    the other part of what was said.";
pub const N_PREDICT: u32 = 64;
/// llama-server's options besides the model and the address.
pub const SERVER_ARGS: &[&str] = &["-t", "2", "-c", "512", "-np", "1"];

/// llama-server with the bench's options (SERVER_ARGS), its log in `cache/logs/bench-NAME.log`.
pub fn start_server(
    env: &Env,
    server_bin: &Path,
    model: &Path,
    extra_env: &[(String, String)],
    log_name: &str,
) -> Result<Server> {
    let log = env.cache.join("logs").join(format!("bench-{log_name}.log"));
    server::start(server_bin, model, SERVER_ARGS, extra_env, &log)
}

/// One streamed completion.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Request sent → first `data:` chunk (the first generated token).
    pub ttft_ms: f64,
    /// Request sent → last byte.
    pub total_ms: f64,
    pub predicted_n: u64,
    pub predicted_per_second: f64,
    pub predicted_per_token_ms: f64,
    pub prompt_ms: f64,
}

impl Completion {
    /// Generated tokens per second of the whole request, by the client's clock.
    pub fn wall_tps(&self) -> f64 {
        self.predicted_n as f64 / (self.total_ms / 1000.0)
    }
}

/// Sends the fixed request (streamed) and times it by the client's clock; the rest comes from
/// the `timings` of its final chunk. An answer other than 200 is an error.
pub fn completion(addr: &str) -> Result<Completion> {
    let body = serde_json::json!({
        "prompt": PROMPT,
        "n_predict": N_PREDICT,
        "temperature": 0.0,
        "cache_prompt": false,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    // The clock starts before ureq connects: connecting to 127.0.0.1 (tens of µs) is in the
    // times, below what the report's 0.1 ms resolves. The body is read as it arrives, so the
    // first `data:` is seen when its chunk comes in.
    let sent = Instant::now();
    let (status, mut reader) = server::send(
        addr,
        "POST",
        "/completion",
        Some(&body),
        Duration::from_secs(300),
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let mut first: Option<Duration> = None;
    loop {
        let n = reader.read(&mut buf).context("reading the completion")?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if first.is_none() && find(&raw, b"data: ").is_some() {
            first = Some(sent.elapsed());
        }
    }
    let total = sent.elapsed();
    let body = String::from_utf8_lossy(&raw);
    if status != 200 {
        bail!("HTTP {status} from llama-server: {}", body.trim());
    }
    let last = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["stop"] == Value::Bool(true))
        .context("the stream had no final chunk (`stop: true`)")?;
    let t = &last["timings"];
    let num = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .with_context(|| format!("no {what} in the final chunk"))
    };
    Ok(Completion {
        ttft_ms: first.context("no data chunk")?.as_secs_f64() * 1000.0,
        total_ms: total.as_secs_f64() * 1000.0,
        predicted_n: t["predicted_n"].as_u64().unwrap_or(0),
        predicted_per_second: num(&t["predicted_per_second"], "timings.predicted_per_second")?,
        predicted_per_token_ms: num(
            &t["predicted_per_token_ms"],
            "timings.predicted_per_token_ms",
        )?,
        prompt_ms: num(&t["prompt_ms"], "timings.prompt_ms")?,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `llamaprobe attach` to a server; returns once its probes are attached.
pub fn attach(env: &Env, pid: u32, extra: &[&str], summary: &Path) -> Result<Proc> {
    let _ = fs::remove_file(summary);
    let metrics = format!("127.0.0.1:{}", server::free_port()?);
    spawn_attached(
        Command::new(&env.probe_bin)
            .args(["attach", "--pid", &pid.to_string(), "--quiet"])
            .args(["--metrics-addr", &metrics, "--summary-json"])
            .arg(summary)
            .args(extra),
    )
}

/// Starts a `llamaprobe attach` command line (output captured, SIGINT to stop it); returns once
/// it prints `probes attached`.
pub fn spawn_attached(cmd: &mut Command) -> Result<Proc> {
    let mut p = Proc::spawn(
        "llamaprobe",
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGINT,
    )?;
    p.wait_line("`probes attached`", Duration::from_secs(60), |s, l| {
        s == Stream::Err && l.contains("probes attached")
    })?;
    Ok(p)
}

/// Stops llamaprobe (SIGINT) and returns its summary JSON.
pub fn detach(mut p: Proc, summary: &Path) -> Result<Value> {
    let status = p.finish(Duration::from_secs(30))?;
    if !status.success() {
        bail!("llamaprobe failed ({status}):\n{}", p.tail());
    }
    let json = read_json(summary)?;
    let _ = fs::remove_file(summary);
    Ok(json)
}
