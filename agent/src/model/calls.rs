//! The other calls the probes see: model loads, contexts, sampling, synchronize, KV memory.

use super::{
    origin::{Origin, SeqUsed},
    step::ContextRole,
};

/// A model load.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelLoad {
    pub origin: Origin,
    pub path: Option<String>,
    pub ok: bool,
}

/// Parameters of a context; those outside plausible ranges (or absent from the layout) are
/// `None`. `n_ctx` 0 ("from the model") is reported `None` too.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContextParams {
    pub n_ctx: Option<u32>,
    pub n_batch: Option<u32>,
    pub n_ubatch: Option<u32>,
    pub n_seq_max: Option<u32>,
    pub n_threads: Option<u32>,
    pub n_threads_batch: Option<u32>,
    /// Tokens of a request sequence's share of the context: n_ctx / n_seq_max, less the
    /// sequences a llama-server keeps for itself (2024: sequence 0, the system prompt's).
    pub seq_share: Option<u32>,
}

/// A context creation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ContextCreate {
    pub origin: Origin,
    pub ok: bool,
    /// The context created (0 if creation failed).
    pub ctx: u64,
    pub context: ContextRole,
    #[serde(flatten)]
    pub params: ContextParams,
}

/// A sampled token.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub origin: Origin,
    pub ctx: u64,
    pub context: ContextRole,
    /// The sample accepts a draft token of a speculative verification (it follows a matching
    /// draft: every sample of a verification but its first).
    pub accepted_draft: bool,
    /// Batch index of the output sampled from (-1: the last output).
    pub idx: i32,
    /// The sequence that batch index belongs to in the context's latest successful step.
    pub seq_id: Option<i32>,
    pub token: i32,
}

/// A `llama_synchronize` call, with the compute time of the decode step it completes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Synchronize {
    pub origin: Origin,
    /// From the preceding decode step's start on this thread and context to this call's end.
    pub compute_ns: Option<u64>,
}

/// A change of the KV memory (`seq_rm`, `seq_cp`, `clear`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryChange {
    pub origin: Origin,
    pub op: &'static str,
    pub seq_id: i32,
    pub seq_dst: i32,
    pub p0: i32,
    pub p1: i32,
    /// `seq_add`'s shift of the positions `[p0, p1)` (0 for the other operations).
    pub delta: i32,
    /// The context whose memory changed (`None`: not known yet).
    pub context: Option<ContextRole>,
    /// That context (the main one's while not known yet).
    pub ctx: u64,
    /// The sequences whose held tokens it cut off at the end (a `seq_rm` from a position the
    /// sequence holds to its end, a `clear`): what they held next is another text. A removal
    /// past the end, or in the middle (a context shift), cuts none.
    pub truncated: Vec<i32>,
    /// Tokens of each sequence the change touched, afterwards.
    pub context_used: Vec<SeqUsed>,
}

/// A context shift: `seq_add` moved a generating request's positions back by `discarded`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ContextShift {
    pub origin: Origin,
    pub seq_id: i32,
    /// Tokens discarded (the shift's size).
    pub discarded: u32,
    /// The request it happened in.
    pub request_id: u64,
}
