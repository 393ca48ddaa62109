//! Decode steps, one event per step whichever API the program uses:
//! - classic: `int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch)`
//!   (llama.h; the 56-byte batch is passed by value);
//! - newest: `int llama_context::decode(const llama_batch_ext & batch)` (src/llama-context.h),
//!   which `llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)` and the compatibility
//!   `llama_decode` both reach. Probing this method counts each step once on either path.
//!
//! The entry program summarises the batch into runs of consecutive tokens of one sequence
//! (sequence id, first position, tokens, outputs) so the agent can tell prompt chunks from
//! generated tokens per sequence. It walks the batch in at most `MAX_SCAN` steps (see [`scan`])
//! and also reads the last token.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    decode_flags as F, BatchExtLayout, ClassicBatchLayout, DecodeApi, DecodeEvent, LastToken,
    SeqRun, MAX_RUNS, MAX_SCAN, MAX_STRIDE,
};

use super::{byval_arg, current, enter, layout, leave, read};
use crate::maps::{
    ScanState, StepMark, DECODE_ENTRY, DECODE_SCRATCH, PROFILE_CPU, SCAN_SCRATCH, STEP_BY_TGID,
};

/// Per-token access to one batch representation.
trait Tokens {
    /// First sequence id of token `i`.
    fn seq(&self, i: u32) -> Option<i32>;
    /// Output flag of token `i` (`None`: the batch has no flags).
    fn output(&self, i: u32) -> Option<bool>;
    /// Position of token `i`, -1 if unknown.
    fn pos(&self, i: u32) -> i32;
    /// Token id of token `i`, -1 if unknown.
    fn id(&self, i: u32) -> i32;
}

/// The classic `llama_batch`, by value: array pointers read from the struct.
struct Classic {
    token: u64,
    pos: u64,
    seq_id: u64,
    logits: u64,
}

impl Tokens for Classic {
    #[inline(always)]
    fn seq(&self, i: u32) -> Option<i32> {
        let p = read::<u64>(self.seq_id + 8 * i as u64)?;
        read::<i32>(p)
    }
    #[inline(always)]
    fn output(&self, i: u32) -> Option<bool> {
        if self.logits == 0 {
            return None;
        }
        read::<i8>(self.logits + i as u64).map(|v| v != 0)
    }
    #[inline(always)]
    fn pos(&self, i: u32) -> i32 {
        read::<i32>(self.pos + 4 * i as u64).unwrap_or(-1)
    }
    #[inline(always)]
    fn id(&self, i: u32) -> i32 {
        read::<i32>(self.token + 4 * i as u64).unwrap_or(-1)
    }
}

/// The C++ `llama_batch_ext`: a vector of token objects.
struct Ext {
    begin: u64,
    l: BatchExtLayout,
}

impl Ext {
    #[inline(always)]
    fn token(&self, i: u32) -> u64 {
        self.begin + i as u64 * self.l.token_size as u64
    }
}

impl Tokens for Ext {
    #[inline(always)]
    fn seq(&self, i: u32) -> Option<i32> {
        let node = read::<u64>(self.token(i) + self.l.token_seq_first_node as u64)?;
        if node == 0 {
            return Some(-1);
        }
        read::<i32>(node + self.l.seq_node_value as u64)
    }
    #[inline(always)]
    fn output(&self, i: u32) -> Option<bool> {
        read::<u8>(self.token(i) + self.l.token_output as u64).map(|v| v != 0)
    }
    #[inline(always)]
    fn pos(&self, i: u32) -> i32 {
        read::<i32>(self.token(i) + self.l.token_pos as u64).unwrap_or(-1)
    }
    #[inline(always)]
    fn id(&self, i: u32) -> i32 {
        read::<i32>(self.token(i) + self.l.token_id as u64).unwrap_or(-1)
    }
}

/// Run `k` of the event. The index is masked after an optimisation barrier: LLVM may check a
/// bound on one copy of a value and index with another, which the verifier cannot follow; the
/// mask (MAX_RUNS is a power of two) is a bound it always sees. Callers check `k < MAX_RUNS`.
#[inline(always)]
fn run_at(ev: &mut DecodeEvent, k: usize) -> &mut SeqRun {
    const _: () = assert!(MAX_RUNS.is_power_of_two());
    let k = core::hint::black_box(k) & (MAX_RUNS - 1);
    // SAFETY: k < MAX_RUNS by the mask.
    unsafe { &mut *ev.runs.as_mut_ptr().add(k) }
}

