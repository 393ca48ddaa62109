//! The Grafana dashboards (dashboards/grafana) and the recording rules
//! (dashboards/prometheus) against a real Prometheus that scrapes llamaprobe and a real
//! llama-server while the server serves a scripted mix of requests: sequential, concurrent
//! (more than its slots, so some wait in its queue) and one that fills its slot's context.
//! After two scrapes, every query of every panel, with the dashboard's variables set to the
//! values Prometheus offers for them, returns data; every recording rule has data; the
//! overview's request and token rates and time-to-first-token quantile agree with the mix
//! (exact counts where they are knowable: tokens and decode steps equal llama-server's own
//! counters, as the same Prometheus scraped them); and `promtool check metrics` finds nothing
//! to fix in llamaprobe's /metrics. With `attach` (and a FAKE NVML library for the GPU
//! dashboard: no GPU here) and with the host agent.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use serde_json::{json, Value};

use crate::common::{
    daemon::Daemon,
    prometheus::{now, Prometheus},
    server::{first_server, free_port, get, http, Server},
    *,
};
use crate::rules::PROMTOOL;

/// What `$__rate_interval` becomes here (Grafana: four scrape intervals at least).
const RATE_INTERVAL: &str = "1m";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/grafana")
}

/// One query of one panel.
struct Target {
    panel: String,
    expr: String,
    instant: bool,
}

/// A dashboard's variables (name, `label_values` query, several values allowed) and targets.
struct Board {
    title: String,
    vars: Vec<(String, String, bool)>,
    targets: Vec<Target>,
}

fn board(file: &str) -> Board {
    let d = json(&dashboards_dir().join(file));
    let vars = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["definition"].as_str().unwrap().to_string(),
                v["multi"].as_bool().unwrap(),
            )
        })
        .collect();
    let mut targets = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            targets.push(Target {
                panel: p["title"].as_str().unwrap().to_string(),
                expr: t["expr"].as_str().unwrap().to_string(),
                instant: t["instant"].as_bool().unwrap_or(false),
            });
        }
    }
    Board {
        title: d["title"].as_str().unwrap().to_string(),
        vars,
        targets,
    }
}

/// `expr` with `$name` / `${name}` replaced (longest names first, so `$pid` never eats `$p`).
fn substitute(expr: &str, values: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = values.iter().collect();
    sorted.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut out = expr.replace("$__rate_interval", RATE_INTERVAL);
    for (name, value) in sorted {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

/// A multi-value variable as Grafana puts it in a regex matcher: `(a|b)`, or All (`.*`)
/// when it has no value.
fn regex_of(values: &[String]) -> String {
    if values.is_empty() {
        return ".*".into();
    }
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars()
                .flat_map(|c| {
                    let special = "\\.+*?()|[]{}^$".contains(c);
                    special
                        .then_some("\\\\")
                        .into_iter()
                        .flat_map(str::chars)
                        .chain([c])
                })
                .collect()
        })
        .collect();
    format!("({})", escaped.join("|"))
}

/// Each variable of `b` set from what Prometheus offers in [start, end] (`label_values`),
/// a single-value one to `pick`'s choice.
fn variables(
    prom: &Prometheus,
    b: &Board,
    start: f64,
    end: f64,
    pick: &dyn Fn(&str, &[String]) -> String,
) -> Vec<(String, String)> {
    let mut set: Vec<(String, String)> = Vec::new();
    for (name, query, multi) in &b.vars {
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{}: variable {name}: {query}", b.title));
        let (selector, label) = inner.rsplit_once(", ").unwrap();
        let selector = substitute(selector, &set);
        let values = prom.label_values(&selector, label, start, end);
        // Pods exist under Kubernetes only; every other variable has values here.
        assert!(
            !values.is_empty() || name == "pod",
            "{}: variable {name} ({selector}, {label}) has no value",
            b.title
        );
        let value = if *multi {
            regex_of(&values)
        } else {
            pick(name, &values)
        };
        set.push((name.clone(), value));
    }
    set
}

