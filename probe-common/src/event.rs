//! Events sent from the probes to the agent through the ring buffer.
//!
//! Every probe family works as an entry/return pair: the entry probe fills an event in a
//! per-thread map, the return probe completes it (end time, return value) and sends it. So each
//! event is one finished call, with `start_ns`/`end_ns` in `CLOCK_MONOTONIC` nanoseconds.

use core::mem::size_of;

/// Event kinds. Numbers are stable and never reused; each family has its own range.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(num_enum::TryFromPrimitive))]
pub enum EventKind {
    /// One decode step ([`DecodeEvent`]).
    Decode = 1,
    /// One model load ([`ModelLoadEvent`]).
    ModelLoad = 10,
    /// One context creation ([`ContextEvent`]).
    ContextCreate = 20,
    /// One context freed ([`ContextFreeEvent`]).
    ContextFree = 21,
    /// One sampled token ([`SampleEvent`]).
    Sample = 30,
    /// One `llama_synchronize` call ([`SyncEvent`]).
    Synchronize = 40,
    /// One change of the KV memory's sequences ([`MemoryEvent`]).
    Memory = 50,
    /// Which KV memory a context has ([`MemoryHandleEvent`]).
    MemoryHandle = 51,
    /// One task handed to llama-server's queue ([`TaskPostEvent`]).
    TaskPost = 60,
    /// One llama-server slot released ([`SlotReleaseEvent`]).
    SlotRelease = 61,
    /// One task launched on (or refused by) a llama-server slot ([`SlotLaunchEvent`]).
    SlotLaunch = 62,
    /// A process exec'd a new program, or a watched process exited ([`ProcessEvent`]; the
    /// host agent's discovery, from the `sched` tracepoints).
    Process = 70,
    /// One CPU sample of a traced process's thread ([`CpuSampleEvent`]; `--profile-cpu`).
    CpuSample = 80,
}

/// First field of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// Process id (thread group id) of the traced process.
    pub tgid: u32,
    /// Thread id that made the call.
    pub tid: u32,
    /// 1 once the call's return is being handled (set in the entry map before `end_ns` is
    /// read): the CPU sampler no longer counts the thread inside the call, so every sample it
    /// joins to the call is taken before the call's `end_ns`. 0 otherwise. (The probes pair a
    /// call's entry and return by stack depth, probe-ebpf's `enter`, not by a counter.)
    pub returning: u32,
    /// Monotonic time of the call's entry, ns.
    pub start_ns: u64,
    /// Monotonic time of the call's return, ns. (While the call runs, the probes keep its
    /// caller's stack pointer here.)
    pub end_ns: u64,
}

/// Which function a decode step entered through.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeApi {
    /// `llama_decode(ctx, struct llama_batch)`: the classic C API, batch passed by value.
    Classic = 1,
    /// `llama_context::decode(llama_batch_ext const&)`: the newest API (`llama_process`).
    BatchExt = 2,
}

/// Maximum number of sequence runs recorded per decode step.
pub const MAX_RUNS: usize = 16;
/// Maximum number of steps the probe takes to walk a batch into runs. Each step reads one token:
/// a run's first token, or the last token of a block of 1, 2, 4, … 256 tokens that continues the
/// run (same sequence, consecutive positions), so a run of L tokens costs about 2·log2(L) steps
/// and a batch of single-token runs one step per token.
pub const MAX_SCAN: u32 = 64;
/// Largest block the walk skips at once.
pub const MAX_STRIDE: u32 = 256;

/// A run of consecutive batch tokens that belong to the same (first) sequence id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqRun {
    /// Sequence id of the run's tokens (the first id where a token has several).
    pub seq_id: i32,
    /// Position of the run's first token, or -1 if the batch carries no positions.
    pub pos0: i32,
    /// Token id of the run's first token, -1 if the batch carries none (embeddings).
    pub tok0: i32,
    /// Number of tokens in the run.
    pub n_tokens: u16,
    /// Tokens seen flagged for output: the run's first token and the last token of each block
    /// the walk skipped (the tokens inside a skipped block are not read).
    pub n_outputs: u8,
    /// 1 if the run's last token is flagged for output.
    pub last_output: u8,
}

/// The last token of a batch, read even when the runs stop before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastToken {
    pub seq_id: i32,
    pub pos: i32,
    pub output: u8,
    pub _pad: [u8; 3],
}

