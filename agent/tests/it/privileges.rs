//! `attach` with the least privilege measured on this kernel: a non-root user holding exactly
//! CAP_SYS_ADMIN (uprobes as non-root; it covers CAP_BPF and CAP_PERFMON here),
//! CAP_SYS_PTRACE (another user's /proc/PID entries) and CAP_DAC_READ_SEARCH (its files: the
//! fixtures live under /root, mode 0700) traces a llama-server that root runs, with the
//! server's own counts; without any one of them, llamaprobe names it and exits 2.

use std::{os::unix::fs::PermissionsExt, process::Command};

use crate::common::{server::*, *};

/// The measured set for `attach`, as setpriv names them.
const ATTACH_CAPS: [&str; 3] = ["sys_admin", "sys_ptrace", "dac_read_search"];

/// `llamaprobe ARGS` as uid/gid 65534 with exactly `caps` (ambient, inheritable, bounding).
fn as_nobody(caps: &[&str], args: &[&str]) -> Command {
    let set = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg(env!("CARGO_BIN_EXE_llamaprobe"))
        .args(args);
    cmd
}

#[test]
fn attach_as_another_user_with_the_measured_capabilities() {
    let Some((f, model, _guard)) =
        first_server("attach_as_another_user_with_the_measured_capabilities")
    else {
        return;
    };
    let server = Server::start(f.server.as_ref().unwrap(), &model, &f.env);
    let pid = server.child.id().to_string();
    let dir = scratch("privileges-attach");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let summary = dir.join("summary.json");
    let mut cmd = as_nobody(
        &ATTACH_CAPS,
        &[
            "attach",
            "--pid",
            &pid,
            "--quiet",
            "--metrics-addr",
            "off",
            "--summary-json",
            path(&summary),
        ],
    );
    let mut probe = Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    let before = server.settled_metrics();
    for i in 0..2 {
        completion(server.port, &format!("least privilege prompt {i}"), 6);
    }
    let after = server.settled_metrics();
    let delta = |k: &str| after[&format!("llamacpp:{k}")] - before[&format!("llamacpp:{k}")];
    // The ring buffer is drained on a short timer; the session ends with what it holds.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, out) = probe.interrupt();
    assert_eq!(code, 0, "{out}");
    let s = json(&summary);
    assert_eq!(s["decode_calls"].as_f64().unwrap(), delta("n_decode_total"));
    assert_eq!(
        s["sampled_tokens"].as_f64().unwrap(),
        delta("tokens_predicted_total")
    );
    // Each capability of the set is needed, and named when it is missing.
    for (missing, says) in [
        ("sys_admin", "give it CAP_SYS_ADMIN"),
        ("sys_ptrace", "needs CAP_SYS_PTRACE"),
        ("dac_read_search", "needs CAP_DAC_READ_SEARCH"),
    ] {
        let fewer: Vec<&str> = ATTACH_CAPS.into_iter().filter(|c| *c != missing).collect();
        let out = as_nobody(
            &fewer,
            &[
                "attach",
                "--pid",
                &pid,
                "--quiet",
                "--metrics-addr",
                "off",
                "--duration",
                "1",
            ],
        )
        .output()
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "without {missing}: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "without {missing}: {}",
            text(&out)
        );
    }
}
