//! Probe families and the entry/return machinery they share.
//!
//! [`enter`] and [`leave`] implement the per-thread protocol once for every family:
//! - an entry made from inside a call of the same family in progress on the thread (a
//!   deprecated wrapper calling its replacement, e.g. `llama_load_model_from_file` →
//!   `llama_model_load_from_file`) is recognised by its deeper stack and not recorded, so the
//!   call is counted once, with the outer timing;
//! - the return of that nested call is recognised the same way; the outer return sends the
//!   event and removes the entry.
//!
//! `process` is not a uprobe family: the host agent's exec and exit tracepoints.

pub mod context;
pub mod decode;
pub mod memory;
pub mod model;
pub mod process;
pub mod profile;
pub mod sampler;
pub mod server;
pub mod sync;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use probe_common::{EventHeader, EventKind, ProcessLayout, LOST_ENTRY, LOST_RINGBUF};

use crate::maps::{count_lost, EVENTS, LAYOUTS, LAYOUT_TABLE, USE_COOKIES};

/// Unread bytes in the ring buffer at which a new event wakes the agent (see [`leave`]).
const WAKEUP_BYTES: u64 = 256 << 10;

/// An event type with a header.
pub trait Event: Copy + 'static {
    const KIND: EventKind;
    fn header(&mut self) -> &mut EventHeader;
}

macro_rules! impl_event {
    ($t:ty, $k:expr) => {
        impl Event for $t {
            const KIND: EventKind = $k;
            #[inline(always)]
            fn header(&mut self) -> &mut EventHeader {
                &mut self.header
            }
        }
    };
}
impl_event!(probe_common::DecodeEvent, EventKind::Decode);
impl_event!(probe_common::ModelLoadEvent, EventKind::ModelLoad);
impl_event!(probe_common::ContextEvent, EventKind::ContextCreate);
impl_event!(probe_common::ContextFreeEvent, EventKind::ContextFree);
impl_event!(probe_common::ProcessEvent, EventKind::Process);
impl_event!(probe_common::SampleEvent, EventKind::Sample);
impl_event!(probe_common::SyncEvent, EventKind::Synchronize);
impl_event!(probe_common::MemoryEvent, EventKind::Memory);
impl_event!(probe_common::TaskPostEvent, EventKind::TaskPost);
impl_event!(probe_common::SlotReleaseEvent, EventKind::SlotRelease);
impl_event!(probe_common::SlotLaunchEvent, EventKind::SlotLaunch);
impl_event!(probe_common::MemoryHandleEvent, EventKind::MemoryHandle);

/// The calling thread: (tgid, tid).
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// The stack pointer the caller has once the probed call returns: at a function's first
/// instruction, x86-64's `rsp` points at the return address (`ret` pops it: + 8); AArch64's
/// `sp` is the caller's. At a uretprobe the call has returned: the stack pointer as it is.
/// A call nested in another (made from inside it) returns to a deeper frame: a lower value.
#[inline(always)]
fn caller_sp(ctx: &impl EbpfContext, at_entry: bool) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: a probe's context is the probed task's saved registers.
        let sp = unsafe { (*regs).rsp };
        if at_entry {
            sp + 8
        } else {
            sp
        }
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        let _ = at_entry;
        // SAFETY: as above.
        unsafe { (*regs).sp }
    }
    #[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
    {
        let _ = (regs, at_entry);
        0
    }
}

/// Starts a call of family `T` on this thread. Returns `false` if the call is nested in one of
/// the same family (nothing more to record) or if it could not be recorded.
///
/// Calls are paired by stack depth, not by counting: the entry keeps the stack pointer its
/// caller will have after the return (in `end_ns` until then). A call whose frame lies below
/// the one in progress is nested in it (a deprecated wrapper calling its replacement, a sampler
/// chain applying its samplers) and is not recorded; one at the same depth or above finds a
/// leftover whose return was never seen (a probe detached mid-call, an exception, an earlier
/// process with this thread id) and replaces it. A missed return thus costs one event, never
/// the calls after it.
///
/// `fill` writes the family's fields into `ev`, which the caller provides (stack or scratch
/// map); the header is written here.
#[inline(always)]
pub fn enter<T: Event>(
    ctx: &ProbeContext,
    map: &HashMap<u32, T>,
    ev: &mut T,
    fill: impl FnOnce(&mut T),
) -> bool {
    let (tgid, tid) = current();
    let sp = caller_sp(ctx, true);
    if let Some(prev) = map.get_ptr_mut(&tid) {
        // SAFETY: map value pointer valid while the program runs.
        let prev = unsafe { &mut *prev };
        if prev.header().tgid == tgid && sp < prev.header().end_ns {
            return false;
        }
    }
    *ev.header() = EventHeader {
        kind: T::KIND as u32,
        tgid,
        tid,
        returning: 0,
        start_ns: unsafe { bpf_ktime_get_ns() },
        end_ns: sp,
    };
    fill(ev);
    if map.insert(&tid, ev, 0).is_err() {
        count_lost(LOST_ENTRY);
        return false;
    }
    true
}

