//! Prometheus sink: metrics in the `llamacpp_` namespace (what the traced llama.cpp does) and
//! `llamaprobe_` (the agent itself), served at `http://ADDR/metrics`.
//!
//! Every `llamacpp_` series carries `pid` and `model` (the model file's stem once a load was
//! seen, else empty), and the process's identity labels where known (`exe`, `container_id`,
//! `k8s_namespace`, `k8s_pod`, `k8s_container`): those are joined at exposition from the
//! table of traced processes ([`Exposition`]), so an event never pays for them. A process that
//! is gone keeps its series for `--series-grace` seconds (a last scrape sees its final
//! counts), then they are removed.
//!
//! With `--web-config FILE` ([`web_config`]) the endpoint is served over TLS and/or behind
//! basic auth, as the Prometheus exporter toolkit's file says.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{
    core::{Collector, MetricVec, MetricVecBuilder},
    proto::{LabelPair, MetricFamily},
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

pub mod resources;
pub mod web_config;

use super::{names::*, Sink, Snapshot};
use crate::model::{ContextRole, CpuPhase, DecodeResult, Observation, Phase};

/// The Prometheus sink's options.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "prometheus_options")]
#[command(next_help_heading = "Prometheus")]
pub struct Options {
    /// Prometheus endpoint address (`off` to disable).
    /// (`attach`/`run`: 127.0.0.1:9464; `daemon`: 0.0.0.0:9464, a scrape target.)
    #[arg(long, value_parser = parse_metrics_addr, value_name = "ADDR", env = "LLAMAPROBE_METRICS_ADDR")]
    pub metrics_addr: Option<MetricsAddr>,
    /// Seconds a gone process's series stay on /metrics before they are removed.
    #[arg(
        long,
        default_value_t = 60.0,
        value_name = "SECS",
        env = "LLAMAPROBE_SERIES_GRACE"
    )]
    pub series_grace: f64,
    /// TLS and basic auth for the endpoint: a web configuration file in the Prometheus
    /// exporter toolkit's format (`tls_server_config`, `basic_auth_users` with bcrypt hashes,
    /// `http_server_config.headers`; `llamaprobe.unauthenticated_paths` may open /healthz and
    /// /readyz). Read when the command line is, and again when it or its files change.
    #[arg(
        long,
        value_name = "FILE",
        value_parser = web_config::parse_arg,
        env = "LLAMAPROBE_WEB_CONFIG"
    )]
    pub web_config: Option<Arc<web_config::WebConfigFile>>,
}

impl Options {
    /// The address to serve on, `default` where none was given.
    pub fn addr_or(&self, default: SocketAddr) -> MetricsAddr {
        self.metrics_addr.unwrap_or(MetricsAddr::On(default))
    }

    /// The address of the ad-hoc modes.
    pub fn addr(&self) -> MetricsAddr {
        self.addr_or(SocketAddr::from(([127, 0, 0, 1], 9464)))
    }

    /// The endpoint's URL for `path` at `addr` (`https` with TLS).
    pub fn url(&self, addr: SocketAddr, path: &str) -> String {
        let scheme = self
            .web_config
            .as_ref()
            .map_or("http", |w| w.current().scheme());
        format!("{scheme}://{addr}{path}")
    }
}

/// Where to serve Prometheus metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::On)
        .map_err(|e| format!("`{s}` is not HOST:PORT or `off` ({e})"))
}

/// Reads one parameter of a context.
type ParamField = fn(&crate::model::ContextParams) -> Option<u32>;

/// The series every event of one process touches, resolved once: a label lookup hashes the
/// labels and `pid` must be formatted, while an event should only add to a number. Filled on
/// first use, so a series exists only once it has a value.
#[derive(Default)]
struct Hot {
    model: Arc<str>,
    /// By [`phase_slot`].
    decode_duration: [Option<Histogram>; 4],
    batch_tokens: [Option<Histogram>; 4],
    decode_ok: Option<IntCounter>,
    prompt_tokens: Option<IntCounter>,
    generated_tokens: Option<IntCounter>,
    sample_duration: Option<Histogram>,
    draft_tokens: Option<IntCounter>,
    drafts: Option<IntCounter>,
    accepted_tokens: Option<IntCounter>,
    sync_duration: Option<Histogram>,
    compute_duration: Option<Histogram>,
    /// Context use and utilization, by sequence.
    /// (utilization is created once the sequence's capacity is known).
    context: HashMap<i32, (Gauge, Option<Gauge>)>,
}

/// Index of a decode step's phase label in [`Hot`]'s arrays (3: unknown).
fn phase_slot(p: Option<Phase>) -> (usize, &'static str) {
    match p {
        Some(p) => (p as usize, p.label()),
        None => (3, "unknown"),
    }
}

/// The handles of process `pid`, (re)built when its model label changes.
fn hot_for<'a>(
    hot: &'a mut HashMap<(u32, ContextRole), Hot>,
    pid: u32,
    context: ContextRole,
    model: &Arc<str>,
) -> &'a mut Hot {
    let h = hot.entry((pid, context)).or_default();
    if !Arc::ptr_eq(&h.model, model) {
        if *h.model != **model {
            *h = Hot::default();
        }
        h.model = model.clone();
    }
    h
}

