//! `--otlp-endpoint URL` (or `OTEL_EXPORTER_OTLP_ENDPOINT`): OpenTelemetry traces and metrics
//! over OTLP (gRPC or HTTP/protobuf), named per the GenAI semantic conventions.
//!
//! Spans: `llama.model_load`, `llama.context_create`, one `text_completion <model>` span per
//! reconstructed request (kind SERVER) with children `prompt` and `generation`, and with
//! `--otlp-step-spans` one `llama.decode` child per decode step that carried the request's tokens.
//! Metrics: the `gen_ai.server.*` histograms and `gen_ai.client.token.usage`, and with a GPU the
//! hardware conventions' `hw.gpu.*`, `hw.power` and `hw.temperature` ([`gpu`]), from each
//! tick's GPU readings.
//!
//! Resources: the ad-hoc modes (`attach`, `run`) export under one resource, llamaprobe's
//! (`service.name` `llamaprobe` unless `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name
//! one, and its `service.version`). The host agent (`daemon`) describes who each process is
//! ([`Observation::Traced`] with non-empty identity labels, which only it sends): each such
//! process is a resource of its own, as one service per process, with `service.name` (the
//! target's `OTEL_SERVICE_NAME`, else its executable), `process.pid`,
//! `process.executable.name`, `container.id`, `k8s.namespace.name`, `k8s.pod.name`,
//! `k8s.container.name` (those known), `k8s.node.name` (`NODE_NAME`), `host.name`, and
//! llamaprobe itself as `telemetry.distro.name` / `telemetry.distro.version` (not
//! `service.version`, which would describe the process). Its spans and its `gen_ai.*`
//! histograms are exported under it: each such process has a tracer provider and a meter
//! provider of its own (a batch span processor and a periodic reader, a thread each), made at
//! its `Traced` and shut down at its `Released` on a helper thread, which exports what it
//! still holds (so at most as many as processes traced, and no series of a gone process stays
//! in memory). They all share one span exporter and one metric exporter (one connection),
//! each export under its provider's resource. What concerns no process (the GPU instruments)
//! stays under llamaprobe's resource.
//!
//! Nothing here blocks the event loop: spans go to the SDK's batch processor (a bounded queue,
//! exported from its own thread; a full queue drops spans) and metrics to a periodic reader
//! (its own thread). The gRPC client (tonic) runs its connections on a small tokio runtime of
//! its own, not on the session's current-thread runtime. Failed exports are counted (in the
//! Prometheus registry) and logged at most once per interval.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use opentelemetry::{
    metrics::{Histogram, MeterProvider as _},
    trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        data::ResourceMetrics, exporter::PushMetricExporter, PeriodicReader, SdkMeterProvider,
        Temporality,
    },
    resource::{EnvResourceDetector, ResourceDetector, TelemetryResourceDetector},
    trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
    Resource,
};
use prometheus::{IntCounterVec, Opts, Registry};

use super::{names::*, Sink, Snapshot};
use crate::model::{clock, Observation, Request, TracedProcess};

pub mod gpu;

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Parses `grpc`, `http` or `http/protobuf`.
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "grpc" => Ok(Protocol::Grpc),
        "http" | "http/protobuf" => Ok(Protocol::HttpProtobuf),
        "http/json" => Err("http/json is not supported; use grpc or http/protobuf".into()),
        other => Err(format!("unknown OTLP protocol `{other}` (grpc | http)")),
    }
}

/// The OTLP sink's options.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "otlp_options")]
#[command(next_help_heading = "OpenTelemetry (OTLP)")]
pub struct Options {
    /// Export OpenTelemetry traces and metrics over OTLP to this endpoint (e.g.
    /// http://127.0.0.1:4317 for gRPC, http://127.0.0.1:4318 for HTTP). Without it, export is on
    /// only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: grpc or http (HTTP/protobuf) [default: OTEL_EXPORTER_OTLP_PROTOCOL, else
    /// grpc].
    #[arg(long, value_name = "PROTO", value_parser = parse_protocol)]
    pub otlp_protocol: Option<Protocol>,
    /// Export one span per decode step as a child of the request spans it carried tokens of.
    #[arg(long)]
    pub otlp_step_spans: bool,
    /// Head sampling: the fraction of requests whose spans are exported (0 to 1) [default:
    /// OTEL_TRACES_SAMPLER(_ARG), else 1.0]. Metrics count every request.
    #[arg(long, value_name = "R")]
    pub otlp_sample_ratio: Option<f64>,
}

