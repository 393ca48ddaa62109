//! `cargo xtask dashboards`: writes the Grafana dashboards in `dashboards/grafana/` from the
//! panel lists below, so that every panel gets the same datasource, variables, units and
//! layout. The JSON files are what users import; a test keeps them equal to this source, and
//! the integration tests run every panel's queries against a real Prometheus.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::util;

/// What a panel shows its queries as.
#[derive(Clone, Copy)]
enum Kind {
    Timeseries,
    Heatmap,
    BarGauge,
    Stat,
    Table,
}

struct Panel {
    title: &'static str,
    description: &'static str,
    kind: Kind,
    unit: &'static str,
    /// (PromQL, legend).
    targets: Vec<(String, String)>,
}

fn panel(
    kind: Kind,
    title: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: &[(&str, &str)],
) -> Panel {
    Panel {
        title,
        description,
        kind,
        unit,
        targets: targets
            .iter()
            .map(|(e, l)| (e.to_string(), l.to_string()))
            .collect(),
    }
}

fn ts(
    title: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: &[(&str, &str)],
) -> Panel {
    panel(Kind::Timeseries, title, unit, description, targets)
}

/// A templating variable over the values of a label: `label_values(METRIC{..}, LABEL)`.
struct Var {
    name: &'static str,
    label: &'static str,
    query: &'static str,
    /// Several values or All (`.*`); otherwise exactly one.
    multi: bool,
}

