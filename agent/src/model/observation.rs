//! [`Observation`]: what the assembler makes of the probes' events, and what the sinks consume.

use std::sync::Arc;

use super::{
    calls::*,
    ending::ProcessEnd,
    origin::*,
    profile::CpuSample,
    request::{Mode, Request},
    resources::ModelInfo,
    server::*,
    step::*,
};

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
    Request(Request),
    /// A process llamaprobe began to trace.
    Traced(TracedProcess),
    /// How a traced process ended (sent before its [`Observation::Released`], where its exit
    /// probe saw the end).
    Ended(ProcessEnd),
    /// A traced process is gone (exited, or no longer probed); its requests were closed.
    Released {
        pid: u32,
    },
    /// A CPU sample of a traced thread (`--profile-cpu`), attributed and symbolized.
    CpuSample(CpuSample),
    /// What is known of a process's model: its GGUF facts, observed at its load or recovered
    /// from the process.
    ModelInfo(ModelFacts),
}

/// A process llamaprobe began to trace, and how.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TracedProcess {
    pub pid: u32,
    /// Its name (`comm`, or the program started by `run`).
    pub name: String,
    pub generation: crate::catalog::Generation,
    pub request_mode: Mode,
    /// Uprobes and uretprobes attached for it.
    pub probes_attached: u64,
    /// How its probes find its struct layouts: `attach_cookie` (kernels 5.15+) or `pid`.
    pub layouts_by: &'static str,
    /// Who it is, as labels for every series of it (`exe`, `container_id`, `k8s_*`; those
    /// known only), and the OpenTelemetry resource attributes of its spans.
    pub identity: ProcessIdentity,
}

/// Who a traced process is (the host agent's labels; the ad-hoc modes know the `exe`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProcessIdentity {
    /// Prometheus label name → value, non-empty values only, in a fixed order.
    pub labels: Vec<(&'static str, String)>,
    /// OpenTelemetry `service.name`: the target's `OTEL_SERVICE_NAME`, else its executable.
    pub service_name: String,
}

/// What is known of a process's model, and how it was learnt.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelFacts {
    pub pid: u32,
    /// The model label its series carry.
    pub label: Arc<str>,
    /// One line saying what was learnt and how ("model: observed at load: …").
    pub fact: String,
    /// The model file's facts, if it was read.
    pub info: Option<ModelInfo>,
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
            Observation::Request(_)
            | Observation::Traced(_)
            | Observation::Released { .. }
            | Observation::Ended(_)
            | Observation::ModelInfo(_)
            | Observation::CpuSample(_) => return None,
        })
    }

    /// The context an observation is about, where it says (`None` for a memory change of a
    /// context not known yet, and for what concerns no context).
    pub fn context(&self) -> Option<ContextRole> {
        match self {
            Observation::Decode(d) => Some(d.context),
            Observation::Sample(s) => Some(s.context),
            Observation::ContextCreate(c) => Some(c.context),
            Observation::Memory(m) => m.context,
            _ => None,
        }
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
