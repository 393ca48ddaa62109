//! llama-server for `demo` and `bench`: started on a free local port with its output in a log
//! file, waited for until `/health` answers, stopped (SIGTERM) when dropped; and the small
//! HTTP/1.1 client both talk to it with.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::proc::Proc;

/// How long llama-server may take to load the model and answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running llama-server (stopped when dropped, with its [`Proc`]).
pub struct Server {
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

/// Starts `server_bin -m model --host 127.0.0.1 --port P args…` (plus `--fit off` where the
/// build has it) on a free port P, with `envs` set and its output in `log`, and waits until
/// its `/health` answers ok.
pub fn start(
    server_bin: &Path,
    model: &Path,
    args: &[&str],
    envs: &[(String, String)],
    log: &Path,
) -> Result<Server> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    let log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let envs = || envs.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let mut cmd = Command::new(server_bin);
    cmd.arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .envs(envs());
    // Newer builds load the model twice at start with the default `--fit on`.
    let help = Command::new(server_bin)
        .arg("--help")
        .envs(envs())
        .stdin(Stdio::null())
        .output()?;
    if String::from_utf8_lossy(&help.stdout).contains("--fit ") {
        cmd.args(["--fit", "off"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let mut proc = Proc::spawn("llama-server", &mut cmd, libc::SIGTERM)?;
    let started = Instant::now();
    loop {
        if let Some(status) = proc.try_wait()? {
            bail!(
                "llama-server exited ({status}) while starting; the end of {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        if let Ok((200, body)) = http(&addr, "GET", "/health", None) {
            if body.contains("ok") {
                return Ok(Server { proc, addr });
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "llama-server was not ready after {} s; the end of {}:\n{}",
                READY_TIMEOUT.as_secs(),
                log.display(),
                log_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last 30 lines of a log file, for messages.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A port that was free a moment ago, on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a local port")?;
    Ok(listener.local_addr()?.port())
}

/// A minimal HTTP/1.1 client: one request per connection; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
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
    let body = if is_chunked(head) {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

/// Whether an HTTP head says `Transfer-Encoding: chunked`.
pub fn is_chunked(head: &str) -> bool {
    head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    })
}

/// Decodes a `Transfer-Encoding: chunked` body.
pub fn dechunk(mut rest: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert!(is_chunked("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"));
        assert!(!is_chunked("HTTP/1.1 200 OK\r\nContent-Length: 5"));
    }
}
