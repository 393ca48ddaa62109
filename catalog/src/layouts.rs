//! The struct layouts the probes read, per llama.cpp generation and per llama-server era: as
//! data, chosen per process by its symbols (see `resolve::Plan`), handed to the probes as a
//! `probe_common::ProcessLayout`.

use probe_common::{
    BatchExtLayout, ClassicBatchLayout, ContextParamsLayout, ProcessLayout, ServerLayout,
    TokenDataArrayLayout, ABSENT,
};

use super::{
    kinds::Generation,
    labels::{LEGACY_TASK_TYPES, TASK_TYPES},
    probes::TASK_POST_ONE_SYMBOL,
};

/// Layout of the classic `struct llama_batch` (llama.h): unchanged since b3943 (older builds
/// only add trailing fields).
pub(crate) const CLASSIC_BATCH: ClassicBatchLayout = ClassicBatchLayout {
    n_tokens: 0,
    token: 8,
    pos: 24,
    seq_id: 40,
    logits: 48,
};

/// The 2026 `llama_context_params`: `n_rs_seq`, `n_outputs_max` and `n_outputs_max_per_seq`
/// came before `n_threads` (llama.h of llama-cpp-python 0.3.36).
const CTX_PARAMS_2026: ContextParamsLayout = ContextParamsLayout {
    n_ctx: 0,
    n_batch: 4,
    n_ubatch: 8,
    n_seq_max: 12,
    n_threads: 28,
    n_threads_batch: 32,
};

/// Symbol whose presence marks the 2026 context parameters in a classic-API build (the getter
/// of the field that came with them).
pub const CTX_PARAMS_2026_MARKER: &str = "llama_n_rs_seq";

/// The classic API has no batch_ext.
const NO_BATCH_EXT: BatchExtLayout = BatchExtLayout {
    tokens_vec: ABSENT,
    token_size: 0,
    token_id: ABSENT,
    token_output: ABSENT,
    token_seq_first_node: ABSENT,
    seq_node_value: ABSENT,
    token_pos: ABSENT,
};

/// Struct layouts per generation (x86-64 / aarch64 LP64, libstdc++).
#[derive(Debug)]
pub struct LayoutRow {
    pub generation: Generation,
    /// A symbol that selects this row over the generation's row without one.
    pub marker: Option<&'static str>,
    /// Where the numbers come from.
    pub source: &'static str,
    pub layout: LlamaLayout,
}

/// The libllama structs the probes read (the server's are in [`ServerLayoutRow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaLayout {
    pub classic: ClassicBatchLayout,
    pub ext: BatchExtLayout,
    pub ctx_params: ContextParamsLayout,
}

pub const LAYOUTS: &[LayoutRow] = &[
    LayoutRow {
        generation: Generation::BatchExt,
        marker: None,
        source: "llama.cpp vendored in llama-cpp-python 0.3.36 (src/llama-batch.h, include/llama.h)",
        layout: LlamaLayout {
            classic: CLASSIC_BATCH,
            // struct llama_batch_ext { size_t n_tokens_max, n_embd_inp, n_embd_inp_enc;
            // llama_seq_id n_seq_max; llama_memory_i * mem; llama_token n_vocab;
            // size_t n_pos_per_embd, n_embd; std::vector<token> tokens; ... }
            // struct token { llama_token id; bool has_embd; size_t embd_off; bool output;
            // std::unordered_set<llama_seq_id> seq_ids; std::array<llama_pos, 4> pos; }
            ext: BatchExtLayout {
                tokens_vec: 64,
                token_size: 96,
                token_id: 0,
                token_output: 16,
                // seq_ids at 24; libstdc++ _Hashtable: _M_buckets, _M_bucket_count, then
                // _M_before_begin (whose _M_nxt is the first node) at +16.
                token_seq_first_node: 24 + 16,
                // _Hash_node<int, false>: _M_nxt, then the value.
                seq_node_value: 8,
                token_pos: 80,
            },
            ctx_params: CTX_PARAMS_2026,
        },
    },
    LayoutRow {
        generation: Generation::Classic,
        marker: Some(CTX_PARAMS_2026_MARKER),
        source: "classic API with the 2026 context parameters (n_rs_seq, n_outputs_max, n_outputs_max_per_seq before n_threads; e.g. node-llama-cpp 3.22.1's libllama v0.5.0)",
        layout: LlamaLayout {
            classic: CLASSIC_BATCH,
            ext: NO_BATCH_EXT,
            ctx_params: CTX_PARAMS_2026,
        },
    },
    LayoutRow {
        generation: Generation::Classic,
        marker: None,
        source: "llama.h b4463 … 2026 classic (n_ctx, n_batch, n_ubatch, n_seq_max, n_threads, n_threads_batch)",
        layout: LlamaLayout {
            classic: CLASSIC_BATCH,
            ext: NO_BATCH_EXT,
            ctx_params: ContextParamsLayout {
                n_ctx: 0,
                n_batch: 4,
                n_ubatch: 8,
                n_seq_max: 12,
                n_threads: 16,
                n_threads_batch: 20,
            },
        },
    },
    LayoutRow {
        generation: Generation::Legacy,
        marker: None,
        source: "llama.h vendored in llama-cpp-python 0.2.90 (2024-08, llama.cpp cfac111): `uint32_t seed` first in llama_context_params; the 72-byte llama_batch (all_pos_0, all_pos_1, all_seq_id after the classic fields)",
        layout: LlamaLayout {
            classic: CLASSIC_BATCH,
            ext: NO_BATCH_EXT,
            ctx_params: ContextParamsLayout {
                n_ctx: 4,
                n_batch: 8,
                n_ubatch: 12,
                n_seq_max: 16,
                n_threads: 20,
                n_threads_batch: 24,
            },
        },
    },
];

