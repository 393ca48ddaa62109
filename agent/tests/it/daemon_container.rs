//! `llamaprobe daemon` and a real llama-server in a podman container (runc, the host's network):
//! the daemon, started first, sees the server at its exec inside the container, reaches its
//! files from the host through /proc/PID/map_files, counts what the server counts itself and
//! labels the series with the container's id.
//!
//! The image is built locally (no registry can be pulled from): the fixture's llama-server, the
//! libraries `ldd` lists for it at the same absolute paths, the dynamic loader and the tiny
//! model, imported from a tar stream once per fixture build.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, UNIX_EPOCH},
};

use crate::common::{daemon::Daemon, fixtures::Fixture, server::*, *};

/// The image's name; its tag names the fixture and the build of the files in it.
const IMAGE: &str = "llamaprobe-test-server";

/// Where the model lies inside the image.
const MODEL_DIR: &str = "/models";

/// The counters compared with the server's own.
const COUNTED: [&str; 2] = ["llamacpp_decode_calls_total", "llamacpp_tokens_total"];

/// podman with the runtime and cgroup manager that work on these hosts (crun refuses the hybrid
/// cgroup layout; cgroupfs needs no systemd).
pub(crate) fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// True when podman and runc are installed; a skip otherwise (a failure when fixtures are
/// required: `cargo xtask setup` installs them).
pub(crate) fn podman_or_skip(test: &str) -> bool {
    let works = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<_> = ["podman", "runc"]
        .into_iter()
        .filter(|b| !works(b))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed; run `cargo xtask setup`",
        missing.join(" and ")
    );
    if std::env::var_os("LLAMAPROBE_REQUIRE_FIXTURES").is_some() {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// The files `ldd` lists for `bin` (its libraries and the dynamic loader), as it reports them.
pub(crate) fn ldd(bin: &Path, env: &HashMap<String, String>) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).envs(env).output().unwrap();
    assert!(
        out.status.success(),
        "ldd {}: {}",
        bin.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            assert!(!line.contains("not found"), "ldd {}: {line}", bin.display());
            let file = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            }?;
            file.starts_with('/').then(|| PathBuf::from(file))
        })
        .collect()
}

/// Copies `from` to the same absolute path under `root`, symbolic links included: the file
/// itself lies at its real path and the path asked for, if it differs, is an absolute link to it
/// (as a distribution's image has them, e.g. the loader in /lib64).
pub(crate) fn place(root: &Path, from: &Path) {
    let real = std::fs::canonicalize(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    let under = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let dest = under(&real);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    if !dest.exists() {
        std::fs::copy(&real, &dest).unwrap_or_else(|e| panic!("{}: {e}", real.display()));
    }
    if real != from {
        let link = under(from);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(&real, &link).unwrap();
        }
    }
}

/// The local image holding `bin` (with its libraries) and `model`, built unless it exists.
pub(crate) fn server_image(f: &Fixture, bin: &Path, model: &Path) -> String {
    let mut files = vec![bin.to_path_buf()];
    files.extend(ldd(bin, &f.env));
    // Tagged by the files' identities (path, size, modification time) and the model: a rebuilt
    // fixture gets an image of its own.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in files.iter().chain([&model.to_path_buf()]) {
        let real = std::fs::canonicalize(p).unwrap();
        let meta = std::fs::metadata(&real).unwrap();
        let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
        (p, &real, meta.len(), mtime).hash(&mut h);
    }
    let tag_of: String = f
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let image = format!("{IMAGE}:{tag_of}-{:016x}", h.finish());
    let exists = podman().args(["image", "exists", &image]).status().unwrap();
    if exists.success() {
        return image;
    }

    let root = scratch("daemon-container-image");
    for p in &files {
        place(&root, p);
    }
    let models = root.join(MODEL_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(model, models.join(model.file_name().unwrap())).unwrap();

    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let import = podman()
        .args(["import", "-", &image])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of {}", root.display());
    assert!(import.status.success(), "podman import: {}", text(&import));
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("built image {image}");
    image
}