/// `DecodeEvent::flags` bits.
pub mod decode_flags {
    /// More than [`super::MAX_RUNS`] runs: the runs stop early.
    pub const RUNS_TRUNCATED: u8 = 1;
    /// The batch has no per-token sequence ids (e.g. `llama_batch_get_one`): runs are empty.
    pub const NO_SEQ_INFO: u8 = 2;
    /// The batch has no output flags: llama.cpp then outputs the last token only.
    pub const NO_OUTPUT_INFO: u8 = 4;
    /// `last` holds the batch's last token.
    pub const LAST_VALID: u8 = 8;
    /// The batch could not be read (unknown layout or unreadable memory): only `n_tokens` (if
    /// not negative) and the timing are valid.
    pub const UNREADABLE: u8 = 16;
}

/// One decode step: `llama_decode` or `llama_context::decode(llama_batch_ext const&)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DecodeEvent {
    pub header: EventHeader,
    /// The `llama_context *`.
    pub ctx: u64,
    /// Return value (0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal).
    pub ret: i32,
    /// Tokens in the batch, -1 if unreadable.
    pub n_tokens: i32,
    /// Tokens covered by `runs` (from the batch's start).
    pub n_scanned: u16,
    /// Valid entries in `runs`.
    pub n_runs: u8,
    /// A [`DecodeApi`] value.
    pub api: u8,
    /// [`decode_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    pub last: LastToken,
    pub runs: [SeqRun; MAX_RUNS],
}

/// Longest model path kept; longer paths are cut (flag in `ModelLoadEvent::path_len`).
pub const PATH_CAP: usize = 512;

/// Which function a model load entered through.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelLoadApi {
    /// `llama_model_load_from_file(path, params)` or `llama_load_model_from_file`.
    File = 1,
    /// `llama_model_load_from_splits(paths, n_paths, params)`: `path` is the first split.
    Splits = 2,
}

/// One model load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModelLoadEvent {
    pub header: EventHeader,
    /// Returned `llama_model *`; 0 means the load failed.
    pub model: u64,
    /// Bytes of `path` read (including the NUL), 0 if unreadable.
    pub path_len: u32,
    /// A [`ModelLoadApi`] value.
    pub api: u32,
    pub path: [u8; PATH_CAP],
}

/// One context creation (`llama_init_from_model` / `llama_new_context_with_model`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextEvent {
    pub header: EventHeader,
    pub model: u64,
    /// Returned `llama_context *`; 0 means creation failed.
    pub ctx: u64,
    /// Raw parameter values read with the process's layout; `u32::MAX` where the layout has no
    /// such field. The agent range-checks them before use.
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq_max: u32,
    pub n_threads: u32,
    pub n_threads_batch: u32,
}

/// One sampled token (`llama_sampler_sample`, `common_sampler_sample`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleEvent {
    pub header: EventHeader,
    pub ctx: u64,
    /// The sampled token id.
    pub token: i32,
    /// The output index sampled from.
    pub idx: i32,
    /// A [`SampleApi`] value.
    pub api: u32,
    pub _pad: u32,
}

/// Which function a sample was seen in.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleApi {
    /// `llama_sampler_sample` / `common_sampler_sample`: a token sampled from a context's
    /// output (`ctx`, `idx` valid).
    Sample = 0,
    /// `llama_sampler_apply(smpl, cur_p)` called by the program itself: the token the chain
    /// selected (no context or index: `ctx` 0, `idx` -1; `token` -1: none selected).
    Apply = 1,
    /// `llama_sample_token*(ctx, candidates, …)` (the 2024 API): a token sampled from a
    /// candidates array the program filled from some output row, which the call does not name
    /// (`idx` -1: the agent infers the row, see `assemble`).
    Token = 2,
}

/// One `llama_synchronize(ctx)` call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncEvent {
    pub header: EventHeader,
    pub ctx: u64,
}

/// What a [`MemoryEvent`] did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryOp {
    /// Removed positions `[p0, p1)` of `seq_id` (`seq_id` < 0: every sequence; `p1` < 0: to
    /// the end).
    SeqRm = 1,
    /// Copied positions `[p0, p1)` of `seq_id` to `seq_dst`.
    SeqCp = 2,
    /// Cleared every sequence.
    Clear = 3,
    /// Moved positions `[p0, p1)` of `seq_id` by `delta` (a context shift when negative).
    SeqAdd = 4,
}

/// One change of the KV memory: `llama_memory_seq_rm` / `_seq_cp` / `_seq_add` / `_clear` and
/// their older names (`llama_kv_self_*`, `llama_kv_cache_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryEvent {
    pub header: EventHeader,
    /// The `llama_memory_t` or, for the older names, the `llama_context *`.
    pub handle: u64,
    pub seq_id: i32,
    pub seq_dst: i32,
    pub p0: i32,
    pub p1: i32,
    /// A [`MemoryOp`] value.
    pub op: u32,
    /// Return value (seq_rm: bool; others 1).
    pub ret: u32,
    /// `seq_add`'s position shift (0 for the other operations).
    pub delta: i32,
    pub _pad: u32,
}

