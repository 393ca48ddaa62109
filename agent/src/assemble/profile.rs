//! CPU samples (`--profile-cpu`) joined to what the process was doing.
//!
//! The sampler tells a sample's state when it is taken: inside a decode step (which one: its
//! thread and entry time), inside sampling, inside a model load, or none. A step's phase (prompt,
//! generation, mixed) and its sequences are known only when the step returns and its event
//! arrives, after the samples taken during it: those samples wait here, keyed by the step, and
//! leave with the step's attribution. Samples of a step whose event never comes (its process
//! ended inside it, the probe was detached) leave as [`CpuPhase::Decode`] when their process is
//! forgotten or the run ends, and when too many are waiting.

use std::collections::HashMap;

use crate::{
    decode,
    model::{CpuPhase, DecodeStep},
};
use probe_common::CpuState;

/// Samples kept waiting for their steps, in all; beyond it the oldest step's leave
/// unclassified (a step of 100 s on 64 threads at 99 Hz is about 630,000 samples).
pub const MAX_WAITING: usize = 200_000;

/// A sample with what it is attributed to (not symbolized yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributed {
    pub sample: decode::CpuSample,
    pub phase: CpuPhase,
    /// The step's context (0 outside a step).
    pub ctx: u64,
    /// The step's sequences (its parts), where the step was classified.
    pub seqs: Vec<i32>,
    /// The requests the step carried (their ids, when the step was observed).
    pub requests: Vec<u64>,
}

/// What a step's samples are attributed to: its phase, context, sequences and requests.
#[derive(Clone, Debug)]
struct StepOf {
    phase: CpuPhase,
    ctx: u64,
    seqs: Vec<i32>,
    requests: Vec<u64>,
}

impl StepOf {
    fn attribute(&self, sample: decode::CpuSample) -> Attributed {
        Attributed {
            sample,
            phase: self.phase,
            ctx: self.ctx,
            seqs: self.seqs.clone(),
            requests: self.requests.clone(),
        }
    }
}

/// Step key: (pid, step thread, step entry time).
type StepKey = (u32, u32, u64);

/// Steps remembered after their end, for samples that arrive after them.
const RECENT_STEPS: usize = 1024;

#[derive(Default)]
pub struct CpuJoin {
    waiting: HashMap<StepKey, Vec<decode::CpuSample>>,
    n_waiting: usize,
    /// The latest steps' attribution: a sample taken on another CPU at the step's very end
    /// (the sampler read the process's step mark just before the step's return removed it)
    /// can reach the ring buffer after the step's own event.
    recent: HashMap<StepKey, StepOf>,
    recent_order: std::collections::VecDeque<StepKey>,
}

impl CpuJoin {
    /// A new sample: attributed now (outside a step, or its step already ended) or kept for
    /// its step (empty); also the samples an overflow released.
    pub fn sample(&mut self, s: decode::CpuSample) -> Vec<Attributed> {
        let phase = match s.state {
            CpuState::Sampling => CpuPhase::Sampling,
            CpuState::ModelLoad => CpuPhase::ModelLoad,
            CpuState::Other => CpuPhase::Other,
            CpuState::Decode => {
                let (tid, start) = s.step.unwrap_or_default();
                if let Some(of) = self.recent.get(&(s.pid, tid, start)) {
                    return vec![of.attribute(s)];
                }
                self.waiting.entry((s.pid, tid, start)).or_default().push(s);
                self.n_waiting += 1;
                return self.overflow();
            }
        };
        vec![Attributed {
            sample: s,
            phase,
            ctx: 0,
            seqs: Vec::new(),
            requests: Vec::new(),
        }]
    }

