//! Requests reconstructed from the batch view, with no help from llama.cpp: per sequence,
//! prompt chunks open a request, the final chunk's sampling gives its first token, each later
//! sample on the sequence one more generated token; a new prompt on the sequence, a change of
//! its KV memory, a long silence or the end of the session closes it.
//!
//! In llama-server, `server_slot::release` ends the request on the slot's sequence at once
//! (the slot's id is the sequence id); elsewhere the closing rules below apply.
//!
//! With llama-server's task queue probed (`server_queue::post`, see [`Mode`]), each request
//! also gets the time the server accepted it: posts are queued per process and the oldest
//! is taken by the next request whose prompt starts, as the server launches tasks in the
//! order they were posted. The wait in between is the request's queue wait, and time to first
//! token and duration count from the post. Cancel posts (pushed to the front) are ignored. A
//! post older than [`STALE_POST_NS`] that is still unclaimed while the process has no request
//! in progress, although a decode step started after it has been seen, was work that never
//! reached a slot (rejected, cancelled before its start) and is dropped. Age alone is not
//! enough: a request's first decode step can take longer than that (a cold start), and it is
//! only seen when it ends.
//!
//! Samples are tied to sequences by their output index: `common_sampler_sample(…, idx)` names
//! the batch index of the token whose logits it samples (`-1`: the last output), and the
//! decode step's parts say which sequence holds each index. Prompt tokens reused from the
//! cache are the positions before the request's first prompt chunk.

use std::{collections::HashMap, sync::Arc};

use std::collections::VecDeque;

use crate::assemble::{
    DecodeResult, DecodeStep, MemoryChange, Observation, PartKind, Sample, SlotRelease, TaskPost,
};

/// Where requests come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The decode batches and samples only (any llama.cpp program): no queue wait.
    BatchView,
    /// The batch view plus llama-server's task queue: queue wait, time from acceptance.
    ServerQueue,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::BatchView => {
                "batch view (decode batches and samples; llama-server's task queue not found, \
                 so no queue wait)"
            }
            Mode::ServerQueue => {
                "server queue + batch view (accepted at server_queue::post, decode batches and \
                 samples, ended at server_slot::release): queue wait measured"
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
    /// When llama-server accepted it (`server_queue::post`), in [`Mode::ServerQueue`].
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
    /// Why it was closed.
    pub closed_by: &'static str,
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
        self.end_ns.saturating_sub(self.arrival_ns()) as f64 / 1e9
    }
}

#[derive(Clone, Debug)]
struct Open {
    req: Request,
    /// The final prompt chunk was decoded: samples now generate.
    generating: bool,
    last_activity_ns: u64,
}

/// Which sequence holds each batch index of a context's latest decode step.
#[derive(Clone, Debug, Default)]
struct BatchMap {
    /// (first index, tokens, sequence), in batch order.
    spans: Vec<(u32, u32, i32)>,
    n_tokens: u32,
}

impl BatchMap {
    fn seq_at(&self, idx: i32) -> Option<i32> {
        let i = if idx < 0 {
            self.n_tokens.checked_sub(1)?
        } else {
            idx as u32
        };
        self.spans
            .iter()
            .find(|(first, n, _)| i >= *first && i < first + n)
            .map(|s| s.2)
    }
}

/// A request silent for this long is closed (its last token was sampled long ago).
const IDLE_CLOSE_NS: u64 = 2_000_000_000;

/// An open request's key: (pid, context, sequence).
type Key = (u32, u64, i32);

/// An open request without a post yet: (its start, its key, its id).
type Waiting = (u64, Key, u64);

/// A post unclaimed this long while its process has no request in progress is dropped.
pub const STALE_POST_NS: u64 = 1_000_000_000;

/// Posts kept per process (a server flooded with work it never starts must not grow us).
const MAX_PENDING_POSTS: usize = 4096;

