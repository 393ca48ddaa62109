//! What every observation of a call carries: who made it and when; and a sequence's use.

use std::sync::Arc;

/// Common facts of every observation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Origin {
    pub pid: u32,
    pub tid: u32,
    /// Model file stem of the process, once a load was seen.
    pub model: Arc<str>,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Origin {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
    pub fn seconds(&self) -> f64 {
        self.duration_ns() as f64 / 1e9
    }
}

/// A sequence's tokens after a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SeqUsed {
    pub seq_id: i32,
    pub used: u32,
}
