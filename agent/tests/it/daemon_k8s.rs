//! `llamaprobe daemon` on a Kubernetes node, with a fake API server: a process in a pod's
//! container cgroup (named as the kubelet's systemd driver and containerd name them) gets its
//! pod's namespace, name and container on every one of its series.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Bytes, Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::common::{
    daemon::{driver_copy, Daemon},
    server::*,
    *,
};

const NODE: &str = "node-test";
const POD_UID: &str = "5f0c3a9e-7b21-4d8e-9a6f-0123456789ab";
const CONTAINER_ID: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The v2 hierarchy of this host's hybrid cgroup layout.
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// A fake Kubernetes API server on 127.0.0.1, on its own runtime: a list of `/api/v1/pods`
/// gets `list`, a watch is answered and held open without events. Every request URI is
/// recorded.
struct FakeApiServer {
    addr: SocketAddr,
    uris: Arc<Mutex<Vec<String>>>,
    /// Whether a list is answered (else it waits until it is).
    listing: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl FakeApiServer {
    /// With `listing` false, lists wait for [`Self::answer_lists`].
    fn start(list: serde_json::Value, listing: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake API server");
        let addr = listener.local_addr().unwrap();
        let uris = Arc::new(Mutex::new(Vec::new()));
        let recorded = uris.clone();
        let list = Bytes::from(list.to_string());
        let listing = Arc::new(AtomicBool::new(listing));
        let answer = listing.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (uris, list, answer) = (uris.clone(), list.clone(), answer.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (uris, list, answer) = (uris.clone(), list.clone(), answer.clone());
                    async move {
                        uris.lock().unwrap().push(req.uri().to_string());
                        let query = req.uri().query().unwrap_or("");
                        let (status, body): (u16, Body) = if req.uri().path() != "/api/v1/pods" {
                            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
                            (404, Full::new(Bytes::from(status.to_string())).boxed_unsync())
                        } else if query_param(query, "watch").as_deref() == Some("true") {
                            let frames = futures::stream::pending::<
                                Result<Frame<Bytes>, Infallible>,
                            >();
                            (200, StreamBody::new(frames).boxed_unsync())
                        } else {
                            while !answer.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            (200, Full::new(list).boxed_unsync())
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            uris: recorded,
            listing,
            _rt: rt,
        }
    }

    fn uris(&self) -> Vec<String> {
        self.uris.lock().unwrap().clone()
    }

    /// Lists are answered from now on (the one waiting too).
    fn answer_lists(&self) {
        self.listing.store(true, Ordering::SeqCst);
    }

    /// Asserts every request was a list or watch of the pods of node `NODE`.
    fn assert_node_pods_only(&self) {
        let uris = self.uris();
        assert!(!uris.is_empty(), "no request to the fake API server");
        for uri in &uris {
            let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
            assert_eq!(path, "/api/v1/pods", "{uri}");
            assert_eq!(
                query_param(query, "fieldSelector").as_deref(),
                Some("spec.nodeName=node-test"),
                "{uri}"
            );
        }
    }
}

/// The value of `name` in a URL query, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The pods of node `NODE` as the API server lists them: one pod with one running container.
fn pod_list() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
        "items": [{
            "metadata": {
                "name": "llm-0", "namespace": "inference", "uid": POD_UID,
                "resourceVersion": "90", "labels": {"app": "llm"}
            },
            "spec": {"nodeName": NODE, "containers": [{"name": "server"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "server", "containerID": format!("containerd://{CONTAINER_ID}"),
                "image": "ghcr.io/ggml-org/llama.cpp:server", "imageID": "",
                "ready": true, "restartCount": 0
            }]}
        }]
    })
}

/// A container's cgroup in the v2 hierarchy, made for the test: the directories it created are
/// removed on drop (innermost first, once no process is left in them).
struct PodCgroup {
    leaf: PathBuf,
    created: Vec<PathBuf>,
}

