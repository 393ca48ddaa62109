//! Kubernetes metadata of the processes of this node: the namespace, pod, container and labels
//! of a pod UID and container id (as [`identity`](super::identity) reads them from a
//! process's cgroup), through the `kube` crate.
//!
//! In a cluster (llamaprobe as a DaemonSet, `NODE_NAME` from the downward API) one watcher on
//! the pods of this node (`spec.nodeName=<node>`, listed from the API server's cache, then
//! watched) keeps a map of pod UID → pod and container id → container name
//! (`status.containerStatuses[].containerID`, `containerd://<id>`, `cri-o://<id>`,
//! `docker://<id>`, with the scheme stripped). Lookups read that map and never wait on the
//! network. The service account needs `list` and `watch` on `pods` (cluster-wide: a field
//! selector is no namespace).
//!
//! Outside a cluster (llamaprobe as a systemd service on a node, or on a developer's machine
//! next to kind or minikube), where there is no in-cluster configuration
//! (`KUBERNETES_SERVICE_HOST` unset, or no service account token), the kubeconfig file named by
//! the standard `KUBECONFIG` variable is used instead, with its current context (a list of
//! files, `:`-separated, is merged as kubectl does). That is only when `NODE_NAME` is set as
//! well: the node is never guessed. Its user needs the same `list` and `watch` on `pods`.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::{OsStr, OsString},
    path::Path,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api,
};

/// The service account token of a pod, as the kubelet mounts it.
const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The Kubernetes metadata of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub pod: String,
    /// The container's name in the pod spec, if the container id is one of the pod's.
    pub container: Option<String>,
    pub node: String,
    pub labels: BTreeMap<String, String>,
}

/// The pods of this node, kept up to date by a watcher task. Clones share the map; the watcher
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct K8sMetadata {
    state: Arc<RwLock<State>>,
    node: Arc<str>,
    _watch: Arc<WatchTask>,
}

/// The watcher task, ended on drop.
struct WatchTask(tokio::task::AbortHandle);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the watcher has seen.
#[derive(Default)]
struct State {
    /// Pod UID → pod.
    pods: HashMap<String, PodEntry>,
    /// Container id → pod UID.
    containers: HashMap<String, String>,
    /// Whether the first list is done.
    ready: bool,
    /// The pods of a (re)list under way, replacing [`Self::pods`] when it is done.
    relist: Option<Vec<(String, PodEntry)>>,
}

/// One pod.
#[derive(Clone, Debug)]
struct PodEntry {
    /// The pod's metadata, without a container.
    meta: PodMeta,
    /// Container id → container name.
    containers: HashMap<String, String>,
}

impl K8sMetadata {
    /// Starts watching the pods of node `node_name` (`NODE_NAME`, set from the downward API)
    /// with the in-cluster configuration (`KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's
    /// service account), or, where there is none, with the kubeconfig file(s) `KUBECONFIG`
    /// names. Returns at once, before the first list; [`Self::ready`] tells when it is done.
    /// Without a node name, outside a cluster without `KUBECONFIG`, or if the client cannot be
    /// made, returns `None`. The line says in either case what came of it ("Kubernetes labels
    /// off: NODE_NAME is not set (set it from the downward API, spec.nodeName)", "Kubernetes
    /// labels on: watching the pods of node n1 (kubeconfig /etc/llamaprobe/kubeconfig)").
    pub async fn start(node_name: Option<String>) -> (Option<K8sMetadata>, String) {
        Self::start_from(
            node_name.as_deref(),
            std::env::var_os("KUBERNETES_SERVICE_HOST").as_deref(),
            Path::new(TOKEN_FILE),
            std::env::var_os("KUBECONFIG").as_deref(),
        )
        .await
    }

