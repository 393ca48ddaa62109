//! The node agent's image (deploy/Containerfile, as `cargo xtask image` builds it, here from the
//! binary under test) running `llamaprobe daemon` as a DaemonSet would: the host's pid
//! namespace and network, a read-only root, only SYS_ADMIN, SYS_PTRACE and DAC_READ_SEARCH,
//! podman's default seccomp profile, tracefs and the cgroup tree mounted from the host. It
//! traces a llama-server on the host and one in another container, counts what each counts
//! itself, and labels only the container's series with its container id.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant, UNIX_EPOCH},
};

use crate::{
    common::{server::*, *},
    daemon_container::{
        inspect, ldd, place, podman, podman_or_skip, run_server, server_image, Container,
    },
};

/// The image's name; its tag names the build of the binary in it.
const IMAGE: &str = "llamaprobe-test";

/// Where the binary lies inside the image (deploy/Containerfile's entrypoint).
const BIN_IN_IMAGE: &str = "/usr/local/bin/llamaprobe";

/// The image of the binary under test, staged as `cargo xtask image` stages it (the binary,
/// its libraries and loader at their real paths, /etc/llamaprobe/ with the default
/// llamaprobe.toml, /tmp) and built with deploy/Containerfile unless it exists.
fn daemon_image() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_llamaprobe"));
    let meta = std::fs::metadata(bin).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
    (meta.len(), mtime).hash(&mut h);
    let image = format!("{IMAGE}:{:016x}", h.finish());
    if podman()
        .args(["image", "exists", &image])
        .status()
        .unwrap()
        .success()
    {
        return image;
    }

    let root = scratch("deploy-image-root");
    let dest = root.join(BIN_IN_IMAGE.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(bin, &dest).unwrap();
    for lib in ldd(bin, &HashMap::new()) {
        place(&root, &lib);
    }
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let etc = root.join("etc/llamaprobe");
    std::fs::create_dir_all(&etc).unwrap();
    let config = deploy.join("systemd/llamaprobe.toml");
    if config.exists() {
        std::fs::copy(&config, etc.join("llamaprobe.toml")).unwrap();
    }
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let sticky = std::os::unix::fs::PermissionsExt::from_mode(0o1777);
    std::fs::set_permissions(&tmp, sticky).unwrap();

    let out = podman()
        .args(["build", "--quiet", "-f"])
        .arg(deploy.join("Containerfile"))
        .args(["-t", &image])
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "podman build: {}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("built image {image}");
    image
}

/// The daemon's container: its id and log (kept outside the container's storage, so it
/// outlives `--rm` for failure messages).
struct DaemonContainer {
    container: Container,
    log: PathBuf,
    port: u16,
}

