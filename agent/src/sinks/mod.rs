//! Sinks: where observations go. Each sink is one module behind [`Sink`], and owns its
//! command-line options (the `Options` of each, flattened into `app::cli`).
//!
//! Every sink gets every observation in ring-buffer order ([`Sink::observe`], which must not
//! block), a [`Snapshot`] about once a second ([`Sink::tick`]: the agent's counters and the
//! resource readings) and a last one at the end ([`Sink::finish`]).

pub mod events_out;
pub mod host_table;
pub mod names;
pub mod otlp;
pub mod profile;
pub mod prometheus;
pub mod summary;
pub mod trace_file;

use crate::model::Observation;
pub use crate::model::{SelfStats, Snapshot};

/// A consumer of observations.
pub trait Sink {
    /// One observation, in ring-buffer order. Must not block.
    fn observe(&mut self, obs: &Observation);
    /// Called about once a second with the agent's counters and the resource readings.
    fn tick(&mut self, _now: &Snapshot) {}
    /// Called once at the end, with the last snapshot.
    fn finish(&mut self, _last: &Snapshot) -> anyhow::Result<()> {
        Ok(())
    }
}
