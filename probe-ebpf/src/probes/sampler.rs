//! One event per sampled token.
//!
//! - `llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
//!   int32_t idx)` (llama.h, b3681+): used by llama-cli, llama-simple and most embedders.
//! - `llama_token common_sampler_sample(common_sampler * gsmpl, llama_context * ctx, int idx,
//!   bool grammar_first)` (common/sampling.h): what llama-server drives; it applies the sampler
//!   chain itself. Same argument positions, so one program serves both.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::SampleEvent;

use super::{enter, leave};
use crate::maps::SAMPLE_ENTRY;

#[uprobe]
pub fn sample_enter(ctx: ProbeContext) -> u32 {
    let mut ev = SampleEvent::default();
    enter(&SAMPLE_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(1).unwrap_or(0);
        ev.idx = ctx.arg::<i64>(2).unwrap_or(0) as i32;
    });
    0
}

#[uretprobe]
pub fn sample_return(ctx: RetProbeContext) -> u32 {
    // llama_token is int32_t: take the low 32 bits of the return register.
    let token = ctx.ret::<u64>() as i32;
    leave(&SAMPLE_ENTRY, |ev| ev.token = token);
    0
}
