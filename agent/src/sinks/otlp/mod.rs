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
//! Nothing here blocks the event loop: spans go to the SDK's batch processor (a bounded queue,
//! exported from its own thread; a full queue drops spans) and metrics to a periodic reader
//! (its own thread). The gRPC client (tonic) runs its connections on a small tokio runtime of
//! its own, not on the session's current-thread runtime. Failed exports are counted (in the
//! Prometheus registry) and logged at most once per interval.

use std::{
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
    trace::{BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
    Resource,
};
use prometheus::{IntCounterVec, Opts, Registry};

use super::{names::*, Sink, Snapshot};
use crate::model::{clock, Observation, Request};

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

/// The GenAI histograms.
struct Instruments {
    duration: Histogram<f64>,
    ttft: Histogram<f64>,
    tpot: Histogram<f64>,
    tokens: Histogram<u64>,
}

/// The OTLP sink.
pub struct Otlp {
    settings: Settings,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    tracer: SdkTracer,
    instruments: Instruments,
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
        let span_exporter = CountedSpans {
            inner: span_exporter,
            failures: failures.clone(),
        };
        let metric_exporter = CountedMetrics {
            inner: metric_exporter,
            failures: failures.clone(),
        };
        // Bounded queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048), exported from its own thread.
        let processor = BatchSpanProcessor::builder(span_exporter).build();
        let mut tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone());
        if let Some(r) = settings.sample_ratio {
            tracer_provider = tracer_provider.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(r),
            )));
        }
        let tracer_provider = tracer_provider.build();
        let tracer = tracer_provider.tracer("llamaprobe");

        let mut reader = PeriodicReader::builder(metric_exporter);
        if std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_none() {
            reader = reader.with_interval(Duration::from_secs(10));
        }
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource)
            .build();
        let meter = meter_provider.meter("llamaprobe");
        let seconds = |name: &'static str, desc: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        let instruments = Instruments {
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
        };
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
            tracer_provider,
            meter_provider,
            tracer,
            instruments,
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

    /// Starts a span at a probe timestamp.
    fn start_span(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        start_ns: u64,
        attributes: Vec<KeyValue>,
        parent: &Context,
    ) -> opentelemetry_sdk::trace::Span {
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(self.wall(start_ns))
            .with_attributes(attributes);
        self.tracer.build_with_context(builder, parent)
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
        self.instruments.duration.record(r.duration_s(), &common);
        if let Some(t) = r.ttft_s() {
            self.instruments.ttft.record(t, &common);
        }
        if let Some(t) = r.tpot_s() {
            self.instruments.tpot.record(t, &common);
        }
        for (kind, n) in [("input", r.input_tokens()), ("output", r.generated_tokens)] {
            let mut a = common.clone();
            a.push(KeyValue::new("gen_ai.token.type", kind));
            self.instruments.tokens.record(n as u64, &a);
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
            KeyValue::new("process.pid", r.pid as i64),
        ]);
        if let Some(t) = r.task_id {
            attrs.push(KeyValue::new("llama.request.task_id", t as i64));
        }
        if let Some(t) = r.ttft_s() {
            attrs.push(KeyValue::new("gen_ai.server.time_to_first_token", t));
        }
        if let Some(t) = r.queue_s() {
            attrs.push(KeyValue::new("llama.request.queue_seconds", t));
        }
        let span = self.start_span(
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
            let mut queue = self.start_span("queue", SpanKind::Internal, q, vec![], &cx);
            self.end_span(&mut queue, r.start_ns);
        }
        let prompt_end = r.first_token_ns.or(r.prompt_end_ns).unwrap_or(r.end_ns);
        let mut prompt = self.start_span(
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
            let mut step =
                self.start_span("llama.decode", SpanKind::Internal, s.start_ns, attrs, &cx);
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
            _ => {}
        }
    }

    fn tick(&mut self, now: &Snapshot) {
        self.gpus.set(now.gpus.clone());
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
        // Exports what is queued (bounded by the timeouts; the receiver may be down).
        if let Err(e) = self
            .tracer_provider
            .shutdown_with_timeout(Duration::from_secs(10))
        {
            tracing::warn!("OTLP: flushing spans: {e}");
        }
        if let Err(e) = self
            .meter_provider
            .shutdown_with_timeout(Duration::from_secs(10))
        {
            tracing::warn!("OTLP: flushing metrics: {e}");
        }
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
    fn protocols() {
        assert_eq!(parse_protocol("grpc"), Ok(Protocol::Grpc));
        assert_eq!(parse_protocol("http"), Ok(Protocol::HttpProtobuf));
        assert_eq!(parse_protocol("http/protobuf"), Ok(Protocol::HttpProtobuf));
        assert!(parse_protocol("http/json").is_err());
    }
}
