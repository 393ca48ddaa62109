//! Context creation:
//! `struct llama_context * llama_init_from_model(struct llama_model * model,
//!                                              struct llama_context_params params)` (b4463+)
//! and the deprecated `llama_new_context_with_model` (same signature; a wrapper in newer builds).
//! `params` is a large struct passed by value; its field offsets come from the process layout.
//! And its end: `void llama_free(struct llama_context * ctx)`, sent at entry.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{ContextEvent, ContextFreeEvent, ABSENT};

use super::{byval_arg, enter, instant, layout, leave, read, send};
use crate::maps::CONTEXT_ENTRY;

#[inline(always)]
fn field(params: u64, off: u32) -> u32 {
    if off == ABSENT {
        return u32::MAX;
    }
    read::<u32>(params + off as u64).unwrap_or(u32::MAX)
}

#[uprobe]
pub fn context_enter(ctx: ProbeContext) -> u32 {
    let mut ev = ContextEvent::default();
    enter(&ctx, &CONTEXT_ENTRY, &mut ev, |ev| {
        ev.model = ctx.arg::<u64>(0).unwrap_or(0);
        let params = byval_arg(&ctx, 1).unwrap_or(0);
        match (layout(&ctx), params) {
            (Some(l), p) if p != 0 => {
                let l = &l.ctx_params;
                ev.n_ctx = field(p, l.n_ctx);
                ev.n_batch = field(p, l.n_batch);
                ev.n_ubatch = field(p, l.n_ubatch);
                ev.n_seq_max = field(p, l.n_seq_max);
                ev.n_threads = field(p, l.n_threads);
                ev.n_threads_batch = field(p, l.n_threads_batch);
            }
            _ => {
                ev.n_ctx = u32::MAX;
                ev.n_batch = u32::MAX;
                ev.n_ubatch = u32::MAX;
                ev.n_seq_max = u32::MAX;
                ev.n_threads = u32::MAX;
                ev.n_threads_batch = u32::MAX;
            }
        }
    });
    0
}

#[uretprobe]
pub fn context_return(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>();
    leave(&ctx, &CONTEXT_ENTRY, |ev| ev.ctx = ret);
    0
}

#[uprobe]
pub fn context_free(ctx: ProbeContext) -> u32 {
    let ev = ContextFreeEvent {
        header: instant::<ContextFreeEvent>(),
        ctx: ctx.arg::<u64>(0).unwrap_or(0),
    };
    send(&ev);
    0
}
