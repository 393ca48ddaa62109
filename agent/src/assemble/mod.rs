//! Assembler: decoded events → observations (decode steps classified by phase, samples,
//! synchronize calls paired with their decode step, model loads, contexts).
//!
//! Phase classification follows how llama.cpp itself counts "prompt eval" and "eval": per
//! sequence in a batch, one token with output that is a generated token being fed back is
//! generation; a token is recognised as fed back when the sampler returned its id since the
//! context's previous step (or, where no sampler is probed, when its position is past the
//! sequence's last one); other tokens are prompt tokens, the chunk whose last
//! token is flagged for output being the final prompt chunk. A batch without sequence ids
//! (`llama_batch_get_one`) is generation if it has one token, else prompt.

use std::{collections::HashMap, sync::Arc};

use probe_common::{decode_flags as F, ContextEvent, DecodeApi, DecodeEvent, ModelLoadEvent};

pub mod context_use;
pub mod profile;
pub mod requests;

use crate::{catalog::plausible, decode::Event, model::*};
use context_use::ContextUse;

/// Turns events into observations. State is kept per traced process ([`ProcessState`]) and,
/// inside it, per context ([`ContextState`]): both are created when their first event comes and
/// dropped with [`Assembler::forget`] when the process is gone.
#[derive(Default)]
pub struct Assembler {
    processes: HashMap<u32, ProcessState>,
    unknown: Arc<str>,
    context_use: ContextUse,
}

/// What the assembler keeps of one process.
#[derive(Default)]
struct ProcessState {
    /// Model file stem, once a load was seen (or the model recovered).
    model: Option<Arc<str>>,
    /// Its sampling is probed and has been seen.
    sampler_seen: bool,
    /// Its tokens were seen through a sampling function (`llama_sampler_sample`,
    /// `common_sampler_sample`): its sampler chain's applies are not counted.
    sampled_by_function: bool,
    /// Sequences a llama-server slot has just taken a new task on: their next tokens are a
    /// prompt, whatever they look like (a prompt served from the cache but for its last token
    /// is one token at a later position).
    launched: std::collections::HashSet<i32>,
    /// Last successful decode per thread: (ctx, start_ns), waiting for its synchronize.
    pending_compute: HashMap<u32, (u64, u64)>,
    contexts: HashMap<u64, ContextState>,
    /// The context that serves requests (see [`ContextRole`]), once known.
    main_ctx: Option<u64>,
    /// Contexts known to be speculative drafts (llama-server's `ctx_dft`).
    draft_ctxs: std::collections::HashSet<u64>,
    /// Model file stems by `llama_model *`, from successful loads.
    models: HashMap<u64, Arc<str>>,
    /// The context of each KV memory handle (`llama_get_memory`).
    memory_ctx: HashMap<u64, u64>,
    /// Its llama-server's era (task types, slot sequence ids), if known.
    server_era: Option<&'static crate::catalog::ServerLayoutRow>,
}

impl ProcessState {
    /// The role of context `ctx`: draft if known as one, else main if it is (or, none being
    /// known yet, becomes) the main context, else draft.
    fn role(&mut self, ctx: u64) -> ContextRole {
        if self.draft_ctxs.contains(&ctx) {
            return ContextRole::Draft;
        }
        match self.main_ctx {
            Some(m) if m != ctx => ContextRole::Draft,
            _ => {
                self.main_ctx = Some(ctx);
                ContextRole::Main
            }
        }
    }

    /// The context a memory event's handle belongs to: a context itself (the 2024-2025
    /// `llama_kv_*` functions take one), else the context `llama_get_memory` gave it to.
    fn context_of(&self, handle: u64) -> Option<u64> {
        if self.contexts.contains_key(&handle) {
            return Some(handle);
        }
        self.memory_ctx.get(&handle).copied()
    }
}

/// What the assembler keeps of one context of a process.
#[derive(Default)]
struct ContextState {
    /// Last position of each sequence.
    last_pos: HashMap<i32, i32>,
    /// Token ids sampled since the last successful decode step, with the sequence each was
    /// sampled for (`None`: none sampled since).
    sampled: Option<Vec<Pending>>,
    /// Which sequence holds each batch index of the latest successful step.
    batch: BatchMap,
    /// Sampler-chain applies that can still be this step's samples (one per output). Others
    /// are not samples: a program may apply the chain for other ends (probabilities of a
    /// prompt's tokens).
    applies_due: u32,
    /// Samples by `llama_sample_token*` (no output index) since the latest successful step.
    token_samples: u32,
}

/// A token sampled since the context's last successful step: (its sequence, if known; id).
type Pending = (Option<i32>, i32);

/// Which sequence holds each batch index of a context's latest decode step.
#[derive(Clone, Debug, Default)]
pub struct BatchMap {
    /// (first index, tokens, sequence, a verification), in batch order.
    spans: Vec<(u32, u32, i32, bool)>,
    /// The same with each part's outputs: (first index, tokens, sequence, a verification,
    /// outputs).
    outputs: Vec<(u32, u32, i32, bool, u32)>,
    n_tokens: u32,
}

impl BatchMap {
    pub fn of(step: &DecodeStep) -> Self {
        let mut map = BatchMap::default();
        let mut index = 0;
        for p in &step.parts {
            let verification = p.kind == PartKind::Verification;
            map.spans.push((index, p.n_tokens, p.seq_id, verification));
            map.outputs.push((
                index,
                p.n_tokens,
                p.seq_id,
                verification,
                p.n_outputs.min(p.n_tokens),
            ));
            index += p.n_tokens;
        }
        map.n_tokens = step.n_tokens.unwrap_or(index);
        map
    }

    /// The batch index of the `k`-th output of the step (0-based, in batch order), where a
    /// sampling call does not say it: each part's outputs are its last tokens (llama.cpp's
    /// programs ask for logits at the end of a sequence's tokens); past the last output, the
    /// last token (-1).
    pub fn output_index(&self, k: u32) -> i32 {
        let mut seen = 0;
        for &(first, n, _, _, outputs) in &self.outputs {
            if k < seen + outputs {
                return (first + n - outputs + (k - seen)) as i32;
            }
            seen += outputs;
        }
        -1
    }

    /// The sequence at batch index `idx` (`-1`: the last token).
    pub fn seq_at(&self, idx: i32) -> Option<i32> {
        self.span_at(idx).map(|s| s.2)
    }

