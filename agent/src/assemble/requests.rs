//! Requests reconstructed from the batch view, with no help from llama.cpp: per sequence,
//! prompt chunks open a request, the final chunk's sampling gives its first token, each later
//! sample on the sequence one more generated token; a new prompt on the sequence, a change of
//! its KV memory, a long silence or the end of the session closes it.
//!
//! In llama-server, requests are its tasks, joined by task id ([`Mode::ServerTasks`]):
//! `server_queue::post` gives each task's id, type and the time the server accepted it;
//! `launch_slot_with_task` says which slot (the sequence id of its batches) took which task,
//! so the request that opens next on that sequence is that task's, with the wait in between
//! as its queue wait; `server_slot::release` ends it at once. The join holds whatever the
//! threads' scheduling: a post is sent from the entry of `post`, before the server loop can see
//! the task, and launch and decode run on the loop's thread, in order. A task cancelled before
//! a slot took it (a cancel task naming it), or refused at launch, is counted by its id and
//! never becomes a request.
//!
//! Where `launch_slot_with_task` is not found ([`Mode::ServerQueue`]), posts are matched by
//! time instead: the next request whose prompt starts takes the oldest post, as the server
//! launches tasks in the order they were posted (a guess when several requests start in the
//! same step: the step lists them in slot order). A post older than [`STALE_POST_NS`] that is
//! still unclaimed while the process has no request in progress, although a decode step
//! started after it has been seen, was work that never reached a slot and is dropped.
//!
//! Samples are tied to sequences by their output index: `common_sampler_sample(…, idx)` names
//! the batch index of the token whose logits it samples (`-1`: the last output), and the
//! decode step's parts say which sequence holds each index. Prompt tokens reused from the
//! cache are the positions before the request's first prompt chunk.
//!
//! A context shift (llama-server, llama-cli: the sequence outgrew its share of the context)
//! is a `seq_add` with a negative shift on a sequence whose request is generating; it does not
//! end the request.

use std::collections::HashMap;

use std::collections::VecDeque;

use crate::model::{
    ContextRole, ContextShift, DecodeResult, DecodeStep, MemoryChange, Mode, Observation, PartKind,
    Request, RequestStep, Sample, SlotLaunch, SlotRelease, TaskPost, Unserved,
};

/// Decode steps kept per request when steps are kept ([`Requests::keep_steps`]); later ones
/// are not (counted in [`Requests::steps_dropped`]).
pub const MAX_STEPS_PER_REQUEST: usize = 4096;

#[derive(Clone, Debug)]
struct Open {
    req: Request,
    /// The final prompt chunk was decoded: samples now generate.
    generating: bool,
    /// The position after the last tokens it decoded on its sequence.
    next_pos: i32,
    last_activity_ns: u64,
}

/// Prompt tokens of a warm-up decode at most (llama.cpp's is BOS and EOS, or one of them).
const MAX_WARMUP_TOKENS: u32 = 2;

/// A request silent for this long is closed (its last token was sampled long ago).
const IDLE_CLOSE_NS: u64 = 2_000_000_000;

/// An open request's key: (pid, context, sequence).
type Key = (u32, u64, i32);

/// A post unclaimed this long while its process has no request in progress is dropped
/// ([`Mode::ServerQueue`]).
pub const STALE_POST_NS: u64 = 1_000_000_000;

/// Posts (or posted tasks) kept per process: a server flooded with work it never starts must
/// not grow us.
const MAX_PENDING_POSTS: usize = 4096;

/// A task llama-server accepted, by id, until a request takes it.
#[derive(Clone, Copy, Debug)]
struct Posted {
    at_ns: u64,
    task_type: &'static str,
    /// A slot took it: it is in progress, a cancel no longer drops it.
    launched: bool,
}

/// The task a slot took, for the request that opens next on its sequence.
#[derive(Clone, Copy, Debug)]
struct Launched {
    task_id: i32,
    posted: Option<Posted>,
}

/// The reconstruction state.
pub struct Requests {
    /// The mode of processes not given one ([`Requests::set_mode`]).
    mode: Mode,
    /// Each process's mode, where set (the host agent traces servers and other programs).
    modes: HashMap<u32, Mode>,
    /// Keep each request's decode steps (for per-step spans).
    keep_steps: bool,
    /// Count the CPU samples of each request's steps (`--profile-cpu`).
    count_cpu: bool,
    /// Steps not kept: over [`MAX_STEPS_PER_REQUEST`] in one request.
    pub steps_dropped: u64,
    open: HashMap<Key, Open>,
    /// [`Mode::ServerTasks`]: accepted tasks by (pid, task id), until a request takes them.
    posted: HashMap<(u32, i32), Posted>,
    /// [`Mode::ServerTasks`]: the task each slot took, by (pid, slot id).
    launched: HashMap<(u32, i32), Launched>,
    /// [`Mode::ServerQueue`]: accepted, not yet started: post times per process, oldest first.
    posts: HashMap<u32, VecDeque<u64>>,
    next_id: u64,
    /// Accepted work that never became a request.
    pub unserved: Unserved,
    /// Context shifts seen.
    pub context_shifts: u64,
    /// Warm-ups seen (see [`Requests::is_warmup`]): not requests.
    pub warmups: u64,
    /// Start of the latest decode step seen, per process.
    last_step_ns: HashMap<u32, u64>,
    /// llama-servers whose slot release is not probed (2024: `server_slot::release` inlined):
    /// their requests end by silence, as in the batch view.
    no_release: std::collections::HashSet<u32>,
}

