//! The types every stage shares: what the assembler makes of the probes' events
//! ([`Observation`] and its parts), requests, and the readings of the resources beside them.
//! Defining them here, below every stage, keeps the stages' imports one way.

mod calls;
mod request;
mod server;
mod step;

use std::sync::Arc;

pub use calls::*;
pub use request::*;
pub use server::*;
pub use step::*;

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

/// What the sinks consume.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Observation {
    Decode(DecodeStep),
    ModelLoad(ModelLoad),
    ContextCreate(ContextCreate),
    Sample(Sample),
    Synchronize(Synchronize),
    Memory(MemoryChange),
    TaskPost(TaskPost),
    SlotLaunch(SlotLaunch),
    SlotRelease(SlotRelease),
    /// A context shift (see [`crate::assemble::requests`]): a generating request's sequence outgrew its
    /// share of the context and llama.cpp discarded some of its tokens.
    ContextShift(ContextShift),
    /// A request reconstructed by [`crate::assemble::requests`], when it closed.
    Request(crate::model::Request),
}

impl Observation {
    /// The call an observation comes from (`None` for a request, which spans many).
    pub fn origin(&self) -> Option<&Origin> {
        Some(match self {
            Observation::Decode(d) => &d.origin,
            Observation::ModelLoad(m) => &m.origin,
            Observation::ContextCreate(c) => &c.origin,
            Observation::Sample(s) => &s.origin,
            Observation::Synchronize(s) => &s.origin,
            Observation::Memory(m) => &m.origin,
            Observation::TaskPost(p) => &p.origin,
            Observation::SlotLaunch(l) => &l.origin,
            Observation::SlotRelease(r) => &r.origin,
            Observation::ContextShift(c) => &c.origin,
            Observation::Request(_) => return None,
        })
    }

    /// Tokens held per sequence after this observation, if it changed them.
    pub fn context_used(&self) -> &[SeqUsed] {
        match self {
            Observation::Decode(d) => &d.context_used,
            Observation::Memory(m) => &m.context_used,
            _ => &[],
        }
    }
}
