//! The Kubernetes manifests in deploy/kubernetes, rendered offline with `kubectl kustomize`:
//! every object is a valid object of its API type (no unknown or misspelled field), the
//! DaemonSet runs the daemon with the capabilities, mounts, probes and port it needs, the
//! ConfigMap's configuration file is one the daemon accepts, and the overlays add what they are
//! for. No cluster is needed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::common::*;

/// The kustomize directories, relative to deploy/kubernetes.
const DIRS: [&str; 3] = ["base", "overlays/gpu-nodes", "overlays/servicemonitor"];

/// The capabilities the DaemonSet's container adds (after dropping ALL): the set measured for
/// the systemd unit (deploy/systemd/README.md).
const CAPS: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];

const NAMESPACE: &str = "llamaprobe";
const CONFIG_KEY: &str = "llamaprobe.toml";
const OTLP_KEY: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// `kubectl version --client`: whether kubectl (with its kustomize) runs.
const KUBECTL: &[&str] = &["kubectl", "version", "--client"];

/// The objects `kubectl kustomize DIR` renders.
fn render(dir: &str) -> Vec<Value> {
    let path = deploy_dir().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}\n{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{dir}: the rendered YAML does not parse: {e}\n{text}"));
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    assert!(!docs.is_empty(), "{dir}: renders nothing");
    docs
}

/// `doc` as the API type `T`, required to serialize back to exactly `doc`: k8s-openapi ignores
/// unknown fields when deserializing, so a misspelled or unknown field shows as a difference.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(doc.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&t).unwrap();
    if back != *doc {
        return Err(format!(
            "fields the API type does not have (or not as written):\nwritten: {doc:#}\nas the type: {back:#}"
        ));
    }
    Ok(t)
}

/// The one object of this kind and name.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in {docs:#?}");
    found[0]
}

fn daemonset(docs: &[Value]) -> DaemonSet {
    typed(object(docs, "DaemonSet", "llamaprobe")).unwrap()
}

fn container(ds: &DaemonSet) -> Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "one container");
    pod.containers[0].clone()
}

/// The ServiceMonitor's spec fields this project uses: a CRD, so checked by hand.
fn check_service_monitor(doc: &Value) -> Result<(), String> {
    /// An absent (optional) mapping passes.
    fn keys_within(v: &Value, allowed: &[&str], what: &str) -> Result<(), String> {
        if v.is_null() {
            return Ok(());
        }
        let map = v.as_object().ok_or(format!("{what}: not a mapping"))?;
        match map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!("{what}: unexpected field `{k}`")),
            None => Ok(()),
        }
    }
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err(format!("apiVersion {}", doc["apiVersion"]));
    }
    keys_within(
        doc,
        &["apiVersion", "kind", "metadata", "spec"],
        "ServiceMonitor",
    )?;
    keys_within(
        &doc["metadata"],
        &["name", "namespace", "labels", "annotations"],
        "metadata",
    )?;
    let spec = &doc["spec"];
    if !spec["selector"].is_object() {
        return Err("spec.selector: missing".to_string());
    }
    keys_within(
        spec,
        &["selector", "namespaceSelector", "endpoints", "jobLabel"],
        "spec",
    )?;
    keys_within(&spec["selector"], &["matchLabels"], "spec.selector")?;
    keys_within(
        &spec["namespaceSelector"],
        &["matchNames", "any"],
        "spec.namespaceSelector",
    )?;
    let endpoints = spec["endpoints"]
        .as_array()
        .ok_or("spec.endpoints: not a list")?;
    for ep in endpoints {
        keys_within(
            ep,
            &["port", "path", "interval", "scrapeTimeout", "relabelings"],
            "endpoint",
        )?;
        for r in ep["relabelings"].as_array().into_iter().flatten() {
            keys_within(
                r,
                &[
                    "sourceLabels",
                    "targetLabel",
                    "action",
                    "regex",
                    "replacement",
                ],
                "relabeling",
            )?;
        }
    }
    Ok(())
}