impl Requests {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            modes: HashMap::new(),
            keep_steps: false,
            count_cpu: false,
            steps_dropped: 0,
            open: HashMap::new(),
            posted: HashMap::new(),
            launched: HashMap::new(),
            posts: HashMap::new(),
            next_id: 0,
            unserved: Unserved::default(),
            context_shifts: 0,
            warmups: 0,
            last_step_ns: HashMap::new(),
            no_release: Default::default(),
        }
    }

    /// Process `pid` is a llama-server whose slot release is not probed: its requests end
    /// after [`IDLE_CLOSE_NS`] of silence (or at their sequence's next prompt).
    pub fn without_release(&mut self, pid: u32) {
        self.no_release.insert(pid);
    }

    /// How requests of process `pid` are reconstructed (else the mode given at creation).
    pub fn set_mode(&mut self, pid: u32, mode: Mode) {
        self.modes.insert(pid, mode);
    }

    fn mode(&self, pid: u32) -> Mode {
        self.modes.get(&pid).copied().unwrap_or(self.mode)
    }

    /// Keeps each request's decode steps on it ([`Request::steps`]), at most
    /// [`MAX_STEPS_PER_REQUEST`] each.
    pub fn keep_steps(mut self, keep: bool) -> Self {
        self.keep_steps = keep;
        self
    }

    /// Counts CPU samples on each request ([`Request::cpu_samples`], `--profile-cpu`).
    pub fn count_cpu(mut self, count: bool) -> Self {
        self.count_cpu = count;
        self
    }

    /// CPU samples are counted on requests.
    pub fn counts_cpu(&self) -> bool {
        self.count_cpu
    }

    /// The ids of the requests open on sequences `seqs` of context `ctx`: those a decode step
    /// of them carries, once the step has been observed.
    pub fn open_ids(&self, pid: u32, ctx: u64, seqs: &[i32]) -> Vec<u64> {
        seqs.iter()
            .filter_map(|&seq| self.open.get(&(pid, ctx, seq)).map(|o| o.req.id))
            .collect()
    }

    /// A CPU sample of a step of context `ctx` on `seqs` that carried requests `ids`: counted
    /// on those still open; returns the ids of those that are not (closed since the step).
    pub fn cpu_sample(&mut self, pid: u32, ctx: u64, seqs: &[i32], ids: &[u64]) -> Vec<u64> {
        let mut closed = ids.to_vec();
        for &seq in seqs {
            if let Some(o) = self.open.get_mut(&(pid, ctx, seq)) {
                if let Some(i) = closed.iter().position(|&id| id == o.req.id) {
                    closed.swap_remove(i);
                    let n = o.req.cpu_samples.get_or_insert(0);
                    *n = n.saturating_add(1);
                }
            }
        }
        closed
    }

    /// Updates the state with one observation; returns what it made: the requests it closed
    /// and the context shifts it recognised.
    pub fn observe(&mut self, obs: &Observation) -> Vec<Observation> {
        // Requests live on the main context: a draft model's steps and samples are its
        // speculation, not requests of their own.
        let draft = Some(ContextRole::Draft);
        let closed = match obs {
            Observation::Decode(d) if d.context == ContextRole::Draft => vec![],
            Observation::Decode(d) if d.result == DecodeResult::Ok => self.decode(d),
            Observation::Sample(s) if s.context == ContextRole::Draft => vec![],
            Observation::Sample(s) => {
                self.sample(s);
                vec![]
            }
            Observation::Memory(m) if m.context == draft => vec![],
            Observation::Memory(m) => return self.memory(m),
            Observation::TaskPost(p) => {
                self.post(p);
                vec![]
            }
            Observation::SlotLaunch(l) => {
                self.launch(l);
                vec![]
            }
            Observation::SlotRelease(r) => self.released(r),
            _ => vec![],
        };
        closed.into_iter().map(Observation::Request).collect()
    }

    fn post(&mut self, p: &TaskPost) {
        let pid = p.origin.pid;
        // Cancels: pushed to the front (2025+), or a cancel task (2024).
        let cancel = !p.tasks.is_empty() && p.tasks.iter().all(|t| t.task_type == "cancel");
        if p.front || cancel {
            // Cancels: a task still waiting for a slot is dropped; a running one ends at its
            // slot's release.
            for t in &p.tasks {
                let key = (pid, t.id_target);
                if self.posted.get(&key).is_some_and(|t| !t.launched) {
                    self.posted.remove(&key);
                    self.unserved.cancelled += 1;
                }
            }
            return;
        }
        let at = p.origin.start_ns;
        if self.mode(pid) == Mode::ServerTasks {
            // Requests only: other work (slot saves, LoRA changes, …) never reaches a slot.
            let is_request = |t: &str| t == "unknown" || crate::catalog::is_request_type(t);
            for t in p
                .tasks
                .iter()
                .filter(|t| t.id >= 0 && is_request(t.task_type))
            {
                // A post seen after its launch (2024: the id is post's return value, read when
                // post returns, and the server loop may launch the task before): it goes to
                // the task's slot or request.
                let posted = Posted {
                    at_ns: at,
                    task_type: t.task_type,
                    launched: true,
                };
                if let Some(l) = self
                    .launched
                    .iter_mut()
                    .find(|(k, l)| k.0 == pid && l.task_id == t.id && l.posted.is_none())
                {
                    l.1.posted = Some(posted);
                    continue;
                }
                if let Some(o) = self.open.iter_mut().find(|(k, o)| {
                    k.0 == pid && o.req.task_id == Some(t.id) && o.req.queued_ns.is_none()
                }) {
                    o.1.req.queued_ns = Some(at);
                    if o.1.req.task_type == "unknown" {
                        o.1.req.task_type = t.task_type;
                    }
                    continue;
                }
                if self.posted.len() >= MAX_PENDING_POSTS {
                    // Bounded: the oldest task, never taken, loses its place.
                    if let Some(oldest) = self.posted.iter().min_by_key(|(_, p)| p.at_ns) {
                        let k = *oldest.0;
                        self.posted.remove(&k);
                        self.unserved.unclaimed += 1;
                    }
                }
                self.posted.insert(
                    (pid, t.id),
                    Posted {
                        at_ns: at,
                        task_type: t.task_type,
                        launched: false,
                    },
                );
            }
            return;
        }
        let q = self.posts.entry(pid).or_default();
        if q.len() >= MAX_PENDING_POSTS {
            q.pop_front();
            self.unserved.unclaimed += 1;
        }
        // Posts of several threads may arrive out of order: keep them sorted by time.
        let i = q.partition_point(|t| *t <= at);
        q.insert(i, at);
    }

    fn launch(&mut self, l: &SlotLaunch) {
        let pid = l.origin.pid;
        if !l.ok {
            if self.posted.remove(&(pid, l.task_id)).is_some() {
                self.unserved.rejected += 1;
            }
            return;
        }
        let posted = self.posted.get_mut(&(pid, l.task_id)).map(|p| {
            p.launched = true;
            *p
        });
        self.launched.insert(
            (pid, l.slot_id),
            Launched {
                task_id: l.task_id,
                posted,
            },
        );
    }

    /// llama-server's slot `slot_id` let its task go: the request on that sequence is over
    /// (whichever context: llama-server's slots are its sequences).
    fn released(&mut self, r: &SlotRelease) -> Vec<Request> {
        let pid = r.origin.pid;
        let launched = self.launched.remove(&(pid, r.slot_id));
        let task_id = launched
            .map(|l| l.task_id)
            .or((r.task_id >= 0).then_some(r.task_id));
        if let Some(t) = task_id {
            self.posted.remove(&(pid, t));
        }
        let keys: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.0 == pid && k.2 == r.slot_id)
            .copied()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.close(k, "slot_released"))
            .collect()
    }

    /// The oldest post of `pid` made before `start_ns` ([`Mode::ServerQueue`]).
    fn claim_post(&mut self, pid: u32, start_ns: u64) -> Option<u64> {
        let q = self.posts.get_mut(&pid)?;
        if *q.front()? <= start_ns {
            q.pop_front()
        } else {
            None
        }
    }

    fn close(&mut self, key: Key, why: &'static str) -> Option<Request> {
        let mut o = self.open.remove(&key)?;
        o.req.closed_by = why;
        if self.is_warmup(&o.req) {
            self.warmups += 1;
            return None;
        }
        // A request whose prompt was never completed has no end of its own.
        if o.req.end_ns == 0 {
            o.req.end_ns = o.last_activity_ns;
        }
        if o.req.task_type.is_empty() {
            o.req.task_type = if o.req.generated_tokens > 0 {
                "completion"
            } else {
                "unknown"
            };
        }
        Some(o.req)
    }

    /// Start-up, not traffic: llama.cpp warms a context up after loading (a decode of one or
    /// two tokens, then the memory is cleared, no sample), and in llama-server a request exists
    /// only for a task.
    fn is_warmup(&self, r: &Request) -> bool {
        let no_token = r.first_token_ns.is_none() && r.generated_tokens == 0;
        match self.mode(r.pid) {
            Mode::ServerTasks => r.task_id.is_none() && no_token,
            _ => {
                no_token
                    && matches!(r.closed_by, "memory_reused" | "context_freed")
                    && r.decode_steps <= 1
                    && r.prompt_tokens <= MAX_WARMUP_TOKENS
            }
        }
    }

    /// A new request on `key`, starting with step `d`: its task and acceptance time.
    fn opened(&mut self, key: Key, d: &DecodeStep, pos0: i32) -> Open {
        self.next_id += 1;
        let (pid, start) = (key.0, d.origin.start_ns);
        let (task_id, queued_ns, task_type) = match self.mode(pid) {
            Mode::ServerTasks => match self.launched.remove(&(pid, key.2)) {
                Some(l) => {
                    self.posted.remove(&(pid, l.task_id));
                    (
                        Some(l.task_id),
                        l.posted.map(|p| p.at_ns),
                        l.posted.map_or("unknown", |p| p.task_type),
                    )
                }
                None => (None, None, ""),
            },
            Mode::ServerQueue => (None, self.claim_post(pid, start), ""),
            Mode::BatchView => (None, None, ""),
        };
        Open {
            req: Request {
                id: self.next_id,
                pid,
                model: d.origin.model.clone(),
                ctx: d.ctx,
                seq_id: key.2,
                task_id,
                task_type,
                queued_ns,
                start_ns: start,
                prompt_end_ns: None,
                first_token_ns: None,
                end_ns: 0,
                prompt_tokens: 0,
                cached_tokens: pos0.max(0) as u32,
                generated_tokens: 0,
                decode_steps: 0,
                context_shifts: 0,
                closed_by: "",
                decode_ns: 0,
                sampling_ns: 0,
                cpu_samples: self.count_cpu.then_some(0),
                steps: Vec::new(),
            },
            generating: false,
            next_pos: pos0,
            last_activity_ns: d.origin.end_ns,
        }
    }

    fn decode(&mut self, d: &DecodeStep) -> Vec<Request> {
        let pid = d.origin.pid;
        let last = self.last_step_ns.entry(pid).or_default();
        *last = (*last).max(d.origin.start_ns);
        let mut closed = Vec::new();
        for p in &d.parts {
            let key = (pid, d.ctx, p.seq_id);
            if !matches!(p.kind, PartKind::Generated | PartKind::Verification) {
                // A prompt after generation is the next request on this sequence. Without
                // task ids, a prompt chunk that continues the sequence where the request's
                // prompt ended, nothing sampled in between, continues that prompt: the
                // earlier chunk's output went unused (gpt4all asks for the logits of every
                // chunk's last token).
                let continues = |o: &Open| {
                    self.mode(pid) == Mode::BatchView
                        && o.req.generated_tokens == 0
                        && o.next_pos == p.pos0
                };
                if self
                    .open
                    .get(&key)
                    .is_some_and(|o| o.generating && !continues(o))
                {
                    closed.extend(self.close(key, "next_request"));
                }
                if !self.open.contains_key(&key) {
                    let o = self.opened(key, d, p.pos0);
                    self.open.insert(key, o);
                }
                let o = self.open.get_mut(&key).expect("inserted above");
                o.req.prompt_tokens = o.req.prompt_tokens.saturating_add(p.n_tokens);
                if matches!(p.kind, PartKind::FinalPromptChunk | PartKind::MultiOutput) {
                    o.generating = true;
                    o.req.prompt_end_ns = Some(d.origin.end_ns);
                }
            }
            if let Some(o) = self.open.get_mut(&key) {
                o.req.decode_steps += 1;
                o.req.decode_ns = o.req.decode_ns.saturating_add(d.origin.duration_ns());
                o.next_pos = p.pos0.saturating_add_unsigned(p.n_tokens);
                o.last_activity_ns = d.origin.end_ns;
                if self.keep_steps {
                    if o.req.steps.len() < MAX_STEPS_PER_REQUEST {
                        o.req.steps.push(RequestStep {
                            start_ns: d.origin.start_ns,
                            end_ns: d.origin.end_ns,
                            tid: d.origin.tid,
                            n_tokens: d.n_tokens,
                            seq_tokens: p.n_tokens,
                            phase: d.phase.map_or("unknown", |p| p.label()),
                            result: d.result.label(),
                        });
                    } else {
                        self.steps_dropped += 1;
                    }
                }
            }
        }
        closed
    }

    fn sample(&mut self, s: &Sample) {
        let pid = s.origin.pid;
        let Some(seq) = s.seq_id else {
            return;
        };
        let Some(o) = self.open.get_mut(&(pid, s.ctx, seq)) else {
            return;
        };
        if !o.generating {
            return;
        }
        o.req.generated_tokens += 1;
        o.req.sampling_ns = o.req.sampling_ns.saturating_add(s.origin.duration_ns());
        o.req.first_token_ns.get_or_insert(s.origin.end_ns);
        o.req.end_ns = s.origin.end_ns;
        o.last_activity_ns = s.origin.end_ns;
    }

    fn memory(&mut self, m: &MemoryChange) -> Vec<Observation> {
        let pid = m.origin.pid;
        let generating = |o: &Open| o.generating && o.req.generated_tokens > 0;
        if m.op == "seq_add" {
            // A shift back while the sequence generates: its context was full.
            if m.delta >= 0 {
                return vec![];
            }
            return self
                .open
                .iter_mut()
                .filter(|(k, o)| k.0 == pid && (m.seq_id < 0 || k.2 == m.seq_id) && generating(o))
                .map(|(k, o)| {
                    o.req.context_shifts += 1;
                    self.context_shifts += 1;
                    Observation::ContextShift(ContextShift {
                        origin: m.origin.clone(),
                        seq_id: k.2,
                        discarded: m.delta.unsigned_abs(),
                        request_id: o.req.id,
                    })
                })
                .collect();
        }
        // llama-server says when a request ends (its slot's release): its memory calls
        // (trimming rejected drafts, reusing a cached prefix) end none.
        if self.mode(pid) != Mode::BatchView {
            return vec![];
        }
        let keys: Vec<_> = self
            .open
            .iter()
            .filter(|(k, o)| {
                // Only a call that changes what the sequence holds ends its request: a
                // removal of held positions to the end, a clear. A removal past the end (a
                // binding's "remove from the current end on" before every eval), one in the
                // middle (a context shift), a copy or a shift keep it open.
                // A clear or a free cuts every sequence (also those whose positions were never
                // seen: `llama_batch_get_one` batches carry none).
                let all = matches!(m.op, "clear" | "free");
                k.0 == pid && k.1 == m.ctx && o.generating && (all || m.truncated.contains(&k.2))
            })
            .map(|(k, _)| *k)
            .collect();
        // Only a request whose prompt was decoded is closed by its memory being cut (filtered
        // above); a removal during a long prompt belongs to it.
        let why = if m.op == "free" {
            "context_freed"
        } else {
            "memory_reused"
        };
        keys.into_iter()
            .filter_map(|k| self.close(k, why))
            .map(Observation::Request)
            .collect()
    }

    /// Closes requests silent since `now_ns - IDLE_CLOSE_NS` (batch view: llama-server's own
    /// requests end at their slot's release), and drops posts no request claimed although
    /// their process went on and is idle (see the module's text).
    pub fn expire(&mut self, now_ns: u64) -> Vec<Request> {
        // llama-server says when a request ends (its slot's release): a server stalled for
        // seconds on a busy node still has its requests in progress.
        let by_silence =
            |pid: u32| self.mode(pid) == Mode::BatchView || self.no_release.contains(&pid);
        let keys: Vec<_> = self
            .open
            .iter()
            .filter(|(k, o)| {
                by_silence(k.0)
                    && o.generating
                    && o.last_activity_ns.saturating_add(IDLE_CLOSE_NS) < now_ns
            })
            .map(|(k, _)| *k)
            .collect();
        let closed: Vec<Request> = keys
            .into_iter()
            .filter_map(|k| self.close(k, "idle"))
            .collect();
        let (open, last_step) = (&self.open, &self.last_step_ns);
        for (pid, q) in self.posts.iter_mut() {
            if open.keys().any(|k| k.0 == *pid) {
                continue;
            }
            let stepped_after = |t: u64| last_step.get(pid).is_some_and(|s| *s > t);
            while q
                .front()
                .is_some_and(|&t| t.saturating_add(STALE_POST_NS) < now_ns && stepped_after(t))
            {
                q.pop_front();
                self.unserved.unclaimed += 1;
            }
        }
        closed
    }

    /// A process is gone: its open requests close (`process_exited`) and what was kept of it
    /// is dropped.
    pub fn forget(&mut self, pid: u32) -> Vec<Request> {
        let keys: Vec<Key> = self.open.keys().filter(|k| k.0 == pid).copied().collect();
        let mut out: Vec<Request> = keys
            .into_iter()
            .filter_map(|k| self.close(k, "process_exited"))
            .collect();
        out.sort_by_key(|r| r.id);
        self.posted.retain(|k, _| k.0 != pid);
        self.launched.retain(|k, _| k.0 != pid);
        self.posts.remove(&pid);
        self.last_step_ns.remove(&pid);
        self.modes.remove(&pid);
        self.no_release.remove(&pid);
        out
    }

    /// Closes everything (end of the session).
    pub fn finish(&mut self) -> Vec<Request> {
        let keys: Vec<_> = self.open.keys().copied().collect();
        let mut out: Vec<Request> = keys
            .into_iter()
            .filter_map(|k| self.close(k, "session_end"))
            .collect();
        out.sort_by_key(|r| r.id);
        out
    }

    /// Requests in progress.
    pub fn active(&self) -> usize {
        self.open.len()
    }

    /// Tasks accepted and not yet taken by a request ([`Mode::ServerTasks`]).
    pub fn tasks_waiting(&self) -> usize {
        self.posted.values().filter(|p| !p.launched).count()
    }

    /// Requests in progress and tasks waiting, per process (processes with neither absent).
    pub fn counts_by_pid(&self) -> HashMap<u32, (u64, u64)> {
        let mut out: HashMap<u32, (u64, u64)> = HashMap::new();
        for k in self.open.keys() {
            out.entry(k.0).or_default().0 += 1;
        }
        for ((pid, _), p) in &self.posted {
            if !p.launched {
                out.entry(*pid).or_default().1 += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::{Origin, Part, PostedTask};

    fn origin(start: u64, end: u64) -> Origin {
        Origin {
            pid: 1,
            tid: 1,
            model: std::sync::Arc::from("m"),
            start_ns: start,
            end_ns: end,
        }
    }

    fn step(start: u64, parts: Vec<Part>) -> Observation {
        let n: u32 = parts.iter().map(|p| p.n_tokens).sum();
        let d = DecodeStep {
            origin: origin(start, start + 10),
            ctx: 7,
            context: ContextRole::Main,
            draft_tokens: 0,
            drafts: 0,
            api: "t",
            ret: 0,
            result: DecodeResult::Ok,
            n_tokens: Some(n),
            phase: None,
            prompt_tokens: 0,
            generated_tokens: 0,
            parts,
            unscanned_tokens: 0,
            context_used: vec![],
        };
        LAST.with(|m| *m.borrow_mut() = crate::assemble::BatchMap::of(&d));
        Observation::Decode(d)
    }

    fn part(seq: i32, pos0: i32, n: u32, kind: PartKind) -> Part {
        Part {
            seq_id: seq,
            pos0,
            n_tokens: n,
            n_outputs: 1,
            kind,
        }
    }

    fn post(at: u64, front: bool) -> Observation {
        Observation::TaskPost(TaskPost {
            origin: origin(at, at + 1),
            front,
            tasks_bytes: 0,
            n_tasks: None,
            tasks: vec![],
        })
    }

    /// A post of tasks (id, type) at `at`.
    fn post_tasks(at: u64, tasks: &[(i32, &'static str)]) -> Observation {
        Observation::TaskPost(TaskPost {
            origin: origin(at, at),
            front: false,
            tasks_bytes: 100 * tasks.len() as u64,
            n_tasks: Some(tasks.len() as u32),
            tasks: tasks
                .iter()
                .map(|&(id, task_type)| PostedTask {
                    id,
                    task_type,
                    id_target: -1,
                })
                .collect(),
        })
    }

    fn cancel(at: u64, target: i32) -> Observation {
        Observation::TaskPost(TaskPost {
            origin: origin(at, at),
            front: true,
            tasks_bytes: 100,
            n_tasks: Some(1),
            tasks: vec![PostedTask {
                id: -1,
                task_type: "cancel",
                id_target: target,
            }],
        })
    }

    fn launch(at: u64, slot_id: i32, task_id: i32, ok: bool) -> Observation {
        Observation::SlotLaunch(SlotLaunch {
            origin: origin(at, at + 1),
            slot_id,
            task_id,
            ok,
            ctx: 7,
            ctx_dft: 0,
        })
    }

    fn release(at: u64, slot_id: i32, task_id: i32) -> Observation {
        Observation::SlotRelease(SlotRelease {
            origin: origin(at, at),
            slot_id,
            task_id,
        })
    }

    /// The requests among what `observe` made.
    fn closed(made: Vec<Observation>) -> Vec<Request> {
        made.into_iter()
            .filter_map(|o| match o {
                Observation::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    thread_local! {
        /// The latest step the tests made, as the assembler keeps it for samples.
        static LAST: std::cell::RefCell<crate::assemble::BatchMap> = Default::default();
    }

    /// A sample of batch index `idx` of the latest step (its sequence as the assembler
    /// resolves it).
    fn sample(at: u64, idx: i32) -> Observation {
        Observation::Sample(Sample {
            origin: origin(at, at + 1),
            ctx: 7,
            context: ContextRole::Main,
            accepted_draft: false,
            idx,
            seq_id: LAST.with(|m| m.borrow().seq_at(idx)),
            token: 5,
        })
    }

    /// gpt4all's prompt: chunks of 8 that each ask for their last token's logits. Without task
    /// ids, a chunk continuing the sequence where the last one ended, nothing sampled in
    /// between, is the same prompt; a chunk elsewhere, or after a sample, is a new request.
    #[test]
    fn prompt_chunks_that_each_ask_for_an_output_are_one_prompt() {
        let mut r = Requests::new(Mode::BatchView);
        r.observe(&step(100, vec![part(0, 0, 8, PartKind::FinalPromptChunk)]));
        let none = closed(r.observe(&step(200, vec![part(0, 8, 7, PartKind::FinalPromptChunk)])));
        assert!(none.is_empty(), "{none:?}");
        r.observe(&sample(220, 6));
        r.observe(&step(300, vec![part(0, 15, 1, PartKind::Generated)]));
        r.observe(&sample(320, 0));
        // A prompt at the sequence's end after samples is the next request.
        let done = closed(r.observe(&step(400, vec![part(0, 16, 3, PartKind::FinalPromptChunk)])));
        assert_eq!(done.len(), 1);
        assert_eq!(
            (
                done[0].prompt_tokens,
                done[0].cached_tokens,
                done[0].generated_tokens,
                done[0].decode_steps
            ),
            (15, 0, 2, 3)
        );
        // Its wall time (100 → 321): three steps of 10 ns, two samplings of 1 ns, the rest.
        let d = &done[0];
        assert_eq!((d.decode_ns, d.sampling_ns, d.outside_ns()), (30, 2, 189));
        assert_eq!(d.cpu_samples, None, "not profiling");
        // A prompt chunk that does not continue where the last one ended is a new request
        // even with nothing sampled.
        let skipped =
            closed(r.observe(&step(500, vec![part(0, 30, 2, PartKind::FinalPromptChunk)])));
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            (skipped[0].prompt_tokens, skipped[0].cached_tokens),
            (3, 16)
        );
        // With llama-server's tasks the rule is theirs: no merging by position.
        let mut q = Requests::new(Mode::ServerQueue);
        q.observe(&step(100, vec![part(0, 0, 8, PartKind::FinalPromptChunk)]));
        let split = closed(q.observe(&step(200, vec![part(0, 8, 7, PartKind::FinalPromptChunk)])));
        assert_eq!(split.len(), 1);
    }

    /// Times come from the traced process's probes: steps whose durations add up past
    /// `u64::MAX` (the fuzzer's find) saturate, they do not overflow.
    #[test]
    fn hostile_step_durations_saturate() {
        let mut r = Requests::new(Mode::BatchView);
        for start in [0, 1] {
            let mut d = step(start, vec![part(0, start as i32, 1, PartKind::PromptChunk)]);
            if let Observation::Decode(d) = &mut d {
                d.origin.end_ns = u64::MAX;
            }
            r.observe(&d);
        }
        let done = r.finish();
        assert_eq!(done[0].decode_ns, u64::MAX);
        assert_eq!(done[0].outside_ns(), 0);
    }

    /// A CPU sample of a step counts on each request the step carried, after the step opened
    /// them; a sequence with no open request counts nothing.
    #[test]
    fn cpu_samples_count_on_the_requests_of_their_step() {
        let mut r = Requests::new(Mode::BatchView).count_cpu(true);
        r.observe(&step(
            100,
            vec![
                part(0, 0, 4, PartKind::FinalPromptChunk),
                part(1, 0, 2, PartKind::FinalPromptChunk),
            ],
        ));
        assert_eq!(r.open_ids(1, 7, &[0, 1]), vec![1, 2]);
        assert!(r.open_ids(1, 8, &[0]).is_empty(), "another context");
        assert!(r.cpu_sample(1, 7, &[0, 1], &[1, 2]).is_empty());
        assert!(r.cpu_sample(1, 7, &[1], &[2]).is_empty());
        // A request closed since the step is named back, not counted.
        assert_eq!(r.cpu_sample(1, 7, &[0], &[9]), vec![9]);
        r.observe(&sample(120, 3));
        r.observe(&sample(121, 5));
        let mut done = r.finish();
        done.sort_by_key(|q| q.id);
        let counts: Vec<_> = done.iter().map(|q| (q.id, q.cpu_samples)).collect();
        assert_eq!(counts, vec![(1, Some(1)), (2, Some(2))]);
    }

    #[test]
    fn two_interleaved_requests_and_a_cached_prefix() {
        let mut r = Requests::new(Mode::ServerQueue);
        // seq 0: 5-token prompt; its first token sampled at index 4.
        r.observe(&step(100, vec![part(0, 0, 5, PartKind::FinalPromptChunk)]));
        r.observe(&sample(120, 4));
        // seq 0 generates (index 0) while seq 1's prompt (3 tokens, 2 cached) ends at index 3.
        r.observe(&step(
            200,
            vec![
                part(0, 5, 1, PartKind::Generated),
                part(1, 2, 3, PartKind::FinalPromptChunk),
            ],
        ));
        r.observe(&sample(220, 0));
        r.observe(&sample(230, 3));
        r.observe(&step(
            300,
            vec![
                part(0, 6, 1, PartKind::Generated),
                part(1, 5, 1, PartKind::Generated),
            ],
        ));
        r.observe(&sample(320, 0));
        r.observe(&sample(330, 1));
        // A new prompt on seq 0 closes its first request.
        let closed = closed(r.observe(&step(400, vec![part(0, 0, 4, PartKind::FinalPromptChunk)])));
        assert_eq!(closed.len(), 1);
        let a = &closed[0];
        assert_eq!(
            (
                a.seq_id,
                a.prompt_tokens,
                a.cached_tokens,
                a.generated_tokens
            ),
            (0, 5, 0, 3)
        );
        assert_eq!(
            (a.start_ns, a.first_token_ns, a.end_ns),
            (100, Some(121), 321)
        );
        assert_eq!(a.decode_steps, 3);
        assert_eq!(a.closed_by, "next_request");
        let rest = r.finish();
        let b = rest.iter().find(|q| q.seq_id == 1).unwrap();
        assert_eq!(
            (
                b.prompt_tokens,
                b.cached_tokens,
                b.input_tokens(),
                b.generated_tokens
            ),
            (3, 2, 5, 2)
        );
        assert_eq!(b.first_token_ns, Some(231));
        assert_eq!(b.ttft_s(), Some((231 - 200) as f64 / 1e9));
        assert_eq!(b.tpot_s(), Some((331 - 231) as f64 / 1e9));
    }

    #[test]
    fn silence_closes_a_finished_generation() {
        let mut r = Requests::new(Mode::BatchView);
        r.observe(&step(0, vec![part(0, 0, 2, PartKind::FinalPromptChunk)]));
        r.observe(&sample(20, -1));
        assert_eq!(r.active(), 1);
        assert!(r.expire(1_000).is_empty());
        let closed = r.expire(3_000_000_000);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].generated_tokens, 1);
        assert_eq!(closed[0].closed_by, "idle");
    }

    #[test]
    fn posts_are_claimed_in_order_by_the_requests_that_start() {
        let mut r = Requests::new(Mode::ServerQueue);
        r.observe(&post(10, false));
        r.observe(&post(20, false));
        r.observe(&post(25, true)); // a cancel: not a request
        r.observe(&post(30, false));
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&sample(115, -1));
        r.observe(&step(
            200,
            vec![
                part(0, 3, 1, PartKind::Generated),
                part(1, 0, 2, PartKind::FinalPromptChunk),
            ],
        ));
        // A request starting before the third post cannot be its own.
        let mut all = r.finish();
        all.sort_by_key(|q| q.id);
        assert_eq!(
            all.iter().map(|q| q.queued_ns).collect::<Vec<_>>(),
            [Some(10), Some(20)]
        );
        let a = &all[0];
        assert_eq!(a.queue_s(), Some(90e-9));
        assert_eq!(a.arrival_ns(), 10);
        assert_eq!(a.ttft_s(), Some((116 - 10) as f64 / 1e9));
        assert_eq!(a.duration_s(), (116 - 10) as f64 / 1e9);
        // The third post waits for the next request.
        r.observe(&step(300, vec![part(2, 0, 2, PartKind::FinalPromptChunk)]));
        assert_eq!(r.finish()[0].queued_ns, Some(30));
    }

    #[test]
    fn without_posts_a_request_has_no_queue_wait() {
        let mut r = Requests::new(Mode::ServerQueue);
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        let q = r.finish().remove(0);
        assert_eq!(
            (q.queued_ns, q.queue_s(), q.arrival_ns()),
            (None, None, 100)
        );
    }

    #[test]
    fn a_post_no_request_claims_while_idle_is_dropped() {
        let mut r = Requests::new(Mode::ServerQueue);
        r.observe(&step(5, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&post(10, false));
        // Busy: a request is open, so the post may still be waiting for a slot.
        r.observe(&step(20, vec![part(0, 3, 1, PartKind::Generated)]));
        r.expire(10 + STALE_POST_NS + 1);
        assert_eq!(r.unserved.unclaimed, 0);
        // Idle, and the loop went on after the post without starting its request: dropped.
        r.finish();
        r.expire(10 + STALE_POST_NS + 1);
        assert_eq!(r.unserved.unclaimed, 1);
        r.observe(&step(
            2 * STALE_POST_NS,
            vec![part(0, 0, 3, PartKind::FinalPromptChunk)],
        ));
        assert_eq!(r.finish()[0].queued_ns, None);
    }

    #[test]
    fn a_released_slot_ends_its_request_at_once() {
        let mut r = Requests::new(Mode::ServerQueue);
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&sample(115, -1));
        r.observe(&step(200, vec![part(1, 0, 2, PartKind::FinalPromptChunk)]));
        let closed = closed(r.observe(&release(300, 0, -1)));
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].seq_id, closed[0].closed_by),
            (0, "slot_released")
        );
        // Its end is its last sample, not the release.
        assert_eq!(closed[0].end_ns, 116);
        assert_eq!(r.active(), 1);
        assert!(r.observe(&release(300, 2, -1)).is_empty());
    }

    /// A cold start: the request's first step takes longer than STALE_POST_NS and is only
    /// seen when it ends; its post must still be there.
    #[test]
    fn a_post_outlives_a_slow_first_step() {
        let mut r = Requests::new(Mode::ServerQueue);
        r.observe(&post(10, false));
        r.expire(10 + 3 * STALE_POST_NS);
        assert_eq!(r.unserved.unclaimed, 0);
        r.observe(&step(20, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        assert_eq!(r.finish()[0].queued_ns, Some(10));
    }

    /// 2024: a post is seen when `post` returns (its id is the return value), which may be
    /// after the server loop launched the task, or even after its prompt started: it still
    /// gives that task's request its acceptance time (the post's entry). Such a server's
    /// requests, without a slot release, end by silence.
    #[test]
    fn a_post_seen_after_its_launch_joins_its_slot_or_request() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.without_release(1);
        // Task 3 launched on slot 0 before its post arrived; task 4's post arrives after its
        // prompt started on slot 1.
        r.observe(&launch(20, 0, 3, true));
        r.observe(&post_tasks(10, &[(3, "completion")]));
        r.observe(&launch(21, 1, 4, true));
        r.observe(&step(
            30,
            vec![
                part(0, 0, 3, PartKind::FinalPromptChunk),
                part(1, 0, 3, PartKind::FinalPromptChunk),
            ],
        ));
        r.observe(&post_tasks(12, &[(4, "completion")]));
        assert_eq!(r.tasks_waiting(), 0);
        r.observe(&sample(31, 2));
        r.observe(&sample(31, 5));
        // Silent for longer than IDLE_CLOSE_NS: both end, as in the batch view.
        let mut done = r.expire(40 + IDLE_CLOSE_NS);
        done.sort_by_key(|q| q.seq_id);
        let got: Vec<_> = done
            .iter()
            .map(|q| (q.seq_id, q.task_id, q.queued_ns, q.closed_by))
            .collect();
        assert_eq!(
            got,
            [
                (0, Some(3), Some(10), "idle"),
                (1, Some(4), Some(12), "idle")
            ]
        );
    }

    /// Four slots take six tasks in an order that is neither the posts' nor the batch's:
    /// every request still gets its own task's acceptance time.
    #[test]
    fn tasks_are_joined_by_id_whatever_the_order() {
        let mut r = Requests::new(Mode::ServerTasks);
        for (at, id) in [(10, 5), (11, 6), (12, 7), (13, 8), (14, 9), (15, 10)] {
            r.observe(&post_tasks(at, &[(id, "completion")]));
        }
        // Slot 3 took task 5, slot 0 task 8, slot 2 task 6, slot 1 task 7.
        for (slot, task) in [(3, 5), (0, 8), (2, 6), (1, 7)] {
            r.observe(&launch(20, slot, task, true));
        }
        assert_eq!(r.tasks_waiting(), 2);
        r.observe(&step(
            30,
            (0..4)
                .map(|s| part(s, 0, 3, PartKind::FinalPromptChunk))
                .collect(),
        ));
        let got: Vec<(i32, Option<i32>, Option<u64>)> = (0..4)
            .map(|s| {
                let q = closed(r.observe(&release(40, s, -1))).remove(0);
                (q.seq_id, q.task_id, q.queued_ns)
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, Some(8), Some(13)),
                (1, Some(7), Some(12)),
                (2, Some(6), Some(11)),
                (3, Some(5), Some(10))
            ]
        );
        // The two that waited start once slots are free again.
        r.observe(&launch(50, 2, 10, true));
        r.observe(&launch(50, 0, 9, true));
        r.observe(&step(
            60,
            vec![
                part(0, 0, 2, PartKind::FinalPromptChunk),
                part(2, 0, 2, PartKind::FinalPromptChunk),
            ],
        ));
        let rest = r.finish();
        assert_eq!(
            rest.iter()
                .map(|q| (q.seq_id, q.task_id, q.queued_ns, q.queue_s()))
                .collect::<Vec<_>>(),
            [
                (0, Some(9), Some(14), Some(46e-9)),
                (2, Some(10), Some(15), Some(45e-9))
            ]
        );
        assert_eq!(r.tasks_waiting(), 0);
        assert_eq!(r.unserved, Unserved::default());
    }

    /// One post with several prompts (an array `/completion`): each gets its queue wait.
    #[test]
    fn every_task_of_a_post_gets_its_queue_wait() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&post_tasks(
            100,
            &[(1, "completion"), (2, "completion"), (3, "completion")],
        ));
        for (slot, task) in [(0, 1), (1, 2), (2, 3)] {
            r.observe(&launch(110, slot, task, true));
        }
        r.observe(&step(
            120,
            (0..3)
                .map(|s| part(s, 0, 4, PartKind::FinalPromptChunk))
                .collect(),
        ));
        let all = r.finish();
        assert_eq!(all.len(), 3);
        assert!(all
            .iter()
            .all(|q| q.queued_ns == Some(100) && q.queue_s() == Some(20e-9)));
        assert_eq!(
            all.iter().map(|q| q.task_id).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
    }

    /// Cancelled before a slot took it, or refused by the slot: counted by id, never a
    /// request; a cancel of a running task leaves it to its slot's release.
    #[test]
    fn cancelled_and_rejected_tasks_are_counted_by_id() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&post_tasks(10, &[(1, "completion")]));
        r.observe(&post_tasks(11, &[(2, "completion")]));
        r.observe(&post_tasks(12, &[(3, "embedding")]));
        r.observe(&launch(20, 0, 1, true));
        r.observe(&launch(21, 1, 3, false));
        r.observe(&cancel(22, 2));
        r.observe(&cancel(23, 1)); // running: its release ends it
        r.observe(&cancel(24, 99)); // unknown: nothing
        assert_eq!(
            r.unserved,
            Unserved {
                cancelled: 1,
                rejected: 1,
                unclaimed: 0
            }
        );
        r.observe(&step(30, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        let q = closed(r.observe(&release(40, 0, 1))).remove(0);
        assert_eq!((q.task_id, q.queued_ns), (Some(1), Some(10)));
        assert_eq!(r.tasks_waiting(), 0);
        assert_eq!(r.active(), 0);
    }

    /// Task types label requests; work that is not a request (a slot save) is not kept.
    #[test]
    fn requests_carry_their_task_type() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&post_tasks(10, &[(1, "embedding")]));
        r.observe(&post_tasks(11, &[(2, "rerank")]));
        r.observe(&post_tasks(12, &[(3, "unknown"), (4, "cancel")]));
        assert_eq!(r.tasks_waiting(), 3);
        r.observe(&launch(20, 0, 1, true));
        r.observe(&launch(20, 1, 2, true));
        r.observe(&step(
            30,
            vec![
                part(0, 0, 3, PartKind::MultiOutput),
                part(1, 0, 5, PartKind::FinalPromptChunk),
            ],
        ));
        let all = r.finish();
        assert_eq!(
            all.iter()
                .map(|q| (q.task_type, q.operation()))
                .collect::<Vec<_>>(),
            [("embedding", "embeddings"), ("rerank", "rerank")]
        );
        // In the batch view a request that sampled is a completion.
        let mut b = Requests::new(Mode::BatchView);
        b.observe(&step(0, vec![part(0, 0, 2, PartKind::FinalPromptChunk)]));
        b.observe(&sample(20, -1));
        b.observe(&step(40, vec![part(1, 0, 2, PartKind::PromptChunk)]));
        let all = b.finish();
        assert_eq!(
            all.iter().map(|q| q.task_type).collect::<Vec<_>>(),
            ["completion", "unknown"]
        );
        assert_eq!(all[0].operation(), "text_completion");
    }

    fn memory(at: u64, op: &'static str, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Observation {
        Observation::Memory(MemoryChange {
            origin: origin(at, at + 1),
            context: None,
            ctx: 7,
            truncated: vec![],
            op,
            seq_id,
            seq_dst: -1,
            p0,
            p1,
            delta,
            context_used: vec![],
        })
    }

    /// A context shift (seq_rm of a middle range, then seq_add back) while generating is
    /// counted and keeps the request open; a shift during the prompt (cache reuse) is not one.
    #[test]
    fn a_context_shift_is_counted_and_keeps_the_request() {
        let mut r = Requests::new(Mode::BatchView);
        r.observe(&step(0, vec![part(0, 0, 4, PartKind::FinalPromptChunk)]));
        assert!(r.observe(&memory(5, "seq_add", 0, 2, 4, -1)).is_empty());
        r.observe(&sample(20, -1));
        assert!(r.observe(&memory(30, "seq_rm", 0, 1, 3, 0)).is_empty());
        let made = r.observe(&memory(31, "seq_add", 0, 3, 6, -2));
        assert_eq!(made.len(), 1);
        let Observation::ContextShift(c) = &made[0] else {
            panic!("{made:?}")
        };
        assert_eq!((c.seq_id, c.discarded, c.request_id), (0, 2, 1));
        assert_eq!(r.context_shifts, 1);
        r.observe(&step(40, vec![part(0, 4, 1, PartKind::Generated)]));
        r.observe(&sample(50, -1));
        let q = r.finish().remove(0);
        assert_eq!((q.generated_tokens, q.context_shifts), (2, 1));
    }

    /// Start-up is not traffic: a decode of one or two tokens cut without a sample is a
    /// warm-up; a cut only of a sequence the call names ends its request; a free ends them all.
    #[test]
    fn warm_ups_are_not_requests_and_only_cuts_end_requests() {
        let mut r = Requests::new(Mode::BatchView);
        r.observe(&step(0, vec![part(0, 0, 2, PartKind::FinalPromptChunk)]));
        let mut clear = memory(5, "clear", -1, -1, -1, 0);
        assert!(r.observe(&clear).is_empty());
        assert_eq!(r.warmups, 1);
        // Two requests, on seqs 0 and 1.
        r.observe(&step(10, vec![part(0, 0, 5, PartKind::FinalPromptChunk)]));
        r.observe(&sample(15, -1));
        r.observe(&step(20, vec![part(1, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&sample(25, -1));
        // A removal that cuts nothing (the assembler found none), then one cutting seq 1.
        assert!(r.observe(&memory(30, "seq_rm", -1, 5, -1, 0)).is_empty());
        let mut cut = memory(31, "seq_rm", 1, 2, -1, 0);
        if let Observation::Memory(m) = &mut cut {
            m.truncated = vec![1];
        }
        let got = closed(r.observe(&cut));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].seq_id, got[0].closed_by), (1, "memory_reused"));
        // A free ends what is left.
        if let Observation::Memory(m) = &mut clear {
            m.op = "free";
        }
        let got = closed(r.observe(&clear));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].seq_id, got[0].closed_by), (0, "context_freed"));
        assert_eq!(got[0].generated_tokens, 1);
        assert_eq!(r.warmups, 1);
        // In llama-server mode, a request exists only for a task.
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&step(0, vec![part(0, 0, 7, PartKind::FinalPromptChunk)]));
        assert!(r.finish().is_empty());
        assert_eq!(r.warmups, 1);
    }

    /// A process that is gone takes its requests and its waiting tasks with it.
    #[test]
    fn a_process_that_is_gone_is_forgotten() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&post_tasks(10, &[(1, "completion"), (2, "completion")]));
        r.observe(&launch(20, 0, 1, true));
        r.observe(&step(30, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        assert_eq!((r.active(), r.tasks_waiting()), (1, 1));
        let gone = r.forget(1);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].closed_by, "process_exited");
        assert_eq!((r.active(), r.tasks_waiting()), (0, 0));
        assert!(r.forget(1).is_empty());
    }

    /// In llama-server, silence does not end a request: a stalled server's requests go on
    /// until their slots are released.
    #[test]
    fn a_stalled_server_keeps_its_requests() {
        let mut r = Requests::new(Mode::ServerTasks);
        r.observe(&post_tasks(10, &[(1, "completion")]));
        r.observe(&launch(20, 0, 1, true));
        r.observe(&step(30, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&sample(45, -1));
        assert!(r.expire(10 * IDLE_CLOSE_NS).is_empty());
        r.observe(&step(
            10 * IDLE_CLOSE_NS,
            vec![part(0, 3, 1, PartKind::Generated)],
        ));
        r.observe(&sample(10 * IDLE_CLOSE_NS + 20, 0));
        let q = closed(r.observe(&release(10 * IDLE_CLOSE_NS + 30, 0, 1))).remove(0);
        assert_eq!((q.generated_tokens, q.closed_by), (2, "slot_released"));
    }
}