/// The metric families.
pub struct Metrics {
    pub registry: Registry,
    decode_duration: HistogramVec,
    batch_tokens: HistogramVec,
    decode_calls: IntCounterVec,
    tokens: IntCounterVec,
    sample_duration: HistogramVec,
    sync_duration: HistogramVec,
    compute_duration: HistogramVec,
    model_load: HistogramVec,
    context_size: GaugeVec,
    context_params: [(GaugeVec, ParamField); 4],
    context_used: GaugeVec,
    context_utilization: GaugeVec,
    /// Tokens per sequence of each process's latest context (n_ctx / n_seq_max).
    seq_capacity: std::collections::HashMap<(u32, ContextRole), u32>,
    ttft: HistogramVec,
    tpot: HistogramVec,
    request_duration: HistogramVec,
    request_prompt_tokens: HistogramVec,
    request_generated_tokens: HistogramVec,
    request_queue: HistogramVec,
    unserved: IntCounterVec,
    context_shifts: IntCounterVec,
    cpu_samples: IntCounterVec,
    cpu_function_samples: IntCounterVec,
    /// `--profile-cpu`: samples by (pid, model, phase, leaf function), of which the top
    /// `cpu_top` of each (pid, phase) are exposed; the series exposed now.
    cpu_leaves: HashMap<(u32, Arc<str>, CpuPhase, Arc<str>), u64>,
    cpu_exposed: std::collections::HashSet<(u32, Arc<str>, CpuPhase, Arc<str>)>,
    cpu_top: usize,
    speculative_draft: IntCounterVec,
    speculative_accepted: IntCounterVec,
    speculative_drafts: IntCounterVec,
    requests_active: GaugeVec,
    requests_waiting: GaugeVec,
    probes_attached: IntGauge,
    processes_traced: IntGauge,
    processes_ended: IntCounterVec,
    calls_interrupted: IntCounterVec,
    /// Per-process handles of the per-event series.
    hot: HashMap<(u32, ContextRole), Hot>,
    /// GPUs, processes and models.
    resources: resources::ResourceSeries,
    events_lost: IntCounterVec,
    /// Every family with a `pid` label, for removing a gone process's series.
    by_pid: Vec<Box<dyn PidSeries>>,
    /// Identity labels by pid, joined at exposition.
    identities: Identities,
    /// Gone processes, since when.
    released: HashMap<u32, Instant>,
    series_grace: Duration,
}

/// The identity labels of each traced process, by pid (as its `pid` label reads).
pub type Identities = Arc<RwLock<HashMap<String, Vec<(&'static str, String)>>>>;

/// A metric family whose series carry `pid`.
trait PidSeries: Send {
    /// Removes every series of `pid`.
    fn remove_pid(&self, pid: &str);
}

impl<T: MetricVecBuilder> PidSeries for MetricVec<T> {
    fn remove_pid(&self, pid: &str) {
        for family in self.collect() {
            for m in family.get_metric() {
                let labels: HashMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if labels.get("pid") == Some(&pid) {
                    let _ = self.remove(&labels);
                }
            }
        }
    }
}

/// A family to register whose series carry `pid`.
fn per_pid<T: MetricVecBuilder + 'static>(
    v: &MetricVec<T>,
) -> (Box<dyn Collector>, Option<Box<dyn PidSeries>>) {
    (Box::new(v.clone()), Some(Box::new(v.clone())))
}

/// A family to register whose series are the agent's (no `pid`).
fn host_wide(c: impl Collector + 'static) -> (Box<dyn Collector>, Option<Box<dyn PidSeries>>) {
    (Box::new(c), None)
}