/// A container, removed (stopped first) on drop.
pub(crate) struct Container {
    pub(crate) id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "--time", "2", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `podman inspect --format FORMAT` of a container.
pub(crate) fn inspect(id: &str, format: &str) -> String {
    let out = podman()
        .args(["inspect", "--format", format, id])
        .output()
        .unwrap();
    assert!(out.status.success(), "podman inspect: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs the image's llama-server with the tests' usual arguments on a free port of the host's
/// network; returns once it is healthy: the container, the server (whose child is a `podman
/// wait` on the container: it ends when the container does) and the container's main process
/// on the host.
pub(crate) fn run_server(
    image: &str,
    f: &Fixture,
    bin: &Path,
    model: &Path,
) -> (Container, Server, u32) {
    let port = free_port();
    let log = scratch("daemon-container").join("server.log");
    let in_image = Path::new(MODEL_DIR).join(model.file_name().unwrap());
    let env: Vec<String> = f
        .env
        .iter()
        .flat_map(|(k, v)| ["--env".to_string(), format!("{k}={v}")])
        .collect();
    let out = podman()
        .args(["run", "-d", "--rm"])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--network", "host"])
        // Its log outside the container's storage, kept after --rm for the failure messages.
        .args(["--log-driver", "k8s-file", "--log-opt"])
        .arg(format!("path={}", log.display()))
        .args(&env)
        .arg(image)
        .arg(bin)
        .args(server_args(bin, &in_image, port))
        .output()
        .unwrap();
    assert!(out.status.success(), "podman run: {}", text(&out));
    let started = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let container = Container {
        id: started.clone(),
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let wait = podman()
        .args(["wait", &started])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podman wait");
    let mut server = Server { child: wait, port };
    let t0 = Instant::now();
    while !get(&format!("http://127.0.0.1:{port}/health")).is_some_and(|b| b.contains("ok")) {
        if let Ok(Some(_)) = server.child.try_wait() {
            panic!(
                "the container exited before llama-server became healthy; its log:\n{}",
                log_text()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "llama-server in the container not healthy after 120 s; its log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = inspect(&started, "{{.Id}}");
    assert_eq!(id, started, "podman run printed another id than inspect");
    let pid: u32 = inspect(&id, "{{.State.Pid}}").parse().unwrap();
    assert!(pid > 0, "container {id} has no process");
    (container, server, pid)
}

/// What a container's process shows the host, for failure messages.
fn proc_view(pid: u32) -> String {
    let read = |f: &str| {
        let mut s = String::new();
        let _ =
            std::fs::File::open(format!("/proc/{pid}/{f}")).map(|mut h| h.read_to_string(&mut s));
        s
    };
    let maps: std::collections::BTreeSet<_> = read("maps")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_string))
        .filter(|p| p.starts_with('/'))
        .collect();
    format!(
        "/proc/{pid}/cgroup:\n{}/proc/{pid}/maps (files):\n{}",
        read("cgroup"),
        maps.into_iter().collect::<Vec<_>>().join("\n")
    )
}

#[test]
fn daemon_traces_a_llama_server_in_a_podman_container() {
    let test = "daemon_traces_a_llama_server_in_a_podman_container";
    let Some((f, model, _guard)) = first_server(test) else {
        return;
    };
    if !podman_or_skip(test) {
        return;
    }
    let bin = f.server.clone().unwrap();
    let image = server_image(&f, &bin, &model);

    // The daemon first: the server is seen at its exec inside the container.
    let mut d = Daemon::start(&["--include", "exe:llama-server", "--series-grace", "1"]);
    let (container, server, pid) = run_server(&image, &f, &bin, &model);
    let id = container.id.clone();
    eprintln!("container {id}, its llama-server is pid {pid} on the host");
    let line = d.wait_line("traced", pid);
    assert!(line.contains("exe=llama-server"), "{line}");
    assert!(
        line.contains(&id),
        "the traced line lacks the container id {id}: {line}\n{}",
        proc_view(pid)
    );

    let of_pid = format!("pid=\"{pid}\"");
    let base_server = server.settled_metrics();
    let base = d.settled(&COUNTED, &of_pid);
    for i in 0..3 {
        completion(
            server.port,
            &format!("container prompt {i} alpha bravo"),
            6 + i,
        );
    }
    let now_server = server.settled_metrics();
    let ours = d.settled(&COUNTED, &of_pid);

    let delta =
        |k: &str| now_server[&format!("llamacpp:{k}")] - base_server[&format!("llamacpp:{k}")];
    // The series of the container's process (and of `filter`): labels are sorted by name in
    // the exposition, so each is matched on its own.
    let ours_delta = |name: &str, filter: &str| {
        let of = |m: &HashMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(k, _)| {
                    k.starts_with(&format!("{name}{{")) && k.contains(&of_pid) && k.contains(filter)
                })
                .map(|(_, v)| v)
                .sum()
        };
        of(&ours) - of(&base)
    };
    let context = || {
        format!(
            "daemon's series of pid {pid}:\n{}\n{}",
            ours.iter()
                .filter(|(k, _)| k.contains(&of_pid))
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join("\n"),
            proc_view(pid)
        )
    };
    eprintln!(
        "the server's own counters: {} decode steps, {} prompt and {} generated tokens",
        delta("n_decode_total"),
        delta("prompt_tokens_total"),
        delta("tokens_predicted_total")
    );
    assert!(delta("n_decode_total") > 0.0, "the server decoded nothing");
    assert_eq!(
        ours_delta("llamacpp_decode_calls_total", ""),
        delta("n_decode_total"),
        "decode steps; {}",
        context()
    );
    assert_eq!(
        ours_delta("llamacpp_tokens_total", "kind=\"prompt\""),
        delta("prompt_tokens_total"),
        "prompt tokens; {}",
        context()
    );
    assert_eq!(
        ours_delta("llamacpp_tokens_total", "kind=\"generated\""),
        delta("tokens_predicted_total"),
        "generated tokens; {}",
        context()
    );

    // Every series of the process names its container and executable.
    let series: Vec<_> = ours
        .keys()
        .filter(|k| k.starts_with("llamacpp_") && k.contains(&of_pid))
        .collect();
    assert!(!series.is_empty(), "no series of pid {pid}");
    if let Some(k) = series
        .iter()
        .find(|k| k.starts_with("llamacpp_decode_calls_total{"))
    {
        eprintln!("e.g. {k}");
    }
    let want_id = format!("container_id=\"{id}\"");
    for k in &series {
        assert!(
            k.contains(&want_id),
            "{k} lacks {want_id}\n{}",
            proc_view(pid)
        );
        assert!(k.contains("exe=\"llama-server\""), "{k}");
    }

    let (code, _) = d.probe.terminate();
    assert_eq!(code, 0);
    drop(server);
    drop(container);
}