/// The layout row of generation `g` in a process that `has` the given symbols: the first row
/// whose marker it has, else the generation's row without a marker.
pub fn layout_for(g: Generation, has: impl Fn(&str) -> bool) -> &'static LayoutRow {
    let rows = || LAYOUTS.iter().filter(move |r| r.generation == g);
    rows()
        .find(|r| r.marker.is_some_and(&has))
        .or_else(|| rows().find(|r| r.marker.is_none()))
        .expect("every generation has a layout row without a marker")
}

/// llama-server's struct layouts, per version, chosen by a marker symbol (the
/// `launch_slot_with_task` of that era). Every version has `server_slot::id` and
/// `server_task::id` as first members, which is all the post → launch → release join needs
/// (the first task of a post, the slot and the task at launch); the other offsets come from
/// the DWARF of a `-g` build of the fixture's sources (`pahole -C server_task`), and a version
/// between two rows gets the earlier era's numbers, checked at run time: a posted vector whose
/// size is not a multiple of `task_size` is read for its first task only.
#[derive(Debug)]
pub struct ServerLayoutRow {
    /// A symbol that selects this row (`None`: the row for any other llama-server).
    pub marker: Option<&'static str>,
    /// Where the numbers come from.
    pub source: &'static str,
    pub layout: ServerLayout,
    /// `enum server_task_type` of that era, by value: (label, GenAI operation name).
    pub task_types: &'static [(&'static str, &'static str)],
    /// The sequence id of slot N's batches is N + this (2024: 1, sequence 0 held the system
    /// prompt).
    pub slot_seq_offset: i32,
}

/// The first members only (any llama-server without a row of its own).
const SERVER_FIRST_MEMBERS: ServerLayout = ServerLayout {
    slot_id: 0,
    slot_task_id: ABSENT,
    slot_task_ptr: ABSENT,
    task_size: ABSENT,
    task_id: 0,
    task_type: ABSENT,
    task_id_target: ABSENT,
    slot_ctx: ABSENT,
    slot_ctx_dft: ABSENT,
};