impl DaemonContainer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&get(&format!("http://127.0.0.1:{}/metrics", self.port)).unwrap_or_default())
    }

    /// Waits (bounded) until the daemon's log says it traces `pid`; returns that line.
    fn wait_traced(&self, pid: u32) -> String {
        let needle = format!("pid={pid}");
        let t0 = Instant::now();
        loop {
            if let Some(l) = self
                .log()
                .lines()
                .find(|l| l.contains("traced") && l.contains(&needle))
            {
                return l.to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon in its image did not trace pid {pid} within 60 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The metrics once two reads 300 ms apart agree on the decode calls of `filter`.
    fn settled(&self, filter: &str) -> HashMap<String, f64> {
        let t0 = Instant::now();
        let mut prev = self.metrics();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let cur = self.metrics();
            let calls = |m: &HashMap<String, f64>| sum_of(m, "llamacpp_decode_calls_total", filter);
            if calls(&cur) == calls(&prev) {
                return cur;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the daemon's counters of {filter} never settled"
            );
            prev = cur;
        }
    }
}

/// Runs the image's daemon as a DaemonSet would; returns once /readyz says ready.
fn run_daemon(image: &str) -> DaemonContainer {
    let port = free_port();
    let log = scratch("deploy-image-daemon").join("daemon.log");
    let out = podman()
        .args(["run", "-d", "--rm"])
        // The host's processes (and their /proc) and its network (the metrics port).
        .args(["--pid=host", "--network", "host"])
        .arg("--read-only")
        .args([
            "--cap-drop=all",
            "--cap-add=SYS_ADMIN,SYS_PTRACE,DAC_READ_SEARCH",
        ])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing"])
        .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--env", "LLAMAPROBE_LOG=info"])
        .args(["--log-driver", "k8s-file", "--log-opt"])
        .arg(format!("path={}", log.display()))
        .arg(image)
        .args(["daemon", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--include", "exe:llama-server", "--series-grace", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "podman run (daemon): {}", text(&out));
    let d = DaemonContainer {
        container: Container {
            id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        },
        log,
        port,
    };
    let t0 = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/readyz")).as_deref() != Some("ready\n") {
        let running = podman()
            .args(["inspect", "--format", "{{.State.Running}}", &d.container.id])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
            .unwrap_or(false);
        assert!(
            running,
            "the daemon's container exited before it was ready; its log:\n{}",
            d.log()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the daemon in its image not ready after 60 s; its log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d
}

#[test]
fn daemon_in_its_image_traces_host_and_container_servers() {
    let test = "daemon_in_its_image_traces_host_and_container_servers";
    let Some((f, model, _guard)) = first_server(test) else {
        return;
    };
    if !podman_or_skip(test) {
        return;
    }
    let bin = f.server.clone().unwrap();
    let image = daemon_image();
    let server_img = server_image(&f, &bin, &model);

    // The daemon first: both servers are seen at their exec.
    let d = run_daemon(&image);
    eprintln!("daemon in container {} ({image})", d.container.id);
    let host = Server::start(&bin, &model, &f.env);
    let host_pid = host.child.id();
    let (container, in_container, container_pid) = run_server(&server_img, &f, &bin, &model);
    let cid = container.id.clone();
    eprintln!("host llama-server pid {host_pid}; container {cid}'s is pid {container_pid}");
    assert_eq!(
        inspect(&cid, "{{.State.Pid}}"),
        container_pid.to_string(),
        "the container's process"
    );

    for (server, pid, who) in [
        (&host, host_pid, "host"),
        (&in_container, container_pid, "container"),
    ] {
        let line = d.wait_traced(pid);
        eprintln!("{who}: {line}");
        let of_pid = format!("pid=\"{pid}\"");
        let base_server = server.settled_metrics();
        let base = d.settled(&of_pid);
        completion(server.port, &format!("{who} prompt alpha bravo"), 6);
        let now_server = server.settled_metrics();
        let now = d.settled(&of_pid);

        let delta = now_server["llamacpp:n_decode_total"] - base_server["llamacpp:n_decode_total"];
        let ours = sum_of(&now, "llamacpp_decode_calls_total", &of_pid);
        let series: Vec<_> = now
            .keys()
            .filter(|k| k.starts_with("llamacpp_") && k.contains(&of_pid))
            .collect();
        let context = || {
            format!(
                "the daemon's series of pid {pid}:\n{}\nits log:\n{}",
                series
                    .iter()
                    .map(|k| format!("{k} {}", now[*k]))
                    .collect::<Vec<_>>()
                    .join("\n"),
                d.log()
            )
        };
        eprintln!("{who}: the server counted {delta} decode steps; the daemon {ours} in all");
        assert!(delta > 0.0, "the {who} server decoded nothing");
        assert!(
            ours > 0.0,
            "no decode calls of the {who} server; {}",
            context()
        );
        assert_eq!(
            ours - sum_of(&base, "llamacpp_decode_calls_total", &of_pid),
            delta,
            "decode steps of the {who} server; {}",
            context()
        );
        assert!(!series.is_empty(), "no series of pid {pid}");
        let want_id = format!("container_id=\"{cid}\"");
        for k in &series {
            if pid == container_pid {
                assert!(k.contains(&want_id), "{k} lacks {want_id}; {}", context());
            } else {
                assert!(
                    !k.contains("container_id="),
                    "the host server's {k} names a container; {}",
                    context()
                );
            }
        }
    }

    drop(in_container);
    drop(container);
    drop(host);
    drop(d);
}
