//! Prometheus exposition of the resources: GPUs (NVML), the traced processes (procfs) and their
//! models (GGUF metadata), registered into the agent's registry.
//!
//! GPU series have `gpu` (NVML index), `uuid` and `name`; process and model series have `pid`
//! and `model`. A series whose source went away (a process that exited, a GPU process that
//! ended, a field NVML stopped reporting) is removed rather than left stale.

use std::collections::{HashMap, HashSet};

use prometheus::{
    core::{Collector, MetricVec, MetricVecBuilder},
    CounterVec, GaugeVec, Opts, Registry,
};

use crate::{
    model::{GpuSample, ModelInfo, Snapshot},
    sources::identity::sanitize_path_label,
};

/// Errors of creating the metric families.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A family could not be created or registered (e.g. the name is taken in the registry).
    #[error("metric {name}: {source}")]
    Prometheus {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
}

/// A family with labels (`GaugeVec`, `CounterVec`).
trait Family {
    type Metric;
    fn series(&self, labels: &[&str]) -> Self::Metric;
    fn remove(&self, labels: &[String]);
}

impl<B: MetricVecBuilder> Family for MetricVec<B> {
    type Metric = B::M;
    fn series(&self, labels: &[&str]) -> B::M {
        self.with_label_values(labels)
    }
    fn remove(&self, labels: &[String]) {
        let _ = self.remove_label_values(labels);
    }
}

/// Series of one family whose label sets are tracked, so that those not set in a round are
/// removed at its end.
struct Tracked<F: Family> {
    vec: F,
    live: HashSet<Vec<String>>,
    seen: HashSet<Vec<String>>,
}

impl<F: Family> Tracked<F> {
    fn new(vec: F) -> Self {
        Self {
            vec,
            live: HashSet::new(),
            seen: HashSet::new(),
        }
    }

    /// The series of `labels`, kept by this round.
    fn get(&mut self, labels: &[&str]) -> F::Metric {
        self.seen
            .insert(labels.iter().map(|s| s.to_string()).collect());
        self.vec.series(labels)
    }

    /// Removes the series not set since the last sweep.
    fn sweep(&mut self) {
        for gone in self.live.difference(&self.seen) {
            self.vec.remove(gone);
        }
        self.live = std::mem::take(&mut self.seen);
    }
}

impl Tracked<GaugeVec> {
    fn set(&mut self, labels: &[&str], v: f64) {
        self.get(labels).set(v);
    }
}

/// Sets a counter to an absolute value read elsewhere (a lower value is a restart).
fn set_counter(c: &prometheus::Counter, v: f64) {
    let cur = c.get();
    if v >= cur {
        c.inc_by(v - cur);
    } else {
        c.reset();
        c.inc_by(v.max(0.0));
    }
}

type Gauges = Tracked<GaugeVec>;
type Counters = Tracked<CounterVec>;

const GPU: &[&str] = &["gpu", "uuid", "name"];
const PROC: &[&str] = &["pid", "model"];

struct Families {
    gpu_utilization: Gauges,
    gpu_memory_used: Gauges,
    gpu_memory_total: Gauges,
    gpu_temperature: Gauges,
    gpu_power: Gauges,
    gpu_sm_clock: Gauges,
    gpu_throttle: Gauges,
    gpu_process_memory: Gauges,
    process_rss: Gauges,
    process_cpu: Counters,
    process_threads: Gauges,
    model_info: GaugeVec,
    model_size: GaugeVec,
    model_parameters: GaugeVec,
}