fn hist(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

fn gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["pid", "model"]).expect("valid gauge")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let mut m = Self {
            registry: registry.clone(),
            decode_duration: hist(
                "llamacpp_decode_duration_seconds",
                "Duration of llama.cpp decode steps (llama_decode / llama_context::decode), by phase.",
                LATENCY_BUCKETS,
                &["pid", "model", "context", "phase"],
            ),
            batch_tokens: hist(
                "llamacpp_batch_tokens",
                "Tokens per decode step, by phase.",
                BATCH_BUCKETS,
                &["pid", "model", "context", "phase"],
            ),
            decode_calls: counter(
                "llamacpp_decode_calls_total",
                "Decode steps by result (ok, no_kv_slot, aborted, invalid_batch, error).",
                &["pid", "model", "context", "result"],
            ),
            tokens: counter(
                "llamacpp_tokens_total",
                "Tokens: prompt tokens processed by successful decode steps; generated tokens sampled.",
                &["pid", "model", "context", "kind"],
            ),
            sample_duration: hist(
                "llamacpp_sample_duration_seconds",
                "Duration of sampling one token (llama_sampler_sample / common_sampler_sample).",
                LATENCY_BUCKETS,
                &["pid", "model", "context"],
            ),
            sync_duration: hist(
                "llamacpp_synchronize_duration_seconds",
                "Duration of llama_synchronize (waiting for the backend to finish queued work).",
                LATENCY_BUCKETS,
                &["pid", "model"],
            ),
            compute_duration: hist(
                "llamacpp_decode_compute_seconds",
                "Decode step start to the end of the llama_synchronize after it: the step's compute time on GPU backends.",
                LATENCY_BUCKETS,
                &["pid", "model"],
            ),
            model_load: hist(
                "llamacpp_model_load_duration_seconds",
                "Model load duration, by result (ok, error).",
                LOAD_BUCKETS,
                &["pid", "model", "result"],
            ),
            context_size: GaugeVec::new(
                Opts::new(
                    "llamacpp_context_size_tokens",
                    "n_ctx of the most recently created context (as requested; 0 = from the model is reported absent).",
                ),
                &["pid", "model"],
            )
            .expect("valid gauge"),
            context_params: [
                (
                    gauge("llamacpp_batch_size_tokens", "n_batch of the most recently created context."),
                    |p| p.n_batch,
                ),
                (
                    gauge("llamacpp_ubatch_size_tokens", "n_ubatch of the most recently created context."),
                    |p| p.n_ubatch,
                ),
                (
                    gauge("llamacpp_sequences_max", "n_seq_max of the most recently created context."),
                    |p| p.n_seq_max,
                ),
                (
                    gauge("llamacpp_threads", "n_threads of the most recently created context."),
                    |p| p.n_threads,
                ),
            ],
            context_used: GaugeVec::new(
                Opts::new(
                    "llamacpp_context_used_tokens",
                    "Tokens a sequence holds in the KV memory (from decoded tokens and seq_rm/seq_cp/clear).",
                ),
                &["pid", "model", "context", "seq"],
            )
            .expect("valid gauge"),
            context_utilization: GaugeVec::new(
                Opts::new(
                    "llamacpp_context_utilization_ratio",
                    "Tokens a sequence holds over its share of the context (n_ctx / n_seq_max; 2024 llama-server: n_ctx / (n_seq_max - 1), its sequence 0 held the system prompt).",
                ),
                &["pid", "model", "context", "seq"],
            )
            .expect("valid gauge"),
            seq_capacity: Default::default(),
            ttft: hist(
                "llamacpp_time_to_first_token_seconds",
                "Request arrival (accepted by llama-server's task queue where probed, else its first prompt chunk) to the sampling of its first token.",
                TTFT_BUCKETS,
                &["pid", "model", "type"],
            ),
            tpot: hist(
                "llamacpp_time_per_output_token_seconds",
                "Mean time between a request's generated tokens after the first.",
                TPOT_BUCKETS,
                &["pid", "model", "type"],
            ),
            request_duration: hist(
                "llamacpp_request_duration_seconds",
                "Request arrival (as for time to first token) to the sampling of its last token.",
                REQUEST_BUCKETS,
                &["pid", "model", "type"],
            ),
            request_prompt_tokens: hist(
                "llamacpp_request_prompt_tokens",
                "Prompt size of a request (reused from the cache plus decoded).",
                TOKEN_BUCKETS,
                &["pid", "model", "type"],
            ),
            request_generated_tokens: hist(
                "llamacpp_request_generated_tokens",
                "Tokens generated (sampled) for a request.",
                TOKEN_BUCKETS,
                &["pid", "model", "type"],
            ),
            request_queue: hist(
                "llamacpp_request_queue_seconds",
                "Queue wait of a llama-server request: accepted (server_queue::post) to the start of its first prompt chunk.",
                LATENCY_BUCKETS,
                &["pid", "model", "type"],
            ),
            hot: HashMap::new(),
            resources: resources::ResourceSeries::new(&registry),
            unserved: counter(
                "llamacpp_requests_unserved_total",
                "Work llama-server accepted that never became a request, by reason: cancelled (before a slot took it), rejected (refused by the slot), unclaimed (matched by timing, where slot launches are not probed, or evicted from a full table).",
                &["reason"],
            ),
            speculative_draft: counter(
                "llamacpp_speculative_draft_tokens_total",
                "Draft tokens verified by the main context (speculative decoding: a draft model's or an n-gram's proposals).",
                &["pid", "model"],
            ),
            speculative_drafts: counter(
                "llamacpp_speculative_drafts_total",
                "Drafts the main context verified (one per sequence and verification step).",
                &["pid", "model"],
            ),
            speculative_accepted: counter(
                "llamacpp_speculative_accepted_tokens_total",
                "Draft tokens the main context's sampler accepted (acceptance rate = accepted / draft).",
                &["pid", "model"],
            ),
            cpu_samples: counter(
                "llamacpp_cpu_samples_total",
                "CPU samples of the traced process's threads (--profile-cpu), by what llama.cpp was doing: prompt, generation, mixed or decode (an unclassified step), sampling, model_load, other. Samples / Hz = CPU seconds.",
                &["pid", "model", "phase"],
            ),
            cpu_function_samples: counter(
                "llamacpp_cpu_function_samples_total",
                "CPU samples by phase and leaf function, for the --profile-top functions with the most samples in each phase (a function that leaves the top loses its series).",
                &["pid", "model", "phase", "function"],
            ),
            cpu_leaves: HashMap::new(),
            cpu_exposed: Default::default(),
            cpu_top: 10,
            context_shifts: counter(
                "llamacpp_context_shifts_total",
                "Context shifts: a generating sequence outgrew its share of the context and llama.cpp discarded some of its tokens (seq_add with a negative shift).",
                &["pid", "model"],
            ),
            requests_active: gauge(
                "llamacpp_requests_active",
                "Requests in progress (reconstructed from the decode batches; in llama-server each ends when its slot is released).",
            ),
            requests_waiting: gauge(
                "llamacpp_requests_waiting",
                "Tasks llama-server accepted that no slot has taken yet (its queue, by task id; 0 where slot launches are not probed).",
            ),
            probes_attached: IntGauge::new(
                "llamaprobe_probes_attached",
                "Uprobes and uretprobes currently attached.",
            )
            .expect("valid gauge"),
            processes_traced: IntGauge::new(
                "llamaprobe_processes_traced",
                "llama.cpp processes traced now (running, probes attached).",
            )
            .expect("valid gauge"),
            processes_ended: counter(
                "llamaprobe_processes_ended_total",
                "Traced processes that ended, by how (exited, killed, unknown where the exit status was not seen) and cause (the exit status, or the signal's name).",
                &["how", "cause"],
            ),
            calls_interrupted: counter(
                "llamaprobe_calls_interrupted_total",
                "Probed calls a traced thread was inside when it ended (killed or crashed in a decode step, …), by call; their per-thread state was released.",
                &["call"],
            ),
            events_lost: counter(
                "llamaprobe_events_lost_total",
                "Events dropped rather than slowing the traced process, by reason (ringbuf_full, entry_map_full, undecodable).",
                &["reason"],
            ),
            by_pid: Vec::new(),
            identities: Identities::default(),
            released: HashMap::new(),
            series_grace: Duration::from_secs(60),
        };
        // Every family once: registered, and, where its series carry `pid`, removed with a
        // gone process.
        let mut families = vec![
            per_pid(&m.decode_duration),
            per_pid(&m.batch_tokens),
            per_pid(&m.sample_duration),
            per_pid(&m.sync_duration),
            per_pid(&m.compute_duration),
            per_pid(&m.model_load),
            per_pid(&m.ttft),
            per_pid(&m.tpot),
            per_pid(&m.request_duration),
            per_pid(&m.request_prompt_tokens),
            per_pid(&m.request_generated_tokens),
            per_pid(&m.request_queue),
            per_pid(&m.decode_calls),
            per_pid(&m.tokens),
            per_pid(&m.context_shifts),
            per_pid(&m.cpu_samples),
            per_pid(&m.cpu_function_samples),
            per_pid(&m.speculative_draft),
            per_pid(&m.speculative_accepted),
            per_pid(&m.speculative_drafts),
            per_pid(&m.context_size),
            per_pid(&m.context_used),
            per_pid(&m.context_utilization),
            per_pid(&m.requests_active),
            per_pid(&m.requests_waiting),
            host_wide(m.unserved.clone()),
            host_wide(m.probes_attached.clone()),
            host_wide(m.processes_traced.clone()),
            host_wide(m.events_lost.clone()),
            host_wide(m.processes_ended.clone()),
            host_wide(m.calls_interrupted.clone()),
        ];
        families.extend(m.context_params.iter().map(|(g, _)| per_pid(g)));
        for (collector, pid_series) in families {
            m.registry.register(collector).expect("unique metric names");
            m.by_pid.extend(pid_series);
        }

        for reason in ["ringbuf_full", "entry_map_full", "undecodable"] {
            m.events_lost.with_label_values(&[reason]);
        }
        for reason in ["cancelled", "rejected", "unclaimed"] {
            m.unserved.with_label_values(&[reason]);
        }
        m
    }

    /// Functions per (process, phase) in `llamacpp_cpu_function_samples_total`.
    pub fn cpu_top(mut self, n: usize) -> Self {
        self.cpu_top = n;
        self
    }

    /// The top functions of each (process, phase) as series; those that left the top go.
    fn expose_cpu_functions(&mut self) {
        // (model, function, samples) of each (process, phase).
        type Leaves<'a> = Vec<(&'a Arc<str>, &'a Arc<str>, u64)>;
        let mut by_group: HashMap<(u32, CpuPhase), Leaves> = HashMap::new();
        for ((pid, model, phase, f), &n) in &self.cpu_leaves {
            by_group
                .entry((*pid, *phase))
                .or_default()
                .push((model, f, n));
        }
        let mut now = std::collections::HashSet::new();
        for ((pid, phase), mut v) in by_group {
            v.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(b.1)));
            for (model, f, n) in v.into_iter().take(self.cpu_top) {
                let pid_s = pid.to_string();
                let c = self.cpu_function_samples.with_label_values(&[
                    pid_s.as_str(),
                    model,
                    phase.label(),
                    f,
                ]);
                c.inc_by(n.saturating_sub(c.get()));
                now.insert((pid, model.clone(), phase, f.clone()));
            }
        }
        for (pid, model, phase, f) in self.cpu_exposed.difference(&now) {
            let pid_s = pid.to_string();
            let _ = self.cpu_function_samples.remove_label_values(&[
                pid_s.as_str(),
                model,
                phase.label(),
                f,
            ]);
        }
        self.cpu_exposed = now;
    }

    /// Gone processes' series stay this long.
    pub fn series_grace(mut self, secs: f64) -> Self {
        self.series_grace = Duration::from_secs_f64(secs.max(0.0));
        self
    }

    /// What [`serve`] exposes: this sink's registry with the identity labels.
    pub fn exposition(&self, health: Option<Arc<Health>>) -> Exposition {
        Exposition {
            registry: self.registry.clone(),
            identities: self.identities.clone(),
            health,
        }
    }

    /// Removes every series of `pid` and what the sink keeps for it.
    fn remove_process(&mut self, pid: u32) {
        let pid_s = pid.to_string();
        for f in &self.by_pid {
            f.remove_pid(&pid_s);
        }
        self.hot.retain(|k, _| k.0 != pid);
        self.cpu_leaves.retain(|k, _| k.0 != pid);
        self.cpu_exposed.retain(|k| k.0 != pid);
        self.seq_capacity.retain(|k, _| k.0 != pid);
        self.resources.forget(pid);
        self.identities
            .write()
            .expect("identities lock")
            .remove(&pid_s);
    }

    /// The text exposition of every metric.
    #[cfg(test)]
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counter handle set to an absolute value read from elsewhere.
fn set_counter(c: &prometheus::IntCounter, value: u64) {
    let cur = c.get();
    if value > cur {
        c.inc_by(value - cur);
    }
}