/// The reconstruction state.
#[derive(Default)]
pub struct Requests {
    open: HashMap<(u32, u64, i32), Open>,
    batches: HashMap<(u32, u64), BatchMap>,
    /// Accepted, not yet started: post times per process, oldest first.
    posts: HashMap<u32, VecDeque<u64>>,
    /// Open requests that found no post when they started, per process, oldest first: the
    /// post's event can arrive after the step that started the request (the server loop can
    /// launch the task before the posting thread returns from `post`).
    unclaimed: HashMap<u32, VecDeque<Waiting>>,
    next_id: u64,
    /// Posts dropped unclaimed (see [`STALE_POST_NS`]).
    pub posts_unclaimed: u64,
    /// Start of the latest decode step seen, per process.
    last_step_ns: HashMap<u32, u64>,
}

impl Requests {
    /// Updates the state with one observation; returns the requests it closed.
    pub fn observe(&mut self, obs: &Observation) -> Vec<Request> {
        match obs {
            Observation::Decode(d) if d.result == DecodeResult::Ok => self.decode(d),
            Observation::Sample(s) => {
                self.sample(s);
                vec![]
            }
            Observation::Memory(m) => self.memory(m),
            Observation::TaskPost(p) => {
                self.post(p);
                vec![]
            }
            Observation::SlotRelease(r) => self.released(r),
            _ => vec![],
        }
    }

    fn post(&mut self, p: &TaskPost) {
        if p.front {
            return; // a cancel, not a request
        }
        let (pid, at) = (p.origin.pid, p.origin.start_ns);
        // A request that started after this post, still without one, is its own.
        if let Some(waiting) = self.unclaimed.get_mut(&pid) {
            if let Some(i) = waiting.iter().position(|w| w.0 >= at) {
                let (_, key, id) = waiting.remove(i).expect("position is in range");
                if let Some(o) = self.open.get_mut(&key).filter(|o| o.req.id == id) {
                    o.req.queued_ns = Some(at);
                    return;
                }
            }
        }
        let q = self.posts.entry(pid).or_default();
        if q.len() >= MAX_PENDING_POSTS {
            q.pop_front();
            self.posts_unclaimed += 1;
        }
        // Posts of several threads may arrive out of order: keep them sorted by time.
        let i = q.partition_point(|t| *t <= at);
        q.insert(i, at);
    }

