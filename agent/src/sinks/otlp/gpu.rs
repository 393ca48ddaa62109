//! GPU metrics over OTLP, named per the OpenTelemetry hardware semantic conventions
//! (`hw.gpu.*`, `hw.power`, `hw.temperature`; status: development), from the readings of each
//! tick's snapshot, kept in a [`Latest`]. This module only names and exports: it never calls
//! NVML. Each instrument is observable; its callback runs on the periodic reader's thread when
//! metrics are collected and reads the latest round. A field NVML could not
//! read is not observed, so its data point is absent (never zero), and a process or GPU that is
//! gone from the latest round disappears from the next export.
//!
//! | metric | instrument | unit | per |
//! |---|---|---|---|
//! | `hw.gpu.utilization` | gauge | `1` | GPU, `hw.gpu.task` = `general` |
//! | `hw.gpu.memory.usage` | up-down counter | `By` | GPU |
//! | `hw.gpu.memory.limit` | up-down counter | `By` | GPU |
//! | `hw.gpu.memory.utilization` | gauge | `1` | GPU (usage / limit) |
//! | `hw.power` | gauge | `W` | GPU |
//! | `hw.temperature` | gauge | `Cel` | the GPU's die sensor |
//! | `llamacpp.gpu.sm_clock` | gauge | `Hz` | GPU (no convention) |
//! | `llamacpp.gpu.throttle_reasons` | gauge | (bitmask) | GPU (no convention) |
//! | `llamacpp.gpu.process.memory.usage` | up-down counter | `By` | GPU and traced process (no convention) |

use opentelemetry::{
    metrics::{AsyncInstrument, Meter},
    KeyValue,
};

use std::sync::{Arc, Mutex};

use crate::model::GpuSample;

/// The latest round of GPU readings, shared with the instruments' callbacks (which run on the
/// SDK's reader thread): a swap of one `Arc`, never a wait on the event loop.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<Arc<Vec<GpuSample>>>>);

impl Latest {
    /// Replaces the readings.
    pub fn set(&self, samples: Arc<Vec<GpuSample>>) {
        if let Ok(mut l) = self.0.lock() {
            *l = samples;
        }
    }

    /// The readings of the latest round (empty before the first, and without GPUs).
    pub fn get(&self) -> Arc<Vec<GpuSample>> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// `hw.vendor` of every GPU NVML sees.
const VENDOR: &str = "NVIDIA";
/// `hw.temperature.sensor_location` of NVML's `NVML_TEMPERATURE_GPU` sensor (the GPU die).
const SENSOR_LOCATION: &str = "GPU_DIE";

/// `hw.id` of a GPU: its UUID, or `nvml_gpu_<index>` when NVML could not tell the UUID.
pub fn gpu_id(s: &GpuSample) -> String {
    if s.id.uuid.is_empty() {
        format!("nvml_gpu_{}", s.id.index)
    } else {
        s.id.uuid.clone()
    }
}

/// Attributes of a GPU's data points: `hw.id`, `hw.type` = `gpu`, `hw.vendor`, `hw.model` and
/// `hw.name` (the NVML name, when known) and `gpu` (the NVML index).
pub fn gpu_attributes(s: &GpuSample) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("hw.id", gpu_id(s)),
        KeyValue::new("hw.type", "gpu"),
        KeyValue::new("hw.vendor", VENDOR),
    ];
    if !s.id.name.is_empty() {
        a.push(KeyValue::new("hw.model", s.id.name.clone()));
        a.push(KeyValue::new("hw.name", s.id.name.clone()));
    }
    a.push(KeyValue::new("gpu", i64::from(s.id.index)));
    a
}