/// The resolved OTLP settings of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `--otlp-endpoint`; `None` when export was turned on by `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (the SDK then resolves the per-signal endpoints and paths itself).
    pub endpoint: Option<String>,
    /// What to print.
    pub endpoint_shown: String,
    pub protocol: Protocol,
    pub step_spans: bool,
    /// `--otlp-sample-ratio`; `None`: the SDK's `OTEL_TRACES_SAMPLER(_ARG)`, else all.
    pub sample_ratio: Option<f64>,
}

impl Settings {
    /// Export is on with `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn resolve(opts: &Options) -> anyhow::Result<Option<Self>> {
        Self::resolve_with(opts, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn resolve_with(
        opts: &Options,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let env_endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT");
        let Some(endpoint_shown) = opts.otlp_endpoint.clone().or(env_endpoint) else {
            return Ok(None);
        };
        let protocol = match (opts.otlp_protocol, env("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            (Some(p), _) => p,
            (None, Some(p)) => parse_protocol(&p)
                .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_PROTOCOL: {e}"))?,
            (None, None) => Protocol::Grpc,
        };
        if let Some(r) = opts.otlp_sample_ratio {
            anyhow::ensure!(
                (0.0..=1.0).contains(&r),
                "--otlp-sample-ratio {r}: must be between 0 and 1"
            );
        }
        Ok(Some(Self {
            endpoint: opts.otlp_endpoint.clone(),
            endpoint_shown,
            protocol,
            step_spans: opts.otlp_step_spans,
            sample_ratio: opts.otlp_sample_ratio,
        }))
    }
}

/// Export failures, shared between the exporters (their threads) and the sink.
#[derive(Debug, Default)]
struct Failures {
    traces: AtomicU64,
    metrics: AtomicU64,
    /// Spans in successful / failed exports.
    spans_exported: AtomicU64,
    spans_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Failures {
    fn failed(&self, counter: &AtomicU64, e: &impl std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }
}

/// A span exporter that counts its failures.
#[derive(Debug)]
struct CountedSpans<E> {
    inner: E,
    failures: Arc<Failures>,
}

impl<E: SpanExporter> SpanExporter for CountedSpans<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => self.failures.spans_exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                self.failures.failed(&self.failures.traces, e);
                self.failures.spans_failed.fetch_add(n, Ordering::Relaxed)
            }
        };
        r
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// A metric exporter that counts its failures.
struct CountedMetrics<E> {
    inner: E,
    failures: Arc<Failures>,
}

impl<E: PushMetricExporter> PushMetricExporter for CountedMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let r = self.inner.export(metrics).await;
        if let Err(e) = &r {
            self.failures.failed(&self.failures.metrics, e);
        }
        r
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// The span exporter every tracer provider exports through: one connection, each provider's
/// batches under its own resource (set on the shared exporter before each of its exports; the
/// exports of the providers' threads take turns).
#[derive(Debug)]
struct SharedSpans {
    inner: Arc<tokio::sync::Mutex<CountedSpans<opentelemetry_otlp::SpanExporter>>>,
    resource: Resource,
}

impl SpanExporter for SharedSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut inner = self.inner.lock().await;
        inner.set_resource(&self.resource);
        inner.export(batch).await
    }
    /// The shared exporter is shut down by the sink, at its end.
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    /// The provider's resource (the SDK sets it when the provider is built).
    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// The metric exporter every meter provider's reader exports through (each export carries its
/// provider's resource).
struct SharedMetrics(Arc<CountedMetrics<opentelemetry_otlp::MetricExporter>>);

impl PushMetricExporter for SharedMetrics {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        self.0.export(metrics).await
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    /// The shared exporter is shut down by the sink, at its end.
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
    fn temporality(&self) -> Temporality {
        self.0.temporality()
    }
}

/// The exporters the providers share.
#[derive(Clone)]
struct Exporters {
    spans: Arc<tokio::sync::Mutex<CountedSpans<opentelemetry_otlp::SpanExporter>>>,
    metrics: Arc<CountedMetrics<opentelemetry_otlp::MetricExporter>>,
}

/// A tracer provider, its tracer, a meter provider and its instruments, under one resource.
struct Providers {
    tracer_provider: SdkTracerProvider,
    tracer: SdkTracer,
    meter_provider: SdkMeterProvider,
    instruments: Instruments,
}