    /// [`Self::start`] with the environment given: the node name, `KUBERNETES_SERVICE_HOST`,
    /// the service account token's path and `KUBECONFIG`.
    async fn start_from(
        node_name: Option<&str>,
        service_host: Option<&OsStr>,
        token: &Path,
        kubeconfig: Option<&OsStr>,
    ) -> (Option<K8sMetadata>, String) {
        let node = node_name.map(str::trim).unwrap_or_default();
        let (config, from) = match source(node, service_host, token, kubeconfig) {
            Err(reason) => return (None, format!("Kubernetes labels off: {reason}")),
            Ok(Source::InCluster) => match kube::Config::incluster() {
                Ok(c) => (c, String::new()),
                Err(e) => {
                    return (
                        None,
                        format!("Kubernetes labels off: no in-cluster configuration: {e}"),
                    )
                }
            },
            Ok(Source::Kubeconfig(files)) => {
                let shown = files.to_string_lossy().into_owned();
                match kubeconfig_config(&files).await {
                    Ok(c) => (c, format!(" (kubeconfig {shown})")),
                    Err(e) => {
                        return (
                            None,
                            format!("Kubernetes labels off: cannot use KUBECONFIG={shown}: {e}"),
                        )
                    }
                }
            }
        };
        match Self::start_with_config(config, node.to_string()).await {
            Ok(m) => (
                Some(m),
                format!("Kubernetes labels on: watching the pods of node {node}{from}"),
            ),
            Err(e) => (None, format!("Kubernetes labels off: {e:#}")),
        }
    }

    /// Starts watching the pods of node `node` with the API server and credentials of
    /// `config` (in a cluster, [`Self::start`] makes it). Errors if the client cannot be
    /// made (a bad TLS setup); errors of the API server are retried with backoff and logged.
    pub async fn start_with_config(
        config: kube::Config,
        node: String,
    ) -> anyhow::Result<K8sMetadata> {
        let client = kube::Client::try_from(config)
            .map_err(|e| anyhow::anyhow!("cannot make a Kubernetes client: {e}"))?;
        let pods = Api::<Pod>::all(client);
        // As client-go's informers: the API server's watch cache serves the list
        // (resourceVersion=0, which a paged list would drop), so one list per node and each
        // relist stays off etcd. A node has a few hundred pods at most.
        let mut config = watcher::Config::default()
            .fields(&format!("spec.nodeName={node}"))
            .any_semantic();
        config.page_size = None;
        let state = Arc::new(RwLock::new(State::default()));
        let task = tokio::spawn(watch(pods, config, state.clone(), node.clone()));
        Ok(K8sMetadata {
            state,
            node: node.into(),
            _watch: Arc::new(WatchTask(task.abort_handle())),
        })
    }

    /// The pod with UID `pod_uid` (with `-` or `_`), or else the pod with container
    /// `container_id` (a bare id, or with its `containerd://`-style scheme), with the name of
    /// the container `container_id` if it is one of the pod's. `None` for a pod not (yet)
    /// seen on this node.
    pub fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<PodMeta> {
        let state = self.read();
        let uid = normalize_uid(pod_uid);
        let container_id = container_id.map(normalize_container_id);
        let entry = state.pods.get(&uid).or_else(|| {
            let uid = state.containers.get(container_id.as_ref()?)?;
            state.pods.get(uid)
        })?;
        let mut meta = entry.meta.clone();
        meta.container = container_id.and_then(|id| entry.containers.get(&id).cloned());
        Some(meta)
    }

    /// Whether the first list of the node's pods is done (before it, [`Self::lookup`] finds
    /// only the pods the watch has announced).
    pub fn ready(&self) -> bool {
        self.read().ready
    }

    /// Waits until [`Self::ready`], at most `within`; returns whether it is.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The node whose pods are watched.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the client's configuration comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// The pod's service account and the API server's service.
    InCluster,
    /// The kubeconfig file(s) of `KUBECONFIG` (a `:`-separated list, as `PATH`).
    Kubeconfig(OsString),
}

/// The configuration to use for node `node`: the in-cluster one where there is one, else the
/// kubeconfig of `KUBECONFIG` if it names any file; else why Kubernetes metadata is off.
fn source(
    node: &str,
    service_host: Option<&OsStr>,
    token: &Path,
    kubeconfig: Option<&OsStr>,
) -> Result<Source, String> {
    let Some(reason) = off_reason(node, service_host, token) else {
        return Ok(Source::InCluster);
    };
    if node.is_empty() {
        return Err(reason);
    }
    match kubeconfig {
        Some(files) if std::env::split_paths(files).any(|p| !p.as_os_str().is_empty()) => {
            Ok(Source::Kubeconfig(files.to_owned()))
        }
        _ => Err(format!("{reason}, and KUBECONFIG is not set")),
    }
}