/// Tasks of one post whose ids are read (a `/completion` with an array of prompts posts one
/// task per prompt; more are counted in [`TaskPostEvent::tasks_bytes`] but not read).
pub const MAX_POST_TASKS: usize = 8;

/// One `server_task` of a post, as read at `server_queue::post`'s entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostedTask {
    /// `server_task::id` (-1: not assigned yet, or unreadable).
    pub id: i32,
    /// `server_task::type` (a `server_task_type` value; -1 if the layout has no offset).
    pub task_type: i32,
    /// `server_task::id_target`: the task a cancel task cancels (-1 otherwise).
    pub id_target: i32,
    pub _pad: i32,
}

/// One `void llama_free(struct llama_context * ctx)` call: the context and its memory are gone
/// (a program that sizes its context with a throw-away one frees it before the real one).
/// Sent from the entry probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextFreeEvent {
    pub header: EventHeader,
    pub ctx: u64,
}

/// What a [`ProcessEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessChange {
    /// `sched/sched_process_exec`: the process (header `tgid`) now runs a new program.
    Exec = 0,
    /// The main thread of a watched process ended (`do_exit`, or `sched/sched_process_exit`
    /// where the kprobe could not be attached): the process is ending.
    Exit = 1,
    /// Another thread of a watched process ended while inside probed calls (their entries were
    /// released; a thread that ends outside them sends nothing).
    ThreadExit = 2,
}

/// [`ProcessEvent::exit_code`] when the exit was seen without its code (the tracepoint).
pub const EXIT_CODE_UNKNOWN: i32 = i32::MIN;

/// Bits of [`ProcessEvent::calls`]: the probed calls, by family (one per-thread entry map),
/// a thread was inside when it ended, with the name the agent reports.
pub const IN_CALL: [(u32, &str); 9] = [
    (1 << 0, "decode"),
    (1 << 1, "model load"),
    (1 << 2, "context creation"),
    (1 << 3, "sampling"),
    (1 << 4, "synchronize"),
    (1 << 5, "memory operation"),
    (1 << 6, "memory handle"),
    (1 << 7, "slot launch"),
    (1 << 8, "task post"),
];

/// A process's exec, or the end of a watched process's thread, sent by the host agent's
/// discovery programs and the exit probe (an instant).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEvent {
    pub header: EventHeader,
    /// A [`ProcessChange`] value.
    pub change: u32,
    /// The probed calls ([`IN_CALL`] bits) the ending thread was inside: their per-thread
    /// entries were released. 0 for an exec.
    pub calls: u32,
    /// The ending thread's exit status as `wait(2)` reports it (the code `do_exit` was called
    /// with: `status << 8`, or the signal number, `| 0x80` if it dumped core), or
    /// [`EXIT_CODE_UNKNOWN`]. 0 for an exec.
    pub exit_code: i32,
    pub _pad: u32,
}

/// One `llama_memory_t llama_get_memory(const struct llama_context * ctx)` call (2025+): which
/// memory handle the memory events of a context carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryHandleEvent {
    pub header: EventHeader,
    pub ctx: u64,
    /// The returned `llama_memory_t`.
    pub mem: u64,
}

/// One `server_queue::post(std::vector<server_task> && tasks, bool front)` call: llama-server
/// accepted work from an HTTP handler (completion, embedding, …; `front` is set for cancels).
/// Sent from the entry probe, before the server loop can see the tasks, so it always reaches
/// the agent before any event of the work it starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskPostEvent {
    pub header: EventHeader,
    /// Bytes of the task vector (`end - begin`): a multiple of `sizeof(server_task)`.
    pub tasks_bytes: u64,
    /// The `front` argument (1: pushed to the front, as llama-server does for cancel tasks).
    pub front: u32,
    /// Valid entries of `tasks` (the first task is always read when the vector is not empty;
    /// the others only when the layout knows `sizeof(server_task)`).
    pub n_read: u32,
    /// Tasks in the vector: `tasks_bytes / sizeof(server_task)`; 0 when the layout does not
    /// know the size or the vector's size is not a multiple of it (a version between two
    /// layout rows), and then only the first task is read.
    pub n_tasks: u32,
    pub _pad: u32,
    pub tasks: [PostedTask; MAX_POST_TASKS],
}

