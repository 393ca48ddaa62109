//! Struct layouts of the traced llama.cpp, as the agent tells them to the probes.
//!
//! llama.cpp's structs change between versions; the probes hold no offsets of their own. The agent
//! picks the layout of the detected API generation from its table (`agent/src/targets.rs`) and
//! writes a [`ProcessLayout`] into the `LAYOUTS` map under the traced process's id. A probe that
//! finds no layout for its process still times the call but reads no struct fields.

use core::mem::size_of;

/// Offset value meaning "this version has no such field".
pub const ABSENT: u32 = u32::MAX;

/// The classic `struct llama_batch` (passed by value to `llama_decode`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassicBatchLayout {
    pub n_tokens: u32,
    pub token: u32,
    pub pos: u32,
    pub seq_id: u32,
    pub logits: u32,
}

/// The C++ `llama_batch_ext` (newest API) and its `token` entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchExtLayout {
    /// Offset of `std::vector<token> tokens` (its begin and end pointers are the first two
    /// words of a libstdc++ vector).
    pub tokens_vec: u32,
    /// `sizeof(token)`.
    pub token_size: u32,
    /// Offset of `llama_token id` in a token.
    pub token_id: u32,
    /// Offset of `bool output` in a token.
    pub token_output: u32,
    /// Offset, in a token, of the first-node pointer of `std::unordered_set<llama_seq_id>
    /// seq_ids` (libstdc++ `_M_before_begin._M_nxt`).
    pub token_seq_first_node: u32,
    /// Offset of the value in a hash-set node (after the next pointer).
    pub seq_node_value: u32,
    /// Offset of `pos[0]` in a token.
    pub token_pos: u32,
}

/// The `struct llama_context_params` fields the context probe reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextParamsLayout {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq_max: u32,
    pub n_threads: u32,
    pub n_threads_batch: u32,
}

/// The llama-server structs the server probes read ([`ABSENT`]: not read in this version).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLayout {
    /// Offset of `int id` in `struct server_slot`.
    pub slot_id: u32,
    /// Offset of `int id_task` in `struct server_slot` (2024-2025: the slot keeps its task's
    /// id).
    pub slot_task_id: u32,
    /// Offset of the task pointer in `struct server_slot` (2026: `std::unique_ptr<const
    /// server_task> task`, whose stored pointer is its only word); the id is then read at
    /// `task_id` in the task it points to.
    pub slot_task_ptr: u32,
    /// `sizeof(struct server_task)`: the stride of a posted task vector.
    pub task_size: u32,
    /// Offset of `int id` in `struct server_task`.
    pub task_id: u32,
    /// Offset of `server_task_type type` in `struct server_task`.
    pub task_type: u32,
    /// Offset of `int id_target` in `struct server_task`.
    pub task_id_target: u32,
    /// Offset of the slot's target context pointer (`ctx_tgt`, 2024-2025 `ctx`).
    pub slot_ctx: u32,
    /// Offset of the slot's draft context pointer (`ctx_dft`).
    pub slot_ctx_dft: u32,
}

/// `llama_token_data_array` (llama.h: `{ llama_token_data * data; size_t size; int64_t
/// selected; bool sorted; }`) and its `llama_token_data` entries (`{ llama_token id; float
/// logit; float p; }`): the token a sampler chain's apply selected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenDataArrayLayout {
    /// Offset of the `data` pointer.
    pub data: u32,
    /// Offset of `size`.
    pub size: u32,
    /// Offset of `selected` (an index into `data`, -1: none).
    pub selected: u32,
    /// `sizeof(llama_token_data)`.
    pub entry_size: u32,
    /// Offset of `id` in an entry.
    pub entry_id: u32,
}

/// Everything the probes need to read one process's structs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessLayout {
    pub classic: ClassicBatchLayout,
    pub ext: BatchExtLayout,
    pub ctx_params: ContextParamsLayout,
    pub server: ServerLayout,
    pub token_data: TokenDataArrayLayout,
}

#[cfg(feature = "user")]
// SAFETY: plain #[repr(C)] data of u32 fields, no padding, any bit pattern valid.
unsafe impl aya::Pod for ProcessLayout {}

const _: () = assert!(size_of::<ClassicBatchLayout>() == 20);
const _: () = assert!(size_of::<BatchExtLayout>() == 28);
const _: () = assert!(size_of::<ContextParamsLayout>() == 24);
const _: () = assert!(size_of::<ServerLayout>() == 36);
const _: () = assert!(size_of::<TokenDataArrayLayout>() == 20);
const _: () = assert!(size_of::<ProcessLayout>() == 128);