struct Dashboard {
    file: &'static str,
    uid: &'static str,
    title: &'static str,
    description: &'static str,
    vars: Vec<Var>,
    rows: Vec<(&'static str, Vec<Panel>)>,
}

const INSTANCE: Var = Var {
    name: "instance",
    label: "Node (instance)",
    query: "label_values(llamaprobe_probes_attached, instance)",
    multi: true,
};

/// Quantiles of a latency family from its recording rule (all three: 0.5, 0.9, 0.99).
fn quantiles(record: &str, sel: &str) -> String {
    format!("{record}{{{sel}}}")
}

/// The three quantiles of a histogram over `$__rate_interval`, for one process.
fn raw_quantiles(metric: &str, sel: &str, by: &str) -> Vec<String> {
    ["0.5", "0.9", "0.99"]
        .iter()
        .map(|q| {
            format!(
                "histogram_quantile({q}, sum by ({by}le) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))"
            )
        })
        .collect()
}

fn overview() -> Dashboard {
    let s = r#"instance=~"$instance", model=~"$model""#;
    let q = |record: &str| quantiles(record, s);
    let ttft = q("instance_model:llamacpp_time_to_first_token_seconds:quantile5m");
    let tpot = q("instance_model:llamacpp_time_per_output_token_seconds:quantile5m");
    let queue = q("instance_model:llamacpp_request_queue_seconds:quantile5m");
    let duration = q("instance_model:llamacpp_request_duration_seconds:quantile5m");
    let steps = format!(
        r#"instance_model_phase:llamacpp_decode_duration_seconds:quantile5m{{{s}, quantile=~"0.5|0.99"}}"#
    );
    let requests = format!("sum by (model) (instance_model:llamacpp_requests:rate5m{{{s}}})");
    let tokens =
        format!("sum by (model, kind) (instance_model_kind:llamacpp_tokens:rate5m{{{s}}})");
    let active = format!("sum by (instance, model) (llamacpp_requests_active{{{s}}})");
    let waiting = format!("sum by (instance, model) (llamacpp_requests_waiting{{{s}}})");
    let batch =
        format!("sum by (le) (increase(llamacpp_batch_tokens_bucket{{{s}}}[$__rate_interval]))");
    let results =
        format!("sum by (result) (instance_model_result:llamacpp_decode_calls:rate5m{{{s}}})");
    let context =
        format!("max by (instance, pid, seq) (llamacpp_context_utilization_ratio{{{s}}})");
    let load = format!(
        "max by (instance, pid, model) (llamacpp_model_load_duration_seconds_sum{{{s}}} / llamacpp_model_load_duration_seconds_count{{{s}}})"
    );
    Dashboard {
        file: "llamacpp-overview.json",
        uid: "llamaprobe-overview",
        title: "llama.cpp overview (llamaprobe)",
        description: "Every llama.cpp process llamaprobe traces on the selected nodes: traffic, latency, decode steps, context use. From eBPF probes on the unmodified binaries.",
        vars: vec![
            INSTANCE,
            Var {
                name: "model",
                label: "Model",
                query: r#"label_values(llamacpp_decode_calls_total{instance=~"$instance"}, model)"#,
                multi: true,
            },
        ],
        rows: vec![
            (
                "Traffic",
                vec![
                    ts("Requests per second", "reqps", "Requests completed per second (each counted when its last token is sampled), by model. Recording rule instance_model:llamacpp_requests:rate5m.", &[(&requests, "{{model}}")]),
                    ts("Tokens per second", "short", "Prompt tokens decoded and tokens generated (sampled) per second, by model. Recording rule instance_model_kind:llamacpp_tokens:rate5m.", &[(&tokens, "{{kind}} {{model}}")]),
                    ts("Requests active and waiting", "short", "Requests in progress and tasks llama-server accepted that no slot has taken yet.", &[(&active, "active {{instance}} {{model}}"), (&waiting, "waiting {{instance}} {{model}}")]),
                ],
            ),
            (
                "Latency",
                vec![
                    ts("Time to first token", "s", "Arrival (llama-server's task queue, or the first prompt chunk elsewhere) to the sampling of the first token: p50, p90, p99 over 5 minutes.", &[(&ttft, "p{{quantile}} {{instance}} {{model}}")]),
                    ts("Time per output token", "s", "Mean time between a request's generated tokens after the first: p50, p90, p99 over 5 minutes.", &[(&tpot, "p{{quantile}} {{instance}} {{model}}")]),
                    ts("Queue wait", "s", "llama-server: a task accepted by its queue to the start of its first prompt chunk (no free slot means waiting here): p50, p90, p99.", &[(&queue, "p{{quantile}} {{instance}} {{model}}")]),
                    ts("Request duration", "s", "Arrival to the sampling of the last token: p50, p90, p99 over 5 minutes.", &[(&duration, "p{{quantile}} {{instance}} {{model}}")]),
                    ts("Decode step latency by phase", "s", "Duration of one decode step (llama_decode), p50 and p99, by phase: prompt (prefill), generation, or mixed batches.", &[(&steps, "{{phase}} p{{quantile}} {{model}}")]),
                ],
            ),
            (
                "Decode steps and context",
                vec![
                    panel(Kind::Heatmap, "Batch size", "short", "Tokens per decode step: prompt chunks at the top, one token per generating sequence at the bottom.", &[(&batch, "{{le}}")]),
                    ts("Decode results", "short", "Decode steps per second by result: ok, no_kv_slot (the KV cache had no room), aborted, invalid_batch, error.", &[(&results, "{{result}}")]),
                    ts("Context utilization per sequence", "percentunit", "Tokens a sequence holds in the KV cache over its share of the context (n_ctx / n_seq_max). Near 100%, llama.cpp shifts or refuses.", &[(&context, "{{instance}} pid {{pid}} seq {{seq}}")]),
                ],
            ),
            (
                "Processes and llamaprobe",
                vec![
                    panel(Kind::BarGauge, "Model load time", "s", "How long each process took to load its model (seen only when llamaprobe traced the process from before the load: `run`, or the host agent).", &[(&load, "{{instance}} pid {{pid}} {{model}}")]),
                    ts("Processes traced", "short", "llama.cpp processes llamaprobe traces now, per node.", &[(r#"sum by (instance) (llamaprobe_processes_traced{instance=~"$instance"})"#, "{{instance}}")]),
                    ts("Events lost", "short", "Events per second the probes dropped rather than slow the traced process, by reason (ringbuf_full, entry_map_full, undecodable). Should be 0.", &[(r#"sum by (instance, reason) (instance_reason:llamaprobe_events_lost:rate5m{instance=~"$instance"})"#, "{{instance}} {{reason}}")]),
                ],
            ),
        ],
    }
}

fn process() -> Dashboard {
    let p = r#"instance=~"$instance", pid="$pid""#;
    let lat = |metric: &str| raw_quantiles(metric, p, "");
    let [ttft, tpot, queue, duration] = [
        "llamacpp_time_to_first_token_seconds",
        "llamacpp_time_per_output_token_seconds",
        "llamacpp_request_queue_seconds",
        "llamacpp_request_duration_seconds",
    ]
    .map(lat);
    let steps = raw_quantiles("llamacpp_decode_duration_seconds", p, "phase, ");
    let sample = raw_quantiles("llamacpp_sample_duration_seconds", p, "");
    let three = |v: &[String]| -> Vec<(String, String)> {
        v.iter()
            .cloned()
            .zip(["p50", "p90", "p99"].map(String::from))
            .collect()
    };
    let with = |mut pn: Panel, t: Vec<(String, String)>| {
        pn.targets = t;
        pn
    };
    let e = |x: &str| x.replace("$P", p);
    Dashboard {
        file: "llamacpp-process.json",
        uid: "llamaprobe-process",
        title: "llama.cpp process (llamaprobe)",
        description: "One llama.cpp process (by pod and pid): its requests, latency, decode steps, context, resources and model.",
        vars: vec![
            INSTANCE,
            Var {
                name: "pod",
                label: "Pod",
                query: r#"label_values(llamacpp_requests_active{instance=~"$instance"}, k8s_pod)"#,
                multi: true,
            },
            Var {
                name: "pid",
                label: "Process (pid)",
                query: r#"label_values(llamacpp_requests_active{instance=~"$instance", k8s_pod=~"$pod"}, pid)"#,
                multi: false,
            },
        ],
        rows: vec![
            (
                "Requests",
                vec![
                    ts("Requests per second", "reqps", "Requests of this process completed per second.", &[(&e("sum(rate(llamacpp_request_duration_seconds_count{$P}[$__rate_interval]))"), "requests")]),
                    ts("Tokens per second", "short", "Prompt tokens decoded and tokens generated per second.", &[(&e("sum by (kind) (rate(llamacpp_tokens_total{$P}[$__rate_interval]))"), "{{kind}}")]),
                    ts("Requests active and waiting", "short", "Requests in progress; tasks accepted that no slot has taken yet.", &[(&e("llamacpp_requests_active{$P}"), "active"), (&e("llamacpp_requests_waiting{$P}"), "waiting")]),
                ],
            ),
            (
                "Latency",
                vec![
                    with(ts("Time to first token", "s", "Arrival to the first sampled token: p50, p90, p99.", &[]), three(&ttft)),
                    with(ts("Time per output token", "s", "Mean time between generated tokens after the first: p50, p90, p99.", &[]), three(&tpot)),
                    with(ts("Queue wait", "s", "Accepted by llama-server's task queue to the start of the first prompt chunk: p50, p90, p99.", &[]), three(&queue)),
                    with(ts("Request duration", "s", "Arrival to the last sampled token: p50, p90, p99.", &[]), three(&duration)),
                    with(ts("Decode step latency by phase", "s", "One decode step, by phase (prompt, generation, mixed): p50, p90, p99.", &[]), steps.iter().cloned().zip(["{{phase}} p50", "{{phase}} p90", "{{phase}} p99"].map(String::from)).collect()),
                    with(ts("Sampling latency", "s", "Sampling one token (llama_sampler_sample / common_sampler_sample): p50, p90, p99.", &[]), three(&sample)),
                ],
            ),
            (
                "Decode steps and context",
                vec![
                    panel(Kind::Heatmap, "Batch size", "short", "Tokens per decode step.", &[(&e("sum by (le) (increase(llamacpp_batch_tokens_bucket{$P}[$__rate_interval]))"), "{{le}}")]),
                    ts("Decode results", "short", "Decode steps per second by result.", &[(&e("sum by (result) (rate(llamacpp_decode_calls_total{$P}[$__rate_interval]))"), "{{result}}")]),
                    ts("Context utilization per sequence", "percentunit", "Tokens each sequence holds over its share of the context.", &[(&e("llamacpp_context_utilization_ratio{$P}"), "seq {{seq}}")]),
                    ts("Context used per sequence", "short", "Tokens each sequence holds in the KV cache.", &[(&e("llamacpp_context_used_tokens{$P}"), "seq {{seq}}")]),
                ],
            ),
            (
                "Process and model",
                vec![
                    ts("Resident memory", "bytes", "Resident memory of the process (includes the touched pages of an mmapped model).", &[(&e("llamacpp_process_resident_memory_bytes{$P}"), "RSS")]),
                    ts("CPU", "percentunit", "CPU time per second, user + system (1 = one core busy).", &[(&e("rate(llamacpp_process_cpu_seconds_total{$P}[$__rate_interval])"), "CPU")]),
                    ts("Threads", "short", "Threads of the process.", &[(&e("llamacpp_process_threads{$P}"), "threads")]),
                    panel(Kind::Stat, "Context parameters", "short", "The parameters of the process's latest context (llama_init_from_model / llama_new_context_with_model).", &[
                        (&e("llamacpp_context_size_tokens{$P}"), "n_ctx"),
                        (&e("llamacpp_batch_size_tokens{$P}"), "n_batch"),
                        (&e("llamacpp_ubatch_size_tokens{$P}"), "n_ubatch"),
                        (&e("llamacpp_sequences_max{$P}"), "n_seq_max"),
                        (&e("llamacpp_threads{$P}"), "n_threads"),
                    ]),
                    panel(Kind::Table, "Model", "none", "The model the process loaded, from its GGUF header: architecture, file type, parameters, trained context length, path; and its size.", &[(&e("llamacpp_model_info{$P}"), "info"), (&e("llamacpp_model_size_bytes{$P}"), "size")]),
                    panel(Kind::BarGauge, "Model load time", "s", "How long the model took to load (seen when llamaprobe traced the process from before the load).", &[(&e("llamacpp_model_load_duration_seconds_sum{$P} / llamacpp_model_load_duration_seconds_count{$P}"), "{{result}}")]),
                ],
            ),
        ],
    }
}

/// NVML's clock throttle reasons that mean lost speed, as (bit value, name); PromQL has no bit
/// operators, so each is tested as `floor(x / bit) % 2`.
const THROTTLE_REASONS: [(u32, &str); 6] = [
    (0x1, "idle"),
    (0x4, "SW power cap"),
    (0x8, "HW slowdown"),
    (0x20, "SW thermal"),
    (0x40, "HW thermal"),
    (0x80, "HW power brake"),
];

fn gpu() -> Dashboard {
    let g = r#"instance=~"$instance", gpu=~"$gpu""#;
    let e = |x: &str| x.replace("$G", g);
    let throttle = THROTTLE_REASONS
        .iter()
        .map(|(bit, name)| {
            (
                format!("floor(llamacpp_gpu_throttle_reasons{{{g}}} / {bit}) % 2"),
                format!("{name} GPU {{{{gpu}}}}"),
            )
        })
        .collect();
    let mut throttled = ts("Throttle reasons", "short", "1 while NVML reports the reason for clocks below their maximum: idle (harmless), power cap, HW slowdown, thermal, power brake.", &[]);
    throttled.targets = throttle;
    Dashboard {
        file: "llamacpp-gpu.json",
        uid: "llamaprobe-gpu",
        title: "llama.cpp GPUs (llamaprobe)",
        description: "The node's NVIDIA GPUs as NVML reports them, the GPU memory of each traced llama.cpp process, and the node's tokens per second beside them.",
        vars: vec![
            INSTANCE,
            Var {
                name: "gpu",
                label: "GPU",
                query: r#"label_values(llamacpp_gpu_utilization_ratio{instance=~"$instance"}, gpu)"#,
                multi: true,
            },
        ],
        rows: vec![
            (
                "GPUs",
                vec![
                    ts("Utilization", "percentunit", "Share of the last sample period during which a kernel ran on the GPU.", &[(&e("llamacpp_gpu_utilization_ratio{$G}"), "GPU {{gpu}} {{name}}")]),
                    ts("Memory", "bytes", "GPU memory allocated (all processes) and installed.", &[(&e("llamacpp_gpu_memory_used_bytes{$G}"), "used GPU {{gpu}}"), (&e("llamacpp_gpu_memory_total_bytes{$G}"), "total GPU {{gpu}}")]),
                    ts("Temperature", "celsius", "GPU core temperature.", &[(&e("llamacpp_gpu_temperature_celsius{$G}"), "GPU {{gpu}}")]),
                    ts("Power", "watt", "GPU power draw.", &[(&e("llamacpp_gpu_power_watts{$G}"), "GPU {{gpu}}")]),
                    ts("SM clock", "hertz", "Streaming-multiprocessor clock.", &[(&e("llamacpp_gpu_sm_clock_hertz{$G}"), "GPU {{gpu}}")]),
                    throttled,
                ],
            ),
            (
                "Processes and tokens",
                vec![
                    ts("GPU memory per traced process", "bytes", "GPU memory each traced llama.cpp process uses, per GPU.", &[(&e("llamacpp_gpu_process_memory_bytes{$G}"), "pid {{pid}} GPU {{gpu}}")]),
                    ts("Node tokens per second", "short", "Prompt tokens decoded and tokens generated per second on the node, beside its GPUs.", &[(r#"sum by (instance, kind) (instance_model_kind:llamacpp_tokens:rate5m{instance=~"$instance"})"#, "{{instance}} {{kind}}")]),
                ],
            ),
        ],
    }
}

const DATASOURCE: &str = "${datasource}";

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": DATASOURCE})
}

impl Panel {
    fn json(&self, id: u64, x: u64, y: u64, w: u64, h: u64) -> Value {
        let (kind, instant, format) = match self.kind {
            Kind::Timeseries => ("timeseries", false, "time_series"),
            Kind::Heatmap => ("heatmap", false, "heatmap"),
            Kind::BarGauge => ("bargauge", true, "time_series"),
            Kind::Stat => ("stat", true, "time_series"),
            Kind::Table => ("table", true, "table"),
        };
        let targets: Vec<Value> = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, (expr, legend))| {
                json!({
                    "datasource": datasource(),
                    "refId": char::from(b'A' + i as u8).to_string(),
                    "expr": expr,
                    "legendFormat": legend,
                    "instant": instant,
                    "range": !instant,
                    "format": format,
                })
            })
            .collect();
        let mut p = json!({
            "id": id,
            "type": kind,
            "title": self.title,
            "description": self.description,
            "datasource": datasource(),
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": self.unit}, "overrides": []},
            "options": {},
            "targets": targets,
        });
        match self.kind {
            Kind::Heatmap => {
                p["options"] = json!({
                    "calculate": false,
                    "yAxis": {"unit": self.unit},
                    "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges"},
                });
            }
            Kind::Timeseries => {
                p["options"] = json!({
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": true},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                });
            }
            Kind::Table => {
                p["transformations"] = json!([
                    {"id": "merge", "options": {}},
                    {"id": "organize", "options": {"excludeByName": {"Time": true, "__name__": true, "job": true}}},
                ]);
            }
            Kind::BarGauge | Kind::Stat => {
                p["options"] = json!({"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": false}});
            }
        }
        p
    }
}

impl Var {
    fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "label": self.label,
            "type": "query",
            "datasource": datasource(),
            "definition": self.query,
            "query": {"query": self.query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "sort": 1,
            "multi": self.multi,
            "includeAll": self.multi,
            "current": {},
            "hide": 0,
        });
        if self.multi {
            v["allValue"] = json!(".*");
            v["current"] = json!({"selected": true, "text": ["All"], "value": ["$__all"]});
        }
        v
    }
}

impl Dashboard {
    fn json(&self) -> Value {
        let mut panels = Vec::new();
        let mut id = 1;
        let mut y = 0;
        for (row, list) in &self.rows {
            panels.push(json!({
                "id": id, "type": "row", "title": row, "collapsed": false,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": [],
            }));
            id += 1;
            y += 1;
            // Three panels a line (two when the row has two or four).
            let per_line = if list.len() % 3 == 0 || list.len() > 4 {
                3
            } else {
                2
            };
            let w = 24 / per_line as u64;
            for (i, p) in list.iter().enumerate() {
                let x = (i % per_line) as u64 * w;
                let line_y = y + (i / per_line) as u64 * 8;
                panels.push(p.json(id, x, line_y, w, 8));
                id += 1;
            }
            y += list.len().div_ceil(per_line) as u64 * 8;
        }
        let mut vars = vec![json!({
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": false, "text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
            "hide": 0,
        })];
        vars.extend(self.vars.iter().map(Var::json));
        json!({
            "__inputs": [{
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes llamaprobe and loads dashboards/prometheus/llamaprobe.rules.yml",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }],
            "__requires": [
                {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            ],
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["llamaprobe", "llama.cpp"],
            "editable": true,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "",
            "links": [{"title": "llamaprobe dashboards", "type": "dashboards", "tags": ["llamaprobe"], "asDropdown": true}],
            "templating": {"list": vars},
            "annotations": {"list": []},
            "panels": panels,
        })
    }
}

fn all() -> Vec<Dashboard> {
    vec![overview(), process(), gpu()]
}

fn dir() -> PathBuf {
    util::workspace_root().join("dashboards/grafana")
}

fn render(d: &Dashboard) -> String {
    let mut s = serde_json::to_string_pretty(&d.json()).expect("JSON values serialize");
    s.push('\n');
    s
}

/// Writes every dashboard; with `check`, fails instead when a file differs.
pub fn run(check: bool) -> Result<()> {
    let dir = dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for d in all() {
        let path = dir.join(d.file);
        let text = render(&d);
        if check {
            let on_disk = fs::read_to_string(&path).unwrap_or_default();
            anyhow::ensure!(
                on_disk == text,
                "{} is out of date: run `cargo xtask dashboards`",
                path.display()
            );
        } else {
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_dashboards_are_current() {
        run(true).unwrap();
    }

    #[test]
    fn every_panel_has_a_description_a_unit_and_queries() {
        for d in all() {
            for (row, panels) in &d.rows {
                for p in panels {
                    let at = format!("{} / {row} / {}", d.title, p.title);
                    assert!(!p.description.is_empty(), "{at}: no description");
                    assert!(!p.unit.is_empty(), "{at}: no unit");
                    assert!(!p.targets.is_empty(), "{at}: no query");
                }
            }
        }
    }
}
