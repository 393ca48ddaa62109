//! A decode step as the assembler classifies it: its phase, its result, each sequence's part.

use super::origin::{Origin, SeqUsed};

/// Phase of a decode step.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Phase {
    Prompt,
    Generation,
    Mixed,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Prompt, Phase::Generation, Phase::Mixed];
    pub fn label(self) -> &'static str {
        self.into()
    }
}

/// Outcome of a decode step, from its return code.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum DecodeResult {
    Ok,
    NoKvSlot,
    Aborted,
    InvalidBatch,
    Error,
}

impl DecodeResult {
    /// The result of a return code (see `catalog::return_codes`).
    pub fn from_ret(ret: i32) -> Self {
        use crate::catalog::return_codes as rc;
        match ret {
            rc::OK => Self::Ok,
            rc::NO_KV_SLOT => Self::NoKvSlot,
            rc::ABORTED => Self::Aborted,
            rc::INVALID_BATCH => Self::InvalidBatch,
            _ => Self::Error,
        }
    }
    pub fn label(self) -> &'static str {
        self.into()
    }
}

/// Which of a process's contexts a step ran on.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ContextRole {
    /// The context that serves requests: llama-server's target context (a slot's `ctx_tgt`),
    /// elsewhere the first context the process created (or the first seen decoding).
    #[default]
    Main,
    /// A speculative draft model's context: llama-server's `ctx_dft`, elsewhere a context
    /// created after the main one.
    Draft,
}

impl ContextRole {
    pub fn label(self) -> &'static str {
        self.into()
    }
}

/// What a sequence's tokens in one batch are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// Prompt tokens, none flagged for output: a middle chunk of a long prompt.
    PromptChunk,
    /// Prompt tokens ending with the one output: the last chunk (its sampling follows).
    FinalPromptChunk,
    /// One token continuing the sequence, with output: a generated token being fed back.
    Generated,
    /// Several tokens flagged for output, not a verification (embeddings, all-logits prompts).
    MultiOutput,
    /// Speculative verification: the generated token fed back, then draft tokens, every one
    /// with an output; the samples that follow accept drafts up to the first mismatch.
    Verification,
}

/// One sequence's share of a batch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Part {
    pub seq_id: i32,
    pub pos0: i32,
    pub n_tokens: u32,
    pub n_outputs: u32,
    pub kind: PartKind,
}

/// One classified decode step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeStep {
    pub origin: Origin,
    pub ctx: u64,
    pub context: ContextRole,
    pub api: &'static str,
    pub ret: i32,
    pub result: DecodeResult,
    /// Tokens in the batch; `None` if the batch was unreadable.
    pub n_tokens: Option<u32>,
    /// `None` if unknown.
    pub phase: Option<Phase>,
    pub prompt_tokens: u32,
    /// Generated tokens fed back (one per generating sequence, one per verification).
    pub generated_tokens: u32,
    /// Draft tokens verified (speculative decoding).
    pub draft_tokens: u32,
    /// Drafts verified: the sequences with a verification in the step.
    pub drafts: u32,
    pub parts: Vec<Part>,
    /// Tokens beyond the probe's scan window, counted as prompt tokens.
    pub unscanned_tokens: u32,
    /// Tokens each sequence of a successful step holds afterwards.
    pub context_used: Vec<SeqUsed>,
}