impl Sink for Metrics {
    fn observe(&mut self, obs: &Observation) {
        let used = obs.context_used();
        if let (false, Some(o)) = (used.is_empty(), obs.origin()) {
            let role = obs.context().unwrap_or_default();
            let capacity = self.seq_capacity.get(&(o.pid, role)).copied();
            let h = hot_for(&mut self.hot, o.pid, role, &o.model);
            let labels = |seq: i32| {
                [
                    o.pid.to_string(),
                    o.model.to_string(),
                    role.label().to_string(),
                    seq.to_string(),
                ]
            };
            for s in used {
                let (used_g, ratio_g) = h.context.entry(s.seq_id).or_insert_with(|| {
                    let [p, m, c, q] = labels(s.seq_id);
                    (self.context_used.with_label_values(&[&p, &m, &c, &q]), None)
                });
                used_g.set(s.used as f64);
                if let Some(cap) = capacity {
                    ratio_g
                        .get_or_insert_with(|| {
                            let [p, m, c, q] = labels(s.seq_id);
                            self.context_utilization
                                .with_label_values(&[&p, &m, &c, &q])
                        })
                        .set(s.used as f64 / cap as f64);
                }
            }
        }
        match obs {
            Observation::ModelInfo(f) => {
                if let Some(info) = &f.info {
                    self.resources.set_model(f.pid, &f.label, info);
                }
            }
            Observation::Traced(t) => {
                // A reused pid: the old process's series go now.
                if self.released.remove(&t.pid).is_some() {
                    self.remove_process(t.pid);
                }
                if !t.identity.labels.is_empty() {
                    self.identities
                        .write()
                        .expect("identities lock")
                        .insert(t.pid.to_string(), t.identity.labels.clone());
                }
            }
            Observation::Released { pid } => {
                self.released.insert(*pid, Instant::now());
            }
            Observation::CpuSample(c) => {
                let pid = c.pid.to_string();
                self.cpu_samples
                    .with_label_values(&[pid.as_str(), &c.model, c.phase.label()])
                    .inc();
                *self
                    .cpu_leaves
                    .entry((c.pid, c.model.clone(), c.phase, c.leaf_name()))
                    .or_default() += 1;
            }
            Observation::Ended(e) => {
                let (how, cause) = e
                    .status
                    .as_ref()
                    .map_or(("unknown", String::new()), |s| s.labels());
                self.processes_ended
                    .with_label_values(&[how, cause.as_str()])
                    .inc();
                for i in &e.interrupted {
                    self.calls_interrupted
                        .with_label_values(&[i.call])
                        .inc_by(u64::from(i.threads));
                }
            }
            Observation::Memory(_)
            | Observation::TaskPost(_)
            | Observation::SlotLaunch(_)
            | Observation::SlotRelease(_) => {}
            Observation::ContextShift(c) => {
                let pid = c.origin.pid.to_string();
                self.context_shifts
                    .with_label_values(&[pid.as_str(), &c.origin.model])
                    .inc();
            }
            Observation::Request(r) => {
                let pid = r.pid.to_string();
                let labels = [pid.as_str(), &*r.model, r.task_type];
                if let Some(t) = r.ttft_s() {
                    self.ttft.with_label_values(&labels).observe(t);
                }
                if let Some(t) = r.tpot_s() {
                    self.tpot.with_label_values(&labels).observe(t);
                }
                if let Some(t) = r.queue_s() {
                    self.request_queue.with_label_values(&labels).observe(t);
                }
                self.request_duration
                    .with_label_values(&labels)
                    .observe(r.duration_s());
                self.request_prompt_tokens
                    .with_label_values(&labels)
                    .observe(r.input_tokens() as f64);
                self.request_generated_tokens
                    .with_label_values(&labels)
                    .observe(r.generated_tokens as f64);
            }
            Observation::Decode(d) => {
                let o = &d.origin;
                let h = hot_for(&mut self.hot, o.pid, d.context, &o.model);
                let pid = || o.pid.to_string();
                let (model, ctx) = (&*o.model, d.context.label());
                if d.result == DecodeResult::Ok {
                    h.decode_ok
                        .get_or_insert_with(|| {
                            self.decode_calls
                                .with_label_values(&[&pid(), model, ctx, "ok"])
                        })
                        .inc();
                } else {
                    self.decode_calls
                        .with_label_values(&[&pid(), model, ctx, d.result.label()])
                        .inc();
                }
                let (slot, phase) = phase_slot(d.phase);
                h.decode_duration[slot]
                    .get_or_insert_with(|| {
                        self.decode_duration
                            .with_label_values(&[&pid(), model, ctx, phase])
                    })
                    .observe(o.seconds());
                if let Some(n) = d.n_tokens {
                    h.batch_tokens[slot]
                        .get_or_insert_with(|| {
                            self.batch_tokens
                                .with_label_values(&[&pid(), model, ctx, phase])
                        })
                        .observe(n as f64);
                }
                if d.result == DecodeResult::Ok && d.prompt_tokens > 0 {
                    h.prompt_tokens
                        .get_or_insert_with(|| {
                            self.tokens
                                .with_label_values(&[&pid(), model, ctx, "prompt"])
                        })
                        .inc_by(d.prompt_tokens as u64);
                }
                if d.result == DecodeResult::Ok && d.draft_tokens > 0 {
                    h.draft_tokens
                        .get_or_insert_with(|| {
                            self.speculative_draft.with_label_values(&[&pid(), model])
                        })
                        .inc_by(d.draft_tokens as u64);
                    h.drafts
                        .get_or_insert_with(|| {
                            self.speculative_drafts.with_label_values(&[&pid(), model])
                        })
                        .inc_by(d.drafts as u64);
                }
            }
            Observation::Sample(s) => {
                let o = &s.origin;
                let h = hot_for(&mut self.hot, o.pid, s.context, &o.model);
                let labels = || {
                    [
                        o.pid.to_string(),
                        o.model.to_string(),
                        s.context.label().to_string(),
                    ]
                };
                h.sample_duration
                    .get_or_insert_with(|| {
                        let [p, m, c] = labels();
                        self.sample_duration.with_label_values(&[&p, &m, &c])
                    })
                    .observe(o.seconds());
                h.generated_tokens
                    .get_or_insert_with(|| {
                        let [p, m, c] = labels();
                        self.tokens.with_label_values(&[&p, &m, &c, "generated"])
                    })
                    .inc();
                if s.accepted_draft {
                    h.accepted_tokens
                        .get_or_insert_with(|| {
                            let [p, m, _] = labels();
                            self.speculative_accepted.with_label_values(&[&p, &m])
                        })
                        .inc();
                }
            }
            Observation::Synchronize(s) => {
                let o = &s.origin;
                let h = hot_for(&mut self.hot, o.pid, ContextRole::Main, &o.model);
                let labels = || [o.pid.to_string(), o.model.to_string()];
                h.sync_duration
                    .get_or_insert_with(|| {
                        let [p, m] = labels();
                        self.sync_duration.with_label_values(&[&p, &m])
                    })
                    .observe(o.seconds());
                if let Some(c) = s.compute_ns {
                    h.compute_duration
                        .get_or_insert_with(|| {
                            let [p, m] = labels();
                            self.compute_duration.with_label_values(&[&p, &m])
                        })
                        .observe(c as f64 / 1e9);
                }
            }
            Observation::ModelLoad(m) => {
                let pid = m.origin.pid.to_string();
                self.model_load
                    .with_label_values(&[
                        pid.as_str(),
                        &m.origin.model,
                        if m.ok { "ok" } else { "error" },
                    ])
                    .observe(m.origin.seconds());
            }
            Observation::ContextCreate(c) => {
                if !c.ok {
                    return;
                }
                let pid = c.origin.pid.to_string();
                let labels = [pid.as_str(), &*c.origin.model];
                if let Some(share) = c.params.seq_share {
                    self.seq_capacity.insert((c.origin.pid, c.context), share);
                }
                // The gauges describe the context that serves requests.
                if c.context != ContextRole::Main {
                    return;
                }
                if let Some(n) = c.params.n_ctx {
                    self.context_size.with_label_values(&labels).set(n as f64);
                }
                for (g, field) in &self.context_params {
                    if let Some(v) = field(&c.params) {
                        g.with_label_values(&labels).set(v as f64);
                    }
                }
            }
        }
    }