/// The client configuration of the kubeconfig file(s) `files` (merged in order, the first to
/// set a value wins), with their current context.
async fn kubeconfig_config(files: &OsStr) -> Result<kube::Config, kube::config::KubeconfigError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let merged = std::env::split_paths(files)
        .filter(|p| !p.as_os_str().is_empty())
        .try_fold(Kubeconfig::default(), |merged, p| {
            Kubeconfig::read_from(p).and_then(|c| merged.merge(c))
        })?;
    kube::Config::from_custom_kubeconfig(merged, &KubeConfigOptions::default()).await
}

/// Why the in-cluster configuration cannot be used, if it cannot: no node name, not in a pod,
/// or no service account token.
fn off_reason(node: &str, service_host: Option<&OsStr>, token: &Path) -> Option<String> {
    if node.is_empty() {
        Some("NODE_NAME is not set (set it from the downward API, spec.nodeName)".to_string())
    } else if service_host.is_none_or(|h| h.is_empty()) {
        Some("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)".to_string())
    } else if !token.exists() {
        Some(format!(
            "no service account token at {} (automountServiceAccountToken is off?)",
            token.display()
        ))
    } else {
        None
    }
}

/// The watcher task: applies the events of the pod watch to `state`, forever (errors are
/// retried with the watcher's default backoff and logged once each until the watch recovers).
async fn watch(pods: Api<Pod>, config: watcher::Config, state: Arc<RwLock<State>>, node: String) {
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut failing: Option<String> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if failing.take().is_some() {
                    tracing::info!("Kubernetes pod watch of node {node} works again");
                }
                apply(&mut write(&state), event, &node);
            }
            Err(e) => {
                let e = e.to_string();
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!("Kubernetes pod watch of node {node}: {e} (retrying)");
                }
                failing = Some(e);
            }
        }
    }
}

fn write(state: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    state.write().unwrap_or_else(|e| e.into_inner())
}

/// Applies one watcher event. A (re)list (`Init`, `InitApply`…, `InitDone`) replaces all pods
/// when it is done, so pods deleted while the watch was down go.
fn apply(state: &mut State, event: watcher::Event<Pod>, node: &str) {
    match event {
        watcher::Event::Init => state.relist = Some(Vec::new()),
        watcher::Event::InitApply(pod) => {
            if let Some(entry) = pod_entry(&pod, node) {
                state.relist.get_or_insert_with(Vec::new).push(entry);
            }
        }
        watcher::Event::InitDone => {
            let listed = state.relist.take().unwrap_or_default();
            state.pods.clear();
            state.containers.clear();
            for (uid, entry) in listed {
                state.insert(uid, entry);
            }
            state.ready = true;
        }
        watcher::Event::Apply(pod) => match pod_entry(&pod, node) {
            Some((uid, entry)) => state.insert(uid, entry),
            None => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    state.remove(&normalize_uid(uid));
                }
            }
        },
        watcher::Event::Delete(pod) => {
            if let Some(uid) = pod.metadata.uid.as_deref() {
                state.remove(&normalize_uid(uid));
            }
        }
    }
}

impl State {
    fn insert(&mut self, uid: String, entry: PodEntry) {
        self.remove(&uid);
        for id in entry.containers.keys() {
            self.containers.insert(id.clone(), uid.clone());
        }
        self.pods.insert(uid, entry);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for id in old.containers.keys() {
                if self.containers.get(id).map(String::as_str) == Some(uid) {
                    self.containers.remove(id);
                }
            }
        }
    }
}