/// One `server_context::launch_slot_with_task(server_slot & slot, server_task && task)`
/// call: a slot took a task from the queue (its queue wait ends), or refused it (`ok` = 0: an
/// invalid request, answered with an error, never run).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotLaunchEvent {
    pub header: EventHeader,
    /// `server_slot::id` (-1 if unreadable).
    pub slot_id: i32,
    /// `server_task::id` of the task (-1 if unreadable).
    pub task_id: i32,
    /// The return value: 1 launched, 0 refused.
    pub ok: u32,
    pub _pad: u32,
    /// The slot's target context (`server_slot::ctx_tgt`, 2024-2025 `ctx`; 0 if unreadable):
    /// the context that serves requests.
    pub ctx: u64,
    /// The slot's draft context (`server_slot::ctx_dft`; 0: none, or unreadable): a
    /// speculative draft model's.
    pub ctx_dft: u64,
}

/// One `void server_slot::release()` call: llama-server's slot stopped processing its task
/// (after the final response, a cancel or an error). The slot's `id`, its first member in every
/// version, is the sequence id of its batches. Sent from the entry probe, where the slot still
/// holds its task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotReleaseEvent {
    pub header: EventHeader,
    /// `server_slot::id` (-1 if unreadable).
    pub slot_id: i32,
    /// The id of the task the slot holds (-1: none, or not readable with this layout).
    pub task_id: i32,
}

/// Deepest user stack a [`CpuSampleEvent`] keeps (frames beyond it are cut).
pub const MAX_FRAMES: usize = 64;

/// What a sampled thread was doing, from the probes' per-thread entry maps.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(num_enum::TryFromPrimitive))]
pub enum CpuState {
    /// Inside none of the calls below.
    Other = 0,
    /// Inside a decode step: its own thread's, or another thread of the process while one of
    /// its threads is inside a step (ggml's compute workers). `step_start_ns`/`step_tid` name it.
    Decode = 1,
    /// Inside a sampling call (`llama_sampler_sample`, `common_sampler_sample`, …).
    Sampling = 2,
    /// Inside a model load.
    ModelLoad = 3,
}

/// One sample of a traced process's thread on a CPU, taken by the `cpu-clock` perf event
/// (`--profile-cpu`). `header.start_ns` = `header.end_ns` = the sample's time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuSampleEvent {
    pub header: EventHeader,
    /// The decode step the process was inside ([`CpuState::Decode`]): its entry time, as the
    /// step's [`DecodeEvent`] will carry it (0 otherwise).
    pub step_start_ns: u64,
    /// The thread that made that decode call (0 otherwise).
    pub step_tid: u32,
    /// A [`CpuState`] value.
    pub state: u32,
    /// Valid entries of `frames` (0: the user stack could not be read).
    pub n_frames: u32,
    /// 1 if the sample interrupted the thread in the kernel (a system call, a page fault): the
    /// frames are its user stack at the kernel entry.
    pub in_kernel: u32,
    /// User instruction pointers, leaf first: the interrupted instruction, then the return
    /// addresses the frame-pointer walk found.
    pub frames: [u64; MAX_FRAMES],
}

/// Index of the counter of events the ring buffer had no room for.
pub const LOST_RINGBUF: u32 = 0;
/// Index of the counter of calls whose entry could not be recorded (per-thread map full).
pub const LOST_ENTRY: u32 = 1;
/// Number of counters in the `LOST` per-CPU array.
pub const LOST_COUNTERS: u32 = 2;

const _: () = assert!(size_of::<EventHeader>() == 32);
const _: () = assert!(size_of::<SeqRun>() == 16);
const _: () = assert!(size_of::<LastToken>() == 12);
const _: () = assert!(size_of::<DecodeEvent>() == 32 + 8 + 8 + 8 + 12 + 16 * MAX_RUNS + 4);
const _: () = assert!(size_of::<ModelLoadEvent>() == 32 + 8 + 8 + PATH_CAP);
const _: () = assert!(size_of::<ContextEvent>() == 32 + 16 + 24);
const _: () = assert!(size_of::<SampleEvent>() == 32 + 24);
const _: () = assert!(size_of::<SyncEvent>() == 32 + 8);
const _: () = assert!(size_of::<MemoryEvent>() == 32 + 8 + 32);
const _: () = assert!(size_of::<PostedTask>() == 16);
const _: () = assert!(size_of::<TaskPostEvent>() == 32 + 8 + 16 + 16 * MAX_POST_TASKS);
const _: () = assert!(size_of::<SlotLaunchEvent>() == 32 + 16 + 16);
const _: () = assert!(size_of::<MemoryHandleEvent>() == 32 + 16);
const _: () = assert!(size_of::<ContextFreeEvent>() == 32 + 8);
const _: () = assert!(size_of::<ProcessEvent>() == 32 + 16);
const _: () = assert!(size_of::<SlotReleaseEvent>() == 32 + 8);
const _: () = assert!(size_of::<CpuSampleEvent>() == 32 + 8 + 16 + 8 * MAX_FRAMES);