    fn tick(&mut self, now: &Snapshot) {
        self.expose_cpu_functions();
        let grace = self.series_grace;
        let due: Vec<u32> = self
            .released
            .iter()
            .filter(|(_, at)| at.elapsed() >= grace)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            self.released.remove(&pid);
            self.remove_process(pid);
        }
        self.resources.update(now);
        let s = &now.stats;
        self.probes_attached.set(s.probes_attached as i64);
        self.processes_traced.set(now.processes.len() as i64);
        for p in &now.processes {
            let labels = [p.pid.to_string(), p.model.to_string()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            self.requests_active
                .with_label_values(&labels)
                .set(p.requests_active as f64);
            self.requests_waiting
                .with_label_values(&labels)
                .set(p.tasks_waiting as f64);
        }
        for (reason, n) in [
            ("cancelled", s.unserved.cancelled),
            ("rejected", s.unserved.rejected),
            ("unclaimed", s.unserved.unclaimed),
        ] {
            set_counter(&self.unserved.with_label_values(&[reason]), n);
        }
        set_counter(
            &self.events_lost.with_label_values(&["ringbuf_full"]),
            s.lost_ringbuf,
        );
        set_counter(
            &self.events_lost.with_label_values(&["entry_map_full"]),
            s.lost_entry,
        );
        set_counter(
            &self.events_lost.with_label_values(&["undecodable"]),
            s.undecodable,
        );
    }