impl Families {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let reg = |name: &'static str, c: Box<dyn Collector>| {
            registry
                .register(c)
                .map_err(|source| MetricsError::Prometheus { name, source })
        };
        let gauge = |name: &'static str, help: &str, labels: &[&str]| {
            let v = GaugeVec::new(Opts::new(name, help), labels)
                .map_err(|source| MetricsError::Prometheus { name, source })?;
            reg(name, Box::new(v.clone()))?;
            Ok::<_, MetricsError>(v)
        };
        let tracked = |name, help, labels| gauge(name, help, labels).map(Tracked::new);
        let cpu_name = "llamacpp_process_cpu_seconds_total";
        let cpu = CounterVec::new(
            Opts::new(
                cpu_name,
                "CPU time of the llama.cpp process, user + system, seconds (from /proc/PID/stat).",
            ),
            PROC,
        )
        .map_err(|source| MetricsError::Prometheus {
            name: cpu_name,
            source,
        })?;
        reg(cpu_name, Box::new(cpu.clone()))?;
        Ok(Self {
            gpu_utilization: tracked(
                "llamacpp_gpu_utilization_ratio",
                "Share of the last NVML sample period during which a kernel ran on the GPU (0-1).",
                GPU,
            )?,
            gpu_memory_used: tracked(
                "llamacpp_gpu_memory_used_bytes",
                "GPU memory allocated, bytes (all processes).",
                GPU,
            )?,
            gpu_memory_total: tracked(
                "llamacpp_gpu_memory_total_bytes",
                "GPU memory installed, bytes.",
                GPU,
            )?,
            gpu_temperature: tracked(
                "llamacpp_gpu_temperature_celsius",
                "GPU core temperature, degrees Celsius.",
                GPU,
            )?,
            gpu_power: tracked(
                "llamacpp_gpu_power_watts",
                "GPU power draw, watts.",
                GPU,
            )?,
            gpu_sm_clock: tracked(
                "llamacpp_gpu_sm_clock_hertz",
                "GPU streaming-multiprocessor clock, hertz.",
                GPU,
            )?,
            gpu_throttle: tracked(
                "llamacpp_gpu_throttle_reasons",
                "Bitmask of the GPU's current clock throttle reasons (NVML nvmlClocksThrottleReason*; 0 = none, 1 = idle).",
                GPU,
            )?,
            gpu_process_memory: tracked(
                "llamacpp_gpu_process_memory_bytes",
                "GPU memory used by a traced process on a GPU, bytes (NVML compute and graphics process lists).",
                &["gpu", "uuid", "name", "pid"],
            )?,
            process_rss: tracked(
                "llamacpp_process_resident_memory_bytes",
                "Resident memory of the llama.cpp process, bytes (includes touched pages of an mmapped model).",
                PROC,
            )?,
            process_cpu: Tracked::new(cpu),
            process_threads: tracked(
                "llamacpp_process_threads",
                "Threads of the llama.cpp process.",
                PROC,
            )?,
            model_info: gauge(
                "llamacpp_model_info",
                "The model a llama.cpp process loaded (value 1), from its GGUF metadata.",
                &[
                    "pid",
                    "model",
                    "architecture",
                    "file_type",
                    "parameters",
                    "context_length",
                    "path",
                ],
            )?,
            model_size: gauge(
                "llamacpp_model_size_bytes",
                "Size of the model file (all shards), bytes.",
                PROC,
            )?,
            model_parameters: gauge(
                "llamacpp_model_parameters",
                "Parameters of the model (elements of all its tensors).",
                PROC,
            )?,
        })
    }

    /// The GPU series of one round (`processes` already restricted to the traced pids).
    fn set_gpus(&mut self, samples: &[GpuSample]) {
        for s in samples {
            let index = s.id.index.to_string();
            let labels = [index.as_str(), s.id.uuid.as_str(), s.id.name.as_str()];
            let gauges = [
                (&mut self.gpu_utilization, s.utilization),
                (
                    &mut self.gpu_memory_used,
                    s.memory_used_bytes.map(|v| v as f64),
                ),
                (
                    &mut self.gpu_memory_total,
                    s.memory_total_bytes.map(|v| v as f64),
                ),
                (&mut self.gpu_temperature, s.temperature_celsius),
                (&mut self.gpu_power, s.power_watts),
                (&mut self.gpu_sm_clock, s.sm_clock_hertz),
                (&mut self.gpu_throttle, s.throttle_reasons.map(|v| v as f64)),
            ];
            for (g, v) in gauges {
                if let Some(v) = v {
                    g.set(&labels, v);
                }
            }
            for p in s.processes.as_deref().unwrap_or_default() {
                let pid = p.pid.to_string();
                self.gpu_process_memory.set(
                    &[labels[0], labels[1], labels[2], pid.as_str()],
                    p.used_memory_bytes as f64,
                );
            }
        }
    }

    fn sweep(&mut self) {
        for g in [
            &mut self.gpu_utilization,
            &mut self.gpu_memory_used,
            &mut self.gpu_memory_total,
            &mut self.gpu_temperature,
            &mut self.gpu_power,
            &mut self.gpu_sm_clock,
            &mut self.gpu_throttle,
            &mut self.gpu_process_memory,
            &mut self.process_rss,
            &mut self.process_threads,
        ] {
            g.sweep();
        }
        self.process_cpu.sweep();
    }
}