    /// Whether a sample of batch index `idx` accepts a draft: an index of a verification part
    /// past its first (the sampler reaches index i + 1 only when the draft at i matched).
    fn accepts_draft(&self, idx: i32) -> bool {
        let Some(&(first, _, _, verification)) = self.span_at(idx) else {
            return false;
        };
        let i = if idx < 0 {
            self.n_tokens.saturating_sub(1)
        } else {
            idx as u32
        };
        verification && i > first
    }

    fn span_at(&self, idx: i32) -> Option<&(u32, u32, i32, bool)> {
        let i = if idx < 0 {
            self.n_tokens.checked_sub(1)?
        } else {
            idx as u32
        };
        self.spans
            .iter()
            .find(|(first, n, _, _)| i >= *first && i < first + n)
    }
}

/// Removes one `token` sampled for sequence `seq` (or for an unknown one) from the pending
/// samples; true if it was there.
fn take(pending: &mut Option<Vec<Pending>>, seq: i32, token: i32) -> bool {
    let Some(v) = pending.as_mut() else {
        return false;
    };
    match v
        .iter()
        .position(|&(s, t)| t == token && s.is_none_or(|s| s == seq))
    {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    }
}

/// Sampled ids kept per context between two steps (a program that samples without decoding
/// must not grow the agent).
const MAX_PENDING_SAMPLES: usize = 4096;

impl Assembler {
    pub fn new() -> Self {
        Self {
            unknown: Arc::from(""),
            ..Default::default()
        }
    }

    /// Declares a process's llama-server era (its server layout row): its task types, and
    /// the sequence ids of its slots.
    pub fn set_server_era(&mut self, pid: u32, row: &'static crate::catalog::ServerLayoutRow) {
        self.processes.entry(pid).or_default().server_era = Some(row);
    }

    /// The sequence id of slot `slot` of process `pid`'s batches.
    fn slot_seq(&self, pid: u32, slot: i32) -> i32 {
        let offset = self
            .processes
            .get(&pid)
            .and_then(|p| p.server_era)
            .map_or(0, |r| r.slot_seq_offset);
        if slot < 0 {
            slot
        } else {
            slot.saturating_add(offset)
        }
    }

    /// Declares the model of a process learnt elsewhere.
    pub fn set_model(&mut self, pid: u32, model: &str) {
        self.processes.entry(pid).or_default().model = Some(Arc::from(model));
    }

    /// The model label of a process ("" until known).
    pub fn model(&self, pid: u32) -> Arc<str> {
        self.processes
            .get(&pid)
            .and_then(|p| p.model.clone())
            .unwrap_or_else(|| self.unknown.clone())
    }

    /// Whether the tokens of `pid` are seen through a sampling function (then the fallback
    /// at the sampler chain's accept is not needed for it).
    pub fn samples_by_function(&self, pid: u32) -> bool {
        self.processes
            .get(&pid)
            .is_some_and(|p| p.sampled_by_function)
    }

