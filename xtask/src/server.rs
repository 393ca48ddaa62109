//! llama-server for `demo` and `bench`: started on a free local port with its output in a log
//! file, waited for until `/health` answers, stopped (SIGTERM) when dropped; and the HTTP
//! requests (ureq) both send to it and to llamaprobe's metrics endpoint.

use std::{
    fs,
    io::Read,
    net::TcpListener,
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
    // Newer builds load the model twice at start with the default `--fit on`.
    let mut args = args.to_vec();
    if help(server_bin, envs)?.contains("--fit ") {
        args.extend(["--fit", "off"]);
    }
    start_exact(server_bin, model, &args, envs, log)
}

/// `server_bin --help` (with `envs` set): which options this build has.
pub fn help(server_bin: &Path, envs: &[(String, String)]) -> Result<String> {
    let out = Command::new(server_bin)
        .arg("--help")
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --help", server_bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`start`] with exactly `args`, and no `llama-server --help` run first (a host agent
/// watching the machine would see that process too).
pub fn start_exact(
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
    let mut cmd = Command::new(server_bin);
    cmd.arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
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
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A port that was free a moment ago, on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a local port")?;
    Ok(listener.local_addr()?.port())
}

/// How long one read of an answer may wait for the server before the request fails (a stalled
/// server then fails the task instead of hanging it).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A ureq agent for the servers on 127.0.0.1 (llama-server, llamaprobe's metrics endpoint).
/// Statuses other than 2xx come back as answers, not as errors (ureq's default), since callers
/// print `HTTP {status}` and the body, and `/health` answers 503 while the model loads; no
/// proxy from the environment, everything is local; and `read_timeout` bounds every read of
/// the socket, not the whole request, so a long generation that keeps streaming is not cut
/// off. [`send`] makes a new agent per request, so no connection is kept for the next one.
fn agent(read_timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_per_read(Some(read_timeout))
        .build()
        .into()
}

/// Sends one request to `http://{addr}{path}`, with a JSON `body` if any; returns the answer's
/// status and its body still to be read (for a caller that times it as it streams in; ureq
/// undoes the chunked transfer encoding).
pub fn send(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    read_timeout: Duration,
) -> Result<(u16, impl Read)> {
    let url = format!("http://{addr}{path}");
    let request = ureq::http::Request::builder().method(method).uri(&url);
    let agent = agent(read_timeout);
    let answer = match body {
        Some(body) => agent.run(
            request
                .header("Content-Type", "application/json")
                .body(body)?,
        ),
        None => agent.run(request.body(())?),
    }
    .with_context(|| format!("{method} {url}"))?;
    Ok((answer.status().as_u16(), answer.into_body().into_reader()))
}

/// One request to a local server (see [`send`]); returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let (status, mut reader) = send(addr, method, path, body, READ_TIMEOUT)?;
    let mut body = Vec::new();
    reader
        .read_to_end(&mut body)
        .with_context(|| format!("reading the answer to {method} http://{addr}{path}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ureq turns 4xx/5xx into errors unless told not to; callers need the status and body.
    #[test]
    fn statuses_other_than_200_come_back_with_their_body() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap().to_string();
        let serve = std::thread::spawn(move || {
            let mut req = server.recv().unwrap();
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            let answer = format!("{} {} {body}", req.method(), req.url());
            // No length: sent chunked, as llama-server streams.
            let chunked = tiny_http::Response::new(
                tiny_http::StatusCode(503),
                Vec::new(),
                answer.as_bytes(),
                None,
                None,
            );
            req.respond(chunked).unwrap();
        });
        let (status, body) = http(&addr, "POST", "/completion", Some("{}")).unwrap();
        serve.join().unwrap();
        assert_eq!((status, body.as_str()), (503, "POST /completion {}"));
    }

    /// The bench's time to first token relies on reading a streamed body as it arrives.
    #[test]
    fn chunks_are_read_as_they_arrive() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serve = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).unwrap();
            let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
            let first = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                chunk("data: 1\n")
            );
            stream.write_all(first.as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(500));
            let rest = format!("{}0\r\n\r\n", chunk("data: 2\n"));
            stream.write_all(rest.as_bytes()).unwrap();
        });
        let started = Instant::now();
        let (status, mut reader) = send(&addr, "GET", "/", None, READ_TIMEOUT).unwrap();
        let mut buf = [0u8; 64];
        let n = reader.read(&mut buf).unwrap();
        assert_eq!((status, &buf[..n]), (200, &b"data: 1\n"[..]));
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "data: 2\n");
        serve.join().unwrap();
    }
}
