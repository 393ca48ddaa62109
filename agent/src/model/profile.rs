//! CPU samples (`--profile-cpu`) as the sinks get them: attributed to what the process was
//! doing, symbolized.

use std::sync::Arc;

use super::step::Phase;

/// What a CPU sample is attributed to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum CpuPhase {
    /// Inside a decode step of prompt tokens only.
    Prompt,
    /// Inside a decode step of generated tokens only.
    Generation,
    /// Inside a decode step of both.
    Mixed,
    /// Inside a decode step whose batch could not be classified (unreadable, or its end was
    /// never seen).
    Decode,
    /// Inside a sampling call.
    Sampling,
    /// Inside a model load.
    ModelLoad,
    /// Outside all of them: HTTP handling, tokenization, the server loop, idle spinning.
    Other,
}

impl CpuPhase {
    pub const ALL: [CpuPhase; 7] = [
        CpuPhase::Prompt,
        CpuPhase::Generation,
        CpuPhase::Mixed,
        CpuPhase::Decode,
        CpuPhase::Sampling,
        CpuPhase::ModelLoad,
        CpuPhase::Other,
    ];
    pub fn label(self) -> &'static str {
        self.into()
    }
    /// The CPU phase of a decode step's phase.
    pub fn of_step(phase: Option<Phase>) -> Self {
        match phase {
            Some(Phase::Prompt) => Self::Prompt,
            Some(Phase::Generation) => Self::Generation,
            Some(Phase::Mixed) => Self::Mixed,
            None => Self::Decode,
        }
    }
    /// Inside a decode step.
    pub fn in_step(self) -> bool {
        matches!(
            self,
            Self::Prompt | Self::Generation | Self::Mixed | Self::Decode
        )
    }
}

/// One frame of a sampled stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Frame {
    /// The instruction address in the process.
    pub addr: u64,
    /// The function's name (demangled), or `[unknown]` / `[file+0xoffset]` where the file has
    /// no symbol for it.
    pub function: Arc<str>,
    /// The file it is in, as the process maps it (empty: not in a file).
    pub module: Arc<str>,
}

/// One CPU sample, attributed and symbolized.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuSample {
    pub pid: u32,
    pub tid: u32,
    /// The process's model label.
    pub model: Arc<str>,
    pub at_ns: u64,
    pub phase: CpuPhase,
    /// The decode step it fell in: its thread and entry time.
    pub step: Option<(u32, u64)>,
    /// The sequences of that step (its parts), where the step was classified.
    pub seqs: Vec<i32>,
    /// The requests those sequences carried then (llamaprobe's request ids, as
    /// [`Request::id`](super::Request::id)).
    pub requests: Vec<u64>,
    /// The sample interrupted the thread in the kernel (its user stack at the kernel entry).
    pub in_kernel: bool,
    /// Leaf first. Empty when no user stack could be read.
    pub frames: Vec<Frame>,
}

impl CpuSample {
    /// The leaf function's name, `[unknown]` without a stack.
    pub fn leaf(&self) -> &str {
        self.frames.first().map_or("[unknown]", |f| &f.function)
    }
    /// The leaf function's name, shared (no allocation but the first `[unknown]`).
    pub fn leaf_name(&self) -> Arc<str> {
        static UNKNOWN: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| "[unknown]".into());
        self.frames
            .first()
            .map_or_else(|| UNKNOWN.clone(), |f| f.function.clone())
    }
}