    /// Drops everything kept of a process that is gone.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.context_use.forget(pid);
    }

    fn process_mut(&mut self, pid: u32) -> &mut ProcessState {
        self.processes.entry(pid).or_default()
    }

    fn context_mut(&mut self, pid: u32, ctx: u64) -> &mut ContextState {
        self.process_mut(pid).contexts.entry(ctx).or_default()
    }

    fn origin(&self, h: &probe_common::EventHeader) -> Origin {
        Origin {
            pid: h.tgid,
            tid: h.tid,
            model: self.model(h.tgid),
            start_ns: h.start_ns,
            end_ns: h.end_ns,
        }
    }

    /// The observation an event makes (`None` for an event that only informs the assembler:
    /// which context a memory handle belongs to).
    pub fn process(&mut self, ev: &Event) -> Option<Observation> {
        Some(match ev {
            Event::Decode(d) => Observation::Decode(self.decode(d)),
            Event::ModelLoad(m) => Observation::ModelLoad(self.model_load(m)),
            Event::Memory(m) => {
                let pid = m.header.tgid;
                let proc_ = self.process_mut(pid);
                let ctx = proc_.context_of(m.handle);
                let context = ctx.map(|c| proc_.role(c));
                // Unknown yet: the main context's (what a program's first memory calls touch).
                let key = ctx.or(proc_.main_ctx).unwrap_or(0);
                let truncated = self.truncate(pid, key, m);
                Observation::Memory(MemoryChange {
                    origin: self.origin(&m.header),
                    op: crate::catalog::memory_op_name(m.op),
                    seq_id: m.seq_id,
                    seq_dst: m.seq_dst,
                    p0: m.p0,
                    p1: m.p1,
                    delta: m.delta,
                    context,
                    ctx: key,
                    truncated,
                    context_used: self.context_use.apply(pid, key, m),
                })
            }
            Event::MemoryHandle(h) => {
                let proc_ = self.process_mut(h.header.tgid);
                proc_.memory_ctx.insert(h.mem, h.ctx);
                return None;
            }
            Event::Context(c) => Observation::ContextCreate(self.context(c)),
            Event::ContextFree(f) => return self.context_free(f),
            // Joined to their steps by `profile::CpuJoin`, beside the assembler.
            Event::CpuSample(_) => return None,
            // Discovery's, not llama.cpp's: the session acts on it before the assembler.
            Event::Process { .. } => return None,
            Event::SlotRelease(r) => Observation::SlotRelease(SlotRelease {
                origin: self.origin(&r.header),
                slot_id: self.slot_seq(r.header.tgid, r.slot_id),
                task_id: r.task_id,
            }),
            Event::SlotLaunch(l) => Observation::SlotLaunch({
                let slot_seq = self.slot_seq(l.header.tgid, l.slot_id);
                let proc_ = self.process_mut(l.header.tgid);
                if l.ok != 0 {
                    proc_.launched.insert(slot_seq);
                }
                // The slot names its contexts: the target serves requests, the other drafts.
                if l.ctx != 0 {
                    proc_.main_ctx = Some(l.ctx);
                    proc_.draft_ctxs.remove(&l.ctx);
                }
                if l.ctx_dft != 0 && l.ctx_dft != l.ctx {
                    proc_.draft_ctxs.insert(l.ctx_dft);
                }
                SlotLaunch {
                    origin: self.origin(&l.header),
                    slot_id: slot_seq,
                    task_id: l.task_id,
                    ok: l.ok != 0,
                    ctx: l.ctx,
                    ctx_dft: l.ctx_dft,
                }
            }),
            Event::TaskPost(p) => {
                let task_types = self
                    .processes
                    .get(&p.header.tgid)
                    .and_then(|s| s.server_era)
                    .map(|r| r.task_types);
                Observation::TaskPost(TaskPost {
                    origin: self.origin(&p.header),
                    front: p.front != 0,
                    tasks_bytes: p.tasks_bytes,
                    n_tasks: (p.n_tasks > 0).then_some(p.n_tasks),
                    tasks: p
                        .tasks
                        .iter()
                        .take((p.n_read as usize).min(probe_common::MAX_POST_TASKS))
                        .map(|t| PostedTask {
                            id: t.id,
                            task_type: crate::catalog::task_type_in(
                                task_types.unwrap_or(crate::catalog::TASK_TYPES),
                                t.task_type,
                            )
                            .0,
                            id_target: t.id_target,
                        })
                        .collect(),
                })
            }
            Event::Sample(s) => {
                let proc_ = self.process_mut(s.header.tgid);
                let ctx = if s.api == probe_common::SampleApi::Apply as u32 {
                    // A program that samples itself: the token of its main context's latest
                    // output; none when its tokens are seen through a sampling function, or
                    // when the chain selected none.
                    if proc_.sampled_by_function || s.token < 0 {
                        return None;
                    }
                    let ctx = proc_.main_ctx.unwrap_or(0);
                    let c = proc_.contexts.entry(ctx).or_default();
                    if c.applies_due == 0 {
                        return None;
                    }
                    c.applies_due -= 1;
                    ctx
                } else {
                    proc_.sampled_by_function = true;
                    s.ctx
                };
                let context = proc_.role(ctx);
                let c = self.context_mut(s.header.tgid, ctx);
                // llama_sample_token* names no output row: the k-th such sample since the
                // step is taken for its k-th output (see BatchMap::output_index).
                let idx = if s.api == probe_common::SampleApi::Token as u32 {
                    c.token_samples += 1;
                    c.batch.output_index(c.token_samples - 1)
                } else {
                    s.idx
                };
                let seq_id = c.batch.seq_at(idx);
                let accepted_draft = c.batch.accepts_draft(idx);
                let pending = c.sampled.get_or_insert_with(Vec::new);
                if pending.len() >= MAX_PENDING_SAMPLES {
                    // Bounded: the oldest, never fed back, goes.
                    pending.remove(0);
                }
                pending.push((seq_id, s.token));
                Observation::Sample(Sample {
                    origin: self.origin(&s.header),
                    ctx,
                    context,
                    accepted_draft,
                    idx,
                    seq_id,
                    token: s.token,
                })
            }
            Event::Sync(s) => {
                let pending = &mut self.process_mut(s.header.tgid).pending_compute;
                let compute_ns = match pending.get(&s.header.tid) {
                    Some(&(ctx, start)) if ctx == s.ctx && start <= s.header.start_ns => {
                        pending.remove(&s.header.tid);
                        Some(s.header.end_ns.saturating_sub(start))
                    }
                    _ => None,
                };
                Observation::Synchronize(Synchronize {
                    origin: self.origin(&s.header),
                    compute_ns,
                })
            }
        })
    }

    fn model_load(&mut self, m: &ModelLoadEvent) -> ModelLoad {
        let path = crate::decode::model_path(m);
        let ok = m.model != 0;
        if ok {
            if let Some(stem) = path
                .as_deref()
                .map(|p| crate::sources::model_path::label(std::path::Path::new(p)))
                .filter(|l| !l.is_empty())
            {
                // The process's label: its first model, until its main context names one
                // (a draft model loads after the main one).
                let proc_ = self.process_mut(m.header.tgid);
                let stem: Arc<str> = Arc::from(stem.as_str());
                proc_.models.insert(m.model, stem.clone());
                proc_.model.get_or_insert(stem);
            }
        }
        ModelLoad {
            origin: self.origin(&m.header),
            path,
            ok,
        }
    }

    /// A context freed: its state goes, its sequences are cut (a memory change `free`); a
    /// freed main context leaves the role to the next context that is used.
    fn context_free(&mut self, f: &probe_common::ContextFreeEvent) -> Option<Observation> {
        let pid = f.header.tgid;
        let proc_ = self.process_mut(pid);
        let state = proc_.contexts.remove(&f.ctx)?;
        let context = Some(if proc_.draft_ctxs.remove(&f.ctx) {
            ContextRole::Draft
        } else if proc_.main_ctx == Some(f.ctx) {
            proc_.main_ctx = None;
            ContextRole::Main
        } else {
            ContextRole::Draft
        });
        proc_.memory_ctx.retain(|_, c| *c != f.ctx);
        proc_.pending_compute.retain(|_, (c, _)| *c != f.ctx);
        let mut truncated: Vec<i32> = state.last_pos.keys().copied().collect();
        truncated.sort();
        Some(Observation::Memory(MemoryChange {
            origin: self.origin(&f.header),
            op: "free",
            seq_id: -1,
            seq_dst: -1,
            p0: -1,
            p1: -1,
            delta: 0,
            context,
            ctx: f.ctx,
            truncated,
            context_used: self.context_use.free(pid, f.ctx),
        }))
    }

    fn context(&mut self, c: &ContextEvent) -> ContextCreate {
        let check = |v: u32, r: std::ops::RangeInclusive<u32>| r.contains(&v).then_some(v);
        let proc_ = self.process_mut(c.header.tgid);
        let context = if c.ctx != 0 {
            let role = proc_.role(c.ctx);
            proc_.contexts.entry(c.ctx).or_default();
            if let (ContextRole::Main, Some(m)) = (role, proc_.models.get(&c.model).cloned()) {
                proc_.model = Some(m);
            }
            role
        } else {
            ContextRole::Main
        };
        let (n_ctx, n_seq_max) = (
            check(c.n_ctx, plausible::N_CTX),
            check(c.n_seq_max, plausible::N_SEQ_MAX),
        );
        let reserved = self
            .processes
            .get(&c.header.tgid)
            .and_then(|p| p.server_era)
            .map_or(0, |r| r.slot_seq_offset.max(0) as u32);
        let seq_share = match (n_ctx, n_seq_max) {
            (Some(n), Some(s)) if s > reserved => Some(n / (s - reserved)),
            (Some(n), Some(s)) => Some(n / s),
            _ => None,
        };
        ContextCreate {
            origin: self.origin(&c.header),
            ok: c.ctx != 0,
            ctx: c.ctx,
            context,
            params: ContextParams {
                n_ctx,
                n_batch: check(c.n_batch, plausible::N_BATCH),
                n_ubatch: check(c.n_ubatch, plausible::N_BATCH),
                n_seq_max,
                n_threads: check(c.n_threads, plausible::N_THREADS),
                n_threads_batch: check(c.n_threads_batch, plausible::N_THREADS),
                seq_share,
            },
        }
    }

    fn decode(&mut self, d: &DecodeEvent) -> DecodeStep {
        let origin = self.origin(&d.header);
        let result = DecodeResult::from_ret(d.ret);
        let api = match d.api {
            x if x == DecodeApi::Classic as u8 => "llama_decode",
            x if x == DecodeApi::BatchExt as u8 => "llama_context::decode(llama_batch_ext)",
            _ => "unknown",
        };
        let context = self.process_mut(d.header.tgid).role(d.ctx);
        let mut step = DecodeStep {
            origin,
            ctx: d.ctx,
            context,
            api,
            ret: d.ret,
            result,
            n_tokens: None,
            phase: None,
            prompt_tokens: 0,
            generated_tokens: 0,
            draft_tokens: 0,
            drafts: 0,
            parts: Vec::new(),
            unscanned_tokens: 0,
            context_used: Vec::new(),
        };
        let pid = d.header.tgid;
        if result == DecodeResult::Ok {
            self.process_mut(pid)
                .pending_compute
                .insert(d.header.tid, (d.ctx, d.header.start_ns));
        }
        if d.n_tokens < 0 || (d.flags & F::UNREADABLE != 0 && d.n_runs == 0) {
            return step;
        }
        let n = d.n_tokens as u32;
        step.n_tokens = Some(n);
        if d.flags & F::NO_SEQ_INFO != 0 {
            // llama_batch_get_one: one sequence, last token output.
            let generated = n == 1;
            step.parts.push(Part {
                seq_id: 0,
                pos0: -1,
                n_tokens: n,
                n_outputs: 1,
                kind: if generated {
                    PartKind::Generated
                } else {
                    PartKind::FinalPromptChunk
                },
            });
        } else {
            let no_outputs = d.flags & F::NO_OUTPUT_INFO != 0;
            // Samples taken since this context's previous successful step; None if no sampler
            // is probed. Only a step that succeeds consumes them: a failed call (no KV slot,
            // aborted, …) is retried with the same tokens, and the retry must find its
            // fed-back tokens still pending to be classified as the failed call was.
            let c = self.context_mut(pid, d.ctx);
            let mut sampled = if result == DecodeResult::Ok {
                c.sampled.take()
            } else {
                c.sampled.clone()
            };
            let samplers_seen = sampled.is_some() || self.process_mut(pid).sampler_seen;
            for run in d.runs.iter().take(d.n_runs as usize) {
                let outputs = if no_outputs { 1 } else { run.n_outputs as u32 };
                let single = run.n_tokens == 1 && outputs == 1;
                let fed_back = single
                    && !self.process_mut(pid).launched.contains(&run.seq_id)
                    && if samplers_seen {
                        take(&mut sampled, run.seq_id, run.tok0)
                    } else {
                        self.continues(pid, d.ctx, run.seq_id, run.pos0)
                    };
                // Several outputs whose first token was just sampled for this sequence: the
                // fed-back token and the drafts after it.
                let verification = !single
                    && run.n_tokens > 1
                    && outputs > 1
                    && samplers_seen
                    && !self.process_mut(pid).launched.contains(&run.seq_id)
                    && take(&mut sampled, run.seq_id, run.tok0);
                let kind = if fed_back {
                    PartKind::Generated
                } else if verification {
                    PartKind::Verification
                } else if outputs == 0 {
                    PartKind::PromptChunk
                } else if outputs == 1 && (run.last_output == 1 || no_outputs) {
                    PartKind::FinalPromptChunk
                } else {
                    PartKind::MultiOutput
                };
                step.parts.push(Part {
                    seq_id: run.seq_id,
                    pos0: run.pos0,
                    n_tokens: run.n_tokens as u32,
                    n_outputs: outputs,
                    kind,
                });
            }
            if samplers_seen {
                self.process_mut(pid).sampler_seen = true;
            }
            if result == DecodeResult::Ok {
                // Tokens sampled for sequences this step did not touch stay pending: a program
                // that decodes its sequences one call each feeds them back later.
                let kept: Vec<Pending> = sampled
                    .into_iter()
                    .flatten()
                    .filter(|&(s, _)| s.is_some_and(|s| !step.parts.iter().any(|p| p.seq_id == s)))
                    .collect();
                if !kept.is_empty() {
                    self.context_mut(pid, d.ctx).sampled = Some(kept);
                }
            }
            let scanned: u32 = step.parts.iter().map(|p| p.n_tokens).sum();
            step.unscanned_tokens = n.saturating_sub(scanned);
            if step.unscanned_tokens > 0 {
                // The scan window ended inside the batch: the rest is prompt. Attribute it to
                // the last token's sequence (the common case: one long prompt chunk).
                let last_out = d.flags & F::LAST_VALID != 0 && d.last.output != 0;
                let seq = if d.flags & F::LAST_VALID != 0 {
                    d.last.seq_id
                } else {
                    -1
                };
                let kind = if last_out {
                    PartKind::FinalPromptChunk
                } else {
                    PartKind::PromptChunk
                };
                match step.parts.last_mut() {
                    Some(p)
                        if p.seq_id == seq
                            && !matches!(p.kind, PartKind::Generated | PartKind::Verification) =>
                    {
                        p.n_tokens += step.unscanned_tokens;
                        p.n_outputs += last_out as u32;
                        p.kind = kind;
                    }
                    _ => step.parts.push(Part {
                        seq_id: seq,
                        pos0: -1,
                        n_tokens: step.unscanned_tokens,
                        n_outputs: last_out as u32,
                        kind,
                    }),
                }
            }
        }
        for p in &step.parts {
            match p.kind {
                PartKind::Generated => step.generated_tokens += p.n_tokens,
                PartKind::Verification => {
                    step.generated_tokens += 1;
                    step.draft_tokens += p.n_tokens - 1;
                    step.drafts += 1;
                }
                _ => step.prompt_tokens += p.n_tokens,
            }
        }
        step.phase = Some(match (step.prompt_tokens, step.generated_tokens) {
            (_, 0) => Phase::Prompt,
            (0, _) => Phase::Generation,
            _ => Phase::Mixed,
        });
        if result == DecodeResult::Ok {
            self.advance_positions(pid, d, &step);
            step.context_used = self.context_use.after_decode(pid, d.ctx, &step.parts);
            let proc_ = self.process_mut(pid);
            for p in &step.parts {
                proc_.launched.remove(&p.seq_id);
            }
            let c = self.context_mut(pid, d.ctx);
            c.batch = BatchMap::of(&step);
            c.applies_due = step.parts.iter().map(|p| p.n_outputs).sum();
            c.token_samples = 0;
        }
        step
    }

    /// Whether a token at `pos` moves sequence `seq` forward (a generated token being fed back)
    /// rather than restarting it (a new prompt reusing the sequence). A sequence whose end is
    /// known continues at any later position: its end may be under-estimated when a batch's
    /// tail lay beyond the probe's scan window. An unknown sequence continues unless it starts
    /// at 0 (attached mid-generation). Batches without positions are judged by size alone.
    fn continues(&self, pid: u32, ctx: u64, seq: i32, pos: i32) -> bool {
        if pos < 0 {
            return true;
        }
        let last = self
            .processes
            .get(&pid)
            .and_then(|p| p.contexts.get(&ctx))
            .and_then(|c| c.last_pos.get(&seq));
        match last {
            Some(&last) => pos > last,
            None => pos > 0,
        }
    }

    /// The sequences of context `ctx` whose held end a memory call cuts off (see
    /// [`MemoryChange::truncated`]); their known ends move back.
    fn truncate(&mut self, pid: u32, ctx: u64, m: &probe_common::MemoryEvent) -> Vec<i32> {
        use probe_common::MemoryOp;
        let c = self.context_mut(pid, ctx);
        let last_pos = &mut c.last_pos;
        let seqs: Vec<i32> = last_pos
            .keys()
            .copied()
            .filter(|&s| m.seq_id < 0 || s == m.seq_id)
            .collect();
        let mut cut = Vec::new();
        if m.op == MemoryOp::Clear as u32 {
            // What was decoded is gone: nothing is due to be sampled.
            c.applies_due = 0;
            cut = last_pos.keys().copied().collect();
            last_pos.clear();
        } else if m.op == MemoryOp::SeqRm as u32 && m.ret != 0 {
            let p0 = m.p0.max(0);
            for s in seqs {
                let last = last_pos[&s];
                // From a held position to (at least) the end.
                if p0 <= last && (m.p1 < 0 || m.p1 > last) {
                    cut.push(s);
                    if p0 == 0 {
                        last_pos.remove(&s);
                    } else {
                        last_pos.insert(s, p0 - 1);
                    }
                }
            }
        }
        cut.sort();
        cut
    }

    /// Records where each sequence ends after a successful step.
    fn advance_positions(&mut self, pid: u32, d: &DecodeEvent, step: &DecodeStep) {
        let last_pos = &mut self.context_mut(pid, d.ctx).last_pos;
        for p in &step.parts {
            if p.pos0 >= 0 {
                // Positions are the program's: saturate, never overflow.
                let n = i32::try_from(p.n_tokens).unwrap_or(i32::MAX);
                last_pos.insert(p.seq_id, p.pos0.saturating_add(n) - 1);
            }
        }
        if d.flags & F::LAST_VALID != 0 && d.last.pos >= 0 {
            last_pos.insert(d.last.seq_id, d.last.pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::decode_event;
    use probe_common::SeqRun;

    fn run(seq: i32, pos0: i32, n: u16, outputs: u8, last: bool) -> SeqRun {
        SeqRun {
            seq_id: seq,
            pos0,
            tok0: 100 + pos0,
            n_tokens: n,
            n_outputs: outputs,
            last_output: last as u8,
        }
    }

    fn sample(a: &mut Assembler, token: i32) {
        let ev = probe_common::SampleEvent {
            header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
            api: 0,
            _pad: 0,
            ctx: 0x1000,
            token,
            idx: 0,
        };
        a.process(&Event::Sample(ev));
    }

    #[test]
    fn with_a_sampler_a_fed_back_token_is_one_just_sampled() {
        let mut a = Assembler::new();
        step(&mut a, decode_event(5, &[run(0, 0, 5, 1, true)], 0));
        sample(&mut a, 105);
        // The sampled token (id 105 at pos 5) comes back: generation.
        let s = step(&mut a, decode_event(1, &[run(0, 5, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
        sample(&mut a, 106);
        // The request ended (106 sampled, never decoded). Another prompt whose state was
        // restored from a cache into this sequence re-evaluates its last token at pos 30:
        // past the sequence's end, but not a sampled id: prompt.
        let s = step(&mut a, decode_event(1, &[run(0, 30, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Prompt));
        // Pending samples are per step: 106 no longer counts.
        let mut ev = decode_event(1, &[run(0, 6, 1, 1, true)], 0);
        ev.runs[0].tok0 = 106;
        assert_eq!(step(&mut a, ev).phase, Some(Phase::Prompt));
    }

    /// A program that decodes its sequences one call each: a token sampled for one sequence
    /// waits for that sequence's next step, whatever is decoded in between.
    #[test]
    fn samples_without_an_index_take_the_steps_outputs_in_batch_order() {
        // llama_sample_token*(ctx, candidates): no output index. A step of two sequences
        // (3 prompt tokens of seq 0 with its last output, 2 of seq 5 with theirs): the first
        // such sample is seq 0's, the second seq 5's, a third the last token's (seq 5).
        let mut a = Assembler::new();
        let token_sample = |a: &mut Assembler, token| {
            let ev = probe_common::SampleEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
                ctx: 0x1000,
                token,
                idx: -1,
                api: probe_common::SampleApi::Token as u32,
                ..Default::default()
            };
            match a.process(&Event::Sample(ev)) {
                Some(Observation::Sample(s)) => (s.idx, s.seq_id),
                other => panic!("{other:?}"),
            }
        };
        step(
            &mut a,
            decode_event(5, &[run(0, 0, 3, 1, true), run(5, 0, 2, 1, true)], 0),
        );
        assert_eq!(token_sample(&mut a, 7), (2, Some(0)));
        assert_eq!(token_sample(&mut a, 8), (4, Some(5)));
        assert_eq!(token_sample(&mut a, 9), (-1, Some(5)));
        // A new step starts the count again.
        step(&mut a, decode_event(1, &[run(5, 2, 1, 1, true)], 0));
        assert_eq!(token_sample(&mut a, 10), (0, Some(5)));
    }

    #[test]
    fn samples_wait_for_their_own_sequence() {
        let mut a = Assembler::new();
        let sample_seq = |a: &mut Assembler, token| {
            let ev = probe_common::SampleEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
                ctx: 0x1000,
                token,
                idx: -1,
                ..Default::default()
            };
            a.process(&Event::Sample(ev));
        };
        step(&mut a, decode_event(4, &[run(1, 0, 4, 1, true)], 0));
        sample_seq(&mut a, 104);
        step(&mut a, decode_event(3, &[run(2, 0, 3, 1, true)], 0));
        sample_seq(&mut a, 103);
        // seq 1 feeds back 104 at pos 4, then seq 2 its 103 at pos 3.
        let s = step(&mut a, decode_event(1, &[run(1, 4, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
        let s = step(&mut a, decode_event(1, &[run(2, 3, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
    }

    fn memory(
        a: &mut Assembler,
        op: probe_common::MemoryOp,
        seq: i32,
        p0: i32,
        p1: i32,
    ) -> Vec<i32> {
        let ev = probe_common::MemoryEvent {
            header: crate::decode::tests::header(probe_common::EventKind::Memory, 0, 1),
            op: op as u32,
            seq_id: seq,
            seq_dst: -1,
            p0,
            p1,
            ret: 1,
            // The older names take the context itself.
            handle: 0x1000,
            ..Default::default()
        };
        match a.process(&Event::Memory(ev)) {
            Some(Observation::Memory(m)) => m.truncated,
            other => panic!("{other:?}"),
        }
    }

    /// A memory call cuts a sequence only where it removes held positions up to the end (or
    /// clears): "remove from the current end on", a removal in the middle, a copy and a shift
    /// cut nothing.
    #[test]
    fn memory_cuts_only_what_a_sequence_holds() {
        use probe_common::MemoryOp::{Clear, SeqAdd, SeqCp, SeqRm};
        let mut a = Assembler::new();
        step(&mut a, decode_event(6, &[run(0, 0, 6, 1, true)], 0));
        step(&mut a, decode_event(3, &[run(1, 0, 3, 1, true)], 0));
        // seq 0 holds 0..5, seq 1 0..2.
        assert_eq!(memory(&mut a, SeqRm, -1, 6, -1), Vec::<i32>::new());
        assert_eq!(memory(&mut a, SeqRm, 0, 1, 3), Vec::<i32>::new());
        assert_eq!(memory(&mut a, SeqCp, 0, 0, -1), Vec::<i32>::new());
        assert_eq!(memory(&mut a, SeqAdd, 0, 3, -1), Vec::<i32>::new());
        // Keep 0..3 of seq 0: cut; again: nothing left to cut.
        assert_eq!(memory(&mut a, SeqRm, 0, 4, -1), [0]);
        assert_eq!(memory(&mut a, SeqRm, 0, 4, -1), Vec::<i32>::new());
        // Every sequence from 3 on: seq 0 ends at 3, seq 1 at 2: only seq 0.
        assert_eq!(memory(&mut a, SeqRm, -1, 3, -1), [0]);
        // Negative p0 means from the start.
        assert_eq!(memory(&mut a, SeqRm, 1, -1, -1), [1]);
        step(&mut a, decode_event(2, &[run(2, 0, 2, 1, true)], 0));
        assert_eq!(memory(&mut a, Clear, -1, -1, -1), [0, 2]);
    }

    /// A program that sizes its parameters with a throw-away context frees it before creating
    /// the real one: the context it uses next is the main one, and a freed context cuts its
    /// sequences.
    #[test]
    fn a_freed_context_hands_the_main_role_on() {
        use probe_common::{ContextEvent, ContextFreeEvent, EventKind};
        let mut a = Assembler::new();
        let create = |a: &mut Assembler, ctx| {
            let ev = ContextEvent {
                header: crate::decode::tests::header(EventKind::ContextCreate, 0, 1),
                ctx,
                ..Default::default()
            };
            match a.process(&Event::Context(ev)) {
                Some(Observation::ContextCreate(c)) => c.context,
                o => panic!("{o:?}"),
            }
        };
        let free = |a: &mut Assembler, ctx| {
            let ev = ContextFreeEvent {
                header: crate::decode::tests::header(EventKind::ContextFree, 0, 1),
                ctx,
            };
            a.process(&Event::ContextFree(ev))
        };
        assert_eq!(create(&mut a, 0x2000), ContextRole::Main);
        match free(&mut a, 0x2000) {
            Some(Observation::Memory(m)) => {
                assert_eq!((m.op, m.context), ("free", Some(ContextRole::Main)));
                assert!(m.truncated.is_empty());
            }
            o => panic!("{o:?}"),
        }
        // The real context (here at the address the helpers decode on) is main.
        assert_eq!(create(&mut a, 0x1000), ContextRole::Main);
        step(&mut a, decode_event(3, &[run(0, 0, 3, 1, true)], 0));
        match free(&mut a, 0x1000) {
            Some(Observation::Memory(m)) => {
                assert_eq!(m.truncated, [0]);
                assert_eq!(m.context_used[0].used, 0);
            }
            o => panic!("{o:?}"),
        }
        // A context never seen created or used: nothing.
        assert!(free(&mut a, 0x3000).is_none());
    }

    /// The sampler chain's apply (a program that samples itself) is a sample at most once per
    /// output of the latest step, none after a clear, none with nothing selected; once a
    /// sampling function is seen, applies are not samples at all.
    #[test]
    fn applies_are_samples_only_where_due() {
        let mut a = Assembler::new();
        let apply = |a: &mut Assembler, token| {
            let ev = probe_common::SampleEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
                api: probe_common::SampleApi::Apply as u32,
                token,
                idx: -1,
                ..Default::default()
            };
            a.process(&Event::Sample(ev)).is_some()
        };
        // Before any step: none due (a prompt's tokens given to the sampler).
        assert!(!apply(&mut a, 5));
        step(&mut a, decode_event(4, &[run(0, 0, 4, 1, true)], 0));
        assert!(!apply(&mut a, -1));
        assert!(apply(&mut a, 104));
        assert!(!apply(&mut a, 104));
        // The token fed back is generation.
        let s = step(&mut a, decode_event(1, &[run(0, 4, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
        memory(&mut a, probe_common::MemoryOp::Clear, -1, -1, -1);
        assert!(!apply(&mut a, 105));
        // A sampling function takes over.
        step(&mut a, decode_event(2, &[run(0, 0, 2, 1, true)], 0));
        sample(&mut a, 7);
        assert!(a.samples_by_function(7));
        step(&mut a, decode_event(1, &[run(0, 2, 1, 1, true)], 0));
        assert!(!apply(&mut a, 8));
    }

    fn step(a: &mut Assembler, ev: DecodeEvent) -> DecodeStep {
        match a.process(&Event::Decode(Box::new(ev))).unwrap() {
            Observation::Decode(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Found by the decode_event fuzz target: a batch position near `i32::MAX` (the program's
    /// batch is read as it is) overflowed the end of its sequence; counts and shifts at their
    /// limits saturate too (context use, requests).
    #[test]
    fn extreme_positions_and_counts_saturate() {
        let mut a = Assembler::new();
        let mut requests = requests::Requests::new(Mode::BatchView);
        let mut r = run(0, 0, 5, 1, true);
        r.pos0 = i32::MAX - 1;
        let mut feed = |a: &mut Assembler, ev: Event| {
            if let Some(obs) = a.process(&ev) {
                requests.observe(&obs);
            }
        };
        feed(&mut a, Event::Decode(Box::new(decode_event(5, &[r], 0))));
        // Past the scan window by i32::MAX tokens, three times: one request's prompt.
        for _ in 0..3 {
            let mut big = decode_event(i32::MAX, &[r], 0);
            big.flags = F::LAST_VALID;
            big.last.pos = i32::MAX;
            feed(&mut a, Event::Decode(Box::new(big)));
        }
        for (op, delta) in [
            (probe_common::MemoryOp::SeqAdd, i32::MAX),
            (probe_common::MemoryOp::SeqAdd, i32::MIN),
            (probe_common::MemoryOp::SeqCp, 0),
        ] {
            let ev = probe_common::MemoryEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Memory, 0, 1),
                op: op as u32,
                seq_id: 0,
                seq_dst: 1,
                p0: 1,
                p1: -1,
                ret: 1,
                delta,
                handle: 0x1000,
                ..Default::default()
            };
            feed(&mut a, Event::Memory(ev));
        }
        let closed = requests.finish();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].prompt_tokens, u32::MAX);
        assert!(requests.expire(u64::MAX).is_empty());
    }

    #[test]
    fn prompt_then_generation_then_mixed() {
        let mut a = Assembler::new();
        let s = step(&mut a, decode_event(12, &[run(0, 0, 12, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Prompt));
        assert_eq!((s.prompt_tokens, s.generated_tokens), (12, 0));
        assert_eq!(s.parts[0].kind, PartKind::FinalPromptChunk);

        let s = step(&mut a, decode_event(1, &[run(0, 12, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
        assert_eq!((s.prompt_tokens, s.generated_tokens), (0, 1));

        // seq 0 generates while seq 1 starts a prompt.
        let s = step(
            &mut a,
            decode_event(7, &[run(0, 13, 1, 1, true), run(1, 0, 6, 1, true)], 0),
        );
        assert_eq!(s.phase, Some(Phase::Mixed));
        assert_eq!((s.prompt_tokens, s.generated_tokens), (6, 1));
    }

    #[test]
    fn a_single_token_that_does_not_continue_its_sequence_is_prompt() {
        let mut a = Assembler::new();
        step(&mut a, decode_event(5, &[run(0, 0, 5, 1, true)], 0));
        step(&mut a, decode_event(1, &[run(0, 5, 1, 1, true)], 0));
        // A new request whose prompt is all cached but the last token: re-evaluated at pos 4.
        let s = step(&mut a, decode_event(1, &[run(0, 4, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Prompt));
    }

    #[test]
    fn failed_steps_do_not_advance_positions() {
        let mut a = Assembler::new();
        step(&mut a, decode_event(3, &[run(0, 0, 3, 1, true)], 0));
        let s = step(&mut a, decode_event(1, &[run(0, 3, 1, 1, true)], 1));
        assert_eq!(s.result, DecodeResult::NoKvSlot);
        // The retry of the same token still continues the sequence.
        let s = step(&mut a, decode_event(1, &[run(0, 3, 1, 1, true)], 0));
        assert_eq!(s.phase, Some(Phase::Generation));
    }

    /// A slot that just took a task re-evaluates the last prompt token of a cached prompt: one
    /// token with output at a later position, which would look fed back; it is a prompt. And
    /// a sample counts as fed back only on the sequence it was sampled for.
    #[test]
    fn a_launched_slot_starts_with_a_prompt_and_samples_are_per_sequence() {
        let mut a = Assembler::new();
        let mut launch = probe_common::SlotLaunchEvent {
            header: crate::decode::tests::header(probe_common::EventKind::SlotLaunch, 0, 1),
            slot_id: 2,
            task_id: 9,
            ok: 1,
            ..Default::default()
        };
        launch.header.tgid = 7;
        a.process(&Event::SlotLaunch(launch));
        let mut ev = decode_event(1, &[run(2, 40, 1, 1, true)], 0);
        ev.header.tgid = 7;
        assert_eq!(step(&mut a, ev).phase, Some(Phase::Prompt));
        // Two sequences generate; seq 0 samples 150, seq 1 samples 160.
        let two = || {
            let mut e = decode_event(2, &[run(0, 49, 1, 1, true), run(1, 59, 1, 1, true)], 0);
            e.header.tgid = 7;
            e
        };
        step(&mut a, two());
        for (idx, token) in [(0, 150), (1, 160)] {
            let mut ev = probe_common::SampleEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
                api: 0,
                _pad: 0,
                ctx: 0x1000,
                token,
                idx,
            };
            ev.header.tgid = 7;
            match a.process(&Event::Sample(ev)).unwrap() {
                Observation::Sample(s) => assert_eq!(s.seq_id, Some(idx)),
                o => panic!("{o:?}"),
            }
        }
        // seq 0 feeds back 150; seq 1 gets a new one-token prompt whose id is 150: prompt.
        let mut e = decode_event(2, &[run(0, 50, 1, 1, true), run(1, 60, 1, 1, true)], 0);
        e.header.tgid = 7;
        e.runs[0].tok0 = 150;
        e.runs[1].tok0 = 150;
        let s = step(&mut a, e);
        assert_eq!(
            s.parts.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [PartKind::Generated, PartKind::FinalPromptChunk]
        );
    }

    /// Speculative decoding in llama-server: the slot names its target and draft contexts; the
    /// main context's verification batch (the fed-back token and three drafts) is generation
    /// with 3 draft tokens, and its samples after the first each accept a draft; the draft
    /// context's steps and samples are labelled draft.
    #[test]
    fn verification_batches_and_draft_contexts() {
        let mut a = Assembler::new();
        let (main, draft) = (0x1000, 0x2000);
        let launch = probe_common::SlotLaunchEvent {
            header: crate::decode::tests::header(probe_common::EventKind::SlotLaunch, 0, 1),
            slot_id: 0,
            task_id: 1,
            ok: 1,
            ctx: main,
            ctx_dft: draft,
            ..Default::default()
        };
        a.process(&Event::SlotLaunch(launch));
        let sample_on = |a: &mut Assembler, ctx, idx, token| -> Sample {
            let ev = probe_common::SampleEvent {
                header: crate::decode::tests::header(probe_common::EventKind::Sample, 0, 1),
                api: 0,
                _pad: 0,
                ctx,
                token,
                idx,
            };
            match a.process(&Event::Sample(ev)).unwrap() {
                Observation::Sample(s) => s,
                o => panic!("{o:?}"),
            }
        };
        // The draft context decodes the prompt first here: still the draft.
        let mut ev = decode_event(6, &[run(0, 0, 6, 1, true)], 0);
        ev.ctx = draft;
        assert_eq!(step(&mut a, ev).context, ContextRole::Draft);
        let s = step(&mut a, decode_event(6, &[run(0, 0, 6, 1, true)], 0));
        assert_eq!((s.context, s.prompt_tokens), (ContextRole::Main, 6));
        assert!(!sample_on(&mut a, main, 5, 504).accepted_draft);
        // The verification: 504 fed back at pos 6, then 3 drafts, all with outputs.
        let mut ev = decode_event(4, &[run(0, 6, 4, 3, true)], 0);
        ev.runs[0].tok0 = 504;
        let v = step(&mut a, ev);
        assert_eq!(v.parts[0].kind, PartKind::Verification);
        assert_eq!(
            (v.phase, v.prompt_tokens, v.generated_tokens, v.draft_tokens),
            (Some(Phase::Generation), 0, 1, 3)
        );
        // Two drafts accepted, then the correction: 3 samples, 2 accepting.
        let accepted: Vec<bool> = [0, 1, 2]
            .into_iter()
            .map(|i| sample_on(&mut a, main, i, 600 + i).accepted_draft)
            .collect();
        assert_eq!(accepted, [false, true, true]);
        assert_eq!(sample_on(&mut a, draft, 0, 7).context, ContextRole::Draft);
        // An all-outputs batch that is not a fed-back token (embeddings) is no verification.
        let mut ev = decode_event(3, &[run(1, 0, 3, 3, true)], 0);
        ev.runs[0].tok0 = 9;
        assert_eq!(step(&mut a, ev).parts[0].kind, PartKind::MultiOutput);
    }

    /// A failed call retried with the same batch, as a server does after `no_kv_slot`: with a
    /// sampler probed, the fed-back token stays pending until the step that succeeds, so the
    /// failed call and its retry are classified alike, whatever the return code.
    #[test]
    fn a_retried_step_keeps_its_phase_with_a_sampler() {
        for ret in [1, 2, -1, -3] {
            let mut a = Assembler::new();
            step(&mut a, decode_event(3, &[run(0, 0, 3, 1, true)], 0));
            sample(&mut a, 103);
            // Generation: the sampled 103 fed back at pos 3, failing once.
            let failed = step(&mut a, decode_event(1, &[run(0, 3, 1, 1, true)], ret));
            let retry = step(&mut a, decode_event(1, &[run(0, 3, 1, 1, true)], 0));
            for s in [&failed, &retry] {
                assert_eq!(s.phase, Some(Phase::Generation), "ret {ret}: {s:?}");
                assert_eq!((s.prompt_tokens, s.generated_tokens), (0, 1));
            }
            assert_eq!(failed.result, DecodeResult::from_ret(ret));
            // Mixed: seq 0 feeds back 104 while seq 1 starts a 5-token prompt.
            sample(&mut a, 104);
            let mixed = || decode_event(6, &[run(0, 4, 1, 1, true), run(1, 0, 5, 1, true)], 0);
            let mut failing = mixed();
            failing.ret = ret;
            let failed = step(&mut a, failing);
            let retry = step(&mut a, mixed());
            for s in [&failed, &retry] {
                assert_eq!(s.phase, Some(Phase::Mixed), "ret {ret}: {s:?}");
                assert_eq!((s.prompt_tokens, s.generated_tokens), (5, 1));
            }
            // Consumed by the retry that succeeded: a third copy would be prompt.
            let again = step(&mut a, decode_event(1, &[run(0, 4, 1, 1, true)], 0));
            assert_eq!(again.phase, Some(Phase::Prompt), "ret {ret}");
        }
    }

    #[test]
    fn tokens_beyond_the_scan_window_are_prompt_of_the_last_sequence() {
        let mut a = Assembler::new();
        let mut ev = decode_event(200, &[run(2, 0, 64, 0, false)], 0);
        ev.flags = F::LAST_VALID;
        ev.last.seq_id = 2;
        ev.last.pos = 199;
        ev.last.output = 1;
        let s = step(&mut a, ev);
        assert_eq!(s.unscanned_tokens, 136);
        assert_eq!(s.parts.len(), 1);
        assert_eq!(s.parts[0].n_tokens, 200);
        assert_eq!(s.parts[0].kind, PartKind::FinalPromptChunk);
        assert_eq!(s.prompt_tokens, 200);
    }

    #[test]
    fn get_one_batches_use_the_token_count() {
        let mut a = Assembler::new();
        let mut ev = decode_event(7, &[], 0);
        ev.flags = F::NO_SEQ_INFO;
        assert_eq!(step(&mut a, ev).phase, Some(Phase::Prompt));
        let mut ev = decode_event(1, &[], 0);
        ev.flags = F::NO_SEQ_INFO;
        assert_eq!(step(&mut a, ev).phase, Some(Phase::Generation));
    }

    #[test]
    fn return_codes_map_to_results() {
        assert_eq!(DecodeResult::from_ret(0), DecodeResult::Ok);
        assert_eq!(DecodeResult::from_ret(1), DecodeResult::NoKvSlot);
        assert_eq!(DecodeResult::from_ret(2), DecodeResult::Aborted);
        assert_eq!(DecodeResult::from_ret(-1), DecodeResult::InvalidBatch);
        assert_eq!(DecodeResult::from_ret(-3), DecodeResult::Error);
    }
}