/// The UID and entry of a pod of node `node`; `None` for a pod without a UID or of another
/// node (the field selector should have left those out).
fn pod_entry(pod: &Pod, node: &str) -> Option<(String, PodEntry)> {
    let uid = normalize_uid(pod.metadata.uid.as_deref()?);
    let pod_node = pod.spec.as_ref()?.node_name.as_deref()?;
    if uid.is_empty() || pod_node != node {
        return None;
    }
    let status = pod.status.as_ref();
    let containers = status
        .into_iter()
        .flat_map(|s| {
            [
                &s.container_statuses,
                &s.init_container_statuses,
                &s.ephemeral_container_statuses,
            ]
        })
        .flatten()
        .flatten()
        .filter_map(|c| {
            let id = normalize_container_id(c.container_id.as_deref()?);
            (!id.is_empty()).then(|| (id, c.name.clone()))
        })
        .collect();
    let meta = PodMeta {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        container: None,
        node: pod_node.to_string(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    };
    Some((uid, PodEntry { meta, containers }))
}

/// A pod UID as the API server writes it: dashes, lower case.
fn normalize_uid(uid: &str) -> String {
    uid.trim().replace('_', "-").to_ascii_lowercase()
}

/// A container id without its runtime's scheme (`containerd://`, `cri-o://`, `docker://`),
/// lower case.
fn normalize_container_id(id: &str) -> String {
    let id = id.trim();
    id.split_once("://")
        .map_or(id, |(_, id)| id)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr, sync::Mutex, time::Duration};

    use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
    use hyper::{
        body::{Bytes, Frame, Incoming},
        server::conn::http1,
        service::service_fn,
        Request, Response,
    };
    use hyper_util::rt::TokioIo;
    use serde_json::json;

    use super::*;

    const NODE: &str = "node-a";
    const UID_A: &str = "8d1e2f3a-4b5c-4d6e-8f70-1a2b3c4d5e6f";
    const UID_B: &str = "11111111-2222-4333-8444-555555555555";
    const UID_C: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    const ID_A: &str = "3f5a4f0c1e2d3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c";
    const ID_SIDECAR: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID_B: &str = "9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c";
    const ID_C: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

    fn container_status(name: &str, id: &str) -> serde_json::Value {
        json!({
            "name": name, "containerID": id, "image": "ghcr.io/ggml-org/llama.cpp:server",
            "imageID": "", "ready": true, "restartCount": 0
        })
    }

    fn pod_json(
        ns: &str,
        name: &str,
        uid: &str,
        node: &str,
        statuses: Vec<serde_json::Value>,
    ) -> serde_json::Value {
        json!({
            "metadata": {
                "name": name, "namespace": ns, "uid": uid, "resourceVersion": "90",
                "labels": {"app": name, "app.kubernetes.io/part-of": "inference"}
            },
            "spec": {"nodeName": node, "containers": [{"name": "server"}]},
            "status": {"phase": "Running", "containerStatuses": statuses}
        })
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    /// The value of `name` in a URL query, percent-decoded.
    fn query_param(query: &str, name: &str) -> Option<String> {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    type Body = UnsyncBoxBody<Bytes, Infallible>;

    /// A fake API server on 127.0.0.1: the pod list answers a list of `/api/v1/pods`, a watch
    /// gets one ADDED event and is then held open. Every request URI is recorded.
    async fn fake_api_server(
        list: serde_json::Value,
        added: serde_json::Value,
    ) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let uris = Arc::new(Mutex::new(Vec::new()));
        let recorded = uris.clone();
        let list = Bytes::from(list.to_string());
        let added = Bytes::from(format!("{}\n", json!({"type": "ADDED", "object": added})));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (uris, list, added) = (uris.clone(), list.clone(), added.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (uris, list, added) = (uris.clone(), list.clone(), added.clone());
                    async move {
                        uris.lock().unwrap().push(req.uri().to_string());
                        let query = req.uri().query().unwrap_or("");
                        let body: Body = if req.uri().path() != "/api/v1/pods" {
                            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
                            return Ok::<_, Infallible>(
                                Response::builder()
                                    .status(404)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(status.to_string())).boxed_unsync())
                                    .unwrap(),
                            );
                        } else if query_param(query, "watch").as_deref() == Some("true") {
                            let frames =
                                futures::stream::once(async move { Ok(Frame::data(added)) })
                                    .chain(futures::stream::pending());
                            StreamBody::new(frames).boxed_unsync()
                        } else {
                            Full::new(list).boxed_unsync()
                        };
                        Ok(Response::builder()
                            .header("content-type", "application/json")
                            .body(body)
                            .unwrap())
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, recorded)
    }

    #[tokio::test]
    async fn fake_k8s_api_server_gives_the_pods_of_this_node() {
        let list = json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
            "items": [
                pod_json("inference", "llama-0", UID_A, NODE, vec![
                    container_status("server", &format!("containerd://{ID_A}")),
                    container_status("metrics", &format!("containerd://{ID_SIDECAR}")),
                ]),
                // Of another node: left out even though the server sent it.
                pod_json("inference", "llama-1", UID_B, "node-b", vec![
                    container_status("server", &format!("containerd://{ID_B}")),
                ]),
            ]
        });
        let mut added = pod_json(
            "batch",
            "llama-2",
            UID_C,
            NODE,
            vec![container_status("worker", &format!("containerd://{ID_C}"))],
        );
        added["apiVersion"] = json!("v1");
        added["kind"] = json!("Pod");
        let (addr, uris) = fake_api_server(list, added).await;

        let url: hyper::Uri = format!("http://{addr}").parse().unwrap();
        let meta = K8sMetadata::start_with_config(kube::Config::new(url), NODE.to_string())
            .await
            .unwrap();
        assert_eq!(meta.node(), NODE);

        // Wait (bounded) for the list and the watch's ADDED event.
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while !(meta.ready() && meta.lookup(UID_C, None).is_some()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            seen.is_ok(),
            "the watcher did not list and watch the fake API server within 10 s (ready: {}, requests: {:?})",
            meta.ready(),
            uris.lock().unwrap()
        );

        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "llama-0".to_string()),
            (
                "app.kubernetes.io/part-of".to_string(),
                "inference".to_string(),
            ),
        ]
        .into();
        assert_eq!(
            meta.lookup(UID_A, Some(ID_A)),
            Some(PodMeta {
                namespace: "inference".into(),
                pod: "llama-0".into(),
                container: Some("server".into()),
                node: NODE.into(),
                labels: labels.clone(),
            })
        );
        // The systemd driver's spelling of the UID, and another container of the pod.
        let sidecar = meta
            .lookup(&UID_A.replace('-', "_"), Some(ID_SIDECAR))
            .unwrap();
        assert_eq!(sidecar.container.as_deref(), Some("metrics"));
        // The container id alone finds the pod (a static pod's cgroup UID is not its API UID).
        let by_id = meta.lookup("", Some(ID_A)).unwrap();
        assert_eq!(
            (by_id.pod.as_str(), by_id.container.as_deref()),
            ("llama-0", Some("server"))
        );
        // An unknown container of a known pod: the pod, no container.
        let unknown = meta.lookup(UID_A, Some(ID_B)).unwrap();
        assert_eq!((unknown.pod.as_str(), unknown.container), ("llama-0", None));
        // The pod of node-b is not kept.
        assert_eq!(meta.lookup(UID_B, Some(ID_B)), None);
        // The watched pod.
        let c = meta.lookup(UID_C, Some(ID_C)).unwrap();
        assert_eq!(
            (
                c.namespace.as_str(),
                c.pod.as_str(),
                c.container.as_deref(),
                c.node.as_str()
            ),
            ("batch", "llama-2", Some("worker"), NODE)
        );

        let uris = uris.lock().unwrap().clone();
        let (watches, lists): (Vec<&String>, Vec<&String>) = uris
            .iter()
            .partition(|u| query_param(u.split_once('?').map_or("", |q| q.1), "watch").is_some());
        assert!(
            !lists.is_empty() && !watches.is_empty(),
            "requests: {uris:?}"
        );
        let list_query = lists[0].split_once('?').map_or("", |q| q.1);
        assert_eq!(
            query_param(list_query, "resourceVersion").as_deref(),
            Some("0"),
            "the list is served from the API server's cache: {uris:?}"
        );
        for uri in &uris {
            let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
            assert_eq!(path, "/api/v1/pods", "{uri}");
            assert_eq!(
                query_param(query, "fieldSelector").as_deref(),
                Some("spec.nodeName=node-a"),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn start_without_a_node_name_is_off() {
        let (meta, line) = K8sMetadata::start(None).await;
        assert!(meta.is_none());
        assert_eq!(
            line,
            "Kubernetes labels off: NODE_NAME is not set (set it from the downward API, spec.nodeName)"
        );
        let (meta, line) = K8sMetadata::start(Some("  ".into())).await;
        assert!(meta.is_none());
        assert!(line.contains("NODE_NAME is not set"), "{line}");
    }

    #[tokio::test]
    async fn start_outside_a_cluster_is_off() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
            && std::env::var_os("KUBECONFIG").is_none()
        {
            let (meta, line) = K8sMetadata::start(Some(NODE.into())).await;
            assert!(meta.is_none());
            assert_eq!(
                line,
                "Kubernetes labels off: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set), and KUBECONFIG is not set"
            );
        }
        // The same, whatever this environment is.
        let token = Path::new("/nonexistent/serviceaccount/token");
        let (meta, line) = K8sMetadata::start_from(Some(NODE), None, token, None).await;
        assert!(meta.is_none());
        assert_eq!(
            line,
            "Kubernetes labels off: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set), and KUBECONFIG is not set"
        );
        let (meta, line) =
            K8sMetadata::start_from(Some(NODE), None, token, Some(OsStr::new(""))).await;
        assert!(meta.is_none());
        assert!(line.ends_with("and KUBECONFIG is not set"), "{line}");
    }

    /// A kubeconfig file whose current context is the API server at `server`, without a user.
    fn kubeconfig_file(name: &str, server: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "llamaprobe-kubeconfig-{name}-{}",
            std::process::id()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\ncurrent-context: fake\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn outside_a_cluster_the_kubeconfig_file_is_used() {
        let list = json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
            "items": [pod_json("inference", "llama-0", UID_A, NODE, vec![
                container_status("server", &format!("containerd://{ID_A}")),
            ])]
        });
        let mut added = pod_json("batch", "llama-2", UID_C, NODE, vec![]);
        added["apiVersion"] = json!("v1");
        added["kind"] = json!("Pod");
        let (addr, uris) = fake_api_server(list, added).await;
        let file = kubeconfig_file("on", &format!("http://{addr}"));
        // A list as KUBECONFIG allows; the missing first entry is an error, an empty one is not.
        let missing = std::env::temp_dir().join("llamaprobe-no-such-kubeconfig");
        let (meta, line) = K8sMetadata::start_from(
            Some(NODE),
            None,
            Path::new("/nonexistent/serviceaccount/token"),
            Some(OsStr::new(&format!("{}:", missing.display()))),
        )
        .await;
        assert!(meta.is_none());
        assert!(
            line.starts_with(&format!(
                "Kubernetes labels off: cannot use KUBECONFIG={}:",
                missing.display()
            )),
            "{line}"
        );

        let value = format!(":{}", file.display());
        let (meta, line) = K8sMetadata::start_from(
            Some(NODE),
            None,
            Path::new("/nonexistent/serviceaccount/token"),
            Some(OsStr::new(&value)),
        )
        .await;
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            line,
            format!("Kubernetes labels on: watching the pods of node {NODE} (kubeconfig {value})")
        );
        let meta = meta.unwrap();
        assert!(
            meta.wait_ready(Duration::from_secs(10)).await,
            "the watcher did not list the fake API server within 10 s (requests: {:?})",
            uris.lock().unwrap()
        );
        let pod = meta.lookup(UID_A, Some(ID_A)).unwrap();
        assert_eq!(
            (
                pod.namespace.as_str(),
                pod.pod.as_str(),
                pod.container.as_deref()
            ),
            ("inference", "llama-0", Some("server"))
        );
        let uris = uris.lock().unwrap().clone();
        assert!(!uris.is_empty());
        for uri in &uris {
            let query = uri.split_once('?').map_or("", |q| q.1);
            assert_eq!(
                query_param(query, "fieldSelector").as_deref(),
                Some("spec.nodeName=node-a"),
                "{uri}"
            );
        }
    }

    #[test]
    fn the_in_cluster_configuration_wins_over_kubeconfig() {
        let token = std::env::current_exe().unwrap();
        let missing = Path::new("/nonexistent/serviceaccount/token");
        let host = Some(OsStr::new("10.96.0.1"));
        let kc = Some(OsStr::new("/etc/llamaprobe/kubeconfig"));
        let from_file = Ok(Source::Kubeconfig("/etc/llamaprobe/kubeconfig".into()));
        assert_eq!(source(NODE, host, &token, kc), Ok(Source::InCluster));
        assert_eq!(source(NODE, host, &token, None), Ok(Source::InCluster));
        assert_eq!(source(NODE, None, &token, kc), from_file);
        assert_eq!(source(NODE, host, missing, kc), from_file);
        // Never without a node name.
        assert!(source("", None, &token, kc)
            .unwrap_err()
            .contains("NODE_NAME"));
        assert!(source("", host, &token, kc)
            .unwrap_err()
            .contains("NODE_NAME"));
        let err = source(NODE, host, missing, Some(OsStr::new(":"))).unwrap_err();
        assert!(
            err.contains("no service account token") && err.ends_with("KUBECONFIG is not set"),
            "{err}"
        );
    }

    #[test]
    fn off_reasons() {
        let token = std::env::current_exe().unwrap();
        let missing = Path::new("/nonexistent/serviceaccount/token");
        let host = Some(OsStr::new("10.96.0.1"));
        assert!(off_reason("", host, &token).unwrap().contains("NODE_NAME"));
        assert!(off_reason(NODE, None, &token)
            .unwrap()
            .contains("KUBERNETES_SERVICE_HOST"));
        assert!(off_reason(NODE, Some(OsStr::new("")), &token)
            .unwrap()
            .contains("KUBERNETES_SERVICE_HOST"));
        assert!(off_reason(NODE, host, missing)
            .unwrap()
            .contains("no service account token at /nonexistent/serviceaccount/token"));
        assert_eq!(off_reason(NODE, host, &token), None);
    }

    #[test]
    fn container_ids_lose_their_scheme() {
        assert_eq!(
            normalize_container_id(&format!("containerd://{ID_A}")),
            ID_A
        );
        assert_eq!(normalize_container_id(&format!("cri-o://{ID_A}")), ID_A);
        assert_eq!(normalize_container_id(&format!("docker://{ID_A}")), ID_A);
        assert_eq!(normalize_container_id(ID_A), ID_A);
        assert_eq!(normalize_container_id(&ID_A.to_ascii_uppercase()), ID_A);
        assert_eq!(normalize_uid("8D1E2F3A_4B5C_4D6E_8F70_1A2B3C4D5E6F"), UID_A);
    }

    #[test]
    fn a_relist_replaces_the_pods_and_deletes_remove_them() {
        let mut state = State::default();
        let a = pod(pod_json(
            "ns",
            "a",
            UID_A,
            NODE,
            vec![container_status("s", &format!("cri-o://{ID_A}"))],
        ));
        let b = pod(pod_json(
            "ns",
            "b",
            UID_B,
            NODE,
            vec![container_status("s", &format!("docker://{ID_B}"))],
        ));
        apply(&mut state, watcher::Event::Init, NODE);
        apply(&mut state, watcher::Event::InitApply(a.clone()), NODE);
        apply(&mut state, watcher::Event::InitApply(b.clone()), NODE);
        assert!(
            !state.ready && state.pods.is_empty(),
            "nothing before the list is done"
        );
        apply(&mut state, watcher::Event::InitDone, NODE);
        assert!(state.ready);
        assert_eq!(state.pods.len(), 2);
        assert_eq!(state.containers.get(ID_B).map(String::as_str), Some(UID_B));

        // A relist without b (deleted while the watch was down): b goes, a stays meanwhile.
        apply(&mut state, watcher::Event::Init, NODE);
        apply(&mut state, watcher::Event::InitApply(a.clone()), NODE);
        assert_eq!(state.pods.len(), 2);
        apply(&mut state, watcher::Event::InitDone, NODE);
        assert_eq!(state.pods.keys().collect::<Vec<_>>(), [UID_A]);
        assert!(!state.containers.contains_key(ID_B));

        // A restarted container: its new id replaces the old one.
        let a2 = pod(pod_json(
            "ns",
            "a",
            UID_A,
            NODE,
            vec![container_status("s", &format!("cri-o://{ID_C}"))],
        ));
        apply(&mut state, watcher::Event::Apply(a2), NODE);
        assert!(!state.containers.contains_key(ID_A));
        assert_eq!(state.containers.get(ID_C).map(String::as_str), Some(UID_A));

        apply(&mut state, watcher::Event::Delete(a), NODE);
        assert!(state.pods.is_empty() && state.containers.is_empty());
        assert!(state.ready);
    }

    #[test]
    fn pods_without_a_uid_or_of_other_nodes_are_not_kept() {
        let other = pod(pod_json("ns", "x", UID_A, "node-b", vec![]));
        assert!(pod_entry(&other, NODE).is_none());
        let mut no_uid = pod_json("ns", "x", UID_A, NODE, vec![]);
        no_uid["metadata"].as_object_mut().unwrap().remove("uid");
        assert!(pod_entry(&pod(no_uid), NODE).is_none());
        // A waiting container has no id yet.
        let mut waiting = container_status("s", "");
        waiting.as_object_mut().unwrap().remove("containerID");
        let p = pod(pod_json(
            "ns",
            "x",
            UID_A,
            NODE,
            vec![waiting, container_status("t", "")],
        ));
        let (uid, entry) = pod_entry(&p, NODE).unwrap();
        assert_eq!(uid, UID_A);
        assert!(entry.containers.is_empty());
        assert_eq!(entry.meta.labels.get("app").map(String::as_str), Some("x"));
    }
}