/// Every object, checked as its API type (the ServiceMonitor by hand).
fn check_objects(dir: &str, docs: &[Value]) {
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let checked = match kind {
            "Namespace" => typed::<Namespace>(doc).map(drop),
            "ServiceAccount" => typed::<ServiceAccount>(doc).map(drop),
            "ConfigMap" => typed::<ConfigMap>(doc).map(drop),
            "Service" => typed::<Service>(doc).map(drop),
            "ClusterRole" => typed::<ClusterRole>(doc).map(drop),
            "ClusterRoleBinding" => typed::<ClusterRoleBinding>(doc).map(drop),
            "DaemonSet" => typed::<DaemonSet>(doc).map(drop),
            "ServiceMonitor" => check_service_monitor(doc),
            _ => Err("a kind this test does not know".to_string()),
        };
        if let Err(e) = checked {
            panic!("{dir}: {kind} {}: {e}", doc["metadata"]["name"]);
        }
        if kind != "Namespace" && !kind.starts_with("Cluster") {
            assert_eq!(
                doc["metadata"]["namespace"], NAMESPACE,
                "{dir}: {kind} namespace"
            );
        }
    }
}

/// `llamaprobe daemon --config FILE --check-config` without this environment's own LLAMAPROBE_*
/// and OTEL_* variables.
fn check_config(config: &str, name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = scratch(name);
    let file = dir.join("llamaprobe.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = llamaprobe();
    cmd.arg("daemon")
        .arg("--config")
        .arg(&file)
        .arg("--check-config");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("LLAMAPROBE_") || k.starts_with("OTEL_") {
            cmd.env_remove(&*k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run llamaprobe daemon --check-config")
}

/// The address `--check-config` says the metrics are served on.
fn metrics_addr(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rest = stdout
        .split("metrics ")
        .nth(1)
        .unwrap_or_else(|| panic!("no metrics address in {stdout:?}"));
    rest.split([',', ' ', '\n']).next().unwrap().to_string()
}

/// The daemon's metrics port when nothing configures it.
fn default_metrics_port() -> u16 {
    let out = check_config("", "deploy_kubernetes_default_port", &[]);
    assert!(out.status.success(), "an empty configuration: {out:?}");
    let addr = metrics_addr(&out);
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn every_directory_renders_to_objects_of_their_api_types() {
    if !tool_or_skip(
        "every_directory_renders_to_objects_of_their_api_types",
        KUBECTL,
    ) {
        return;
    }
    for dir in DIRS {
        let docs = render(dir);
        check_objects(dir, &docs);
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
        ] {
            assert!(kinds.contains(&kind), "{dir}: no {kind} in {kinds:?}");
        }
    }
}

#[test]
fn the_round_trip_rejects_a_misspelled_field() {
    // The check the manifests pass must fail for a field the API type does not have.
    let good = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": { "name": "llamaprobe", "namespace": NAMESPACE },
    });
    typed::<ServiceAccount>(&good).unwrap();
    let mut bad = good.clone();
    bad["metadata"]["namspace"] = bad["metadata"]["namespace"].take();
    bad["metadata"].as_object_mut().unwrap().remove("namespace");
    assert!(typed::<ServiceAccount>(&bad).is_err());

    let mut monitor = serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": { "name": "llamaprobe" },
        "spec": { "selector": {}, "endpoints": [{ "port": "metrics" }] },
    });
    check_service_monitor(&monitor).unwrap();
    monitor["spec"]["endpoints"][0]["prot"] = "metrics".into();
    assert!(check_service_monitor(&monitor).is_err());
}