    fn finish(&mut self, last: &Snapshot) -> anyhow::Result<()> {
        self.tick(last);
        Ok(())
    }
}

/// The host agent's health, for `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// Monotonic seconds (since `started`) of the event loop's latest turn.
    turned: AtomicU64,
    ready: AtomicBool,
    started: std::sync::OnceLock<Instant>,
}

/// A loop that has not turned for this long is not healthy.
const STALL_SECS: u64 = 10;

impl Health {
    fn now(&self) -> u64 {
        self.started.get_or_init(Instant::now).elapsed().as_secs()
    }
    /// The event loop turned.
    pub fn turned(&self) {
        self.turned.store(self.now(), Ordering::Relaxed);
    }
    /// Probes loaded and discovery ran once.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }
    fn healthy(&self) -> bool {
        self.now()
            .saturating_sub(self.turned.load(Ordering::Relaxed))
            < STALL_SECS
    }
}

/// What the endpoint serves: a registry, with the identity labels joined to every `llamacpp_`
/// series of a traced process, and, in the host agent, its health.
#[derive(Clone)]
pub struct Exposition {
    pub registry: Registry,
    identities: Identities,
    health: Option<Arc<Health>>,
}

impl Exposition {
    /// The registry's families with the identity labels added.
    pub fn gather(&self) -> Vec<MetricFamily> {
        let mut families = self.registry.gather();
        let ids = self.identities.read().expect("identities lock");
        if ids.is_empty() {
            return families;
        }
        for f in families
            .iter_mut()
            .filter(|f| f.name().starts_with("llamacpp_"))
        {
            for m in f.mut_metric() {
                let Some(extra) = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "pid")
                    .and_then(|l| ids.get(l.value()))
                else {
                    continue;
                };
                let mut labels = m.get_label().to_vec();
                for (k, v) in extra {
                    let mut l = LabelPair::default();
                    l.set_name((*k).to_string());
                    l.set_value(v.clone());
                    labels.push(l);
                }
                labels.sort_by(|a, b| a.name().cmp(b.name()));
                m.set_label(labels);
            }
        }
        families
    }

    fn respond(&self, path: &str) -> (u16, &'static str, Vec<u8>) {
        let text = |code, body: &str| (code, "text/plain", body.as_bytes().to_vec());
        match (path, &self.health) {
            ("/metrics", _) => {
                let mut buf = Vec::new();
                let _ = TextEncoder::new().encode(&self.gather(), &mut buf);
                (200, prometheus::TEXT_FORMAT, buf)
            }
            ("/healthz", Some(h)) if h.healthy() => text(200, "ok\n"),
            ("/healthz", Some(_)) => text(503, "the event loop has not turned for 10 s\n"),
            ("/readyz", Some(h)) if h.ready.load(Ordering::Relaxed) => text(200, "ready\n"),
            ("/readyz", Some(_)) => text(
                503,
                "not ready: probes loading or first discovery running\n",
            ),
            _ => text(404, "llamaprobe: metrics are at /metrics\n"),
        }
    }
}

