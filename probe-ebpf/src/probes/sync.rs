//! `void llama_synchronize(struct llama_context * ctx)`: waits for the backend (GPU) to finish
//! the queued work. A decode step's compute time runs to the end of the synchronize after it.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::SyncEvent;

use super::{enter, leave};
use crate::maps::SYNC_ENTRY;

#[uprobe]
pub fn sync_enter(ctx: ProbeContext) -> u32 {
    let mut ev = SyncEvent::default();
    enter(&ctx, &SYNC_ENTRY, &mut ev, |ev| {
        ev.ctx = ctx.arg::<u64>(0).unwrap_or(0)
    });
    0
}

#[uretprobe]
pub fn sync_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, &SYNC_ENTRY, |_| {});
    0
}
