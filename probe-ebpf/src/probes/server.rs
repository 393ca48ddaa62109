//! llama-server's own flow: `int server_queue::post(std::vector<server_task> && tasks, bool
//! front)` is where an HTTP handler hands a request's tasks to the server loop, so its entry
//! time is when the request was accepted and the wait until the request's first decode step is
//! its queue wait.
//!
//! `void server_slot::release()` ends a slot's task: its request is over. `server_slot::id`,
//! the slot's (and its batches' sequence) id, is read at the process layout's offset.
//!
//! Arguments: `this` (rdi/x0), the vector (rsi/x1: `{begin, end, capacity}`), `front`
//! (edx/w2). Builds that clone it (`.isra.0`, older `std::vector &` overload) keep this order
//! (checked on every fixture's disassembly; see agent/src/targets.rs).

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{SlotReleaseEvent, TaskPostEvent};

use probe_common::ABSENT;

use super::{enter, layout, leave};
use crate::maps::{SLOT_RELEASE_ENTRY, TASK_POST_ENTRY};

#[uprobe]
pub fn task_post(ctx: ProbeContext) -> u32 {
    let vec = ctx.arg::<u64>(1).unwrap_or(0);
    // SAFETY: reads of user memory through the helper, which fails cleanly.
    let begin = unsafe { bpf_probe_read_user(vec as *const u64) }.unwrap_or(0);
    let end = unsafe { bpf_probe_read_user((vec + 8) as *const u64) }.unwrap_or(0);
    let mut ev = TaskPostEvent::default();
    enter(&TASK_POST_ENTRY, &mut ev, |ev| {
        ev.tasks_bytes = end.wrapping_sub(begin);
        ev.front = ctx.arg::<u64>(2).unwrap_or(0) as u8 as u32;
    });
    0
}

#[uretprobe]
pub fn task_post_return(_ctx: RetProbeContext) -> u32 {
    leave(&TASK_POST_ENTRY, |_| {});
    0
}

#[uprobe]
pub fn slot_release(ctx: ProbeContext) -> u32 {
    let slot = ctx.arg::<u64>(0).unwrap_or(0);
    let (tgid, _) = super::current();
    let slot_id = match layout(tgid).map(|l| l.server.slot_id) {
        Some(off) if off != ABSENT => {
            // SAFETY: a read of user memory through the helper, which fails cleanly.
            unsafe { bpf_probe_read_user((slot + off as u64) as *const i32) }.unwrap_or(-1)
        }
        _ => -1,
    };
    let mut ev = SlotReleaseEvent::default();
    enter(&SLOT_RELEASE_ENTRY, &mut ev, |ev| {
        ev.slot_id = slot_id;
    });
    0
}

#[uretprobe]
pub fn slot_release_return(_ctx: RetProbeContext) -> u32 {
    leave(&SLOT_RELEASE_ENTRY, |_| {});
    0
}
