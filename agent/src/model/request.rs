//! Requests and what became of the work that never was one.

use std::sync::Arc;

/// Where requests come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The decode batches and samples only (any llama.cpp program): no queue wait.
    BatchView,
    /// The batch view plus llama-server's task queue matched by time (no
    /// `launch_slot_with_task` found): queue wait, time from acceptance.
    ServerQueue,
    /// llama-server's tasks joined by id: post → launch → release.
    ServerTasks,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::BatchView => {
                "batch view (decode batches and samples; llama-server's task queue not found, \
                 so no queue wait)"
            }
            Mode::ServerQueue => {
                "server queue by timing + batch view (accepted at server_queue::post, matched to \
                 requests by time: launch_slot_with_task not found; ended at \
                 server_slot::release): queue wait measured"
            }
            Mode::ServerTasks => {
                "server tasks by id (accepted at server_queue::post, taken by a slot at \
                 launch_slot_with_task, ended at server_slot::release; decode batches and \
                 samples): queue wait measured"
            }
        }
    }
}

/// A finished request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Request {
    /// Sequential id of the request in this session.
    pub id: u64,
    pub pid: u32,
    pub model: Arc<str>,
    pub ctx: u64,
    pub seq_id: i32,
    /// llama-server's task id ([`Mode::ServerTasks`]).
    pub task_id: Option<i32>,
    /// What it was: llama-server's task type (`completion`, `embedding`, `rerank`, `infill`);
    /// elsewhere `completion` once a token was sampled for it, else `unknown`.
    #[serde(rename = "type")]
    pub task_type: &'static str,
    /// When llama-server accepted it (`server_queue::post`).
    pub queued_ns: Option<u64>,
    /// Start of its first prompt chunk (monotonic ns).
    pub start_ns: u64,
    /// End of its final prompt chunk.
    pub prompt_end_ns: Option<u64>,
    /// End of the sampling of its first token.
    pub first_token_ns: Option<u64>,
    /// End of the sampling of its last token.
    pub end_ns: u64,
    /// Prompt tokens decoded for it.
    pub prompt_tokens: u32,
    /// Prompt tokens reused from the cache (positions before its first chunk).
    pub cached_tokens: u32,
    /// Tokens sampled for it.
    pub generated_tokens: u32,
    /// Decode steps that carried its tokens.
    pub decode_steps: u32,
    /// Context shifts while it generated.
    pub context_shifts: u32,
    /// Why it was closed.
    pub closed_by: &'static str,
    /// Wall time of the decode steps that carried its tokens, ns (steps of other requests
    /// that ran beside it are not counted).
    pub decode_ns: u64,
    /// Wall time of the sampling calls that gave its tokens, ns.
    pub sampling_ns: u64,
    /// `--profile-cpu`: CPU samples taken, on any of the process's threads, inside the decode
    /// steps that carried its tokens (a step of several requests counts for each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_samples: Option<u64>,
    /// The decode steps that carried its tokens, when kept (`--otlp-step-spans`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RequestStep>,
}

/// One decode step that carried a request's tokens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RequestStep {
    pub start_ns: u64,
    pub end_ns: u64,
    pub tid: u32,
    /// Tokens of the whole step.
    pub n_tokens: Option<u32>,
    /// This request's tokens in the step.
    pub seq_tokens: u32,
    pub phase: &'static str,
    pub result: &'static str,
}

impl Request {
    /// Prompt size: reused plus decoded prompt tokens.
    pub fn input_tokens(&self) -> u32 {
        self.cached_tokens + self.prompt_tokens
    }
    /// When it arrived: accepted by the server if known, else its first prompt chunk.
    pub fn arrival_ns(&self) -> u64 {
        self.queued_ns.unwrap_or(self.start_ns)
    }
    /// From acceptance to the start of its first prompt chunk.
    pub fn queue_s(&self) -> Option<f64> {
        self.queued_ns
            .map(|q| self.start_ns.saturating_sub(q) as f64 / 1e9)
    }
    /// From arrival to the end of its first token's sampling.
    pub fn ttft_s(&self) -> Option<f64> {
        self.first_token_ns
            .map(|t| t.saturating_sub(self.arrival_ns()) as f64 / 1e9)
    }
    /// Mean time between generated tokens after the first.
    pub fn tpot_s(&self) -> Option<f64> {
        let first = self.first_token_ns?;
        (self.generated_tokens > 1).then(|| {
            (self.end_ns.saturating_sub(first)) as f64 / 1e9 / (self.generated_tokens - 1) as f64
        })
    }
    pub fn duration_s(&self) -> f64 {
        self.duration_ns() as f64 / 1e9
    }
    /// From arrival to the end of its last token's sampling.
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.arrival_ns())
    }
    /// Its wall time outside its decode steps and samplings: queue wait, the server's work
    /// between steps (HTTP, tokenization, other requests' steps), ns.
    pub fn outside_ns(&self) -> u64 {
        self.duration_ns()
            .saturating_sub(self.decode_ns.saturating_add(self.sampling_ns))
    }
    /// The GenAI `gen_ai.operation.name` of its type.
    pub fn operation(&self) -> &'static str {
        crate::catalog::TASK_TYPES
            .iter()
            .find(|(label, _)| *label == self.task_type)
            .map_or("text_completion", |(_, op)| *op)
    }
}

/// Why accepted work never became a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Unserved {
    /// Cancelled before a slot took it (the client went away).
    pub cancelled: u64,
    /// Refused by the slot that was to run it (an invalid request).
    pub rejected: u64,
    /// Matched by time ([`Mode::ServerQueue`]): no request claimed it (see [`STALE_POST_NS`]).
    pub unclaimed: u64,
}

impl Unserved {
    pub fn total(&self) -> u64 {
        self.cancelled + self.rejected + self.unclaimed
    }
}