/// Ends a call of family `T` on this thread: the return of the recorded call (not of one nested
/// in it: see [`enter`]) gets `fill` to write its return value, and the event is sent.
#[inline(always)]
pub fn leave<T: Event>(ctx: &RetProbeContext, map: &HashMap<u32, T>, fill: impl FnOnce(&mut T)) {
    let (_, tid) = current();
    let Some(ev) = map.get_ptr_mut(&tid) else {
        return; // entered before the probes were attached
    };
    // SAFETY: map value pointer valid while the program runs.
    let ev = unsafe { &mut *ev };
    if caller_sp(ctx, false) < ev.header().end_ns {
        return; // a nested call returned
    }
    // Marked first, timed after: the thread can be preempted anywhere in this program (for
    // milliseconds on a busy machine), and a CPU sample taken meanwhile must not join a call
    // that has ended (the sampler skips a returning entry).
    ev.header().returning = 1;
    ev.header().end_ns = unsafe { bpf_ktime_get_ns() };
    fill(ev);
    send(ev);
    let _ = map.remove(&tid);
}

/// Sends a finished event to the agent, or counts it lost when the ring buffer is full.
#[inline(always)]
pub fn send<T: Event>(ev: &T) {
    // Waking the agent for every event costs the traced thread an interrupt (and the agent a
    // wake-up) per call: wake it only once a batch has piled up; the agent also drains on a
    // short timer.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<T>(ev, flags as u64).is_err() {
        count_lost(LOST_RINGBUF);
    }
}

/// The header of an event sent from an entry probe: an instant (`end_ns` = `start_ns`).
#[inline(always)]
pub fn instant<T: Event>() -> EventHeader {
    let (tgid, tid) = current();
    let now = unsafe { bpf_ktime_get_ns() };
    EventHeader {
        kind: T::KIND as u32,
        tgid,
        tid,
        returning: 0,
        start_ns: now,
        end_ns: now,
    }
}

/// The layout of the process the probe fired in: the one its attach cookie names (the agent
/// attaches with cookie = layout id + 1 on kernels that have cookies, 5.15+), else the one the
/// agent registered for the process's id.
#[inline(always)]
pub fn layout(ctx: &impl EbpfContext) -> Option<&'static ProcessLayout> {
    if USE_COOKIES.load() != 0 {
        // SAFETY: the helper reads the cookie of the link that ran this program.
        let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
        if cookie != 0 {
            return LAYOUT_TABLE.get((cookie - 1) as u32);
        }
    }
    let (tgid, _) = current();
    // SAFETY: the value is plain data; a concurrent update by the agent can at worst give a
    // mix of two layouts of the same process, which the agent never writes.
    unsafe { LAYOUTS.get(&tgid) }
}

/// Reads a `T` from the traced process's memory.
#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user checks the address; a fault returns an error.
    unsafe { bpf_probe_read_user(addr as *const T).ok() }
}

/// Address of a struct argument passed by value, given the register index that would carry it
/// had it been passed by reference.
///
/// - x86-64 SysV: structs larger than 16 bytes go on the stack; at a function's first
///   instruction `rsp` points at the return address, so the first such argument is at `rsp + 8`.
/// - AAPCS64: the caller copies the struct and passes its address in the next x register.
#[inline(always)]
pub fn byval_arg(ctx: &ProbeContext, reg_index: usize) -> Option<u64> {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        let _ = reg_index;
        // SAFETY: regs points at the probed task's saved registers.
        let rsp = unsafe { (*ctx.regs).rsp };
        Some(rsp + 8)
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        ctx.arg::<u64>(reg_index)
    }
    #[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
    {
        let _ = (ctx, reg_index);
        None
    }
}