/// Attributes of a GPU's temperature: the conventions make the sensor a component of its own
/// (`hw.type` = `temperature`), with `hw.id` = `<GPU hw.id>_temperature` and `hw.parent` = the
/// GPU's `hw.id`; `gpu` as on the GPU's own points.
pub fn temperature_attributes(s: &GpuSample) -> Vec<KeyValue> {
    let gpu = gpu_id(s);
    vec![
        KeyValue::new("hw.id", format!("{gpu}_temperature")),
        KeyValue::new("hw.type", "temperature"),
        KeyValue::new("hw.parent", gpu),
        KeyValue::new("hw.temperature.sensor_location", SENSOR_LOCATION),
        KeyValue::new("gpu", i64::from(s.id.index)),
    ]
}

/// How an instrument reads its value(s) from one GPU: `(value, attributes)` per data point.
type Points<T> = fn(&GpuSample) -> Vec<(T, Vec<KeyValue>)>;

/// One data point with the GPU's attributes, if NVML gave the value.
fn per_gpu<T>(v: Option<T>, s: &GpuSample) -> Vec<(T, Vec<KeyValue>)> {
    v.map(|v| vec![(v, gpu_attributes(s))]).unwrap_or_default()
}

/// The callback of an instrument: every point of every GPU of the latest round.
fn observe_all<T: Copy>(feed: Latest, points: Points<T>) -> impl Fn(&dyn AsyncInstrument<T>) {
    move |o| {
        for s in feed.get().iter() {
            for (v, attrs) in points(s) {
                o.observe(v, &attrs);
            }
        }
    }
}

/// Bytes as an OTLP integer (absent if beyond `i64`, which no GPU has).
fn bytes(v: Option<u64>) -> Option<i64> {
    v.and_then(|v| i64::try_from(v).ok())
}

