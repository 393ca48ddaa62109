//! The maps shared by all probe families.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    Global,
};
use probe_common::{
    ContextEvent, DecodeEvent, MemoryEvent, MemoryHandleEvent, ModelLoadEvent, ProcessLayout,
    SampleEvent, SlotLaunchEvent, SyncEvent, TaskPostEvent, LOST_COUNTERS,
};

/// Finished events, read by the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Events lost, by cause (`probe_common::LOST_*`), per CPU.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_COUNTERS, 0);

/// Set by the agent at load: the kernel has attach cookies for uprobes (5.15+), and the probes
/// find their layout by cookie in [`LAYOUT_TABLE`].
#[no_mangle]
pub static USE_COOKIES: Global<u32> = Global::new(0);

/// Set by the agent at load: the offset of `task_struct.exit_code` in the running kernel (from
/// its BTF), 0 if not known. The exit tracepoint reads the ending thread's status there.
#[no_mangle]
pub static TASK_EXIT_CODE_OFFSET: Global<u32> = Global::new(0);

/// Struct layouts by id (attach cookie − 1), written by the agent: one entry per distinct
/// layout, shared by every process and file that has it.
#[map]
pub static LAYOUT_TABLE: Array<ProcessLayout> = Array::with_max_entries(64, 0);

/// Struct layouts by traced process id, written by the agent (kernels without cookies).
#[map]
pub static LAYOUTS: HashMap<u32, ProcessLayout> = HashMap::with_max_entries(1024, 0);

/// Processes whose exit the host agent wants to hear of (`probes::process`), by tgid.
#[map]
pub static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Set by the agent at load when `--profile-cpu` is on: the decode probes keep
/// [`STEP_BY_TGID`] (one map update per step, skipped otherwise).
#[no_mangle]
pub static PROFILE_CPU: Global<u32> = Global::new(0);

/// Processes whose threads the CPU sampler records (`probes::profile`), by tgid.
#[map]
pub static PROFILED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// The decode step a process is inside: which thread entered it, when.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StepMark {
    pub start_ns: u64,
    pub tid: u32,
    pub _pad: u32,
}

/// The decode step in progress in each process (`--profile-cpu`), so that a sample on one of
/// its other threads (ggml's compute workers) joins the step.
#[map]
pub static STEP_BY_TGID: HashMap<u32, StepMark> = HashMap::with_max_entries(4096, 0);

/// Calls in progress, by thread id, one map per family.
#[map]
pub static DECODE_ENTRY: HashMap<u32, DecodeEvent> = HashMap::with_max_entries(4096, 0);
#[map]
pub static MODEL_ENTRY: HashMap<u32, ModelLoadEvent> = HashMap::with_max_entries(256, 0);
#[map]
pub static CONTEXT_ENTRY: HashMap<u32, ContextEvent> = HashMap::with_max_entries(256, 0);
#[map]
pub static SAMPLE_ENTRY: HashMap<u32, SampleEvent> = HashMap::with_max_entries(4096, 0);
#[map]
pub static SYNC_ENTRY: HashMap<u32, SyncEvent> = HashMap::with_max_entries(4096, 0);
#[map]
pub static MEMORY_ENTRY: HashMap<u32, MemoryEvent> = HashMap::with_max_entries(1024, 0);
#[map]
pub static MEMORY_HANDLE_ENTRY: HashMap<u32, MemoryHandleEvent> =
    HashMap::with_max_entries(1024, 0);
#[map]
pub static SLOT_LAUNCH_ENTRY: HashMap<u32, SlotLaunchEvent> = HashMap::with_max_entries(256, 0);
/// The 2024 single-task `server_queue::post` (its task id is its return value).
#[map]
pub static POST_ENTRY: HashMap<u32, TaskPostEvent> = HashMap::with_max_entries(256, 0);

/// The batch walk's cursor (see `probes::decode::scan`), kept in map memory on purpose.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ScanState {
    pub i: u32,
    pub stride: u32,
    pub cur_seq: i32,
    pub cur_pos0: i32,
    pub cur_i0: u32,
}

#[map]
pub static SCAN_SCRATCH: PerCpuArray<ScanState> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for events too large for the 512-byte eBPF stack.
#[map]
pub static DECODE_SCRATCH: PerCpuArray<DecodeEvent> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static MODEL_SCRATCH: PerCpuArray<ModelLoadEvent> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static POST_SCRATCH: PerCpuArray<TaskPostEvent> = PerCpuArray::with_max_entries(1, 0);

/// Counts one lost event of cause `index`.
#[inline(always)]
pub fn count_lost(index: u32) {
    if let Some(c) = LOST.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *c += 1 };
    }
}