/// Serves `/metrics` (and, with a [`Health`], `/healthz` and `/readyz`) on `listener` until
/// the runtime ends; with a web configuration, over TLS and/or behind basic auth.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exposition: Exposition,
    web: Option<Arc<web_config::WebConfigFile>>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let exposition = exposition.clone();
        let web = web.clone();
        tokio::spawn(async move {
            // TLS as configured now (the file is read again if it or its files changed).
            let cfg = web.as_ref().map(|w| w.current());
            match cfg.as_ref().and_then(|c| c.tls()) {
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(TokioIo::new(tls), exposition, web).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                }
                None => connection(TokioIo::new(stream), exposition, web).await,
            }
        });
    }
}

/// A TLS client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 requests on one connection, each checked against the web configuration of
/// the moment (a user removed from the file is refused on a kept-alive connection too).
async fn connection<I>(io: I, exposition: Exposition, web: Option<Arc<web_config::WebConfigFile>>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let exposition = exposition.clone();
        let web = web.clone();
        async move {
            let cfg = web.as_ref().map(|w| w.current());
            let path = req.uri().path().to_string();
            let allowed = match (&web, &cfg) {
                (Some(w), Some(c)) => {
                    w.authorized(c, &path, req.headers().get(hyper::header::AUTHORIZATION))
                        .await
                }
                _ => true,
            };
            let (code, ctype, body) = if allowed {
                exposition.respond(&path)
            } else {
                (401, "text/plain", b"Unauthorized\n".to_vec())
            };
            let mut resp = Response::builder()
                .status(code)
                .header("content-type", ctype);
            if !allowed {
                resp = resp.header("www-authenticate", "Basic realm=\"llamaprobe\"");
            }
            for (k, v) in cfg.iter().flat_map(|c| c.headers()) {
                resp = resp.header(k, v);
            }
            Ok::<_, Infallible>(
                resp.body(Full::new(Bytes::from(body)))
                    .expect("valid response"),
            )
        }
    });
    let _ = http1::Builder::new().serve_connection(io, service).await;
}

