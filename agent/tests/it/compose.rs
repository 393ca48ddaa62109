//! The observability stack in deploy/compose, validated offline (no Docker engine, no image):
//! `docker-compose config` accepts the file and resolves it; llamaprobe runs as the DaemonSet
//! does (host pids, its capabilities, the same host mounts) with a command line the daemon
//! accepts; Prometheus's configuration passes `promtool check config` and its rule file is the
//! repository's both in a checkout and at the container's mount points; Grafana's provisioning
//! and the collector's configuration are what the compose file mounts, and refer only to
//! services, receivers and exporters that exist.

use std::{
    collections::BTreeSet,
    path::{Component, Path, PathBuf},
    process::Command,
};

use crate::{
    common::*,
    rules::{run_ok, seq, yaml, ALERTS, PROMTOOL, RECORDING_RULES},
};

const DOCKER_COMPOSE: &[&str] = &["docker-compose", "version"];

const SERVICES: [&str; 6] = [
    "llama-server",
    "llamaprobe",
    "prometheus",
    "grafana",
    "jaeger",
    "otel-collector",
];

/// The capabilities llamaprobe adds after dropping ALL, as the DaemonSet and the systemd unit.
const CAPS: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];

fn compose_dir() -> PathBuf {
    repo().join("deploy/compose")
}

/// The compose file as `docker-compose config` resolves it: variables at their defaults,
/// relative paths made absolute.
fn resolved() -> Value {
    let mut cmd = Command::new("docker-compose");
    cmd.arg("-f")
        .arg(compose_dir().join("compose.yaml"))
        .arg("config")
        .current_dir(repo());
    // The defaults are what is tested, not this environment's choices.
    for var in ["LLAMA_MODEL", "LLAMAPROBE_IMAGE", "GRAFANA_ADMIN_PASSWORD"] {
        cmd.env_remove(var);
    }
    let out = run_ok(&mut cmd);
    serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("docker-compose config's output does not parse: {e}"))
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_object(), "no service {name} in {compose:#}");
    s
}

fn strings(v: &Value) -> Vec<&str> {
    seq(v).iter().map(|s| s.as_str().unwrap()).collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a command.
fn flag<'a>(command: &[&'a str], flag: &str) -> Option<&'a str> {
    command.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            command.get(i + 1).copied()
        } else {
            a.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

/// `path` with `.` and `..` resolved lexically (the paths compared need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// A service's volumes as (source, target, mode); the resolved form is `SRC:DST:MODE`.
fn volumes(service: &Value) -> Vec<(String, String, String)> {
    strings(&service["volumes"])
        .into_iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            assert_eq!(parts.len(), 3, "volume {v}");
            (parts[0].into(), parts[1].into(), parts[2].into())
        })
        .collect()
}

/// The host path that `container_path` shows in the service: under the bind mount whose target
/// holds it (the deepest one, as the runtime mounts them).
fn host_path(service: &Value, container_path: &str) -> PathBuf {
    let path = normalize(Path::new(container_path));
    volumes(service)
        .into_iter()
        .filter(|(src, ..)| src.starts_with('/'))
        .filter_map(|(src, dst, _)| {
            let rest = path.strip_prefix(&dst).ok()?;
            Some((dst.len(), Path::new(&src).join(rest)))
        })
        .max_by_key(|(depth, _)| *depth)
        .map(|(_, p)| normalize(&p))
        .unwrap_or_else(|| panic!("{container_path} is on no bind mount of {service:#}"))
}

/// host:port of a URL or an address.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap()
}

fn port(addr: &str) -> &str {
    authority(addr).rsplit(':').next().unwrap()
}