impl Providers {
    /// Builds them on the shared exporters (a batch span processor and a periodic reader:
    /// a thread each; neither blocks).
    fn build(exporters: &Exporters, resource: Resource, sample_ratio: Option<f64>) -> Self {
        let spans = SharedSpans {
            inner: exporters.spans.clone(),
            resource: resource.clone(),
        };
        // Bounded queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048), exported from its own thread.
        let processor = BatchSpanProcessor::builder(spans).build();
        let mut tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone());
        if let Some(r) = sample_ratio {
            tracer_provider = tracer_provider.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(r),
            )));
        }
        let tracer_provider = tracer_provider.build();
        let tracer = tracer_provider.tracer("llamaprobe");

        let mut reader = PeriodicReader::builder(SharedMetrics(exporters.metrics.clone()));
        if std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_none() {
            reader = reader.with_interval(Duration::from_secs(10));
        }
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource)
            .build();
        let instruments = Instruments::new(&meter_provider.meter("llamaprobe"));
        Self {
            tracer_provider,
            tracer,
            meter_provider,
            instruments,
        }
    }

    /// Exports what they hold and stops their threads (bounded by `timeout` each).
    fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.tracer_provider.shutdown_with_timeout(timeout) {
            tracing::warn!("OTLP: flushing spans: {e}");
        }
        if let Err(e) = self.meter_provider.shutdown_with_timeout(timeout) {
            tracing::warn!("OTLP: flushing metrics: {e}");
        }
    }
}

/// A process traced by the host agent: who it is, and the providers of its resource.
struct Process {
    labels: Vec<(&'static str, String)>,
    service_name: String,
    providers: Providers,
}

/// The resource attributes of the host (`host.name`, `k8s.node.name`), read once.
fn host_attributes() -> Vec<KeyValue> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it, or
    // the last byte stays 0.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !name.is_empty() {
            out.push(KeyValue::new("host.name", name));
        }
    }
    if let Some(node) = std::env::var("NODE_NAME").ok().filter(|v| !v.is_empty()) {
        out.push(KeyValue::new("k8s.node.name", node));
    }
    out
}

/// The OpenTelemetry resource attribute of an identity label.
fn resource_key(label: &str) -> Option<&'static str> {
    Some(match label {
        "exe" => "process.executable.name",
        "container_id" => "container.id",
        "k8s_namespace" => "k8s.namespace.name",
        "k8s_pod" => "k8s.pod.name",
        "k8s_container" => "k8s.container.name",
        _ => return None,
    })
}

/// The attributes of a traced process's own resource (after the SDK's `telemetry.sdk.*` and
/// the agent's `OTEL_RESOURCE_ATTRIBUTES`, which they override).
fn process_attributes(t: &TracedProcess, host: &[KeyValue]) -> Vec<KeyValue> {
    let service = match t.identity.service_name.as_str() {
        "" => t.name.clone(),
        s => s.to_string(),
    };
    let mut attrs = vec![
        KeyValue::new("service.name", service),
        KeyValue::new("process.pid", t.pid as i64),
    ];
    for (label, value) in &t.identity.labels {
        if let Some(key) = resource_key(label) {
            attrs.push(KeyValue::new(key, value.clone()));
        }
    }
    attrs.extend(host.iter().cloned());
    attrs.extend([
        KeyValue::new("telemetry.distro.name", "llamaprobe"),
        KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ]);
    attrs
}

fn process_resource(t: &TracedProcess, host: &[KeyValue]) -> Resource {
    let detectors: [Box<dyn ResourceDetector>; 2] = [
        Box::new(TelemetryResourceDetector),
        Box::new(EnvResourceDetector::new()),
    ];
    Resource::builder_empty()
        .with_detectors(&detectors)
        .with_attributes(process_attributes(t, host))
        .build()
}

/// The GenAI histograms.
struct Instruments {
    duration: Histogram<f64>,
    ttft: Histogram<f64>,
    tpot: Histogram<f64>,
    tokens: Histogram<u64>,
}

impl Instruments {
    fn new(meter: &opentelemetry::metrics::Meter) -> Self {
        let seconds = |name: &'static str, desc: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        Self {
            duration: seconds(
                "gen_ai.server.request.duration",
                "Time from the request's first prompt step to its last token",
                REQUEST_BUCKETS,
            ),
            ttft: seconds(
                "gen_ai.server.time_to_first_token",
                "Time from the request's first prompt step to its first token",
                TTFT_BUCKETS,
            ),
            tpot: seconds(
                "gen_ai.server.time_per_output_token",
                "Mean time per output token after the first",
                TPOT_BUCKETS,
            ),
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Input and output tokens per request")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
        }
    }
}

