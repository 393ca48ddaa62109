//! Changes of the KV memory's sequences, for context use per sequence:
//! - `bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
//!   llama_pos p1)` (2025+), `llama_kv_self_seq_rm(ctx, …)`, `llama_kv_cache_seq_rm(ctx, …)`;
//! - `void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id src, llama_seq_id dst,
//!   llama_pos p0, llama_pos p1)` and the older names;
//! - `void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
//!   llama_pos p1, llama_pos delta)` and the older names (a context shift moves a sequence's
//!   positions back after removing some);
//! - `void llama_memory_clear(llama_memory_t mem, bool data)`, `llama_kv_self_clear(ctx)`,
//!   `llama_kv_cache_clear(ctx)`.
//!
//! - `llama_memory_t llama_get_memory(const struct llama_context * ctx)`: whose memory a handle
//!   is.
//!
//! All take plain integer arguments, so one entry program per operation serves every name.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{MemoryEvent, MemoryHandleEvent, MemoryOp};

use super::{enter, leave};
use crate::maps::{MEMORY_ENTRY, MEMORY_HANDLE_ENTRY};

#[inline(always)]
fn arg_i32(ctx: &ProbeContext, n: usize) -> i32 {
    ctx.arg::<u64>(n).unwrap_or(0) as i32
}

#[inline(always)]
fn start(ctx: &ProbeContext, op: MemoryOp, seq: i32, dst: i32, p0: i32, p1: i32, delta: i32) {
    let mut ev = MemoryEvent::default();
    enter(ctx, &MEMORY_ENTRY, &mut ev, |ev| {
        ev.handle = ctx.arg::<u64>(0).unwrap_or(0);
        ev.op = op as u32;
        ev.seq_id = seq;
        ev.seq_dst = dst;
        ev.p0 = p0;
        ev.p1 = p1;
        ev.delta = delta;
    });
}

#[uprobe]
pub fn memory_seq_rm(ctx: ProbeContext) -> u32 {
    let (seq, p0, p1) = (arg_i32(&ctx, 1), arg_i32(&ctx, 2), arg_i32(&ctx, 3));
    start(&ctx, MemoryOp::SeqRm, seq, -1, p0, p1, 0);
    0
}

#[uprobe]
pub fn memory_seq_cp(ctx: ProbeContext) -> u32 {
    let (src, dst) = (arg_i32(&ctx, 1), arg_i32(&ctx, 2));
    let (p0, p1) = (arg_i32(&ctx, 3), arg_i32(&ctx, 4));
    start(&ctx, MemoryOp::SeqCp, src, dst, p0, p1, 0);
    0
}

#[uprobe]
pub fn memory_clear(ctx: ProbeContext) -> u32 {
    start(&ctx, MemoryOp::Clear, -1, -1, -1, -1, 0);
    0
}

#[uprobe]
pub fn memory_seq_add(ctx: ProbeContext) -> u32 {
    let (seq, p0, p1) = (arg_i32(&ctx, 1), arg_i32(&ctx, 2), arg_i32(&ctx, 3));
    start(&ctx, MemoryOp::SeqAdd, seq, -1, p0, p1, arg_i32(&ctx, 4));
    0
}

#[uretprobe]
pub fn memory_return(ctx: RetProbeContext) -> u32 {
    // bool for seq_rm (low byte of the return register); void for the others, where the
    // register holds garbage: the agent only reads `ret` for seq_rm.
    let ret = ctx.ret::<u64>() as u8 as u32;
    leave(&ctx, &MEMORY_ENTRY, |ev| ev.ret = ret);
    0
}

/// `llama_memory_t llama_get_memory(const struct llama_context * ctx)`: the memory events of
/// the 2025+ API carry the memory handle, not the context; this says whose it is.
#[uprobe]
pub fn memory_handle(ctx: ProbeContext) -> u32 {
    let mut ev = MemoryHandleEvent::default();
    enter(&ctx, &MEMORY_HANDLE_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(0).unwrap_or(0);
    });
    0
}

#[uretprobe]
pub fn memory_handle_return(ctx: RetProbeContext) -> u32 {
    let mem = ctx.ret::<u64>();
    leave(&ctx, &MEMORY_HANDLE_ENTRY, |ev| ev.mem = mem);
    0
}