#[test]
fn compose_file_resolves_with_the_six_services() {
    if !tool_or_skip(
        "compose_file_resolves_with_the_six_services",
        DOCKER_COMPOSE,
    ) {
        return;
    }
    let compose = resolved();
    let names: BTreeSet<&str> = compose["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, SERVICES.into_iter().collect::<BTreeSet<_>>());

    let server = service(&compose, "llama-server");
    let command = strings(&server["command"]);
    assert_eq!(flag(&command, "-m"), Some("/models/model.gguf"));
    assert_eq!(flag(&command, "--host"), Some("0.0.0.0"));
    assert_eq!(flag(&command, "--port"), Some("8080"));
    assert!(command.contains(&"--metrics"), "{command:?}");
    assert_eq!(
        host_path(server, "/models"),
        compose_dir().join("models"),
        "the models directory"
    );
}

#[test]
fn llamaprobe_runs_as_the_daemonset_does() {
    if !tool_or_skip("llamaprobe_runs_as_the_daemonset_does", DOCKER_COMPOSE) {
        return;
    }
    let compose = resolved();
    let probe = service(&compose, "llamaprobe");
    assert_eq!(probe["pid"], "host");
    assert_eq!(strings(&probe["cap_drop"]), ["ALL"]);
    assert_eq!(strings(&probe["cap_add"]), CAPS);
    assert_eq!(probe["read_only"], true);
    assert!(probe["privileged"].is_null(), "not privileged");

    // The same capabilities and host mounts as the DaemonSet: the same daemon needs them.
    let ds = yaml(&repo().join("deploy/kubernetes/base/daemonset.yaml"));
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        strings(&container["securityContext"]["capabilities"]["add"]),
        strings(&probe["cap_add"])
    );
    let mounts = volumes(probe);
    for v in seq(&pod["volumes"]) {
        let Some(host) = v["hostPath"]["path"].as_str() else {
            continue;
        };
        let mount = seq(&container["volumeMounts"])
            .iter()
            .find(|m| m["name"] == v["name"])
            .unwrap();
        let mode = if mount["readOnly"] == true {
            "ro"
        } else {
            "rw"
        };
        let expected = (
            host.to_string(),
            mount["mountPath"].as_str().unwrap().to_string(),
            mode.to_string(),
        );
        assert!(mounts.contains(&expected), "{expected:?} not in {mounts:?}");
    }

    // The daemon accepts the command line, with the configuration file the image holds.
    let command = strings(&probe["command"]);
    assert_eq!(command[0], "daemon", "{command:?}");
    let mut check = llamaprobe();
    check
        .args(&command)
        .arg("--config")
        .arg(repo().join("deploy/systemd/llamaprobe.toml"))
        .arg("--check-config");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("LLAMAPROBE_") || k.starts_with("OTEL_") {
            check.env_remove(&*k);
        }
    }
    let out = run_ok(&mut check);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("metrics 0.0.0.0:9464"), "{}", text(&out));

    // OTLP goes to the collector's gRPC receiver.
    let endpoint = flag(&command, "--otlp-endpoint").unwrap();
    assert_eq!(authority(endpoint), "otel-collector:4317");
}

#[test]
fn prometheus_config_checks_and_scrapes_the_stack() {
    let test = "prometheus_config_checks_and_scrapes_the_stack";
    if !tool_or_skip(test, DOCKER_COMPOSE) || !tool_or_skip(test, PROMTOOL) {
        return;
    }
    let config = compose_dir().join("prometheus/prometheus.yml");
    // In the checkout: promtool resolves rule_files relative to the file, and checks them.
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(&config),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SUCCESS: 1 rule files found"),
        "{}",
        text(&out)
    );
    let rules = format!("SUCCESS: {} rules found", RECORDING_RULES + ALERTS);
    assert!(stdout.contains(&rules), "{}", text(&out));

    // In the container: the configuration Prometheus is started with is this file, and the
    // same relative path there lands on the repository's rules file.
    let compose = resolved();
    let prom = service(&compose, "prometheus");
    let command = strings(&prom["command"]);
    let in_container = flag(&command, "--config.file").unwrap();
    assert_eq!(host_path(prom, in_container), config);
    let doc = yaml(&config);
    let rule_files = strings(&doc["rule_files"]);
    assert_eq!(rule_files.len(), 1, "{rule_files:?}");
    let rules_in_container = Path::new(in_container)
        .parent()
        .unwrap()
        .join(rule_files[0]);
    assert_eq!(
        host_path(prom, rules_in_container.to_str().unwrap()),
        rules_file()
    );

    // Both jobs, every 5 s, at the addresses the services listen on.
    let global = doc["global"]["scrape_interval"].as_str();
    let probe_cmd = strings(&service(&compose, "llamaprobe")["command"]);
    let server_cmd = strings(&service(&compose, "llama-server")["command"]);
    let expected = [
        (
            "llamaprobe",
            format!(
                "llamaprobe:{}",
                port(flag(&probe_cmd, "--metrics-addr").unwrap())
            ),
        ),
        (
            "llama-server",
            format!("llama-server:{}", flag(&server_cmd, "--port").unwrap()),
        ),
    ];
    let jobs = seq(&doc["scrape_configs"]);
    assert_eq!(jobs.len(), expected.len(), "{jobs:?}");
    for (job, target) in expected {
        let j = jobs
            .iter()
            .find(|j| j["job_name"] == job)
            .unwrap_or_else(|| panic!("no job {job}"));
        let targets: Vec<&str> = seq(&j["static_configs"])
            .iter()
            .flat_map(|s| strings(&s["targets"]))
            .collect();
        assert_eq!(targets, [target.as_str()], "job {job}");
        let interval = j["scrape_interval"].as_str().or(global);
        assert_eq!(interval, Some("5s"), "job {job}");
    }
}