/// Every target of `b` returns at least one series (panels in `exempt` aside); the failures
/// listed together.
fn every_panel_has_data(
    prom: &Prometheus,
    b: &Board,
    vars: &[(String, String)],
    (start, end): (f64, f64),
    exempt: &[&str],
) -> usize {
    let mut empty = Vec::new();
    let mut checked = 0;
    for t in b
        .targets
        .iter()
        .filter(|t| !exempt.contains(&t.panel.as_str()))
    {
        let expr = substitute(&t.expr, vars);
        assert!(!expr.contains('$'), "{}: unsubstituted {expr}", b.title);
        let result = if t.instant {
            prom.query_at(&expr, end)
        } else {
            prom.query_range(&expr, start, end)
        };
        checked += 1;
        if result.is_empty() {
            empty.push(format!("{} / {}: {expr}", b.title, t.panel));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    checked
}

/// The requests a mix sent and what their clients saw.
struct Mix {
    requests: usize,
    /// Each request's wall time at the client, seconds.
    client_secs: Vec<f64>,
    /// Each request's prompt + generation time as the server reports it, seconds.
    server_secs: Vec<f64>,
    /// The client's wait of the request sent before the mix (in the 5-minute quantiles too).
    warm_secs: f64,
}

fn timed_completion(port: u16, body: Value) -> (f64, f64) {
    let t0 = Instant::now();
    let mut r = http()
        .post(&format!("http://127.0.0.1:{port}/completion"))
        .send_json(body)
        .expect("completion request");
    let v: Value = r.body_mut().read_json().unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let t = &v["timings"];
    let server = (t["prompt_ms"].as_f64().unwrap() + t["predicted_ms"].as_f64().unwrap()) / 1e3;
    (wall, server)
}

/// Three sequential requests, six concurrent ones on a two-slot server (four wait), and one
/// that generates until its slot's context is full.
fn drive_mix(port: u16, warm_secs: f64) -> Mix {
    let body = |i: usize, n: u32| {
        json!({"prompt": format!("dashboard mix {i}: tell a story about the number {i}"),
               "n_predict": n, "seed": 1, "temperature": 0.8})
    };
    let mut timings: Vec<(f64, f64)> = (0..3).map(|i| timed_completion(port, body(i, 8))).collect();
    let concurrent: Vec<_> = (3..9)
        .map(|i| std::thread::spawn(move || timed_completion(port, body(i, 12))))
        .collect();
    timings.extend(concurrent.into_iter().map(|h| h.join().unwrap()));
    // Longer than the slot's 256 tokens: generation runs into the end of its context.
    timings.push(timed_completion(
        port,
        json!({"prompt": "fill the context", "n_predict": 400, "ignore_eos": true, "seed": 1}),
    ));
    Mix {
        requests: timings.len(),
        client_secs: timings.iter().map(|t| t.0).collect(),
        server_secs: timings.iter().map(|t| t.1).collect(),
        warm_secs,
    }
}

/// The server's flags here: two slots of 256 tokens.
const SERVER_FLAGS: [&str; 4] = ["-c", "512", "-np", "2"];

/// What the scrapes at `t1` (before the mix) and `t2` (after it) say, against the mix and
/// llama-server's own counters; `sel` selects the traced server's series.
fn check_counts(prom: &Prometheus, sel: &str, mix: &Mix, (t1, t2): (f64, f64)) {
    let d = |expr: &str| prom.sum_at(expr, t2) - prom.sum_at(expr, t1);
    let ours = |m: &str, extra: &str| format!("{m}{{{sel}{extra}}}");
    let n = mix.requests as f64;
    assert_eq!(d(&ours("llamacpp_request_duration_seconds_count", "")), n);
    assert_eq!(
        d(&ours("llamacpp_time_to_first_token_seconds_count", "")),
        n
    );
    let server = |m: &str| d(&format!("llamacpp:{m}{{job=\"llama-server\"}}"));
    let prompt = d(&ours(
        "llamacpp_tokens_total",
        r#", kind="prompt", context="main""#,
    ));
    let generated = d(&ours(
        "llamacpp_tokens_total",
        r#", kind="generated", context="main""#,
    ));
    assert_eq!(prompt, server("prompt_tokens_total"), "prompt tokens");
    assert_eq!(
        generated,
        server("tokens_predicted_total"),
        "generated tokens"
    );
    assert_eq!(
        d(&ours("llamacpp_decode_calls_total", r#", context="main""#)),
        server("n_decode_total"),
        "decode steps"
    );
    assert!(generated > 256.0, "the long request generated {generated}");

    // Each rule's value is the rate of the raw series at its own evaluation time, and between
    // the mix's count over 300 s and everything counted so far plus Prometheus's
    // extrapolation (which, on series some seconds old, can add a third).
    let rate_agrees = |record: &str, delta: f64, total: &str| {
        let rule = prom.query_at(&format!("sum({record})"), t2);
        let at = prom.query_at(&format!("max(timestamp({record}))"), t2);
        let (Some(rule), Some(at)) = (rule.first(), at.first()) else {
            panic!("{record}: no data at {t2}; {:?}", prom.failing_rules());
        };
        let (base, matcher) = record.split_once('{').map_or((record, ""), |(b, m)| (b, m));
        let raw_metric = if base.contains("requests") {
            "llamacpp_request_duration_seconds_count"
        } else {
            "llamacpp_tokens_total"
        };
        let matcher = matcher.trim_end_matches('}');
        let raw = prom.sum_at(&format!("rate({raw_metric}{{{matcher}}}[5m])"), at.value);
        assert!(
            (rule.value - raw).abs() <= 1e-9 * raw.max(1.0),
            "{record} = {} at {}, the raw rate {raw}",
            rule.value,
            at.value
        );
        let (got, all) = (rule.value * 300.0, prom.sum_at(total, t2));
        assert!(
            got >= delta * 0.999 && got <= all * 1.5,
            "{record} × 300 s = {got}: the mix counted {delta}, {all} in all"
        );
    };
    rate_agrees(
        "instance_model:llamacpp_requests:rate5m",
        n,
        &ours("llamacpp_request_duration_seconds_count", ""),
    );
    rate_agrees(
        r#"instance_model_kind:llamacpp_tokens:rate5m{kind="generated"}"#,
        generated,
        &ours("llamacpp_tokens_total", r#", kind="generated""#),
    );

    // Time to first token and request duration: each between what the server measured of the
    // request and what its client waited.
    let client: f64 = mix.client_secs.iter().sum();
    let server_side: f64 = mix.server_secs.iter().sum();
    let ttft = d(&ours("llamacpp_time_to_first_token_seconds_sum", ""));
    let duration = d(&ours("llamacpp_request_duration_seconds_sum", ""));
    assert!(
        ttft > 0.0 && ttft < duration,
        "TTFT {ttft} s, duration {duration} s"
    );
    assert!(
        duration >= server_side * 0.95 && duration <= client,
        "request durations {duration} s: the server measured {server_side} s, clients waited {client} s"
    );
    // The overview's p99 (over every request of the last 5 minutes) lies in the bucket of the
    // longest wait or below.
    let longest = mix
        .client_secs
        .iter()
        .cloned()
        .fold(mix.warm_secs, f64::max);
    let bound = prom
        .query_at(&ours("llamacpp_time_to_first_token_seconds_bucket", ""), t2)
        .iter()
        .filter_map(|s| s.label("le").parse::<f64>().ok())
        .filter(|le| *le >= longest)
        .fold(f64::INFINITY, f64::min);
    let p99 = prom
        .query_at(
            r#"instance_model:llamacpp_time_to_first_token_seconds:quantile5m{quantile="0.99"}"#,
            t2,
        )
        .iter()
        .map(|s| s.value)
        .fold(f64::NAN, f64::max);
    assert!(
        p99 > 0.0 && p99 <= bound,
        "TTFT p99 {p99} s; the longest client wait {longest} s (bucket ≤ {bound})"
    );
}

/// Every recording rule of the rules file has data at `t`.
fn every_rule_has_data(prom: &Prometheus, t: f64) {
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let mut names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(str::trim)
        .collect();
    names.dedup();
    assert!(names.len() >= 9, "{names:?}");
    let failing = prom.failing_rules();
    assert!(failing.is_empty(), "rules failing: {failing:?}");
    let empty: Vec<&&str> = names
        .iter()
        .filter(|n| prom.query_at(n, t).is_empty())
        .collect();
    assert!(empty.is_empty(), "recording rules without data: {empty:?}");
}

/// `promtool check metrics` on llamaprobe's /metrics: nothing reported.
fn promtool_finds_nothing(metrics_port: u16) {
    let text = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

/// The stack under `mode`: Prometheus scraping llamaprobe (on `metrics_port`) and `server`;
/// a baseline request, the mix, then every check. `exempt`: panels that cannot have data in
/// this mode (said why by the caller).
fn check_stack(name: &str, server: &Server, metrics_port: u16, boards: &[&str], exempt: &[&str]) {
    let prom = Prometheus::start(
        name,
        &[
            ("llamaprobe", format!("127.0.0.1:{metrics_port}")),
            ("llama-server", format!("127.0.0.1:{}", server.port)),
        ],
    );
    let start = now();
    // One request before the baseline, so that its series exist when the baseline is read.
    let (warm_secs, _) = timed_completion(
        server.port,
        json!({"prompt": "warm", "n_predict": 4, "seed": 1}),
    );
    server.settled_metrics();
    let pid = server.child.id().to_string();
    let sel = format!(r#"pid="{pid}""#);
    let counted = |want: f64| {
        let count = |m: &std::collections::HashMap<String, f64>| {
            server::sum_of(m, "llamacpp_request_duration_seconds_count", &sel)
        };
        let m = server::wait_metrics(metrics_port, |m| count(m) >= want);
        assert_eq!(count(&m), want, "requests llamaprobe counted");
    };
    counted(1.0);
    let t1 = prom.two_scrapes();
    let mix = drive_mix(server.port, warm_secs);
    server.settled_metrics();
    counted(1.0 + mix.requests as f64);
    prom.two_scrapes();
    // The rules evaluate every second: once more after the latest scrape.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let t2 = now();

    check_counts(&prom, &sel, &mix, (t1, t2));
    every_rule_has_data(&prom, t2);
    let mut checked = 0;
    for file in boards {
        let b = board(file);
        let vars = variables(&prom, &b, start, t2, &|var, values| {
            assert_eq!(var, "pid");
            assert!(values.contains(&pid), "pid variable {values:?} lacks {pid}");
            pid.clone()
        });
        checked += every_panel_has_data(&prom, &b, &vars, (start, t2), exempt);
    }
    eprintln!("{name}: {checked} panel queries returned data");
    promtool_finds_nothing(metrics_port);
}

const OVERVIEW: &str = "llamacpp-overview.json";
const PROCESS: &str = "llamacpp-process.json";
const GPU: &str = "llamacpp-gpu.json";

/// `attach` to a running llama-server, with GPU readings from the FAKE NVML library: every
/// panel of the three dashboards has data but those of what happened before llamaprobe
/// attached: the model's load time and the context's parameters (and so each sequence's
/// share of it, for the utilization ratio). `run` and the host agent see both.
#[test]
fn fake_gpu_every_dashboard_query_has_data_when_attached() {
    let test = "fake_gpu_every_dashboard_query_has_data_when_attached";
    if !tool_or_skip(test, &["prometheus", "--version"]) || !tool_or_skip(test, PROMTOOL) {
        return;
    }
    let Some((f, model, _serial)) = first_server(test) else {
        return;
    };
    let bin = f.server.as_ref().unwrap();
    let server = Server::start_with(bin, &model, &f.env, &SERVER_FLAGS, None);
    let metrics_port = free_port();
    let nvml = crate::resources::fake_nvml_lib();
    let mut cmd = llamaprobe();
    cmd.args(["attach", "--pid", &server.child.id().to_string(), "--quiet"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(f.symbols_args())
        .arg("--nvml-lib")
        .arg(nvml)
        .env("FAKE_NVML_PID", server.child.id().to_string());
    f.apply(&mut cmd);
    let mut probe = server::Probe::spawn(&mut cmd);
    probe.wait_for("probes attached");
    check_stack(
        "attach",
        &server,
        metrics_port,
        &[OVERVIEW, PROCESS, GPU],
        &[
            "Model load time",
            "Context parameters",
            "Context utilization per sequence",
        ],
    );
    let (code, out) = probe.interrupt();
    assert_eq!(code, 0, "{out}");
}

/// The host agent tracing a llama-server started after it (its model load and context seen):
/// every panel of the overview and process dashboards has data (no GPU here).
#[test]
fn every_dashboard_query_has_data_under_the_host_agent() {
    let test = "every_dashboard_query_has_data_under_the_host_agent";
    if !tool_or_skip(test, &["prometheus", "--version"]) || !tool_or_skip(test, PROMTOOL) {
        return;
    }
    let Some((f, model, _serial)) = first_server(test) else {
        return;
    };
    let bin = f.server.as_ref().unwrap();
    let mut daemon = Daemon::start(&[]);
    // The host agent reads a binary's symbols once, at its first process (a few hundred ms,
    // longer than the tiny model's load): an earlier server of the same build makes the
    // probes live from the traced server's exec, as on a node where the build has run before.
    let earlier = Server::start(bin, &model, &f.env);
    daemon.wait_line("traced", earlier.child.id());
    drop(earlier);
    let server = Server::start_with(bin, &model, &f.env, &SERVER_FLAGS, None);
    daemon.wait_line("traced", server.child.id());
    check_stack("daemon", &server, daemon.port, &[OVERVIEW, PROCESS], &[]);
}