    /// llama-server's slot `slot_id` let its task go: the request on that sequence is over
    /// (whichever context: llama-server's slots are its sequences).
    fn released(&mut self, r: &SlotRelease) -> Vec<Request> {
        let pid = r.origin.pid;
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

    /// The oldest post of `pid` made before `start_ns`.
    fn claim_post(posts: &mut HashMap<u32, VecDeque<u64>>, pid: u32, start_ns: u64) -> Option<u64> {
        let q = posts.get_mut(&pid)?;
        if *q.front()? <= start_ns {
            q.pop_front()
        } else {
            None
        }
    }

    fn close(&mut self, key: (u32, u64, i32), why: &'static str) -> Option<Request> {
        let mut o = self.open.remove(&key)?;
        if let Some(w) = self.unclaimed.get_mut(&key.0) {
            w.retain(|e| e.2 != o.req.id);
        }
        o.req.closed_by = why;
        // A request whose prompt was never completed has no end of its own.
        if o.req.end_ns == 0 {
            o.req.end_ns = o.last_activity_ns;
        }
        Some(o.req)
    }

    fn decode(&mut self, d: &DecodeStep) -> Vec<Request> {
        let pid = d.origin.pid;
        let last = self.last_step_ns.entry(pid).or_default();
        *last = (*last).max(d.origin.start_ns);
        let mut closed = Vec::new();
        let mut map = BatchMap::default();
        let mut index = 0u32;
        for p in &d.parts {
            map.spans.push((index, p.n_tokens, p.seq_id));
            index += p.n_tokens;
            let key = (pid, d.ctx, p.seq_id);
            let is_prompt = p.kind != PartKind::Generated;
            if is_prompt {
                // A prompt after generation is the next request on this sequence.
                if self.open.get(&key).is_some_and(|o| o.generating) {
                    closed.extend(self.close(key, "next_request"));
                }
                let (id, posts, unclaimed) =
                    (&mut self.next_id, &mut self.posts, &mut self.unclaimed);
                let o = self.open.entry(key).or_insert_with(|| {
                    *id += 1;
                    let start = d.origin.start_ns;
                    let queued_ns = Self::claim_post(posts, pid, start);
                    if queued_ns.is_none() {
                        // Its post may still be on its way (see `post`).
                        unclaimed
                            .entry(pid)
                            .or_default()
                            .push_back((start, key, *id));
                    }
                    Open {
                        req: Request {
                            id: *id,
                            pid,
                            model: d.origin.model.clone(),
                            ctx: d.ctx,
                            seq_id: p.seq_id,
                            queued_ns,
                            start_ns: start,
                            prompt_end_ns: None,
                            first_token_ns: None,
                            end_ns: 0,
                            prompt_tokens: 0,
                            cached_tokens: p.pos0.max(0) as u32,
                            generated_tokens: 0,
                            decode_steps: 0,
                            closed_by: "",
                        },
                        generating: false,
                        last_activity_ns: d.origin.end_ns,
                    }
                });
                o.req.prompt_tokens += p.n_tokens;
                if matches!(p.kind, PartKind::FinalPromptChunk | PartKind::MultiOutput) {
                    o.generating = true;
                    o.req.prompt_end_ns = Some(d.origin.end_ns);
                }
            }
            if let Some(o) = self.open.get_mut(&key) {
                o.req.decode_steps += 1;
                o.last_activity_ns = d.origin.end_ns;
            }
        }
        map.n_tokens = d.n_tokens.unwrap_or(index);
        self.batches.insert((pid, d.ctx), map);
        closed
    }

    fn sample(&mut self, s: &Sample) {
        let pid = s.origin.pid;
        let Some(seq) = self
            .batches
            .get(&(pid, s.ctx))
            .and_then(|b| b.seq_at(s.idx))
        else {
            return;
        };
        let Some(o) = self.open.get_mut(&(pid, s.ctx, seq)) else {
            return;
        };
        if !o.generating {
            return;
        }
        o.req.generated_tokens += 1;
        o.req.first_token_ns.get_or_insert(s.origin.end_ns);
        o.req.end_ns = s.origin.end_ns;
        o.last_activity_ns = s.origin.end_ns;
    }

    fn memory(&mut self, m: &MemoryChange) -> Vec<Request> {
        let pid = m.origin.pid;
        let keys: Vec<_> = self
            .open
            .keys()
            .filter(|k| {
                k.0 == pid
                    && self
                        .open
                        .get(k)
                        .is_some_and(|o| o.generating && o.req.generated_tokens > 0)
                    && match m.op {
                        "clear" => true,
                        // A removal to the end reuses the sequence; one in the middle is a
                        // context shift within the request.
                        "seq_rm" => m.p1 < 0 && (m.seq_id < 0 || k.2 == m.seq_id),
                        _ => k.2 == m.seq_dst,
                    }
            })
            .copied()
            .collect();
        // Only a generating request is closed by its memory being reused (filtered above); a
        // removal during the prompt (cache reuse at the request's start) belongs to it.
        keys.into_iter()
            .filter_map(|k| self.close(k, "memory_reused"))
            .collect()
    }

    /// Closes requests silent since `now_ns - IDLE_CLOSE_NS`, and drops posts no request
    /// claimed although their process went on and is idle (see the module's text).
    pub fn expire(&mut self, now_ns: u64) -> Vec<Request> {
        let keys: Vec<_> = self
            .open
            .iter()
            .filter(|(_, o)| o.generating && o.last_activity_ns + IDLE_CLOSE_NS < now_ns)
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
                .is_some_and(|&t| t + STALE_POST_NS < now_ns && stepped_after(t))
            {
                q.pop_front();
                self.posts_unclaimed += 1;
            }
        }
        closed
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::{Origin, Part};

    fn origin(start: u64, end: u64) -> Origin {
        Origin {
            pid: 1,
            tid: 1,
            model: Arc::from("m"),
            start_ns: start,
            end_ns: end,
        }
    }

    fn step(start: u64, parts: Vec<Part>) -> Observation {
        let n: u32 = parts.iter().map(|p| p.n_tokens).sum();
        Observation::Decode(DecodeStep {
            origin: origin(start, start + 10),
            ctx: 7,
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
        })
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
        })
    }

    fn sample(at: u64, idx: i32) -> Observation {
        Observation::Sample(Sample {
            origin: origin(at, at + 1),
            ctx: 7,
            idx,
            token: 5,
        })
    }

    #[test]
    fn two_interleaved_requests_and_a_cached_prefix() {
        let mut r = Requests::default();
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
        let closed = r.observe(&step(400, vec![part(0, 0, 4, PartKind::FinalPromptChunk)]));
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
        let mut r = Requests::default();
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
        let mut r = Requests::default();
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
        let mut r = Requests::default();
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        let q = r.finish().remove(0);
        assert_eq!(
            (q.queued_ns, q.queue_s(), q.arrival_ns()),
            (None, None, 100)
        );
    }

    #[test]
    fn a_post_no_request_claims_while_idle_is_dropped() {
        let mut r = Requests::default();
        r.observe(&step(5, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&post(10, false));
        // Busy: a request is open, so the post may still be waiting for a slot.
        r.observe(&step(20, vec![part(0, 3, 1, PartKind::Generated)]));
        r.expire(10 + STALE_POST_NS + 1);
        assert_eq!(r.posts_unclaimed, 0);
        // Idle, and the loop went on after the post without starting its request: dropped.
        r.finish();
        r.expire(10 + STALE_POST_NS + 1);
        assert_eq!(r.posts_unclaimed, 1);
        r.observe(&step(
            2 * STALE_POST_NS,
            vec![part(0, 0, 3, PartKind::FinalPromptChunk)],
        ));
        assert_eq!(r.finish()[0].queued_ns, None);
    }

    #[test]
    fn a_post_seen_after_its_request_started_is_still_its_own() {
        let mut r = Requests::default();
        // The loop launched the task before the posting thread's return was recorded.
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&post(90, false));
        // A later post made after this request started is not its own: it waits.
        r.observe(&step(200, vec![part(1, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&post(250, false));
        r.observe(&post(190, false));
        r.observe(&step(300, vec![part(2, 0, 3, PartKind::FinalPromptChunk)]));
        let mut all = r.finish();
        all.sort_by_key(|q| q.id);
        assert_eq!(
            all.iter().map(|q| q.queued_ns).collect::<Vec<_>>(),
            [Some(90), Some(190), Some(250)]
        );
    }

    #[test]
    fn a_released_slot_ends_its_request_at_once() {
        let mut r = Requests::default();
        r.observe(&step(100, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        r.observe(&sample(115, -1));
        r.observe(&step(200, vec![part(1, 0, 2, PartKind::FinalPromptChunk)]));
        let release = |slot_id| {
            Observation::SlotRelease(SlotRelease {
                origin: origin(300, 301),
                slot_id,
            })
        };
        let closed = r.observe(&release(0));
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].seq_id, closed[0].closed_by),
            (0, "slot_released")
        );
        // Its end is its last sample, not the release.
        assert_eq!(closed[0].end_ns, 116);
        assert_eq!(r.active(), 1);
        assert!(r.observe(&release(2)).is_empty());
    }

    /// A cold start: the request's first step takes longer than STALE_POST_NS and is only
    /// seen when it ends; its post must still be there.
    #[test]
    fn a_post_outlives_a_slow_first_step() {
        let mut r = Requests::default();
        r.observe(&post(10, false));
        r.expire(10 + 3 * STALE_POST_NS);
        assert_eq!(r.posts_unclaimed, 0);
        r.observe(&step(20, vec![part(0, 0, 3, PartKind::FinalPromptChunk)]));
        assert_eq!(r.finish()[0].queued_ns, Some(10));
    }
}
