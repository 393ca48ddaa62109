//! Child processes the tasks start: each owned by a [`Proc`] guard that stops it when dropped
//! (on errors too) and dies with the task if the task is killed (`PR_SET_PDEATHSIG`).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, progress};

/// Which of a child's output streams a line came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

/// A child process, stopped (its stop signal, then SIGKILL) when dropped. Its piped stdout and
/// stderr are read by threads into a channel of lines (and a tail kept for messages).
pub struct Proc {
    name: String,
    child: Child,
    lines: Option<Receiver<(Stream, String)>>,
    tail: Arc<Mutex<Vec<String>>>,
    stop_signal: libc::c_int,
}

const TAIL_LINES: usize = 40;

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, stop_signal: libc::c_int) -> Result<Proc> {
        // If the task itself is killed (no Drop runs), the kernel kills the child too.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {name} (`{}`)", util::display(cmd)))?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let mut captured = false;
        if let Some(out) = child.stdout.take() {
            read_lines(out, Stream::Out, tx.clone(), tail.clone());
            captured = true;
        }
        if let Some(err) = child.stderr.take() {
            read_lines(err, Stream::Err, tx.clone(), tail.clone());
            captured = true;
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            lines: captured.then_some(rx),
            tail,
            stop_signal,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.join("\n")).unwrap_or_default()
    }

    /// Waits for an output line matching `pred`; fails on timeout or if the process ends first.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(Stream, &str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let Some(rx) = self.lines.as_ref() else {
            bail!("{}'s output is not captured", self.name);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((stream, line)) if pred(stream, &line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{} did not print {what} within {} s; its last output:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_secs(5));
                    bail!(
                        "{} ended ({}) before printing {what}; its last output:\n{}",
                        self.name,
                        status.map_or_else(|e| format!("{e:#}"), |s| s.to_string()),
                        self.tail()
                    )
                }
            }
        }
    }

    /// Where the process waits in the kernel (wchan and stack), for a message.
    fn kernel_wait(&self) -> String {
        let pid = self.pid();
        let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stack: Vec<String> = fs::read_to_string(format!("/proc/{pid}/stack"))
            .unwrap_or_default()
            .lines()
            .take(6)
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
            .collect();
        format!("wchan {wchan}; stack {}", stack.join(" < "))
    }

    pub fn send_byte(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin is not piped")?;
        stdin.write_all(b"g")?;
        stdin.flush()?;
        Ok(())
    }

    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits for the process to end by itself; after `timeout`, stops it and fails.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let where_ = self.kernel_wait();
                self.stop();
                bail!(
                    "{} did not exit within {} s: stopped it (it was waiting in: {where_})",
                    self.name,
                    timeout.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the stop signal and waits for the process to end (SIGKILL after `timeout`).
    /// The stop signal is sent again every 3 s while the process runs, in case one was missed
    /// (llamaprobe, once its outputs are written, takes about 3 s to detach its probes: its
    /// repeats are ignored then).
    pub fn finish(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut sent = 0;
        while self.running() && (sent == 0 || Instant::now() + Duration::from_secs(3) < deadline) {
            util::signal(self.pid(), self.stop_signal);
            sent += 1;
            let until = Instant::now() + Duration::from_secs(3);
            while self.running() && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if sent > 1 {
            progress!("  {} needed the stop signal {sent} times", self.name);
        }
        self.wait_exit(deadline.saturating_duration_since(Instant::now()))
    }

    /// The stop signal, up to 5 s of grace, then SIGKILL.
    pub fn stop(&mut self) {
        if !self.running() {
            return;
        }
        util::signal(self.pid(), self.stop_signal);
        // In case it was paused (the capacity section stops llamaprobe on purpose).
        util::signal(self.pid(), libc::SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        progress!("{} did not stop: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_lines(
    pipe: impl Read + Send + 'static,
    stream: Stream,
    tx: Sender<(Stream, String)>,
    tail: Arc<Mutex<Vec<String>>>,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if let Ok(mut t) = tail.lock() {
                        t.push(line.clone());
                        if t.len() > TAIL_LINES {
                            t.remove(0);
                        }
                    }
                    let _ = tx.send((stream, line));
                }
            }
        }
    });
}
