//! Model loading:
//! - `struct llama_model * llama_model_load_from_file(const char * path_model,
//!   struct llama_model_params params)` (b4424+) and the deprecated
//!   `llama_load_model_from_file` (same signature; calls the former: counted once);
//! - `struct llama_model * llama_model_load_from_splits(const char ** paths, size_t n_paths,
//!   struct llama_model_params params)` (b4492+): the first split's path is recorded.
//!
//! A null return is a failed load.

use aya_ebpf::{
    helpers::bpf_probe_read_user_str_bytes,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::ModelLoadApi;

use super::{enter, leave, read};
use crate::maps::{MODEL_ENTRY, MODEL_SCRATCH};

#[inline(always)]
fn start(ctx: &ProbeContext, path_ptr: u64, api: ModelLoadApi) {
    let Some(ev) = MODEL_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program only while it runs.
    let ev = unsafe { &mut *ev };
    enter(ctx, &MODEL_ENTRY, ev, |ev| {
        ev.model = 0;
        ev.api = api as u32;
        ev.path_len = 0;
        if path_ptr != 0 {
            // SAFETY: the helper bounds the read by the buffer and checks the address.
            if let Ok(s) =
                unsafe { bpf_probe_read_user_str_bytes(path_ptr as *const u8, &mut ev.path) }
            {
                ev.path_len = s.len() as u32 + 1;
            }
        }
    });
}

#[uprobe]
pub fn model_load_file(ctx: ProbeContext) -> u32 {
    start(&ctx, ctx.arg::<u64>(0).unwrap_or(0), ModelLoadApi::File);
    0
}

#[uprobe]
pub fn model_load_splits(ctx: ProbeContext) -> u32 {
    let paths = ctx.arg::<u64>(0).unwrap_or(0);
    start(&ctx, read::<u64>(paths).unwrap_or(0), ModelLoadApi::Splits);
    0
}

#[uretprobe]
pub fn model_load_return(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>();
    leave(&ctx, &MODEL_ENTRY, |ev| ev.model = ret);
    0
}