/// Fills `ev.runs`, `n_runs`, `n_scanned`, `last` and flags by walking the batch.
///
/// The walk (at most `MAX_SCAN` steps) starts a run at a token, then tries to extend it by a
/// block of `stride` tokens by reading only the block's last token: same sequence at the
/// expected position means the whole block continues the run (llama.cpp's batches hold each
/// sequence's tokens contiguously), and the stride doubles; otherwise it halves, down to one
/// token, whose mismatch starts the next run.
///
/// Verifier note: the run index lives in the event (map memory, read with volatile loads),
/// not in a register. The verifier treats map memory as unknown scalars, so every path through
/// one step reaches the next in the same abstract state and is pruned; with the index in a
/// register it would explore every (step, run) pair and exceed the instruction limit.
#[inline(always)]
fn scan<T: Tokens>(ev: &mut DecodeEvent, src: &T, n_tokens: u32) {
    use core::ptr::{addr_of, addr_of_mut, read_volatile as rv, write_volatile as wv};
    let Some(st) = SCAN_SCRATCH.get_ptr_mut(0) else {
        ev.flags |= F::UNREADABLE;
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program only while it runs. Every access is
    // volatile so that LLVM keeps the cursor in map memory (see the verifier note above).
    let st = unsafe { &mut *st };
    unsafe {
        wv(
            st,
            ScanState {
                i: 0,
                stride: 1,
                cur_seq: 0,
                cur_pos0: 0,
                cur_i0: 0,
            },
        )
    };
    let mut k: u32 = 0;
    while k < MAX_SCAN {
        k += 1;
        let ScanState {
            i,
            stride,
            cur_seq,
            cur_pos0,
            cur_i0,
        } = unsafe { rv(st) };
        if i >= n_tokens {
            break;
        }
        // SAFETY: fields of the map value we own for the duration of the program.
        let started = unsafe { rv(addr_of!(ev.n_runs)) } as usize;
        if started > 0 && started <= MAX_RUNS {
            let cand = i.wrapping_add(stride).wrapping_sub(1);
            if cand < n_tokens {
                let expected = cur_pos0.wrapping_add(cand.wrapping_sub(cur_i0) as i32);
                if src.seq(cand) == Some(cur_seq) && (cur_pos0 < 0 || src.pos(cand) == expected) {
                    let out = src.output(cand).unwrap_or(false);
                    let run = run_at(ev, started - 1);
                    run.n_tokens = run.n_tokens.wrapping_add(stride as u16);
                    if out {
                        run.n_outputs = run.n_outputs.wrapping_add(1);
                    }
                    run.last_output = out as u8;
                    unsafe {
                        wv(addr_of_mut!(st.i), i.wrapping_add(stride));
                        wv(
                            addr_of_mut!(st.stride),
                            if stride < MAX_STRIDE {
                                stride * 2
                            } else {
                                stride
                            },
                        );
                    }
                    continue;
                }
            }
            if stride > 1 {
                unsafe { wv(addr_of_mut!(st.stride), stride / 2) };
                continue;
            }
        }
        // Token i starts a new run.
        if started >= MAX_RUNS {
            ev.flags |= F::RUNS_TRUNCATED;
            break;
        }
        let Some(seq) = src.seq(i) else {
            ev.flags |= F::UNREADABLE;
            break;
        };
        let out = match src.output(i) {
            Some(o) => o,
            None => {
                ev.flags |= F::NO_OUTPUT_INFO;
                false
            }
        };
        let pos0 = src.pos(i);
        let tok0 = src.id(i);
        let run = run_at(ev, started);
        run.seq_id = seq;
        run.pos0 = pos0;
        run.tok0 = tok0;
        run.n_tokens = 1;
        run.n_outputs = out as u8;
        run.last_output = out as u8;
        unsafe {
            wv(addr_of_mut!(ev.n_runs), (started + 1) as u8);
            wv(
                st,
                ScanState {
                    i: i + 1,
                    stride: 1,
                    cur_seq: seq,
                    cur_pos0: pos0,
                    cur_i0: i,
                },
            );
        }
    }
    let i = unsafe { rv(addr_of!(st.i)) };
    ev.n_scanned = i as u16;
    if n_tokens > 0 {
        let last = n_tokens - 1;
        if let Some(seq) = src.seq(last) {
            let pos = src.pos(last);
            // No output flags means llama.cpp outputs the last token.
            let out: u8 = match src.output(last) {
                Some(false) => 0,
                _ => 1,
            };
            // Volatile stores keep LLVM from merging these with values across the helper
            // calls above (which clobber r1-r5).
            unsafe {
                wv(addr_of_mut!(ev.last.seq_id), seq);
                wv(addr_of_mut!(ev.last.pos), pos);
                wv(addr_of_mut!(ev.last.output), out);
            }
            ev.flags |= F::LAST_VALID;
        }
    }
}

/// Starts a decode event in the per-CPU scratch slot and records it for this thread.
#[inline(always)]
fn start(ctx: &ProbeContext, ctx_ptr: u64, api: DecodeApi, fill: impl FnOnce(&mut DecodeEvent)) {
    let Some(ev) = DECODE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program only while it runs.
    let ev = unsafe { &mut *ev };
    let recorded = enter(ctx, &DECODE_ENTRY, ev, |ev| {
        ev.ctx = ctx_ptr;
        ev.ret = 0;
        ev.n_tokens = -1;
        ev.n_scanned = 0;
        ev.n_runs = 0;
        ev.api = api as u8;
        ev.flags = 0;
        ev._pad = [0; 3];
        ev.last = LastToken::default();
        let mut k = 0;
        while k < MAX_RUNS {
            if let Some(run) = ev.runs.get_mut(k) {
                *run = Default::default();
            }
            k += 1;
        }
        fill(ev);
    });
    if recorded && PROFILE_CPU.load() != 0 {
        let mark = StepMark {
            start_ns: ev.header.start_ns,
            tid: ev.header.tid,
            _pad: 0,
        };
        // A full map costs the step's other threads their decode state, nothing else.
        let _ = STEP_BY_TGID.insert(&ev.header.tgid, &mark, 0);
    }
}

#[uprobe]
pub fn decode_classic(ctx: ProbeContext) -> u32 {
    let ctx_ptr = ctx.arg::<u64>(0).unwrap_or(0);
    let batch = byval_arg(&ctx, 1).unwrap_or(0);
    start(&ctx, ctx_ptr, DecodeApi::Classic, |ev| {
        let Some(l) = layout(&ctx) else {
            ev.flags |= F::UNREADABLE;
            return;
        };
        let l: ClassicBatchLayout = l.classic;
        let Some(n) = read::<i32>(batch + l.n_tokens as u64) else {
            ev.flags |= F::UNREADABLE;
            return;
        };
        ev.n_tokens = n;
        let seq_id = read::<u64>(batch + l.seq_id as u64).unwrap_or(0);
        if seq_id == 0 || n <= 0 {
            ev.flags |= F::NO_SEQ_INFO;
            return;
        }
        let src = Classic {
            token: read::<u64>(batch + l.token as u64).unwrap_or(0),
            pos: read::<u64>(batch + l.pos as u64).unwrap_or(0),
            seq_id,
            logits: read::<u64>(batch + l.logits as u64).unwrap_or(0),
        };
        scan(ev, &src, n as u32);
    });
    0
}

#[uprobe]
pub fn decode_ext(ctx: ProbeContext) -> u32 {
    // C++ method: `this` in the first argument register, the reference in the second.
    let ctx_ptr = ctx.arg::<u64>(0).unwrap_or(0);
    let batch = ctx.arg::<u64>(1).unwrap_or(0);
    start(&ctx, ctx_ptr, DecodeApi::BatchExt, |ev| {
        let Some(l) = layout(&ctx) else {
            ev.flags |= F::UNREADABLE;
            return;
        };
        let l: BatchExtLayout = l.ext;
        let begin = read::<u64>(batch + l.tokens_vec as u64).unwrap_or(0);
        let end = read::<u64>(batch + l.tokens_vec as u64 + 8).unwrap_or(0);
        if begin == 0 || end < begin || l.token_size == 0 {
            ev.flags |= F::UNREADABLE;
            return;
        }
        let n = (end - begin) / l.token_size as u64;
        ev.n_tokens = n as i32;
        scan(ev, &Ext { begin, l }, n as u32);
    });
    0
}

#[uretprobe]
pub fn decode_return(ctx: RetProbeContext) -> u32 {
    // int32_t / int: the low 32 bits of the return register.
    let ret = ctx.ret::<u64>() as i32;
    leave(&ctx, &DECODE_ENTRY, |ev| ev.ret = ret);
    if PROFILE_CPU.load() != 0 {
        let (tgid, tid) = current();
        // The outer call returned (its entry is gone): the process's step mark, if this
        // thread's, goes too.
        // SAFETY (both): plain data.
        if unsafe { DECODE_ENTRY.get(&tid) }.is_none()
            && unsafe { STEP_BY_TGID.get(&tgid) }.is_some_and(|m| m.tid == tid)
        {
            let _ = STEP_BY_TGID.remove(&tgid);
        }
    }
    0
}