#[test]
fn grafana_provisions_the_datasources_and_the_dashboards_folder() {
    let test = "grafana_provisions_the_datasources_and_the_dashboards_folder";
    if !tool_or_skip(test, DOCKER_COMPOSE) {
        return;
    }
    let compose = resolved();
    let grafana = service(&compose, "grafana");
    let provisioning = host_path(grafana, "/etc/grafana/provisioning");
    assert_eq!(provisioning, compose_dir().join("grafana/provisioning"));

    // Datasources by the uids the dashboards use, at services of the stack.
    let doc = yaml(&provisioning.join("datasources/prometheus.yml"));
    assert_eq!(doc["apiVersion"], 1);
    let sources = seq(&doc["datasources"]);
    for (uid, kind, addr) in [
        ("prometheus", "prometheus", "prometheus:9090"),
        ("jaeger", "jaeger", "jaeger:16686"),
    ] {
        let ds = sources
            .iter()
            .find(|d| d["uid"] == uid)
            .unwrap_or_else(|| panic!("no datasource uid {uid}"));
        assert_eq!(ds["type"], kind, "{uid}");
        assert_eq!(authority(ds["url"].as_str().unwrap()), addr, "{uid}");
    }
    assert_eq!(
        sources.iter().filter(|d| d["isDefault"] == true).count(),
        1,
        "one default datasource"
    );

    // The dashboard provider reads the folder where dashboards/grafana is mounted.
    let doc = yaml(&provisioning.join("dashboards/llamaprobe.yml"));
    assert_eq!(doc["apiVersion"], 1);
    let providers = seq(&doc["providers"]);
    assert_eq!(providers.len(), 1, "{providers:?}");
    assert_eq!(providers[0]["type"], "file");
    let path = providers[0]["options"]["path"].as_str().unwrap();
    assert_eq!(host_path(grafana, path), repo().join("dashboards/grafana"));
}

#[test]
fn collector_pipelines_use_only_what_it_defines() {
    let config = compose_dir().join("otel-collector/config.yaml");
    let doc = yaml(&config);
    let pipelines = doc["service"]["pipelines"].as_object().expect("pipelines");
    for kind in ["traces", "metrics"] {
        assert!(pipelines.contains_key(kind), "no {kind} pipeline");
    }
    for (name, p) in pipelines {
        for section in ["receivers", "processors", "exporters"] {
            let defined = doc[section].as_object();
            for c in strings(&p[section]) {
                assert!(
                    defined.is_some_and(|d| d.contains_key(c)),
                    "pipeline {name}: {section} `{c}` is not defined"
                );
            }
        }
        assert!(
            !seq(&p["receivers"]).is_empty(),
            "pipeline {name}: no receiver"
        );
        assert!(
            !seq(&p["exporters"]).is_empty(),
            "pipeline {name}: no exporter"
        );
    }

    // OTLP in on the standard ports; traces out to Jaeger's OTLP receiver, in plain text.
    let otlp = &doc["receivers"]["otlp"]["protocols"];
    assert_eq!(port(otlp["grpc"]["endpoint"].as_str().unwrap()), "4317");
    assert_eq!(port(otlp["http"]["endpoint"].as_str().unwrap()), "4318");
    let traces = strings(&pipelines["traces"]["exporters"]);
    assert_eq!(traces.len(), 1, "{traces:?}");
    let exporter = &doc["exporters"][traces[0]];
    assert_eq!(traces[0].split('/').next(), Some("otlp"), "{traces:?}");
    assert_eq!(exporter["endpoint"], "jaeger:4317");
    assert_eq!(exporter["tls"]["insecure"], true);
}

#[test]
fn collector_runs_this_config_beside_jaeger() {
    if !tool_or_skip("collector_runs_this_config_beside_jaeger", DOCKER_COMPOSE) {
        return;
    }
    let compose = resolved();
    let collector = service(&compose, "otel-collector");
    let command = strings(&collector["command"]);
    let in_container = flag(&command, "--config").unwrap();
    assert_eq!(
        host_path(collector, in_container),
        compose_dir().join("otel-collector/config.yaml")
    );
    let jaeger = service(&compose, "jaeger");
    assert_eq!(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"], "true");
}