    /// A decode step ended, carrying requests `requests`: its samples, attributed to its
    /// phase, sequences and requests.
    pub fn step(&mut self, step: &DecodeStep, requests: Vec<u64>) -> Vec<Attributed> {
        let o = &step.origin;
        let key = (o.pid, o.tid, o.start_ns);
        let of = StepOf {
            phase: CpuPhase::of_step(step.phase),
            ctx: step.ctx,
            seqs: step.parts.iter().map(|p| p.seq_id).collect(),
            requests,
        };
        let samples = self.waiting.remove(&key).unwrap_or_default();
        self.n_waiting -= samples.len();
        let out = samples.into_iter().map(|s| of.attribute(s)).collect();
        self.recent.insert(key, of);
        self.recent_order.push_back(key);
        if self.recent_order.len() > RECENT_STEPS {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
        out
    }

    /// A process is gone: the samples of its steps that never ended, unclassified.
    pub fn forget(&mut self, pid: u32) -> Vec<Attributed> {
        self.recent.retain(|k, _| k.0 != pid);
        self.recent_order.retain(|k| k.0 != pid);
        let keys: Vec<StepKey> = self
            .waiting
            .keys()
            .filter(|k| k.0 == pid)
            .copied()
            .collect();
        keys.into_iter().flat_map(|k| self.release(k)).collect()
    }

    /// The end: every waiting sample, unclassified.
    pub fn finish(&mut self) -> Vec<Attributed> {
        let keys: Vec<StepKey> = self.waiting.keys().copied().collect();
        keys.into_iter().flat_map(|k| self.release(k)).collect()
    }

    fn release(&mut self, k: StepKey) -> Vec<Attributed> {
        let samples = self.waiting.remove(&k).unwrap_or_default();
        self.n_waiting -= samples.len();
        samples
            .into_iter()
            .map(|sample| Attributed {
                sample,
                phase: CpuPhase::Decode,
                ctx: 0,
                seqs: Vec::new(),
                requests: Vec::new(),
            })
            .collect()
    }

    /// Over [`MAX_WAITING`]: the oldest steps' samples leave unclassified.
    fn overflow(&mut self) -> Vec<Attributed> {
        let mut out = Vec::new();
        while self.n_waiting > MAX_WAITING {
            let Some(oldest) = self.waiting.keys().min_by_key(|k| k.2).copied() else {
                break;
            };
            out.extend(self.release(oldest));
        }
        out
    }

    pub fn waiting(&self) -> usize {
        self.n_waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContextRole, DecodeResult, Origin, Part, PartKind, Phase};

    fn sample(state: CpuState, step: Option<(u32, u64)>, at: u64) -> decode::CpuSample {
        decode::CpuSample {
            pid: 7,
            tid: 9,
            at_ns: at,
            state,
            step,
            in_kernel: false,
            frames: vec![0x1000],
        }
    }

    fn step(tid: u32, start: u64, phase: Option<Phase>) -> DecodeStep {
        DecodeStep {
            origin: Origin {
                pid: 7,
                tid,
                model: "m".into(),
                start_ns: start,
                end_ns: start + 100,
            },
            ctx: 1,
            context: ContextRole::Main,
            api: "llama_decode",
            ret: 0,
            result: DecodeResult::Ok,
            n_tokens: Some(1),
            phase,
            prompt_tokens: 0,
            generated_tokens: 1,
            draft_tokens: 0,
            drafts: 0,
            parts: vec![Part {
                seq_id: 3,
                pos0: 5,
                n_tokens: 1,
                n_outputs: 1,
                kind: PartKind::Generated,
            }],
            unscanned_tokens: 0,
            context_used: Vec::new(),
        }
    }

    #[test]
    fn samples_wait_for_their_step_and_take_its_phase() {
        let mut j = CpuJoin::default();
        assert!(j
            .sample(sample(CpuState::Decode, Some((8, 100)), 150))
            .is_empty());
        assert!(j
            .sample(sample(CpuState::Decode, Some((8, 100)), 160))
            .is_empty());
        assert!(j
            .sample(sample(CpuState::Decode, Some((8, 300)), 310))
            .is_empty());
        let other = j.sample(sample(CpuState::Sampling, None, 170));
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].phase, CpuPhase::Sampling);
        assert_eq!(j.waiting(), 3);
        // Another thread's step at the same time is not this one.
        assert!(j
            .step(&step(9, 100, Some(Phase::Prompt)), vec![])
            .is_empty());
        let got = j.step(&step(8, 100, Some(Phase::Generation)), vec![4]);
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|a| a.phase == CpuPhase::Generation && a.seqs == [3] && a.requests == [4]));
        assert_eq!(j.waiting(), 1);
        // A sample of that step read after the step's event joins it still.
        let late = j.sample(sample(CpuState::Decode, Some((8, 100)), 199));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].phase, CpuPhase::Generation);
        assert_eq!(
            late[0].requests,
            [4],
            "the requests of its step, not of now"
        );
        let left = j.forget(7);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].phase, CpuPhase::Decode);
        assert_eq!(j.waiting(), 0);
    }

    #[test]
    fn too_many_waiting_release_the_oldest_step_unclassified() {
        let mut j = CpuJoin::default();
        for i in 0..MAX_WAITING as u64 {
            assert!(j
                .sample(sample(CpuState::Decode, Some((8, 1)), i))
                .is_empty());
        }
        let out = j.sample(sample(CpuState::Decode, Some((8, 2)), 0));
        assert_eq!(out.len(), MAX_WAITING);
        assert!(out.iter().all(|a| a.phase == CpuPhase::Decode));
        assert_eq!(j.waiting(), 1);
    }
}
