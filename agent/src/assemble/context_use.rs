//! Context use per sequence: how many tokens each sequence holds in the KV memory, from the
//! decode steps (tokens added) and the memory calls (`seq_rm`, `seq_cp`, `clear`).
//!
//! A sequence first seen mid-way (attached after it started) is assumed to hold positions
//! `0..pos0` already. `seq_add` (a context shift moving positions back after a removal) moves
//! the sequence's end. Not seen: `seq_div` and state restores (`llama_state_seq_set_data`),
//! whose tokens count once decoding continues.
//! Sequences are keyed by process, not by context: a process with a draft model's context
//! counts both contexts' changes on the same sequence ids.

use std::collections::HashMap;

use probe_common::{MemoryEvent, MemoryOp};

use crate::model::{Part, SeqUsed};

#[derive(Clone, Copy, Debug, Default)]
struct SeqUse {
    /// Tokens held.
    used: u32,
    /// One past the highest position held.
    end: i32,
}

/// Per-process, per-sequence token counts.
#[derive(Default)]
pub struct ContextUse {
    /// By (pid, context, sequence).
    seqs: HashMap<(u32, u64, i32), SeqUse>,
}

impl ContextUse {
    /// Drops the sequences of a process that is gone.
    pub fn forget(&mut self, pid: u32) {
        self.seqs.retain(|k, _| k.0 != pid);
    }

    /// Drops the sequences of a context that was freed; returns them, now holding nothing.
    pub fn free(&mut self, pid: u32, ctx: u64) -> Vec<SeqUsed> {
        let mut gone: Vec<SeqUsed> = self
            .seqs
            .keys()
            .filter(|k| k.0 == pid && k.1 == ctx)
            .map(|k| SeqUsed {
                seq_id: k.2,
                used: 0,
            })
            .collect();
        self.seqs.retain(|k, _| !(k.0 == pid && k.1 == ctx));
        gone.sort_by_key(|s| s.seq_id);
        gone
    }

    /// Counts the tokens a successful decode step added.
    pub fn after_decode(&mut self, pid: u32, ctx: u64, parts: &[Part]) -> Vec<SeqUsed> {
        let mut changed: Vec<SeqUsed> = Vec::new();
        for p in parts {
            let s = self
                .seqs
                .entry((pid, ctx, p.seq_id))
                .or_insert_with(|| SeqUse {
                    // First sight of a sequence: it holds what lies before this position.
                    used: p.pos0.max(0) as u32,
                    end: p.pos0.max(0),
                });
            // Counts and positions are the program's: saturate, never overflow.
            s.used = s.used.saturating_add(p.n_tokens);
            let n = i32::try_from(p.n_tokens).unwrap_or(i32::MAX);
            if p.pos0 >= 0 {
                s.end = s.end.max(p.pos0.saturating_add(n));
            } else {
                s.end = s.end.saturating_add(n);
            }
            match changed.iter_mut().find(|c| c.seq_id == p.seq_id) {
                Some(c) => c.used = s.used,
                None => changed.push(SeqUsed {
                    seq_id: p.seq_id,
                    used: s.used,
                }),
            }
        }
        changed
    }

    /// Applies a memory call; returns the sequences it changed.
    /// Applies a memory call to context `ctx`; returns the sequences it changed.
    pub fn apply(&mut self, pid: u32, ctx: u64, ev: &MemoryEvent) -> Vec<SeqUsed> {
        let op = match ev.op {
            x if x == MemoryOp::SeqRm as u32 => MemoryOp::SeqRm,
            x if x == MemoryOp::SeqCp as u32 => MemoryOp::SeqCp,
            x if x == MemoryOp::SeqAdd as u32 => MemoryOp::SeqAdd,
            _ => MemoryOp::Clear,
        };
        let of_pid: Vec<i32> = self
            .seqs
            .keys()
            .filter(|k| k.0 == pid && k.1 == ctx)
            .map(|k| k.2)
            .collect();
        let targets: Vec<i32> = match op {
            MemoryOp::Clear => of_pid,
            MemoryOp::SeqRm | MemoryOp::SeqAdd if ev.seq_id < 0 => of_pid,
            MemoryOp::SeqRm | MemoryOp::SeqAdd => vec![ev.seq_id],
            MemoryOp::SeqCp => vec![ev.seq_dst],
        };
        // A failed partial removal leaves the sequence as it was.
        if op == MemoryOp::SeqRm && ev.ret == 0 {
            return vec![];
        }
        let src = self
            .seqs
            .get(&(pid, ctx, ev.seq_id))
            .copied()
            .unwrap_or_default();
        targets
            .into_iter()
            .map(|seq| {
                let s = self.seqs.entry((pid, ctx, seq)).or_default();
                match op {
                    MemoryOp::Clear => *s = SeqUse::default(),
                    MemoryOp::SeqRm => remove(s, ev.p0, ev.p1),
                    // Positions move, tokens stay: the sequence ends `delta` earlier (later)
                    // when the moved range ran to its end.
                    MemoryOp::SeqAdd if ev.p1 < 0 || ev.p1 >= s.end => {
                        s.end = s.end.saturating_add(ev.delta).max(0);
                    }
                    MemoryOp::SeqAdd => {}
                    MemoryOp::SeqCp if ev.p0 <= 0 && ev.p1 < 0 => *s = src,
                    MemoryOp::SeqCp => {
                        let (a, b) = range(&src, ev.p0, ev.p1);
                        s.used = s.used.saturating_add((b - a).max(0) as u32);
                        s.end = s.end.max(b);
                    }
                }
                SeqUsed {
                    seq_id: seq,
                    used: s.used,
                }
            })
            .collect()
    }
}