/// Binds the metrics address, with a message that says what to do when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for Prometheus ({e}): pick another address with \
             --metrics-addr HOST:PORT, or --metrics-addr off"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{tests::decode_event, Event};
    use crate::{assemble::Assembler, model::Observation};
    use probe_common::SeqRun;

    #[test]
    fn decode_steps_become_series_with_pid_model_phase() {
        let mut a = Assembler::new();
        a.set_model(7, "tiny");
        let mut m = Metrics::new();
        let run = SeqRun {
            seq_id: 0,
            pos0: 0,
            tok0: 1,
            n_tokens: 4,
            n_outputs: 1,
            last_output: 1,
        };
        for ret in [0, 1] {
            let obs = a
                .process(&Event::Decode(Box::new(decode_event(4, &[run], ret))))
                .unwrap();
            assert!(matches!(obs, Observation::Decode(_)));
            m.observe(&obs);
        }
        let text = m.render();
        assert!(
            text.contains(
                r#"llamacpp_decode_calls_total{context="main",model="tiny",pid="7",result="ok"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"llamacpp_decode_calls_total{context="main",model="tiny",pid="7",result="no_kv_slot"} 1"#
        ));
        assert!(text.contains(
            r#"llamacpp_tokens_total{context="main",kind="prompt",model="tiny",pid="7"} 4"#
        ));
        assert!(text.contains(
            r#"llamacpp_batch_tokens_count{context="main",model="tiny",phase="prompt",pid="7"} 2"#
        ));
        assert!(text.contains(r#"llamacpp_decode_duration_seconds_bucket{context="main",model="tiny",phase="prompt",pid="7",le="0.00005"} 2"#));
    }

    /// What the decode path did before the handles: format `pid` and look every series up by
    /// its labels, per event (kept here as the baseline of `measure_hot_path`).
    fn observe_by_lookup(m: &Metrics, d: &crate::model::DecodeStep) {
        let pid = d.origin.pid.to_string();
        let model = &*d.origin.model;
        for s in &d.context_used {
            let seq = s.seq_id.to_string();
            m.context_used
                .with_label_values(&[pid.as_str(), model, "main", seq.as_str()])
                .set(s.used as f64);
        }
        m.decode_calls
            .with_label_values(&[pid.as_str(), model, "main", d.result.label()])
            .inc();
        let phase = d.phase.map_or("unknown", |p| p.label());
        m.decode_duration
            .with_label_values(&[pid.as_str(), model, "main", phase])
            .observe(d.origin.seconds());
        if let Some(n) = d.n_tokens {
            m.batch_tokens
                .with_label_values(&[pid.as_str(), model, "main", phase])
                .observe(n as f64);
        }
        if d.prompt_tokens > 0 {
            m.tokens
                .with_label_values(&[pid.as_str(), model, "main", "prompt"])
                .inc_by(d.prompt_tokens as u64);
        }
    }

    /// The agent's cost per decode step in this sink, per-event label lookup vs resolved
    /// handles: `cargo test --release -p llamaprobe --lib -- --ignored --exact
    /// sinks::prometheus::tests::measure_hot_path --nocapture` (run by `cargo xtask bench`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_hot_path() {
        let mut a = Assembler::new();
        a.set_model(4242, "bench-model");
        // A step of 4 slots generating one token each, as llama-server's is.
        let runs: Vec<SeqRun> = (0..4)
            .map(|seq| SeqRun {
                seq_id: seq,
                pos0: 100,
                tok0: 7,
                n_tokens: 1,
                n_outputs: 1,
                last_output: 1,
            })
            .collect();
        let mut ev = decode_event(4, &runs, 0);
        ev.header.tgid = 4242;
        let obs = a.process(&Event::Decode(Box::new(ev))).unwrap();
        let Observation::Decode(d) = &obs else {
            panic!("not a decode step")
        };
        assert_eq!(d.context_used.len(), 4);
        const N: u32 = 200_000;
        let time = |f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            for _ in 0..N {
                f();
            }
            t.elapsed().as_nanos() as f64 / N as f64
        };
        let (mut lookup, mut handles) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            let m = Metrics::new();
            lookup.push(time(&mut || observe_by_lookup(&m, d)));
            let mut m = Metrics::new();
            handles.push(time(&mut || m.observe(&obs)));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (l, h) = (median(&mut lookup), median(&mut handles));
        println!(
            "hot path: decode step of 4 sequences in the Prometheus sink: label lookup per event {l:.0} ns, resolved handles {h:.0} ns ({:.1}x), median of 7 x {N}",
            l / h
        );
    }
}