impl PodCgroup {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    /// cri-containerd-<id>.scope`, as the kubelet's systemd cgroup driver and containerd name
    /// a best-effort pod's container.
    fn create(pod_uid: &str, container_id: &str) -> Self {
        let pod = format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_"));
        let mut dir = PathBuf::from(UNIFIED);
        let mut created = Vec::new();
        for part in [
            "kubepods.slice",
            "kubepods-besteffort.slice",
            &pod,
            &format!("cri-containerd-{container_id}.scope"),
        ] {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("cannot create the cgroup {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Self { leaf: dir, created }
    }

    /// The path as `/proc/PID/cgroup` shows it on the unified line.
    fn path_in_hierarchy(&self) -> String {
        format!("/{}", self.leaf.strip_prefix(UNIFIED).unwrap().display())
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // A process just reaped can keep its cgroup busy a moment.
            let t0 = Instant::now();
            while let Err(e) = std::fs::remove_dir(dir) {
                if t0.elapsed() > Duration::from_secs(5) {
                    eprintln!("cannot remove the cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A child process, killed and reaped on drop (before its cgroup goes).
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A kubeconfig file whose current context is the API server at `server`, without a user.
fn write_kubeconfig(path: &Path, server: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\ncurrent-context: fake\n"
    );
    std::fs::write(path, text).unwrap();
}

fn metrics(port: u16) -> HashMap<String, f64> {
    parse_metrics(&get(&format!("http://127.0.0.1:{port}/metrics")).unwrap_or_default())
}

/// `llamaprobe daemon` for node `NODE` with a kubeconfig (in `dir`) of `api` and `extra`
/// options, once /readyz says ready; and its metrics port.
fn start_daemon(dir: &Path, api: &FakeApiServer, extra: &[&str]) -> (Probe, u16) {
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("http://{}", api.addr));
    let args: Vec<&str> = ["--include", "exe:k8s_driver", "--series-grace", "30"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let Daemon { mut probe, port } = Daemon::start_with(&args, |cmd| {
        cmd.env("NODE_NAME", NODE)
            .env("KUBECONFIG", &kubeconfig)
            // The kubeconfig is used where there is no in-cluster configuration.
            .env_remove("KUBERNETES_SERVICE_HOST");
    });
    let line = probe.wait_for("Kubernetes labels");
    assert_eq!(
        line.split_once("Kubernetes labels").map(|(_, l)| l),
        Some(
            format!(
                " on: watching the pods of node {NODE} (kubeconfig {})",
                kubeconfig.display()
            )
            .as_str()
        ),
        "{line}"
    );
    (probe, port)
}

/// Starts `exe` in `cgroup` (moved there before it runs the program, as a runtime starts a
/// container's first process), waiting on its stdin; its pid and stdout.
fn start_in_cgroup(cgroup: &PodCgroup, exe: &Path) -> (Reaped, u32, BufReader<ChildStdout>) {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} /models/tiny-model.gguf",
        cgroup.leaf.display(),
        exe.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env("FAKE_WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the driver");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let driver = Reaped(Some(child));
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(
        first.trim(),
        format!("ready pid={pid}"),
        "the driver did not start in its cgroup"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l == format!("0::{}", cgroup.path_in_hierarchy())),
        "process {pid} is not in {}: {cgroups}",
        cgroup.path_in_hierarchy()
    );
    (driver, pid, stdout)
}

/// The next log line saying `pid` is traced.
fn wait_traced(daemon: &mut Probe, pid: u32) -> String {
    let needle = format!("pid={pid}");
    loop {
        let line = daemon.wait_for("traced");
        if line.contains(&needle) {
            return line;
        }
    }
}

/// Releases the driver (its calls run) and waits for its exit.
fn release_driver(mut driver: Reaped, mut stdout: BufReader<ChildStdout>, pid: u32) {
    let mut child = driver.0.take().unwrap();
    child.stdin.take().unwrap().write_all(b"x").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "driver {pid}: {status}\n{rest}");
    assert!(rest.contains("done decodes=15 samples=6"), "{rest}");
}

/// Asserts that every `llamacpp_` series of `pid` (its 15 decodes counted) carries the labels
/// of its pod and container.
fn assert_pod_labels_on_every_series(port: u16, pid: u32) {
    // Its series stay --series-grace (30 s) after its exit.
    let of_pid = format!("pid=\"{pid}\"");
    let t0 = Instant::now();
    let m = loop {
        let m = metrics(port);
        if sum_of(&m, "llamacpp_decode_calls_total", &of_pid) == 15.0 {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "llamacpp_decode_calls_total of pid {pid} is {} after 20 s, not 15",
            sum_of(&m, "llamacpp_decode_calls_total", &of_pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let series: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("llamacpp_") && k.contains(&of_pid))
        .collect();
    let names: std::collections::BTreeSet<&str> = series
        .iter()
        .map(|k| k.split_once('{').map_or(k.as_str(), |(n, _)| n))
        .collect();
    assert!(
        names.len() >= 3,
        "few series of pid {pid}: {names:?} ({series:?})"
    );
    for label in [
        "k8s_namespace=\"inference\"".to_string(),
        "k8s_pod=\"llm-0\"".to_string(),
        "k8s_container=\"server\"".to_string(),
        format!("container_id=\"{CONTAINER_ID}\""),
        "exe=\"k8s_driver\"".to_string(),
    ] {
        for s in &series {
            assert!(s.contains(&label), "{s} has no {label}");
        }
    }
}

#[test]
fn fake_k8s_pod_labels_on_every_series_of_a_process_in_a_pod() {
    if !root_or_skip("fake_k8s_pod_labels_on_every_series_of_a_process_in_a_pod") {
        return;
    }
    let _serial = serial();
    assert!(
        Path::new(UNIFIED).join("cgroup.procs").exists(),
        "no cgroup v2 hierarchy at {UNIFIED}"
    );
    let dir = scratch("daemon-k8s");
    let exe = driver_copy(&dir, "k8s_driver");
    let api = FakeApiServer::start(pod_list(), true);
    let (mut daemon, port) = start_daemon(&dir, &api, &[]);
    // Ready once the pods were listed (it waits for the list before its first scan).
    let listed = api.uris().iter().any(|u| {
        let query = u.split_once('?').map_or("", |q| q.1);
        query_param(query, "watch").is_none()
    });
    assert!(
        listed,
        "the daemon was ready before it listed the pods: {:?}",
        api.uris()
    );

    let cgroup = PodCgroup::create(POD_UID, CONTAINER_ID);
    let (driver, pid, stdout) = start_in_cgroup(&cgroup, &exe);
    // Traced with its pod's labels from the start.
    let traced = wait_traced(&mut daemon, pid);
    assert!(
        traced.contains("k8s_pod") && traced.contains("llm-0") && traced.contains(CONTAINER_ID),
        "{traced}"
    );
    release_driver(driver, stdout, pid);
    assert_pod_labels_on_every_series(port, pid);
    api.assert_node_pods_only();

    let (code, _) = daemon.terminate();
    assert_eq!(code, 0);
}

#[test]
fn fake_k8s_pod_labels_come_at_a_rescan_when_the_pods_are_listed_late() {
    if !root_or_skip("fake_k8s_pod_labels_come_at_a_rescan_when_the_pods_are_listed_late") {
        return;
    }
    let _serial = serial();
    assert!(
        Path::new(UNIFIED).join("cgroup.procs").exists(),
        "no cgroup v2 hierarchy at {UNIFIED}"
    );
    let dir = scratch("daemon-k8s-late");
    let exe = driver_copy(&dir, "k8s_driver");
    // The list is not answered until the process is traced.
    let api = FakeApiServer::start(pod_list(), false);
    let (mut daemon, port) = start_daemon(&dir, &api, &["--rescan", "1"]);
    daemon.wait_for("are not listed after 5 s");

    let cgroup = PodCgroup::create(POD_UID, CONTAINER_ID);
    let (driver, pid, stdout) = start_in_cgroup(&cgroup, &exe);
    let traced = wait_traced(&mut daemon, pid);
    assert!(
        traced.contains(CONTAINER_ID) && !traced.contains("llm-0"),
        "traced before its pod is known: {traced}"
    );
    api.answer_lists();
    // Published again, with its pod, at a rescan once the pods are listed.
    let traced = loop {
        let line = wait_traced(&mut daemon, pid);
        if line.contains("llm-0") {
            break line;
        }
    };
    assert!(traced.contains("k8s_pod"), "{traced}");
    release_driver(driver, stdout, pid);
    assert_pod_labels_on_every_series(port, pid);
    api.assert_node_pods_only();

    let (code, _) = daemon.terminate();
    assert_eq!(code, 0);
}