/// How long a provider's or exporter's shutdown may wait for its last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP sink.
pub struct Otlp {
    settings: Settings,
    /// llamaprobe's resource: everything in the ad-hoc modes, what concerns no process in the
    /// host agent.
    shared: Providers,
    /// The processes of the host agent, each under its own resource.
    processes: HashMap<u32, Process>,
    exporters: Exporters,
    /// `host.name`, `k8s.node.name`.
    host: Vec<KeyValue>,
    /// The helper threads shutting down the providers of released processes.
    retiring: Vec<std::thread::JoinHandle<()>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, in ns, taken once at start.
    offset_ns: i128,
    /// The latest GPU readings, which the GPU instruments observe when metrics are collected.
    gpus: gpu::Latest,
    failures: Arc<Failures>,
    /// Spans handed to the SDK (sampled ones).
    spans_sent: u64,
    prom_failures: IntCounterVec,
    prom_spans: IntCounterVec,
    /// Values already added to the Prometheus counters: traces, metrics, exported, failed, sent.
    reported: [u64; 5],
    /// Failures at the last log line, and its time.
    logged_failures: u64,
    last_log: Instant,
    log_interval: Duration,
    /// Runs the gRPC client's connections (tonic needs a tokio runtime; not the session's).
    runtime: Option<tokio::runtime::Runtime>,
}

