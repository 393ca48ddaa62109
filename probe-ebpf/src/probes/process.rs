//! The host agent's discovery (`llamaprobe daemon`): every exec on the host, from the `sched`
//! tracepoint; and the end of every thread of a watched process (`attach`, `run` and the
//! daemon), from `sched_process_exit`, with the thread's exit status read from its task at the
//! offset the agent found in the kernel's BTF (`TASK_EXIT_CODE_OFFSET`; the tracepoint itself
//! has no status). An exec is one small event (the agent then looks at the process); the ends
//! of unwatched threads cost a map lookup.
//!
//! A thread that ends inside probed calls (killed in a decode step, crashed in a sampler) never
//! returns from them: its per-thread entries are released here and reported with the exit.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    maps::HashMap,
    programs::TracePointContext,
};
use probe_common::{ProcessChange, ProcessEvent, EXIT_CODE_UNKNOWN, IN_CALL};

use super::{current, instant, send, Event};
use crate::maps::{
    CONTEXT_ENTRY, DECODE_ENTRY, MEMORY_ENTRY, MEMORY_HANDLE_ENTRY, MODEL_ENTRY, POST_ENTRY,
    SAMPLE_ENTRY, SLOT_LAUNCH_ENTRY, SYNC_ENTRY, TASK_EXIT_CODE_OFFSET, WATCHED,
};

#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    send(&ProcessEvent {
        header: instant::<ProcessEvent>(),
        change: ProcessChange::Exec as u32,
        ..Default::default()
    });
    0
}

/// A thread ends (`do_exit` has set its `exit_code`).
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let offset = TASK_EXIT_CODE_OFFSET.load();
    let code = if offset == 0 {
        EXIT_CODE_UNKNOWN
    } else {
        // SAFETY: the current task is valid while the program runs; the read is checked by the
        // helper (a wrong offset reads a wrong number, never faults).
        unsafe {
            let task = bpf_get_current_task() as *const u8;
            bpf_probe_read_kernel(task.add(offset as usize) as *const i32)
                .unwrap_or(EXIT_CODE_UNKNOWN)
        }
    };
    ended(code);
    0
}

/// The calling thread ends: if its process is watched, its entries are released; the main
/// thread's end reports the process's, another thread's is reported only if it was inside
/// probed calls. (A main thread that ends before the others is caught by the agent's rescan.)
#[inline(always)]
fn ended(exit_code: i32) {
    let (tgid, tid) = current();
    // SAFETY: plain data, read only.
    if unsafe { WATCHED.get(&tgid) }.is_none() {
        return;
    }
    let mut calls = 0;
    calls |= release(&DECODE_ENTRY, tgid, tid, IN_CALL[0].0);
    calls |= release(&MODEL_ENTRY, tgid, tid, IN_CALL[1].0);
    calls |= release(&CONTEXT_ENTRY, tgid, tid, IN_CALL[2].0);
    calls |= release(&SAMPLE_ENTRY, tgid, tid, IN_CALL[3].0);
    calls |= release(&SYNC_ENTRY, tgid, tid, IN_CALL[4].0);
    calls |= release(&MEMORY_ENTRY, tgid, tid, IN_CALL[5].0);
    calls |= release(&MEMORY_HANDLE_ENTRY, tgid, tid, IN_CALL[6].0);
    calls |= release(&SLOT_LAUNCH_ENTRY, tgid, tid, IN_CALL[7].0);
    calls |= release(&POST_ENTRY, tgid, tid, IN_CALL[8].0);
    // The process stays watched (the agent unwatches it when it releases it): its other
    // threads may end after its main thread.
    let change = if tgid == tid {
        ProcessChange::Exit
    } else if calls != 0 {
        ProcessChange::ThreadExit
    } else {
        return;
    };
    send(&ProcessEvent {
        header: instant::<ProcessEvent>(),
        change: change as u32,
        calls,
        exit_code,
        _pad: 0,
    });
}

/// Removes the ending thread's entry from `map`: `bit` if it was a call of this process in
/// progress (an entry left by an earlier process with the same thread id goes too, unreported).
#[inline(always)]
fn release<T: Event>(map: &HashMap<u32, T>, tgid: u32, tid: u32, bit: u32) -> u32 {
    let Some(entry) = map.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: map value pointer valid while the program runs.
    let mine = unsafe { &mut *entry }.header().tgid == tgid;
    let _ = map.remove(&tid);
    if mine {
        bit
    } else {
        0
    }
}
