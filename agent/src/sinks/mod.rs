//! Sinks: where observations go. Each sink is one module behind [`Sink`].

pub mod events_out;
pub mod otlp;
pub mod prometheus;
pub mod summary;
pub mod terminal;
pub mod trace_file;

use crate::model::Observation;

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
    pub unserved: crate::model::Unserved,
    /// Tasks llama-server accepted that no slot has taken yet (by task id).
    pub tasks_waiting: u64,
}

/// A consumer of observations.
pub trait Sink {
    /// One observation, in ring-buffer order. Must not block.
    fn observe(&mut self, obs: &Observation);
    /// Called about once a second with the agent's own counters.
    fn tick(&mut self, _stats: &SelfStats) {}
    /// Called once at the end.
    fn finish(&mut self, _stats: &SelfStats) -> anyhow::Result<()> {
        Ok(())
    }
}
