//! What the sinks get besides observations: about once a second, and once at the end, a
//! [`Snapshot`] of the agent's own counters and of the resource readings.

use std::sync::Arc;

use super::{
    request::Unserved,
    resources::{GpuSample, ProcessSample},
};

/// Agent-side state the sinks report next to the observations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelfStats {
    pub probes_attached: u64,
    /// Events the ring buffer had no room for.
    pub lost_ringbuf: u64,
    /// Calls whose entry could not be recorded.
    pub lost_entry: u64,
    /// Records that could not be decoded.
    pub undecodable: u64,
    /// Requests in progress.
    pub requests_active: u64,
    /// Work llama-server accepted that never became a request.
    pub unserved: Unserved,
    /// Tasks llama-server accepted that no slot has taken yet (by task id).
    pub tasks_waiting: u64,
    /// Warm-up decodes seen (start-up, not requests).
    pub warmups: u64,
    /// CPU samples received (`--profile-cpu`).
    pub cpu_samples: u64,
}

impl SelfStats {
    /// Events lost in the kernel, for any reason.
    pub fn lost(&self) -> u64 {
        self.lost_ringbuf + self.lost_entry
    }
}

/// One traced process's readings.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessReading {
    pub pid: u32,
    /// Its model label (as on its observations).
    pub model: Arc<str>,
    pub sample: ProcessSample,
    /// Its requests in progress.
    pub requests_active: u64,
    /// Its tasks accepted that no slot has taken yet.
    pub tasks_waiting: u64,
}

/// The state of things at one tick (or at the end).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub stats: SelfStats,
    /// The GPUs, their process lists restricted to the traced processes (empty without NVML).
    pub gpus: Arc<Vec<GpuSample>>,
    /// The traced processes still running.
    pub processes: Vec<ProcessReading>,
    /// At the end: why the session ended ("the process exited", "interrupted", …).
    pub ended_by: Option<&'static str>,
}