/// Label values of the model series of a pid.
struct ModelSeries {
    info: Vec<String>,
    model: String,
}

/// The resource series: set from each tick's snapshot (GPUs, processes) and from the models'
/// facts as they are learnt.
pub struct ResourceSeries {
    families: Option<Families>,
    models: HashMap<u32, ModelSeries>,
}

impl ResourceSeries {
    /// Registers the families into `registry` (a name already taken there turns them off, with
    /// one warning).
    pub fn new(registry: &Registry) -> Self {
        let families = match Families::new(registry) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("resource metrics off: {e}");
                None
            }
        };
        Self {
            families,
            models: HashMap::new(),
        }
    }

    /// Declares the model of `pid` (replacing an earlier one).
    pub fn set_model(&mut self, pid: u32, model_label: &str, info: &ModelInfo) {
        let Some(f) = &self.families else { return };
        let pid_s = pid.to_string();
        if let Some(old) = self.models.remove(&pid) {
            let _ = f.model_info.remove_label_values(&old.info);
            let _ = f.model_size.remove_label_values(&[&pid_s, &old.model]);
            let _ = f
                .model_parameters
                .remove_label_values(&[&pid_s, &old.model]);
        }
        let labels = vec![
            pid_s.clone(),
            model_label.to_owned(),
            info.architecture.clone().unwrap_or_default(),
            info.file_type.map(|t| t.to_string()).unwrap_or_default(),
            info.parameters.to_string(),
            info.context_length
                .map(|c| c.to_string())
                .unwrap_or_default(),
            sanitize_path_label(&info.path.to_string_lossy()),
        ];
        f.model_info.with_label_values(&labels).set(1.0);
        f.model_size
            .with_label_values(&[&pid_s, model_label])
            .set(info.size_bytes as f64);
        f.model_parameters
            .with_label_values(&[&pid_s, model_label])
            .set(info.parameters as f64);
        self.models.insert(
            pid,
            ModelSeries {
                info: labels,
                model: model_label.to_owned(),
            },
        );
    }

    /// Removes the model series of `pid` (the process is gone; its process series go with the
    /// next round, which no longer reads it).
    pub fn forget(&mut self, pid: u32) {
        let (Some(f), Some(old)) = (&self.families, self.models.remove(&pid)) else {
            return;
        };
        let pid_s = pid.to_string();
        let _ = f.model_info.remove_label_values(&old.info);
        let _ = f.model_size.remove_label_values(&[&pid_s, &old.model]);
        let _ = f
            .model_parameters
            .remove_label_values(&[&pid_s, &old.model]);
    }

    /// The series of one round of readings: the processes and GPUs in `now`; a series whose
    /// source is no longer in it is removed.
    pub fn update(&mut self, now: &Snapshot) {
        let Some(f) = self.families.as_mut() else {
            return;
        };
        for p in &now.processes {
            let pid_s = p.pid.to_string();
            let labels = [pid_s.as_str(), &*p.model];
            f.process_rss.set(&labels, p.sample.rss_bytes as f64);
            f.process_threads.set(&labels, p.sample.threads as f64);
            set_counter(&f.process_cpu.get(&labels), p.sample.cpu_seconds);
        }
        f.set_gpus(&now.gpus);
        f.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn render(r: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    /// One round of readings of `pids` (no GPU), labelled with model "m".
    fn round(pids: &[u32]) -> Snapshot {
        let mut sampler =
            crate::sources::Sampler::new(Some("/nonexistent/libnvidia-ml.so.1".into()));
        assert!(!sampler.has_gpus());
        let (gpus, processes) = sampler.sample(pids);
        Snapshot {
            gpus: std::sync::Arc::new(gpus),
            processes: processes
                .into_iter()
                .map(|(pid, sample)| crate::model::ProcessReading {
                    pid,
                    model: "m".into(),
                    sample,
                    requests_active: 0,
                    tasks_waiting: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn series_of_a_process_that_is_gone_are_removed() {
        let r = Registry::new();
        let mut s = ResourceSeries::new(&r);
        let me = std::process::id();
        s.update(&round(&[me, 4_999_999]));
        let text = render(&r);
        let line = format!("llamacpp_process_threads{{model=\"m\",pid=\"{me}\"}}");
        assert!(text.contains(&line), "{text}");
        assert!(!text.contains("4999999"), "{text}");
        s.update(&round(&[]));
        let text = render(&r);
        assert!(!text.contains(&line), "{text}");
        assert!(!text.contains("llamacpp_gpu_"), "{text}");
    }

    #[test]
    fn model_info_labels_from_a_file_are_bounded_and_clean() {
        use crate::sources::{gguf, identity::LABEL_MAX_CHARS};
        let mut w = gguf::writer::Writer::new();
        w.string(
            "general.architecture",
            &format!("qw\u{202e}en\n{}", "2".repeat(500)),
        )
        .string("general.name", "\u{1b}[2Jname");
        let bytes = w.bytes(0);
        let meta = gguf::read_metadata(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
        let path = format!("/{}/\u{7}tiny.gguf", "d".repeat(300));
        let info = ModelInfo::from_metadata(path.into(), &meta, 0);
        let r = Registry::new();
        let mut s = ResourceSeries::new(&r);
        s.set_model(7, "tiny", &info);
        let text = render(&r);
        let line = text
            .lines()
            .find(|l| l.starts_with("llamacpp_model_info{"))
            .unwrap();
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            line[start..].split('"').next().unwrap().to_string()
        };
        let arch = label("architecture");
        assert!(arch.starts_with("qwen2222"), "{line}");
        assert_eq!(arch.chars().count(), LABEL_MAX_CHARS);
        let path = label("path");
        assert_eq!(path.chars().count(), LABEL_MAX_CHARS);
        assert!(
            path.starts_with('…') && path.ends_with("/tiny.gguf"),
            "{path}"
        );
        assert!(!line.contains('\u{1b}') && !line.contains('\u{7}') && !line.contains("\\n"));
    }

    #[test]
    fn a_counter_follows_an_absolute_value() {
        let c = prometheus::Counter::new("c", "c").unwrap();
        set_counter(&c, 2.5);
        set_counter(&c, 4.0);
        assert_eq!(c.get(), 4.0);
        set_counter(&c, 1.0); // a new process with a reused pid
        assert_eq!(c.get(), 1.0);
    }

    #[test]
    fn a_taken_name_turns_resource_metrics_off_without_panicking() {
        let r = Registry::new();
        let g = prometheus::Gauge::new("llamacpp_gpu_power_watts", "x").unwrap();
        r.register(Box::new(g)).unwrap();
        let mut s = ResourceSeries::new(&r);
        s.update(&round(&[std::process::id()]));
    }
}