#[test]
fn the_daemonset_runs_the_daemon_with_what_it_needs() {
    if !tool_or_skip("the_daemonset_runs_the_daemon_with_what_it_needs", KUBECTL) {
        return;
    }
    let port = default_metrics_port();
    for dir in DIRS {
        let docs = render(dir);
        let ds = daemonset(&docs);
        let template = &ds.spec.as_ref().unwrap().template;
        let pod = template.spec.as_ref().unwrap();
        let c = container(&ds);

        // The daemon, not privileged: root with exactly the capabilities it uses.
        assert_eq!(
            c.args.as_deref(),
            Some(&["daemon".to_string()][..]),
            "{dir}"
        );
        assert_eq!(pod.host_pid, Some(true), "{dir}: hostPID");
        assert_ne!(pod.host_network, Some(true), "{dir}: hostNetwork");
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{dir}: privileged");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{dir}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{dir}");
        assert_eq!(sc.run_as_user, Some(0), "{dir}");
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{dir}"
        );
        let mut added = caps.add.clone().unwrap_or_default();
        added.sort();
        let mut want: Vec<String> = CAPS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(added, want, "{dir}: capabilities added");

        // The named port is the daemon's default metrics port; the probes and the scrape
        // annotations use it.
        let ports = c.ports.clone().unwrap_or_default();
        assert_eq!(ports.len(), 1, "{dir}: {ports:?}");
        assert_eq!(ports[0].name.as_deref(), Some("metrics"), "{dir}");
        assert_eq!(ports[0].container_port, i32::from(port), "{dir}");
        for (probe, path) in [
            (c.liveness_probe.as_ref(), "/healthz"),
            (c.readiness_probe.as_ref(), "/readyz"),
        ] {
            let get = probe.and_then(|p| p.http_get.as_ref()).expect(path);
            assert_eq!(get.path.as_deref(), Some(path), "{dir}");
            assert_eq!(get.port, IntOrString::String("metrics".into()), "{dir}");
        }
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{dir}");
        assert_eq!(annotations["prometheus.io/port"], port.to_string(), "{dir}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{dir}");

        // The node's name for the pod watch, the OTLP endpoint from the ConfigMap (optional).
        let env = c.env.clone().unwrap_or_default();
        let var = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{dir}: no {name} in {env:?}"))
                .clone()
        };
        let node = var("NODE_NAME").value_from.and_then(|v| v.field_ref);
        assert_eq!(node.map(|f| f.field_path).as_deref(), Some("spec.nodeName"));
        let otlp = var(OTLP_KEY)
            .value_from
            .and_then(|v| v.config_map_key_ref)
            .expect("OTLP endpoint from the ConfigMap");
        assert_eq!(
            (otlp.name.as_str(), otlp.key.as_str()),
            ("llamaprobe", OTLP_KEY)
        );
        assert_eq!(otlp.optional, Some(true), "{dir}");
        let cm: ConfigMap = typed(object(&docs, "ConfigMap", &otlp.name)).unwrap();
        assert!(cm.data.unwrap_or_default().contains_key(OTLP_KEY), "{dir}");
        assert_eq!(var("NVIDIA_VISIBLE_DEVICES").value.as_deref(), Some("all"));
        assert_eq!(
            var("NVIDIA_DRIVER_CAPABILITIES").value.as_deref(),
            Some("utility")
        );

        // tracefs and the cgroup tree from the host, the configuration at its default path.
        let volumes: BTreeMap<String, _> = pod
            .volumes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let mounts: BTreeMap<String, _> = c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.mount_path.clone(), m))
            .collect();
        for (path, read_only) in [("/sys/kernel/tracing", false), ("/sys/fs/cgroup", true)] {
            let m = mounts.get(path).unwrap_or_else(|| panic!("{dir}: {path}"));
            assert_eq!(m.read_only.unwrap_or(false), read_only, "{dir}: {path}");
            let host = volumes[&m.name].host_path.as_ref().expect("hostPath");
            assert_eq!(host.path, path, "{dir}");
        }
        let m = &mounts["/etc/llamaprobe"];
        assert_eq!(m.read_only, Some(true), "{dir}");
        let cm_vol = volumes[&m.name].config_map.as_ref().expect("configMap");
        let cm = object(&docs, "ConfigMap", &cm_vol.name);
        assert!(cm["data"][CONFIG_KEY].is_string(), "{dir}");
        if let Some(items) = &cm_vol.items {
            assert!(
                items
                    .iter()
                    .any(|i| i.key == CONFIG_KEY && i.path == CONFIG_KEY),
                "{dir}: {items:?}"
            );
        }

        // Scheduling and resources.
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(
            strategy
                .rolling_update
                .as_ref()
                .and_then(|r| r.max_unavailable.clone()),
            Some(IntOrString::Int(1))
        );
        let res = c.resources.as_ref().expect("resources");
        let q = |m: &Option<BTreeMap<String, _>>, k: &str| {
            m.as_ref()
                .and_then(|m| m.get(k))
                .map(|q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| q.0.clone())
        };
        assert_eq!(q(&res.requests, "cpu").as_deref(), Some("50m"));
        assert_eq!(q(&res.requests, "memory").as_deref(), Some("64Mi"));
        assert_eq!(q(&res.limits, "cpu").as_deref(), Some("500m"));
        assert_eq!(q(&res.limits, "memory").as_deref(), Some("256Mi"));

        // Its ServiceAccount may read pods and nothing else.
        let sa = pod
            .service_account_name
            .as_deref()
            .expect("serviceAccountName");
        object(&docs, "ServiceAccount", sa);
        let binding: ClusterRoleBinding =
            typed(object(&docs, "ClusterRoleBinding", "llamaprobe")).unwrap();
        let subjects = binding.subjects.unwrap_or_default();
        assert!(
            subjects.iter().any(|s| s.kind == "ServiceAccount"
                && s.name == sa
                && s.namespace.as_deref() == Some(NAMESPACE)),
            "{dir}: {subjects:?}"
        );
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        let role: ClusterRole =
            typed(object(&docs, "ClusterRole", &binding.role_ref.name)).unwrap();
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules.len(), 1, "{dir}: {rules:?}");
        assert_eq!(rules[0].api_groups.as_deref(), Some(&["".to_string()][..]));
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);

        if dir == "base" {
            assert!(pod.tolerations.is_none(), "base: no tolerations");
            assert!(pod.node_selector.is_none(), "base: no nodeSelector");
        }
    }
}

