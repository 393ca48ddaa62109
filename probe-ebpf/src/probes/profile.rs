//! `--profile-cpu`: a `cpu-clock` software perf event on every CPU runs [`cpu_sample`] at the
//! chosen frequency. For a thread of a profiled process it records the user instruction pointer,
//! the user stack as far as frame pointers lead (bpf_get_stack; builds without frame pointers
//! give the leaf alone, or a few wrong frames the agent cannot tell from right ones), and what
//! the thread was doing, from the entry maps the uprobes keep: inside a decode step (its own, or
//! another thread's of the same process: ggml's compute workers), inside sampling, inside a
//! model load, or none of them.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_stack, bpf_ktime_get_ns},
    macros::perf_event,
    programs::PerfEventContext,
    EbpfContext,
};
use probe_common::{CpuSampleEvent, CpuState, EventHeader, EventKind, LOST_RINGBUF, MAX_FRAMES};

use super::current;
use crate::maps::{
    count_lost, StepMark, DECODE_ENTRY, EVENTS, MODEL_ENTRY, PROFILED, SAMPLE_ENTRY, STEP_BY_TGID,
};

/// Whether the interrupted context was the kernel's.
#[inline(always)]
fn in_kernel(ctx: &PerfEventContext) -> bool {
    let data = ctx.as_ptr() as *const aya_ebpf::bindings::bpf_perf_event_data;
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: the context is the perf event's data; its regs are the interrupted ones.
        let cs = unsafe { (*data).regs.cs };
        cs & 3 != 3
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        // SAFETY: as above. PSTATE.M[3:0] is 0 at EL0 (user).
        let pstate = unsafe { (*data).regs.pstate };
        pstate & 0xf != 0
    }
    #[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
    {
        let _ = data;
        false
    }
}

/// The decode step the process is inside, as (entry time, thread), if any: the sampled
/// thread's own, else the one its process's step mark names, if that thread is still inside it
/// (a mark left by a thread that ended mid-step is ignored).
#[inline(always)]
fn step_of(tgid: u32, tid: u32) -> Option<(u64, u32)> {
    // SAFETY: map values are plain data, read while the program runs.
    if let Some(ev) = unsafe { DECODE_ENTRY.get(&tid) } {
        if ev.header.tgid == tgid {
            // A returning step has ended for the sampler (see `leave`): not this thread's
            // step any more, and no other thread's either.
            return inside(&ev.header, tgid).then_some((ev.header.start_ns, tid));
        }
    }
    let mark: StepMark = unsafe { *STEP_BY_TGID.get(&tgid)? };
    let ev = unsafe { DECODE_ENTRY.get(&mark.tid)? };
    (inside(&ev.header, tgid) && ev.header.start_ns == mark.start_ns)
        .then_some((mark.start_ns, mark.tid))
}

/// Whether an entry map's call of process `tgid` is still in progress for the sampler.
#[inline(always)]
fn inside(h: &EventHeader, tgid: u32) -> bool {
    h.tgid == tgid && h.returning == 0
}

#[perf_event]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    let (tgid, tid) = current();
    if tgid == 0 {
        return 0; // the idle task
    }
    // SAFETY: plain data.
    if unsafe { PROFILED.get(&tgid) }.is_none() {
        return 0;
    }
    let (state, step_start_ns, step_tid) = match step_of(tgid, tid) {
        Some((start, t)) => (CpuState::Decode, start, t),
        // SAFETY (both): plain data.
        // (A returning call has ended for the sampler, as a step has: see `leave`.)
        None if unsafe { SAMPLE_ENTRY.get(&tid) }.is_some_and(|e| inside(&e.header, tgid)) => {
            (CpuState::Sampling, 0, 0)
        }
        None if unsafe { MODEL_ENTRY.get(&tid) }.is_some_and(|e| inside(&e.header, tgid)) => {
            (CpuState::ModelLoad, 0, 0)
        }
        None => (CpuState::Other, 0, 0),
    };
    let Some(mut entry) = EVENTS.reserve::<CpuSampleEvent>(0) else {
        count_lost(LOST_RINGBUF);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `ev` is the reserved record, written field by field before it is submitted.
    unsafe {
        (*ev).header = EventHeader {
            kind: EventKind::CpuSample as u32,
            tgid,
            tid,
            returning: 0,
            start_ns: now,
            end_ns: now,
        };
        (*ev).step_start_ns = step_start_ns;
        (*ev).step_tid = step_tid;
        (*ev).state = state as u32;
        (*ev).in_kernel = in_kernel(&ctx) as u32;
        let got = bpf_get_stack(
            ctx.as_ptr(),
            (*ev).frames.as_mut_ptr().cast(),
            (MAX_FRAMES * 8) as u32,
            BPF_F_USER_STACK as u64,
        );
        (*ev).n_frames = if got > 0 { (got as u32) / 8 } else { 0 };
    }
    // Samples come at a fixed, low rate: they never wake the agent themselves (its drain timer
    // reads them, and the uprobes' events wake it when a batch has piled up).
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    0
}
