//! The host agent's discovery (`llamaprobe daemon`): every exec on the host, and the exit of
//! the processes the agent watches, from the `sched` tracepoints. An exec is one small event
//! (the agent then looks at the process); exits of unwatched processes cost nothing but the
//! map lookup.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use probe_common::{ProcessChange, ProcessEvent};

use super::{current, instant, send};
use crate::maps::WATCHED;

#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    send(&ProcessEvent {
        header: instant::<ProcessEvent>(),
        change: ProcessChange::Exec as u32,
        _pad: 0,
    });
    0
}

#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    // Threads end all the time; the process ends with its main thread (a leader that exits
    // first is caught by the agent's rescan).
    // SAFETY: plain data, read only.
    if tgid != tid || unsafe { WATCHED.get(&tgid) }.is_none() {
        return 0;
    }
    let _ = WATCHED.remove(&tgid);
    send(&ProcessEvent {
        header: instant::<ProcessEvent>(),
        change: ProcessChange::Exit as u32,
        _pad: 0,
    });
    0
}