/// `[p0, p1)` clipped to what the sequence holds (`p0` < 0: from 0; `p1` < 0: to the end).
fn range(s: &SeqUse, p0: i32, p1: i32) -> (i32, i32) {
    let a = p0.max(0);
    let b = if p1 < 0 { s.end } else { p1.min(s.end) };
    (a, b.max(a))
}

fn remove(s: &mut SeqUse, p0: i32, p1: i32) {
    let (a, b) = range(s, p0, p1);
    s.used = s.used.saturating_sub((b - a) as u32);
    if p1 < 0 || p1 >= s.end {
        s.end = a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PartKind;

    fn part(seq: i32, pos0: i32, n: u32) -> Part {
        Part {
            seq_id: seq,
            pos0,
            n_tokens: n,
            n_outputs: 1,
            kind: PartKind::FinalPromptChunk,
        }
    }

    fn mem(op: MemoryOp, seq: i32, dst: i32, p0: i32, p1: i32) -> MemoryEvent {
        MemoryEvent {
            op: op as u32,
            seq_id: seq,
            seq_dst: dst,
            p0,
            p1,
            ret: 1,
            ..Default::default()
        }
    }

    /// A context shift as llama-server makes it: keep 4, discard 6 of 20, shift the rest back.
    #[test]
    fn a_context_shift_moves_the_end_back() {
        let mut c = ContextUse::default();
        c.after_decode(1, 0, &[part(0, 0, 20)]);
        c.apply(1, 0, &mem(MemoryOp::SeqRm, 0, -1, 4, 10));
        let mut add = mem(MemoryOp::SeqAdd, 0, -1, 10, 20);
        add.delta = -6;
        assert_eq!(
            c.apply(1, 0, &add),
            [SeqUsed {
                seq_id: 0,
                used: 14
            }]
        );
        // Generation goes on at the shifted end.
        let after = c.after_decode(1, 0, &[part(0, 14, 1)]);
        assert_eq!(after[0].used, 15);
        assert_eq!(c.seqs[&(1, 0, 0)].end, 15);
    }

    #[test]
    fn a_request_then_a_new_prompt_reusing_a_prefix() {
        let mut c = ContextUse::default();
        // 10 prompt tokens, then 5 generated fed back.
        c.after_decode(1, 0, &[part(0, 0, 10)]);
        for i in 0..5 {
            c.after_decode(1, 0, &[part(0, 10 + i, 1)]);
        }
        assert_eq!(c.after_decode(1, 0, &[]), vec![]);
        // The next prompt shares 4 tokens: positions 4.. are removed, 6 new tokens decoded.
        assert_eq!(
            c.apply(1, 0, &mem(MemoryOp::SeqRm, 0, -1, 4, -1)),
            vec![SeqUsed { seq_id: 0, used: 4 }]
        );
        assert_eq!(
            c.after_decode(1, 0, &[part(0, 4, 6)]),
            vec![SeqUsed {
                seq_id: 0,
                used: 10
            }]
        );
    }

    #[test]
    fn middle_removal_copy_and_clear() {
        let mut c = ContextUse::default();
        c.after_decode(1, 0, &[part(0, 0, 100), part(1, 0, 20)]);
        // Context shift: discard [10, 40).
        assert_eq!(
            c.apply(1, 0, &mem(MemoryOp::SeqRm, 0, -1, 10, 40))[0].used,
            70
        );
        // Copy all of seq 1 to seq 2.
        assert_eq!(
            c.apply(1, 0, &mem(MemoryOp::SeqCp, 1, 2, -1, -1)),
            vec![SeqUsed {
                seq_id: 2,
                used: 20
            }]
        );
        // A failed partial removal changes nothing.
        let mut failed = mem(MemoryOp::SeqRm, 1, -1, 5, 10);
        failed.ret = 0;
        assert!(c.apply(1, 0, &failed).is_empty());
        // Another process is untouched by a clear.
        c.after_decode(2, 0, &[part(0, 0, 7)]);
        let mut cleared = c.apply(1, 0, &mem(MemoryOp::Clear, -1, -1, -1, -1));
        cleared.sort_by_key(|s| s.seq_id);
        assert_eq!(
            cleared.iter().map(|s| s.used).collect::<Vec<_>>(),
            [0, 0, 0]
        );
        assert_eq!(c.after_decode(2, 0, &[part(0, 7, 1)])[0].used, 8);
    }

    #[test]
    fn a_sequence_first_seen_mid_way_holds_its_earlier_positions() {
        let mut c = ContextUse::default();
        assert_eq!(c.after_decode(1, 0, &[part(3, 41, 1)])[0].used, 42);
    }
}

#[cfg(test)]
mod two_contexts {
    use super::*;
    use crate::model::PartKind;

    /// A draft context's sequences are its own: the same sequence id in two contexts of one
    /// process holds two counts, and a removal in one leaves the other.
    #[test]
    fn contexts_count_apart() {
        let mut c = ContextUse::default();
        let part = |n| Part {
            seq_id: 0,
            pos0: 0,
            n_tokens: n,
            n_outputs: 1,
            kind: PartKind::FinalPromptChunk,
        };
        assert_eq!(c.after_decode(1, 0xa, &[part(10)])[0].used, 10);
        assert_eq!(c.after_decode(1, 0xb, &[part(4)])[0].used, 4);
        let rm = MemoryEvent {
            op: MemoryOp::SeqRm as u32,
            seq_id: 0,
            p0: 2,
            p1: -1,
            ret: 1,
            ..Default::default()
        };
        assert_eq!(c.apply(1, 0xb, &rm)[0].used, 2);
        assert_eq!(c.seqs[&(1, 0xa, 0)].used, 10);
    }
}