/// The default service name applies unless the environment names one.
fn service_name_from_env() -> bool {
    std::env::var_os("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        })
}

impl Otlp {
    /// Builds the exporters and providers; nothing is sent until spans end. The GPU
    /// instruments observe the latest tick's readings each time metrics are collected (none
    /// without GPUs).
    pub fn start(
        settings: Settings,
        registry: &Registry,
        log_interval: Duration,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("llamaprobe-otlp")
            .enable_all()
            .build()
            .context("starting the OTLP runtime")?;
        let failures = Arc::new(Failures::default());
        let mut resource = Resource::builder();
        if !service_name_from_env() {
            resource = resource.with_service_name("llamaprobe");
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();

        let (span_exporter, metric_exporter) = {
            let _entered = runtime.enter();
            build_exporters(&settings)?
        };
        let exporters = Exporters {
            spans: Arc::new(tokio::sync::Mutex::new(CountedSpans {
                inner: span_exporter,
                failures: failures.clone(),
            })),
            metrics: Arc::new(CountedMetrics {
                inner: metric_exporter,
                failures: failures.clone(),
            }),
        };
        let shared = Providers::build(&exporters, resource, settings.sample_ratio);
        let meter = shared.meter_provider.meter("llamaprobe");
        let gpus = gpu::Latest::default();
        gpu::register(&meter, &gpus);

        let prom_failures = IntCounterVec::new(
            Opts::new(
                "llamaprobe_otlp_export_failures_total",
                "OTLP exports that failed (receiver down, slow or refusing)",
            ),
            &["signal"],
        )?;
        let prom_spans = IntCounterVec::new(
            Opts::new(
                "llamaprobe_otlp_spans_total",
                "Spans by outcome: sent (to the exporter's queue), exported, failed (in a failed export)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(prom_failures.clone()))?;
        registry.register(Box::new(prom_spans.clone()))?;
        for s in ["traces", "metrics"] {
            prom_failures.with_label_values(&[s]);
        }
        for o in ["sent", "exported", "failed"] {
            prom_spans.with_label_values(&[o]);
        }
        eprintln!(
            "llamaprobe: OpenTelemetry export to {} ({}){}",
            settings.endpoint_shown,
            match settings.protocol {
                Protocol::Grpc => "gRPC",
                Protocol::HttpProtobuf => "HTTP/protobuf",
            },
            if settings.step_spans {
                ", with decode-step spans"
            } else {
                ""
            }
        );
        Ok(Self {
            offset_ns: clock::realtime_offset_ns(),
            gpus,
            settings,
            shared,
            processes: HashMap::new(),
            exporters,
            host: host_attributes(),
            retiring: Vec::new(),
            failures,
            spans_sent: 0,
            prom_failures,
            prom_spans,
            reported: [0; 5],
            logged_failures: 0,
            last_log: Instant::now(),
            log_interval,
            runtime: Some(runtime),
        })
    }

    /// A probe timestamp (CLOCK_MONOTONIC ns) on the wall clock.
    fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u64;
        UNIX_EPOCH + Duration::from_nanos(ns)
    }

    /// The providers of a process's spans and metrics: its own under the host agent, else
    /// llamaprobe's.
    fn providers(&self, pid: u32) -> &Providers {
        self.processes
            .get(&pid)
            .map_or(&self.shared, |p| &p.providers)
    }

    /// Starts a span of process `pid` at a probe timestamp.
    fn start_span(
        &self,
        pid: u32,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        start_ns: u64,
        attributes: Vec<KeyValue>,
        parent: &Context,
    ) -> opentelemetry_sdk::trace::Span {
        let tracer = &self.providers(pid).tracer;
        let builder = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(self.wall(start_ns))
            .with_attributes(attributes);
        tracer.build_with_context(builder, parent)
    }

    /// A process began to be traced: one traced by the host agent (its identity has labels)
    /// gets providers under its own resource, made anew when its identity changed.
    fn traced(&mut self, t: &TracedProcess) {
        if let Some(p) = self.processes.get(&t.pid) {
            if p.labels == t.identity.labels && p.service_name == t.identity.service_name {
                return;
            }
        }
        self.release(t.pid);
        if t.identity.labels.is_empty() {
            return;
        }
        let resource = process_resource(t, &self.host);
        let providers = Providers::build(&self.exporters, resource, self.settings.sample_ratio);
        self.processes.insert(
            t.pid,
            Process {
                labels: t.identity.labels.clone(),
                service_name: t.identity.service_name.clone(),
                providers,
            },
        );
    }

    /// A process is gone: its providers export what they hold and stop, on a helper thread
    /// (their shutdown waits for their export).
    fn release(&mut self, pid: u32) {
        let Some(p) = self.processes.remove(&pid) else {
            return;
        };
        self.retiring.retain(|h| !h.is_finished());
        let cell = Arc::new(Mutex::new(Some(p.providers)));
        let moved = cell.clone();
        let spawned = std::thread::Builder::new()
            .name("llamaprobe-otlp-release".into())
            .spawn(move || {
                let providers = moved.lock().ok().and_then(|mut p| p.take());
                if let Some(p) = providers {
                    p.shutdown(SHUTDOWN_TIMEOUT);
                }
            });
        match spawned {
            Ok(h) => self.retiring.push(h),
            Err(e) => {
                // No thread: the shutdown happens here (dropping the providers would too).
                tracing::warn!("OTLP: releasing the providers of process {pid}: {e}");
                if let Some(p) = cell.lock().ok().and_then(|mut p| p.take()) {
                    p.shutdown(SHUTDOWN_TIMEOUT);
                }
            }
        }
    }

    /// Ends a span at a probe timestamp.
    fn end_span(&mut self, span: &mut impl opentelemetry::trace::Span, end_ns: u64) {
        if span.span_context().is_sampled() {
            self.spans_sent += 1;
        }
        span.end_with_timestamp(self.wall(end_ns));
    }

    /// A root span for one probed call (model load, context creation), in error if it failed.
    fn call_span(
        &mut self,
        name: &'static str,
        origin: &crate::model::Origin,
        attrs: Vec<KeyValue>,
        ok: bool,
        error: &'static str,
    ) {
        let mut span = self.start_span(
            origin.pid,
            name,
            SpanKind::Internal,
            origin.start_ns,
            attrs,
            &Context::new(),
        );
        if !ok {
            span.set_status(Status::error(error));
        }
        self.end_span(&mut span, origin.end_ns);
    }

    fn request(&mut self, r: &Request) {
        let model = r.model.to_string();
        let operation = r.operation();
        let name = if model.is_empty() {
            operation.to_string()
        } else {
            format!("{operation} {model}")
        };
        let mut common = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", PROVIDER),
        ];
        if !model.is_empty() {
            common.push(KeyValue::new("gen_ai.request.model", model));
        }
        // Metrics (every request, whatever the sampling).
        let instruments = &self.providers(r.pid).instruments;
        instruments.duration.record(r.duration_s(), &common);
        if let Some(t) = r.ttft_s() {
            instruments.ttft.record(t, &common);
        }
        if let Some(t) = r.tpot_s() {
            instruments.tpot.record(t, &common);
        }
        for (kind, n) in [("input", r.input_tokens()), ("output", r.generated_tokens)] {
            let mut a = common.clone();
            a.push(KeyValue::new("gen_ai.token.type", kind));
            instruments.tokens.record(n as u64, &a);
        }

        // The steps the request stage kept for it (`--otlp-step-spans`).
        let steps = &r.steps;
        let mut attrs = common;
        attrs.extend([
            KeyValue::new("gen_ai.usage.input_tokens", r.input_tokens() as i64),
            KeyValue::new("gen_ai.usage.output_tokens", r.generated_tokens as i64),
            KeyValue::new(
                "gen_ai.usage.cache_read.input_tokens",
                r.cached_tokens as i64,
            ),
            KeyValue::new("llama.seq_id", r.seq_id as i64),
            KeyValue::new("llama.request.id", r.id as i64),
            KeyValue::new("llama.request.prompt_tokens", r.prompt_tokens as i64),
            KeyValue::new("llama.request.decode_steps", r.decode_steps as i64),
            KeyValue::new("llama.request.closed_by", r.closed_by),
            KeyValue::new("llama.request.type", r.task_type),
            KeyValue::new("llama.request.context_shifts", r.context_shifts as i64),
            // Where its wall time went: its decode steps, its samplings, the rest.
            KeyValue::new("llama.request.decode_seconds", r.decode_ns as f64 / 1e9),
            KeyValue::new("llama.request.sampling_seconds", r.sampling_ns as f64 / 1e9),
            KeyValue::new("llama.request.outside_seconds", r.outside_ns() as f64 / 1e9),
            KeyValue::new("process.pid", r.pid as i64),
        ]);
        if let Some(n) = r.cpu_samples {
            attrs.push(KeyValue::new("llama.request.cpu_samples", n as i64));
        }
        if let Some(t) = r.task_id {
            attrs.push(KeyValue::new("llama.request.task_id", t as i64));
        }
        if let Some(t) = r.ttft_s() {
            attrs.push(KeyValue::new("gen_ai.server.time_to_first_token", t));
        }
        if let Some(t) = r.queue_s() {
            attrs.push(KeyValue::new("llama.request.queue_seconds", t));
        }
        let pid = r.pid;
        let span = self.start_span(
            pid,
            name,
            SpanKind::Server,
            r.arrival_ns(),
            attrs,
            &Context::new(),
        );
        if !span.span_context().is_sampled() {
            // Head sampling said no: no children either.
            return;
        }
        let cx = Context::new().with_span(span);
        if let Some(q) = r.queued_ns {
            // Accepted by llama-server's task queue, waiting for a slot.
            let mut queue = self.start_span(pid, "queue", SpanKind::Internal, q, vec![], &cx);
            self.end_span(&mut queue, r.start_ns);
        }
        let prompt_end = r.first_token_ns.or(r.prompt_end_ns).unwrap_or(r.end_ns);
        let mut prompt = self.start_span(
            pid,
            "prompt",
            SpanKind::Internal,
            r.start_ns,
            vec![
                KeyValue::new("llama.prompt.tokens", r.prompt_tokens as i64),
                KeyValue::new("llama.prompt.cached_tokens", r.cached_tokens as i64),
            ],
            &cx,
        );
        self.end_span(&mut prompt, prompt_end);
        if prompt_end < r.end_ns || r.generated_tokens > 1 {
            let mut generation = self.start_span(
                pid,
                "generation",
                SpanKind::Internal,
                prompt_end,
                vec![KeyValue::new(
                    "llama.generation.tokens",
                    r.generated_tokens as i64,
                )],
                &cx,
            );
            self.end_span(&mut generation, r.end_ns);
        }
        for s in steps {
            let mut attrs = vec![
                KeyValue::new("llama.decode.phase", s.phase),
                KeyValue::new("llama.decode.result", s.result),
                KeyValue::new("llama.decode.seq_tokens", s.seq_tokens as i64),
                KeyValue::new("thread.id", s.tid as i64),
            ];
            if let Some(n) = s.n_tokens {
                attrs.push(KeyValue::new("llama.decode.n_tokens", n as i64));
            }
            let mut step = self.start_span(
                pid,
                "llama.decode",
                SpanKind::Internal,
                s.start_ns,
                attrs,
                &cx,
            );
            self.end_span(&mut step, s.end_ns);
        }
        let span = cx.span();
        self.spans_sent += 1;
        span.end_with_timestamp(self.wall(r.end_ns));
    }

    /// Copies the shared counters into Prometheus; returns total export failures.
    fn report(&mut self) -> u64 {
        let f = &self.failures;
        let now = [
            f.traces.load(Ordering::Relaxed),
            f.metrics.load(Ordering::Relaxed),
            f.spans_exported.load(Ordering::Relaxed),
            f.spans_failed.load(Ordering::Relaxed),
            self.spans_sent,
        ];
        let targets = [
            self.prom_failures.with_label_values(&["traces"]),
            self.prom_failures.with_label_values(&["metrics"]),
            self.prom_spans.with_label_values(&["exported"]),
            self.prom_spans.with_label_values(&["failed"]),
            self.prom_spans.with_label_values(&["sent"]),
        ];
        for ((c, n), prev) in targets.iter().zip(now).zip(self.reported.iter_mut()) {
            c.inc_by(n.saturating_sub(*prev));
            *prev = n;
        }
        now[0] + now[1]
    }

    fn last_error(&self) -> String {
        self.failures
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default()
    }
}

/// The span and metric exporters of the chosen transport (called inside the OTLP runtime, which
/// the tonic channel's connection tasks are spawned on).
fn build_exporters(
    s: &Settings,
) -> anyhow::Result<(
    opentelemetry_otlp::SpanExporter,
    opentelemetry_otlp::MetricExporter,
)> {
    use opentelemetry_otlp::{MetricExporter, SpanExporter};
    Ok(match s.protocol {
        Protocol::Grpc => {
            let mut spans = SpanExporter::builder().with_tonic();
            let mut metrics = MetricExporter::builder().with_tonic();
            if let Some(e) = &s.endpoint {
                spans = spans.with_endpoint(e.clone());
                metrics = metrics.with_endpoint(e.clone());
            }
            (
                spans
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .build()
                    .context("OTLP gRPC span exporter")?,
                metrics
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .build()
                    .context("OTLP gRPC metric exporter")?,
            )
        }
        Protocol::HttpProtobuf => {
            let mut spans = SpanExporter::builder().with_http();
            let mut metrics = MetricExporter::builder().with_http();
            if let Some(e) = &s.endpoint {
                // A base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal paths are appended.
                let base = e.trim_end_matches('/');
                spans = spans.with_endpoint(format!("{base}/v1/traces"));
                metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
            }
            (
                spans
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
                    .context("OTLP HTTP span exporter")?,
                metrics
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
                    .context("OTLP HTTP metric exporter")?,
            )
        }
    })
}

impl Sink for Otlp {
    fn observe(&mut self, obs: &Observation) {
        match obs {
            Observation::ModelLoad(m) => {
                let mut attrs = vec![
                    KeyValue::new("llama.model_load.result", if m.ok { "ok" } else { "error" }),
                    KeyValue::new("process.pid", m.origin.pid as i64),
                    KeyValue::new("thread.id", m.origin.tid as i64),
                ];
                if let Some(p) = &m.path {
                    attrs.push(KeyValue::new("llama.model_load.path", p.clone()));
                }
                self.call_span(
                    "llama.model_load",
                    &m.origin,
                    attrs,
                    m.ok,
                    "model load failed",
                );
            }
            Observation::ContextCreate(c) => {
                let mut attrs = vec![
                    KeyValue::new(
                        "llama.context_create.result",
                        if c.ok { "ok" } else { "error" },
                    ),
                    KeyValue::new("process.pid", c.origin.pid as i64),
                    KeyValue::new("thread.id", c.origin.tid as i64),
                ];
                let p = &c.params;
                for (k, v) in [
                    ("llama.context.n_ctx", p.n_ctx),
                    ("llama.context.n_batch", p.n_batch),
                    ("llama.context.n_ubatch", p.n_ubatch),
                    ("llama.context.n_seq_max", p.n_seq_max),
                ] {
                    if let Some(v) = v {
                        attrs.push(KeyValue::new(k, v as i64));
                    }
                }
                let failed = "context creation failed";
                self.call_span("llama.context_create", &c.origin, attrs, c.ok, failed);
            }
            Observation::Request(r) => self.request(r),
            Observation::Traced(t) => self.traced(t),
            Observation::Released { pid } => self.release(*pid),
            _ => {}
        }
    }

    fn tick(&mut self, now: &Snapshot) {
        self.gpus.set(now.gpus.clone());
        self.retiring.retain(|h| !h.is_finished());
        let failures = self.report();
        if self.last_log.elapsed() < self.log_interval {
            return;
        }
        if failures > self.logged_failures {
            tracing::warn!(
                "OTLP export to {} failing: {} failed exports in the last {:.0} s ({} in all); last error: {}",
                self.settings.endpoint_shown,
                failures - self.logged_failures,
                self.last_log.elapsed().as_secs_f64(),
                failures,
                self.last_error()
            );
        }
        self.logged_failures = failures;
        self.last_log = Instant::now();
    }

    fn finish(&mut self, _: &Snapshot) -> anyhow::Result<()> {
        // Exports what is queued (bounded by the timeouts; the receiver may be down): the
        // processes' providers side by side, then llamaprobe's, then the shared exporters.
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.release(pid);
        }
        self.shared.shutdown(SHUTDOWN_TIMEOUT);
        for h in self.retiring.drain(..) {
            let _ = h.join();
        }
        if let Ok(spans) = self.exporters.spans.try_lock() {
            let _ = spans.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        let _ = self
            .exporters
            .metrics
            .shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let failures = self.report();
        let f = &self.failures;
        let (exported, failed) = (
            f.spans_exported.load(Ordering::Relaxed),
            f.spans_failed.load(Ordering::Relaxed),
        );
        if failures > 0 || exported + failed < self.spans_sent {
            eprintln!(
                "llamaprobe: OTLP: {} spans sent, {exported} exported, {failed} in failed exports, {} dropped in the queue; {failures} failed exports (last error: {})",
                self.spans_sent,
                self.spans_sent.saturating_sub(exported + failed),
                self.last_error()
            );
        }
        Ok(())
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        // Dropping a runtime inside the session's async context would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        otlp: Options,
    }

    fn opts(args: &[&str]) -> Options {
        let mut v = vec!["llamaprobe"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().otlp
    }

    #[test]
    fn off_without_an_endpoint() {
        let none = |_: &str| None;
        assert_eq!(Settings::resolve_with(&opts(&[]), none).unwrap(), None);
    }

    #[test]
    fn endpoint_and_protocol_from_cli_then_env() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/protobuf".to_string()),
            _ => None,
        };
        let s = Settings::resolve_with(&opts(&[]), env).unwrap().unwrap();
        assert_eq!(s.endpoint, None);
        assert_eq!(s.endpoint_shown, "http://collector:4318");
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        let s = Settings::resolve_with(
            &opts(&[
                "--otlp-endpoint",
                "http://127.0.0.1:4317",
                "--otlp-protocol",
                "grpc",
                "--otlp-sample-ratio",
                "0.25",
                "--otlp-step-spans",
            ]),
            env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.sample_ratio, Some(0.25));
        assert!(s.step_spans);
        let s = Settings::resolve_with(&opts(&["--otlp-endpoint", "http://x:4317"]), |_| None)
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::Grpc);
        assert!(Settings::resolve_with(
            &opts(&[
                "--otlp-endpoint",
                "http://x:4317",
                "--otlp-sample-ratio",
                "2"
            ]),
            |_| None
        )
        .is_err());
    }

    #[test]
    fn a_processs_resource_says_who_it_is_and_names_llamaprobe_as_the_distro() {
        let t = TracedProcess {
            pid: 4242,
            name: "llama-server".into(),
            generation: crate::catalog::Generation::Classic,
            request_mode: crate::model::Mode::BatchView,
            probes_attached: 0,
            layouts_by: "pid",
            identity: crate::model::ProcessIdentity {
                labels: vec![
                    ("exe", "llama-server".into()),
                    ("container_id", "abc123".into()),
                    ("k8s_namespace", "ml".into()),
                    ("k8s_pod", "chat-0".into()),
                    ("k8s_container", "server".into()),
                ],
                service_name: "chat".into(),
            },
        };
        let host = vec![
            KeyValue::new("host.name", "node-1"),
            KeyValue::new("k8s.node.name", "node-1"),
        ];
        let attrs = process_attributes(&t, &host);
        let get = |k: &str| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        for (k, v) in [
            ("service.name", "chat"),
            ("process.pid", "4242"),
            ("process.executable.name", "llama-server"),
            ("container.id", "abc123"),
            ("k8s.namespace.name", "ml"),
            ("k8s.pod.name", "chat-0"),
            ("k8s.container.name", "server"),
            ("host.name", "node-1"),
            ("k8s.node.name", "node-1"),
            ("telemetry.distro.name", "llamaprobe"),
            ("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
        ] {
            assert_eq!(get(k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(get("service.version"), None);
        // Without a service name, the program's.
        let mut t = t;
        t.identity.service_name.clear();
        assert_eq!(
            process_attributes(&t, &[])[0].value.to_string(),
            "llama-server"
        );
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_protocol("grpc"), Ok(Protocol::Grpc));
        assert_eq!(parse_protocol("http"), Ok(Protocol::HttpProtobuf));
        assert_eq!(parse_protocol("http/protobuf"), Ok(Protocol::HttpProtobuf));
        assert!(parse_protocol("http/json").is_err());
    }
}