#[test]
fn the_configmap_holds_a_configuration_the_daemon_accepts() {
    if !tool_or_skip(
        "the_configmap_holds_a_configuration_the_daemon_accepts",
        KUBECTL,
    ) {
        return;
    }
    let docs = render("base");
    let cm: ConfigMap = typed(object(&docs, "ConfigMap", "llamaprobe")).unwrap();
    let data = cm.data.unwrap_or_default();
    let config = data.get(CONFIG_KEY).expect("llamaprobe.toml");
    let otlp = data.get(OTLP_KEY).expect("the OTLP endpoint entry");
    let out = check_config(
        config,
        "deploy_kubernetes_configmap",
        &[(OTLP_KEY, otlp.as_str())],
    );
    assert!(
        out.status.success(),
        "the daemon refuses the ConfigMap's llamaprobe.toml: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It serves metrics on every address of the pod, on the container's `metrics` port.
    let port = container(&daemonset(&docs)).ports.unwrap()[0].container_port;
    assert_eq!(metrics_addr(&out), format!("0.0.0.0:{port}"));
}

#[test]
fn the_gpu_nodes_overlay_selects_and_tolerates_gpu_nodes() {
    if !tool_or_skip(
        "the_gpu_nodes_overlay_selects_and_tolerates_gpu_nodes",
        KUBECTL,
    ) {
        return;
    }
    let docs = render("overlays/gpu-nodes");
    let ds = daemonset(&docs);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let selector = pod.node_selector.unwrap_or_default();
    assert_eq!(
        selector.get("nvidia.com/gpu.present").map(String::as_str),
        Some("true"),
        "{selector:?}"
    );
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")
                && t.operator.as_deref() == Some("Exists")
                && t.effect.as_deref() == Some("NoSchedule")),
        "{tolerations:?}"
    );
}

#[test]
fn the_servicemonitor_overlay_scrapes_the_daemonset_pods() {
    if !tool_or_skip(
        "the_servicemonitor_overlay_scrapes_the_daemonset_pods",
        KUBECTL,
    ) {
        return;
    }
    let docs = render("overlays/servicemonitor");
    let ds = daemonset(&docs);
    let pod_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let c = container(&ds);
    let container_port = c.ports.unwrap()[0].clone();

    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 1);
    let service: Service = typed(services[0]).unwrap();
    let spec = service.spec.as_ref().unwrap();
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "the Service selects pods");
    for (k, v) in &selector {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "selector {k}={v} vs {pod_labels:?}"
        );
    }
    let ports = spec.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].port, container_port.container_port);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String(container_port.name.clone().unwrap()))
    );

    let monitors: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 1);
    let monitor = monitors[0];
    check_service_monitor(monitor).unwrap();
    let service_labels = service.metadata.labels.clone().unwrap_or_default();
    let match_labels = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert!(!match_labels.is_empty());
    for (k, v) in match_labels {
        assert_eq!(
            service_labels.get(k).map(String::as_str),
            v.as_str(),
            "ServiceMonitor selects {k}={v}; the Service has {service_labels:?}"
        );
    }
    let namespaces = &monitor["spec"]["namespaceSelector"]["matchNames"];
    assert!(
        namespaces
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == NAMESPACE)),
        "{namespaces}"
    );
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], ports[0].name.clone().unwrap());
    assert_eq!(endpoints[0]["path"], "/metrics");
}