pub const SERVER_LAYOUTS: &[ServerLayoutRow] = &[
    ServerLayoutRow {
        marker: Some("_ZN19server_context_impl21launch_slot_with_taskER11server_slotO11server_task"),
        source: "llama-server of llama-cpp-python 0.3.36 (b11312; tools/server/server-task.h, server-context.cpp)",
        layout: ServerLayout {
            slot_id: 0,
            slot_task_id: ABSENT,
            // std::unique_ptr<const server_task> task
            slot_task_ptr: 5240,
            task_size: 2776,
            task_id: 0,
            task_type: 2640,
            task_id_target: 16,
            // llama_context * ctx_tgt, * ctx_dft: right after `int id`
            slot_ctx: 8,
            slot_ctx_dft: 16,
        },
        task_types: TASK_TYPES,
        slot_seq_offset: 0,
    },
    ServerLayoutRow {
        marker: Some("_ZN14server_context21launch_slot_with_taskER11server_slotO11server_task"),
        source: "llama-server of llama-cpp-python 0.3.14 (b5904; tools/server/server.cpp)",
        layout: ServerLayout {
            slot_id: 0,
            slot_task_id: 4,
            slot_task_ptr: ABSENT,
            task_size: 1960,
            task_id: 0,
            task_type: 8,
            task_id_target: 12,
            // llama_context * ctx, * ctx_dft, after the slot's speculative batch
            slot_ctx: 72,
            slot_ctx_dft: 80,
        },
        task_types: TASK_TYPES,
        slot_seq_offset: 0,
    },
    // Before the late-2024 row: that era's launch_slot_with_task has the same symbol.
    ServerLayoutRow {
        marker: Some(TASK_POST_ONE_SYMBOL),
        source: "llama-server of llama-cpp-python 0.2.90 (2024-08, cfac111; examples/server/server.cpp: server_task { int id, id_multi, id_target; server_task_type type; json data; bool infill, embedding; }, server_slot { int id, id_task, … })",
        layout: ServerLayout {
            slot_id: 0,
            slot_task_id: 4,
            slot_task_ptr: ABSENT,
            task_size: ABSENT,
            task_id: 0,
            task_type: 12,
            task_id_target: 8,
            slot_ctx: ABSENT,
            slot_ctx_dft: ABSENT,
        },
        task_types: LEGACY_TASK_TYPES,
        // `llama_batch_add(batch, …, { slot.id + 1 }, …)`
        slot_seq_offset: 1,
    },
    ServerLayoutRow {
        marker: Some("_ZN14server_context21launch_slot_with_taskER11server_slotRK11server_task"),
        source: "llama-server of llama-cpp-python 0.3.5 (b4295; examples/server/server.cpp)",
        layout: ServerLayout {
            slot_id: 0,
            slot_task_id: 4,
            slot_task_ptr: ABSENT,
            task_size: 1624,
            task_id: 0,
            task_type: 8,
            task_id_target: 12,
            slot_ctx: 72,
            slot_ctx_dft: 80,
        },
        task_types: TASK_TYPES,
        slot_seq_offset: 0,
    },
    ServerLayoutRow {
        marker: None,
        source: "llama-server's first members only (server_slot::id, server_task::id)",
        layout: SERVER_FIRST_MEMBERS,
        task_types: TASK_TYPES,
        slot_seq_offset: 0,
    },
];

/// The server layout row of a process that `has` the given symbols.
pub fn server_layout_for(has: impl Fn(&str) -> bool) -> &'static ServerLayoutRow {
    SERVER_LAYOUTS
        .iter()
        .find(|r| r.marker.is_none_or(&has))
        .expect("the last server row has no marker")
}

/// `llama_token_data_array` and `llama_token_data` (llama.h): unchanged since the sampler API
/// (b3681, `selected` came with it), in every fixture.
pub const TOKEN_DATA_ARRAY: TokenDataArrayLayout = TokenDataArrayLayout {
    data: 0,
    size: 8,
    selected: 16,
    entry_size: 12,
    entry_id: 0,
};

/// Everything the probes read in one process: its libllama row and its server row.
pub fn process_layout(llama: &LlamaLayout, server: &ServerLayout) -> ProcessLayout {
    ProcessLayout {
        classic: llama.classic,
        ext: llama.ext,
        ctx_params: llama.ctx_params,
        server: *server,
        token_data: TOKEN_DATA_ARRAY,
    }
}

/// Plausible ranges of the context parameters; a value outside is reported unknown.
pub mod plausible {
    pub const N_CTX: std::ops::RangeInclusive<u32> = 1..=16 << 20;
    pub const N_BATCH: std::ops::RangeInclusive<u32> = 1..=16 << 20;
    pub const N_SEQ_MAX: std::ops::RangeInclusive<u32> = 1..=4096;
    pub const N_THREADS: std::ops::RangeInclusive<u32> = 1..=4096;
}
