//! One event per sampled token.
//!
//! - `llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
//!   int32_t idx)` (llama.h, b3681+): used by llama-cli, llama-simple and most embedders.
//! - `llama_token common_sampler_sample(common_sampler * gsmpl, llama_context * ctx, int idx,
//!   bool grammar_first)` (common/sampling.h): what llama-server drives; it applies the sampler
//!   chain itself. Same argument positions, so one program serves both.
//! - 2024 (before the sampler chain): `llama_token llama_sampling_sample(struct
//!   llama_sampling_context * ctx_sampling, struct llama_context * ctx_main, struct
//!   llama_context * ctx_cfg, int idx)` (common/sampling.h: what llama-server and the examples
//!   drive), and llama.h's `llama_sample_token*(struct llama_context * ctx,
//!   llama_token_data_array * candidates, …)`, which `llama_sampling_sample` calls (nested:
//!   counted once) and embedders call directly. The latter do not say which output row the
//!   candidates came from: `idx` -1 and `SampleApi::Token`, the agent infers it.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{SampleApi, SampleEvent, TokenDataArrayLayout};

use super::{enter, layout, leave, read};
use crate::maps::SAMPLE_ENTRY;

#[uprobe]
pub fn sample_enter(ctx: ProbeContext) -> u32 {
    let mut ev = SampleEvent::default();
    enter(&ctx, &SAMPLE_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(1).unwrap_or(0);
        ev.idx = ctx.arg::<i64>(2).unwrap_or(0) as i32;
    });
    0
}

/// `llama_sampling_sample(ctx_sampling, ctx_main, ctx_cfg, idx)` (2024): the context is the
/// second argument, the output index the fourth.
#[uprobe]
pub fn sample_enter_2024(ctx: ProbeContext) -> u32 {
    let mut ev = SampleEvent::default();
    enter(&ctx, &SAMPLE_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(1).unwrap_or(0);
        ev.idx = ctx.arg::<i64>(3).unwrap_or(-1) as i32;
    });
    0
}

/// `llama_sample_token*(ctx, candidates, …)` (2024): the context first; no output index.
#[uprobe]
pub fn sample_token_enter(ctx: ProbeContext) -> u32 {
    let mut ev = SampleEvent::default();
    enter(&ctx, &SAMPLE_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(0).unwrap_or(0);
        ev.idx = -1;
        ev.api = SampleApi::Token as u32;
    });
    0
}

/// `void llama_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p)`:
/// where a program that applies the sampler chain itself (node-llama-cpp) picks each token. A
/// chain's apply calls each of its samplers' apply, and the sampling functions above call it:
/// nested, counted once. The agent keeps these only for a process whose tokens it sees through
/// no sampling function (and detaches them otherwise).
#[uprobe]
pub fn sample_apply(ctx: ProbeContext) -> u32 {
    let mut ev = SampleEvent::default();
    enter(&ctx, &SAMPLE_ENTRY, &mut ev, |ev| {
        // The array until the return, which reads what the chain selected in it.
        ev.ctx = ctx.arg::<u64>(1).unwrap_or(0);
        ev.token = -1;
        ev.idx = -1;
        ev.api = SampleApi::Apply as u32;
    });
    0
}

#[uretprobe]
pub fn sample_apply_return(ctx: RetProbeContext) -> u32 {
    let l = layout(&ctx);
    leave(&ctx, &SAMPLE_ENTRY, |ev| {
        let array = ev.ctx;
        ev.ctx = 0;
        if let Some(l) = l {
            ev.token = selected_token(array, &l.token_data);
        }
    });
    0
}

/// The id of the entry `selected` in a `llama_token_data_array` (-1: none, or unreadable).
#[inline(always)]
fn selected_token(array: u64, l: &TokenDataArrayLayout) -> i32 {
    let selected = read::<i64>(array + l.selected as u64).unwrap_or(-1);
    let size = read::<u64>(array + l.size as u64).unwrap_or(0);
    if selected < 0 || selected as u64 >= size {
        return -1;
    }
    let data = read::<u64>(array + l.data as u64).unwrap_or(0);
    let at = data + selected as u64 * l.entry_size as u64 + l.entry_id as u64;
    read::<i32>(at).filter(|t| *t >= 0).unwrap_or(-1)
}

#[uretprobe]
pub fn sample_return(ctx: RetProbeContext) -> u32 {
    // llama_token is int32_t: take the low 32 bits of the return register.
    let token = ctx.ret::<u64>() as i32;
    leave(&ctx, &SAMPLE_ENTRY, |ev| ev.token = token);
    0
}