/// Registers the GPU instruments on `meter`, observing `feed`.
pub fn register(meter: &Meter, feed: &Latest) {
    let f64_gauge = |name: &'static str, unit: &'static str, desc: &'static str, p: Points<f64>| {
        meter
            .f64_observable_gauge(name)
            .with_unit(unit)
            .with_description(desc)
            .with_callback(observe_all(feed.clone(), p))
            .build();
    };
    let i64_sum = |name: &'static str, unit: &'static str, desc: &'static str, p: Points<i64>| {
        meter
            .i64_observable_up_down_counter(name)
            .with_unit(unit)
            .with_description(desc)
            .with_callback(observe_all(feed.clone(), p))
            .build();
    };
    f64_gauge(
        "hw.gpu.utilization",
        "1",
        "Fraction of time spent in a specific task",
        |s| {
            s.utilization
                .map(|u| {
                    let mut a = gpu_attributes(s);
                    a.push(KeyValue::new("hw.gpu.task", "general"));
                    vec![(u, a)]
                })
                .unwrap_or_default()
        },
    );
    i64_sum("hw.gpu.memory.usage", "By", "GPU memory used", |s| {
        per_gpu(bytes(s.memory_used_bytes), s)
    });
    i64_sum("hw.gpu.memory.limit", "By", "Size of the GPU memory", |s| {
        per_gpu(bytes(s.memory_total_bytes), s)
    });
    f64_gauge(
        "hw.gpu.memory.utilization",
        "1",
        "Fraction of GPU memory used",
        |s| {
            let ratio = match (s.memory_used_bytes, s.memory_total_bytes) {
                (Some(used), Some(total)) if total > 0 => Some(used as f64 / total as f64),
                _ => None,
            };
            per_gpu(ratio, s)
        },
    );
    f64_gauge(
        "hw.power",
        "W",
        "Instantaneous power consumed by the component",
        |s| per_gpu(s.power_watts, s),
    );
    f64_gauge(
        "hw.temperature",
        "Cel",
        "Temperature in degrees Celsius",
        |s| {
            s.temperature_celsius
                .map(|t| vec![(t, temperature_attributes(s))])
                .unwrap_or_default()
        },
    );
    f64_gauge(
        "llamacpp.gpu.sm_clock",
        "Hz",
        "GPU streaming-multiprocessor clock",
        |s| per_gpu(s.sm_clock_hertz, s),
    );
    meter
        .u64_observable_gauge("llamacpp.gpu.throttle_reasons")
        .with_description(
            "Bitmask of the GPU's current clock throttle reasons (NVML nvmlClocksThrottleReason*; 0 = none, 1 = idle)",
        )
        .with_callback(observe_all(feed.clone(), |s| {
            per_gpu(s.throttle_reasons, s)
        }))
        .build();
    i64_sum(
        "llamacpp.gpu.process.memory.usage",
        "By",
        "GPU memory used by a traced process on a GPU (NVML compute and graphics process lists)",
        |s| {
            s.processes
                .as_deref()
                .unwrap_or_default()
                .iter()
                .filter_map(|p| {
                    let v = i64::try_from(p.used_memory_bytes).ok()?;
                    let mut a = gpu_attributes(s);
                    a.push(KeyValue::new("process.pid", i64::from(p.pid)));
                    Some((v, a))
                })
                .collect()
        },
    );
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        metrics::{
            data::{AggregatedMetrics, MetricData, ResourceMetrics},
            exporter::PushMetricExporter,
            PeriodicReader, SdkMeterProvider, Temporality,
        },
    };

    use super::*;
    use crate::model::{GpuIdentity, GpuProcess};

    fn sample(index: u32, uuid: &str, name: &str) -> GpuSample {
        GpuSample::unread(GpuIdentity {
            index,
            uuid: uuid.into(),
            name: name.into(),
        })
    }

    fn keys(a: &[KeyValue]) -> Vec<(String, String)> {
        a.iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect()
    }

    fn pairs<const N: usize>(p: [(&str, &str); N]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_gpu_is_identified_by_its_uuid_else_its_index() {
        let s = sample(1, "GPU-abc", "Tesla T4");
        assert_eq!(
            keys(&gpu_attributes(&s)),
            pairs([
                ("hw.id", "GPU-abc"),
                ("hw.type", "gpu"),
                ("hw.vendor", "NVIDIA"),
                ("hw.model", "Tesla T4"),
                ("hw.name", "Tesla T4"),
                ("gpu", "1"),
            ])
        );
        let s = sample(1, "", "");
        assert_eq!(gpu_id(&s), "nvml_gpu_1");
        assert_eq!(
            keys(&temperature_attributes(&s)),
            pairs([
                ("hw.id", "nvml_gpu_1_temperature"),
                ("hw.type", "temperature"),
                ("hw.parent", "nvml_gpu_1"),
                ("hw.temperature.sensor_location", "GPU_DIE"),
                ("gpu", "1"),
            ])
        );
    }

    /// (metric, hw.id, process.pid) → (kind, unit, value) of the last export.
    type Points = BTreeMap<(String, String, Option<String>), (&'static str, String, f64)>;

    /// An exporter keeping the data points of the last export.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Points>>);

    impl PushMetricExporter for Recorder {
        async fn export(&self, rm: &ResourceMetrics) -> OTelSdkResult {
            let mut out = self.0.lock().unwrap();
            out.clear();
            for m in rm.scope_metrics().flat_map(|s| s.metrics()) {
                let mut put = |kind, value: f64, attrs: Vec<&KeyValue>| {
                    let get = |k: &str| {
                        attrs
                            .iter()
                            .find(|kv| kv.key.as_str() == k)
                            .map(|kv| kv.value.to_string())
                    };
                    let key = (
                        m.name().to_string(),
                        get("hw.id").unwrap(),
                        get("process.pid"),
                    );
                    out.insert(key, (kind, m.unit().to_string(), value));
                };
                match m.data() {
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => g
                        .data_points()
                        .for_each(|p| put("gauge", p.value(), p.attributes().collect())),
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                        .data_points()
                        .for_each(|p| put("gauge", p.value() as f64, p.attributes().collect())),
                    AggregatedMetrics::I64(MetricData::Sum(s)) => {
                        assert!(!s.is_monotonic(), "{}", m.name());
                        s.data_points()
                            .for_each(|p| put("sum", p.value() as f64, p.attributes().collect()))
                    }
                    _ => panic!("{}: unexpected kind", m.name()),
                }
            }
            Ok(())
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
        fn temporality(&self) -> Temporality {
            Temporality::Cumulative
        }
    }

    #[test]
    fn every_reading_is_one_point_and_a_missing_one_none() {
        let rec = Recorder::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(rec.clone()).build())
            .build();
        let feed = Latest::default();
        register(&provider.meter("test"), &feed);

        let mut full = sample(0, "GPU-a", "A");
        full.utilization = Some(0.37);
        full.memory_used_bytes = Some(3 << 30);
        full.memory_total_bytes = Some(16 << 30);
        full.temperature_celsius = Some(61.0);
        full.power_watts = Some(123.456);
        full.sm_clock_hertz = Some(1.41e9);
        full.throttle_reasons = Some(5);
        full.processes = Some(vec![GpuProcess {
            pid: 42,
            used_memory_bytes: 512 << 20,
        }]);
        // NVML could tell nothing but the memory of this one.
        let mut bare = sample(1, "GPU-b", "B");
        bare.memory_used_bytes = Some(0);
        bare.memory_total_bytes = Some(8 << 30);
        feed.set(Arc::new(vec![full.clone(), bare]));
        provider.force_flush().unwrap();

        let got = rec.0.lock().unwrap().clone();
        let key = |m: &str, id: &str, pid: Option<&str>| {
            (m.to_string(), id.to_string(), pid.map(String::from))
        };
        let want: Points = [
            (
                key("hw.gpu.utilization", "GPU-a", None),
                ("gauge", "1", 0.37),
            ),
            (
                key("hw.gpu.memory.usage", "GPU-a", None),
                ("sum", "By", (3u64 << 30) as f64),
            ),
            (
                key("hw.gpu.memory.limit", "GPU-a", None),
                ("sum", "By", (16u64 << 30) as f64),
            ),
            (
                key("hw.gpu.memory.utilization", "GPU-a", None),
                ("gauge", "1", 0.1875),
            ),
            (key("hw.power", "GPU-a", None), ("gauge", "W", 123.456)),
            (
                key("hw.temperature", "GPU-a_temperature", None),
                ("gauge", "Cel", 61.0),
            ),
            (
                key("llamacpp.gpu.sm_clock", "GPU-a", None),
                ("gauge", "Hz", 1.41e9),
            ),
            (
                key("llamacpp.gpu.throttle_reasons", "GPU-a", None),
                ("gauge", "", 5.0),
            ),
            (
                key("llamacpp.gpu.process.memory.usage", "GPU-a", Some("42")),
                ("sum", "By", (512u64 << 20) as f64),
            ),
            (
                key("hw.gpu.memory.usage", "GPU-b", None),
                ("sum", "By", 0.0),
            ),
            (
                key("hw.gpu.memory.limit", "GPU-b", None),
                ("sum", "By", (8u64 << 30) as f64),
            ),
            (
                key("hw.gpu.memory.utilization", "GPU-b", None),
                ("gauge", "1", 0.0),
            ),
        ]
        .into_iter()
        .map(|(k, (kind, unit, v))| (k, (kind, unit.to_string(), v)))
        .collect();
        assert_eq!(got, want);

        // The next round: GPU 1 and the process are gone, and so are their points.
        full.processes = Some(vec![]);
        feed.set(Arc::new(vec![full]));
        provider.force_flush().unwrap();
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 8, "{got:#?}");
        assert!(got
            .keys()
            .all(|(_, id, pid)| id.starts_with("GPU-a") && pid.is_none()));
        provider.shutdown().unwrap();
    }
}
