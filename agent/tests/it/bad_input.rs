//! Bad input gets a clear message that says what to do, a non-zero exit and no panic.

use std::process::{Command, Stdio};

use crate::common::*;

/// Runs llamaprobe and returns (exit code, stderr), checking it did not panic.
fn fails(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{}", text(&out));
    (out.status.code().unwrap_or(-1), stderr)
}

/// A running process that is not llama.cpp, killed on drop.
struct Sleeper(std::process::Child);
impl Sleeper {
    fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}
impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_such_pid() {
    if !root_or_skip("no_such_pid") {
        return;
    }
    // pid_max is at most 2^22 on Linux: this pid cannot exist.
    let (code, err) = fails(llamaprobe().args(["attach", "--pid", "4999999"]));
    assert_eq!(code, 2);
    assert!(err.contains("no process with pid 4999999"), "{err}");
    assert!(
        err.contains("pgrep"),
        "should say how to find the pid: {err}"
    );
}

#[test]
fn a_process_that_is_not_llama_cpp() {
    if !root_or_skip("a_process_that_is_not_llama_cpp") {
        return;
    }
    let s = Sleeper::start();
    let (code, err) = fails(llamaprobe().args(["attach", "--pid", &s.0.id().to_string()]));
    assert_eq!(code, 2);
    assert!(
        err.contains("defines none of llama.cpp's decode functions"),
        "{err}"
    );
    assert!(err.contains("(sleep)"), "should name the process: {err}");
    assert!(err.contains("Is this a llama.cpp program"), "{err}");
}

#[test]
fn a_binary_without_the_symbols() {
    let (code, err) = fails(llamaprobe().args(["symbols", "/bin/true"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("/bin/true defines none of llama.cpp's decode functions"),
        "{err}"
    );
    if !root_or_skip("a_binary_without_the_symbols (run)") {
        return;
    }
    // `run` refuses before starting the program.
    let dir = scratch("no-symbols");
    let marker = dir.join("ran");
    let (code, err) = fails(
        llamaprobe()
            .args(["run", "--metrics-addr", "off", "--", "/bin/sh", "-c"])
            .arg(format!("touch {}", marker.display())),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("defines none of llama.cpp's decode functions"),
        "{err}"
    );
    assert!(!marker.exists(), "the program must not run unprobed");
}

#[test]
fn a_program_that_does_not_exist() {
    if !root_or_skip("a_program_that_does_not_exist") {
        return;
    }
    let (code, err) = fails(llamaprobe().args(["run", "--", "no-such-llama-program-xyz"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot find program `no-such-llama-program-xyz`"),
        "{err}"
    );
}

#[test]
fn no_privileges() {
    if !root_or_skip("no_privileges (needs root to drop to nobody)") {
        return;
    }
    let s = Sleeper::start();
    // Drop to the unprivileged `nobody` user with no capabilities.
    let (code, err) = fails(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(env!("CARGO_BIN_EXE_llamaprobe"))
            .args(["attach", "--pid", &s.0.id().to_string()]),
    );
    assert_eq!(code, 2);
    assert!(err.contains("missing privileges"), "{err}");
    assert!(err.contains("sudo"), "should say what to do: {err}");
}

#[test]
fn help_explains_every_subcommand() {
    let out = llamaprobe().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for s in ["attach", "run", "symbols", "Needs root"] {
        assert!(help.contains(s), "{help}");
    }
    let out = llamaprobe().args(["attach", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "--pid",
        "--duration",
        "--metrics-addr",
        "127.0.0.1:9464",
        "--summary-json",
    ] {
        assert!(help.contains(s), "{help}");
    }
}

/// A reader that is gone (`llamaprobe doctor | true`): llamaprobe ends quietly (by SIGPIPE, as
/// other command-line tools do), without a panic.
#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let lib = fakes().join("classic/libllama.so");
    for args in [&["doctor"][..], &["symbols", server::path(&lib)][..]] {
        // The read end is closed before llamaprobe starts: its first write meets a broken pipe.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = llamaprobe()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {stderr}"
        );
    }
}
