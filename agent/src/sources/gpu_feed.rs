//! The hand-off of GPU readings from the sampler to other exporters.
//!
//! [`ResourceSampler`](super::ResourceSampler) reads NVML once per round and publishes what it
//! read into a [`GpuFeed`]; an exporter that holds a clone (the OTLP sink's observable
//! instruments) reads the latest round whenever it collects. Neither side waits on the other:
//! publishing swaps one `Arc` under a mutex, reading clones it.

use std::sync::{Arc, Mutex};

use super::nvml::GpuSample;

/// The GPU readings of the latest sampling round, shared between the sampler (writer) and the
/// exporters (readers). Each [`GpuSample`] is as NVML gave it (a field NVML could not read is
/// `None`), except that [`GpuSample::processes`] lists only the traced processes.
#[derive(Clone, Debug, Default)]
pub struct GpuFeed(Arc<Mutex<Arc<Vec<GpuSample>>>>);

impl GpuFeed {
    /// Replaces the latest round.
    pub fn publish(&self, samples: Vec<GpuSample>) {
        let samples = Arc::new(samples);
        match self.0.lock() {
            Ok(mut latest) => *latest = samples,
            Err(poisoned) => *poisoned.into_inner() = samples,
        }
    }

    /// The latest round (empty before the first).
    pub fn latest(&self) -> Arc<Vec<GpuSample>> {
        match self.0.lock() {
            Ok(latest) => latest.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::nvml::GpuIdentity;
    use super::*;

    fn sample(index: u32, power: Option<f64>) -> GpuSample {
        GpuSample {
            id: GpuIdentity {
                index,
                uuid: format!("GPU-{index}"),
                name: "g".into(),
            },
            utilization: None,
            memory_used_bytes: None,
            memory_total_bytes: None,
            temperature_celsius: None,
            power_watts: power,
            sm_clock_hertz: None,
            throttle_reasons: None,
            processes: None,
        }
    }

    #[test]
    fn readers_see_the_latest_round() {
        let feed = GpuFeed::default();
        let reader = feed.clone();
        assert!(reader.latest().is_empty());
        feed.publish(vec![sample(0, Some(10.0))]);
        let first = reader.latest();
        feed.publish(vec![sample(0, None), sample(1, Some(2.0))]);
        // A round already read stays as it was.
        assert_eq!(*first, [sample(0, Some(10.0))]);
        assert_eq!(*reader.latest(), [sample(0, None), sample(1, Some(2.0))]);
    }
}
