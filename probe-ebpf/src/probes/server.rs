//! llama-server's own flow, by task id: a request is a task that an HTTP handler posts, a slot
//! launches and later releases. The three probes read the task ids, so the agent joins post →
//! slot → request exactly, whatever the threads' scheduling.
//!
//! - `int server_queue::post(std::vector<server_task> && tasks, bool front)`: `this` (rdi/x0),
//!   the vector (rsi/x1: `{begin, end, capacity}`), `front` (edx/w2). Builds that clone it
//!   (`.isra.0`, the older `std::vector &` overload) keep this order (checked on every fixture's
//!   disassembly; see agent/src/targets.rs). Entry only: the event is sent before the server
//!   loop can take the tasks, so it reaches the agent before any event of their work.
//! - 2024: `int server_queue::post(server_task task)`: one task, passed by reference to a
//!   copy (rsi/x1), whose id is assigned inside and returned: the entry reads the task's type,
//!   the return its id.
//! - `bool server_context::launch_slot_with_task(server_slot & slot, server_task && task)`
//!   (2026: `server_context_impl::`; 2024: `const server_task &`): `this`, the slot (rsi/x1),
//!   the task (rdx/x2); returns false when the task is refused (an invalid request).
//! - `void server_slot::release()`: `this` (rdi/x0). Entry only, while the slot still holds
//!   its task.
//!
//! Every offset comes from the process layout (`ServerLayout`); an [`ABSENT`] one is not read.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    ServerLayout, SlotLaunchEvent, SlotReleaseEvent, TaskPostEvent, ABSENT, MAX_POST_TASKS,
};

use super::{enter, instant, layout, leave, read, send};
use crate::maps::{POST_ENTRY, POST_SCRATCH, SLOT_LAUNCH_ENTRY};

/// The `i32` at `base + off`, -1 if the layout has no such field or the read fails.
#[inline(always)]
fn field(base: u64, off: u32) -> i32 {
    if off == ABSENT || base == 0 {
        return -1;
    }
    read::<i32>(base + off as u64).unwrap_or(-1)
}

/// The pointer at `base + off`, 0 if the layout has no such field or the read fails.
#[inline(always)]
fn pointer(base: u64, off: u32) -> u64 {
    if off == ABSENT || base == 0 {
        return 0;
    }
    read::<u64>(base + off as u64).unwrap_or(0)
}

fn server_layout(ctx: &ProbeContext) -> Option<ServerLayout> {
    layout(ctx).map(|l| l.server)
}

#[uprobe]
pub fn task_post(ctx: ProbeContext) -> u32 {
    let Some(ev) = POST_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, ours for the program's run.
    let ev = unsafe { &mut *ev };
    ev.header = instant::<TaskPostEvent>();
    let vec = ctx.arg::<u64>(1).unwrap_or(0);
    let begin = read::<u64>(vec).unwrap_or(0);
    let end = read::<u64>(vec + 8).unwrap_or(0);
    ev.tasks_bytes = end.wrapping_sub(begin);
    ev.front = ctx.arg::<u64>(2).unwrap_or(0) as u8 as u32;
    ev.n_read = 0;
    ev.n_tasks = 0;
    if let Some(l) = server_layout(&ctx) {
        let size = l.task_size as u64;
        let whole = l.task_size != ABSENT && size > 0 && ev.tasks_bytes % size == 0;
        // Without a size that divides the vector's, only the first task can be found.
        let (n, stride) = if whole {
            ev.n_tasks = (ev.tasks_bytes / size) as u32;
            (ev.n_tasks as u64, size)
        } else {
            ((ev.tasks_bytes > 0) as u64, 0)
        };
        for i in 0..MAX_POST_TASKS {
            if i as u64 >= n {
                break;
            }
            let task = begin + i as u64 * stride;
            ev.tasks[i].id = field(task, l.task_id);
            ev.tasks[i].task_type = field(task, l.task_type);
            ev.tasks[i].id_target = field(task, l.task_id_target);
            ev.n_read = i as u32 + 1;
        }
    }
    send(ev);
    0
}

#[uprobe]
pub fn task_post_one(ctx: ProbeContext) -> u32 {
    let Some(ev) = POST_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, ours for the program's run (copied into the entry map).
    let ev = unsafe { &mut *ev };
    let task = ctx.arg::<u64>(1).unwrap_or(0);
    let l = server_layout(&ctx);
    enter(&ctx, &POST_ENTRY, ev, |ev| {
        ev.front = 0;
        ev.n_tasks = 1;
        ev.n_read = 1;
        ev.tasks_bytes = l.map_or(0, |l| {
            if l.task_size == ABSENT {
                0
            } else {
                l.task_size as u64
            }
        });
        ev.tasks[0].id = -1;
        ev.tasks[0].task_type = l.map_or(-1, |l| field(task, l.task_type));
        ev.tasks[0].id_target = l.map_or(-1, |l| field(task, l.task_id_target));
    });
    0
}

#[uretprobe]
pub fn task_post_one_return(ctx: RetProbeContext) -> u32 {
    let id = ctx.ret::<u64>() as i32;
    leave(&ctx, &POST_ENTRY, |ev| {
        ev.tasks[0].id = id;
        // Accepted at the entry: the event is an instant there.
        ev.header.end_ns = ev.header.start_ns;
    });
    0
}

#[uprobe]
pub fn slot_launch(ctx: ProbeContext) -> u32 {
    let slot = ctx.arg::<u64>(1).unwrap_or(0);
    let task = ctx.arg::<u64>(2).unwrap_or(0);
    let l = server_layout(&ctx);
    let mut ev = SlotLaunchEvent::default();
    enter(&ctx, &SLOT_LAUNCH_ENTRY, &mut ev, |ev| {
        ev.slot_id = -1;
        ev.task_id = -1;
        if let Some(l) = l {
            ev.slot_id = field(slot, l.slot_id);
            ev.task_id = field(task, l.task_id);
            ev.ctx = pointer(slot, l.slot_ctx);
            ev.ctx_dft = pointer(slot, l.slot_ctx_dft);
        }
    });
    0
}

#[uretprobe]
pub fn slot_launch_return(ctx: RetProbeContext) -> u32 {
    // bool: the low byte of the return register.
    let ok = ctx.ret::<u64>() as u8 != 0;
    leave(&ctx, &SLOT_LAUNCH_ENTRY, |ev| ev.ok = ok as u32);
    0
}

#[uprobe]
pub fn slot_release(ctx: ProbeContext) -> u32 {
    let slot = ctx.arg::<u64>(0).unwrap_or(0);
    let mut ev = SlotReleaseEvent {
        header: instant::<SlotReleaseEvent>(),
        slot_id: -1,
        task_id: -1,
    };
    if let Some(l) = server_layout(&ctx) {
        ev.slot_id = field(slot, l.slot_id);
        ev.task_id = if l.slot_task_id != ABSENT {
            field(slot, l.slot_task_id)
        } else if l.slot_task_ptr != ABSENT {
            let task = read::<u64>(slot + l.slot_task_ptr as u64).unwrap_or(0);
            field(task, l.task_id)
        } else {
            -1
        };
    }
    send(&ev);
    0
}
