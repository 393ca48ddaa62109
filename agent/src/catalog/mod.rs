//! Everything llamaprobe knows about llama.cpp versions, as data: the API generations, the
//! functions probed in each (symbol → eBPF programs), and the struct layouts the probes read.
//!
//! To support a new llama.cpp version, change this file only: add its symbols to [`PROBES`] and,
//! if a struct moved, a layout to [`LAYOUTS`]. Each probe names the upstream prototype it relies
//! on (see the eBPF modules for the argument handling).

use probe_common::{
    BatchExtLayout, ClassicBatchLayout, ContextParamsLayout, ProcessLayout, ServerLayout, ABSENT,
};

/// An API generation of llama.cpp: how a decode step enters libllama.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Generation {
    /// 2026+: `llama_process(ctx, type, llama_batch_ext *)` → `llama_context::decode(const
    /// llama_batch_ext &)`; `llama_decode` is a compatibility wrapper around the same method.
    BatchExt,
    /// b3943 … 2026: `llama_decode(ctx, struct llama_batch)` with the 56-byte batch.
    Classic,
}

impl Generation {
    pub fn describe(self) -> &'static str {
        match self {
            Generation::BatchExt => {
                "batch_ext (llama_process / llama_context::decode(llama_batch_ext const&), 2026+)"
            }
            Generation::Classic => "classic (llama_decode(ctx, struct llama_batch), b3943+)",
        }
    }
}

/// What a probe measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Decode,
    ModelLoad,
    ContextCreate,
    Sample,
    Synchronize,
    /// KV memory changes (sequence removal, copy, clear): context use.
    Memory,
    /// llama-server's task queue and slots: when a request was accepted (queue wait) and when
    /// its slot let it go.
    Server,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Decode => "decode",
            Family::ModelLoad => "model_load",
            Family::ContextCreate => "context_create",
            Family::Sample => "sample",
            Family::Synchronize => "synchronize",
            Family::Memory => "memory",
            Family::Server => "server",
        }
    }
}

/// One function to probe.
#[derive(Debug)]
pub struct ProbePoint {
    pub family: Family,
    /// Symbol name as in `.dynsym`/`.symtab` (mangled for C++).
    pub symbol: &'static str,
    /// Human-readable prototype.
    pub prototype: &'static str,
    /// eBPF program run at entry.
    pub entry: &'static str,
    /// eBPF program run at return (`None`: the entry program sends the event itself).
    pub ret: Option<&'static str>,
    /// Generations in which this symbol is the one to probe (empty: all).
    pub generations: &'static [Generation],
}

const ALL: &[Generation] = &[];

/// Symbol whose presence marks the batch_ext generation.
pub const BATCH_EXT_DECODE: &str = "_ZN13llama_context6decodeERK15llama_batch_ext";
/// Symbol that marks the classic generation (when the batch_ext one is absent).
pub const CLASSIC_DECODE: &str = "llama_decode";

/// The entry program of llama-server's `server_queue::post`: where requests are accepted.
pub const TASK_POST: &str = "task_post";
/// The entry program of llama-server's `launch_slot_with_task`: where a slot takes a task.
pub const SLOT_LAUNCH: &str = "slot_launch";
/// The entry program of llama-server's `server_slot::release`: where a slot lets it go.
pub const SLOT_RELEASE: &str = "slot_release";

/// The probe catalog. Wrappers of one family on one thread nest (the probes count the outer
/// call once), so listing both a deprecated function and its replacement is safe.
pub const PROBES: &[ProbePoint] = &[
    ProbePoint {
        family: Family::Decode,
        symbol: BATCH_EXT_DECODE,
        prototype: "int llama_context::decode(const llama_batch_ext & batch)",
        entry: "decode_ext",
        ret: Some("decode_return"),
        generations: &[Generation::BatchExt],
    },
    ProbePoint {
        family: Family::Decode,
        symbol: CLASSIC_DECODE,
        prototype: "int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch)",
        entry: "decode_classic",
        ret: Some("decode_return"),
        generations: &[Generation::Classic],
    },
    ProbePoint {
        family: Family::ModelLoad,
        symbol: "llama_model_load_from_file",
        prototype: "struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params)",
        entry: "model_load_file",
        ret: Some("model_load_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::ModelLoad,
        symbol: "llama_load_model_from_file",
        prototype: "struct llama_model * llama_load_model_from_file(const char * path_model, struct llama_model_params params) [deprecated]",
        entry: "model_load_file",
        ret: Some("model_load_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::ModelLoad,
        symbol: "llama_model_load_from_splits",
        prototype: "struct llama_model * llama_model_load_from_splits(const char ** paths, size_t n_paths, struct llama_model_params params)",
        entry: "model_load_splits",
        ret: Some("model_load_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::ContextCreate,
        symbol: "llama_init_from_model",
        prototype: "struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params)",
        entry: "context_enter",
        ret: Some("context_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::ContextCreate,
        symbol: "llama_new_context_with_model",
        prototype: "struct llama_context * llama_new_context_with_model(struct llama_model * model, struct llama_context_params params) [deprecated]",
        entry: "context_enter",
        ret: Some("context_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "llama_sampler_sample",
        prototype: "llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx)",
        entry: "sample_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "_Z21common_sampler_sampleP14common_samplerP13llama_contextib",
        prototype: "llama_token common_sampler_sample(common_sampler * gsmpl, llama_context * ctx, int idx, bool grammar_first)",
        entry: "sample_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Synchronize,
        symbol: "llama_synchronize",
        prototype: "void llama_synchronize(struct llama_context * ctx)",
        entry: "sync_enter",
        ret: Some("sync_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_memory_seq_rm",
        prototype: "bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1)",
        entry: "memory_seq_rm",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_self_seq_rm",
        prototype: "bool llama_kv_self_seq_rm(struct llama_context * ctx, llama_seq_id seq_id, llama_pos p0, llama_pos p1) [2025, removed]",
        entry: "memory_seq_rm",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_cache_seq_rm",
        prototype: "bool llama_kv_cache_seq_rm(struct llama_context * ctx, llama_seq_id seq_id, llama_pos p0, llama_pos p1) [2024]",
        entry: "memory_seq_rm",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_memory_seq_cp",
        prototype: "void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1)",
        entry: "memory_seq_cp",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_self_seq_cp",
        prototype: "void llama_kv_self_seq_cp(struct llama_context * ctx, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) [2025, removed]",
        entry: "memory_seq_cp",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_cache_seq_cp",
        prototype: "void llama_kv_cache_seq_cp(struct llama_context * ctx, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) [2024]",
        entry: "memory_seq_cp",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_memory_clear",
        prototype: "void llama_memory_clear(llama_memory_t mem, bool data)",
        entry: "memory_clear",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_self_clear",
        prototype: "void llama_kv_self_clear(struct llama_context * ctx) [2025, removed]",
        entry: "memory_clear",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_cache_clear",
        prototype: "void llama_kv_cache_clear(struct llama_context * ctx) [2024]",
        entry: "memory_clear",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_memory_seq_add",
        prototype: "void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta)",
        entry: "memory_seq_add",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_self_seq_add",
        prototype: "void llama_kv_self_seq_add(struct llama_context * ctx, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) [2025, removed]",
        entry: "memory_seq_add",
        ret: Some("memory_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_kv_cache_seq_add",
        prototype: "void llama_kv_cache_seq_add(struct llama_context * ctx, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) [2024]",
        entry: "memory_seq_add",
        ret: Some("memory_return"),
        generations: ALL,
    },
    // llama-server's queue. Completions, embeddings, reranks and infills are posted through
    // the vector overload (metrics and slot actions through the single-task one, not probed).
    // Argument order is the same in every variant below, `.isra.0` clones included (GCC's
    // clone only drops the unused return value: disassembly of the mid2025 and late2024
    // fixtures, `rdi` this, `rsi` the vector, `edx` front).
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN12server_queue4postEOSt6vectorI11server_taskSaIS1_EEb",
        prototype: "int server_queue::post(std::vector<server_task> && tasks, bool front)",
        entry: TASK_POST,
        ret: None,
        generations: ALL,
    },
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN12server_queue4postEOSt6vectorI11server_taskSaIS1_EEb.isra.0",
        prototype: "int server_queue::post(std::vector<server_task> && tasks, bool front) [clone .isra.0, 2025]",
        entry: TASK_POST,
        ret: None,
        generations: ALL,
    },
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN12server_queue4postERSt6vectorI11server_taskSaIS1_EEb",
        prototype: "int server_queue::post(std::vector<server_task> & tasks, bool front) [2024]",
        entry: TASK_POST,
        ret: None,
        generations: ALL,
    },
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN12server_queue4postERSt6vectorI11server_taskSaIS1_EEb.isra.0",
        prototype: "int server_queue::post(std::vector<server_task> & tasks, bool front) [clone .isra.0, 2024]",
        entry: TASK_POST,
        ret: None,
        generations: ALL,
    },
    // Where a slot takes a task from the queue (or refuses it): a member of the server
    // context, emitted out of line in every fixture (weak symbol), `this` first, then the slot
    // and the task.
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN19server_context_impl21launch_slot_with_taskER11server_slotO11server_task",
        prototype: "bool server_context_impl::launch_slot_with_task(server_slot & slot, server_task && task) [2026]",
        entry: SLOT_LAUNCH,
        ret: Some("slot_launch_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN14server_context21launch_slot_with_taskER11server_slotO11server_task",
        prototype: "bool server_context::launch_slot_with_task(server_slot & slot, server_task && task) [2025]",
        entry: SLOT_LAUNCH,
        ret: Some("slot_launch_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN14server_context21launch_slot_with_taskER11server_slotRK11server_task",
        prototype: "bool server_context::launch_slot_with_task(server_slot & slot, const server_task & task) [2024]",
        entry: SLOT_LAUNCH,
        ret: Some("slot_launch_return"),
        generations: ALL,
    },
    // The end of a request's task in every llama-server version (an inline member, emitted
    // out of line and called there: 10-13 call sites in each fixture).
    ProbePoint {
        family: Family::Server,
        symbol: "_ZN11server_slot7releaseEv",
        prototype: "void server_slot::release()",
        entry: SLOT_RELEASE,
        ret: None,
        generations: ALL,
    },
];

impl ProbePoint {
    pub fn applies_to(&self, g: Generation) -> bool {
        self.generations.is_empty() || self.generations.contains(&g)
    }

    /// The function's name as a person writes it (C++ names unmangled).
    pub fn name(&self) -> &'static str {
        self.prototype
            .split('(')
            .next()
            .and_then(|head| head.rsplit([' ', '*']).next())
            .unwrap_or(self.symbol)
    }
}

/// ggml GPU backends, by the library file a shared build loads (`libggml-<name>.so`) and the
/// init function a static build contains. With one of them the decode step only queues work
/// and `llama_synchronize` is where it completes; without, decode is synchronous on the CPU.
pub const GPU_BACKENDS: &[(&str, &str)] = &[
    ("libggml-cuda", "ggml_backend_cuda_init"),
    ("libggml-hip", "ggml_backend_cuda_init"),
    ("libggml-musa", "ggml_backend_cuda_init"),
    ("libggml-vulkan", "ggml_backend_vk_init"),
    ("libggml-sycl", "ggml_backend_sycl_init"),
    ("libggml-metal", "ggml_backend_metal_init"),
    ("libggml-opencl", "ggml_backend_opencl_init"),
    ("libggml-cann", "ggml_backend_cann_init"),
];

/// Every symbol llamaprobe looks for: the probed functions and the layout markers.
pub fn wanted_symbols() -> impl Iterator<Item = &'static str> {
    PROBES
        .iter()
        .map(|p| p.symbol)
        .chain(LAYOUTS.iter().filter_map(|r| r.marker))
        .chain(SERVER_LAYOUTS.iter().filter_map(|r| r.marker))
}

/// The generation implied by the symbols a process has.
pub fn detect_generation(has: impl Fn(&str) -> bool) -> Option<Generation> {
    if has(BATCH_EXT_DECODE) {
        Some(Generation::BatchExt)
    } else if has(CLASSIC_DECODE) {
        Some(Generation::Classic)
    } else {
        None
    }
}

/// Layout of the classic `struct llama_batch` (llama.h): unchanged since b3943 (older builds
/// only add trailing fields).
const CLASSIC_BATCH: ClassicBatchLayout = ClassicBatchLayout {
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
];

/// The layout row for a generation.
/// The layout row of generation `g` in a process that `has` the given symbols: the first row
/// whose marker it has, else the generation's row without a marker.
pub fn layout_for(g: Generation, has: impl Fn(&str) -> bool) -> &'static LayoutRow {
    let rows = || LAYOUTS.iter().filter(move |r| r.generation == g);
    rows()
        .find(|r| r.marker.is_some_and(&has))
        .or_else(|| rows().find(|r| r.marker.is_none()))
        .expect("every generation has a layout row without a marker")
}

/// What llama-server's task types are called (`enum server_task_type`: the same first five
/// values in the 2024, 2025 and 2026 sources; only these are posted through the probed
/// overload), as a label and as the GenAI `gen_ai.operation.name`.
pub const TASK_TYPES: &[(&str, &str)] = &[
    ("completion", "text_completion"),
    ("embedding", "embeddings"),
    ("rerank", "rerank"),
    ("infill", "text_completion"),
    ("cancel", "cancel"),
];

/// Whether a task type label is work a slot runs as a request.
pub fn is_request_type(label: &str) -> bool {
    TASK_TYPES[..4].iter().any(|(l, _)| *l == label)
}

/// The label of a task type value ("unknown" outside the table).
pub fn task_type(value: i32) -> (&'static str, &'static str) {
    usize::try_from(value)
        .ok()
        .and_then(|i| TASK_TYPES.get(i).copied())
        .unwrap_or(("unknown", "text_completion"))
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
        },
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
        },
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
        },
    },
    ServerLayoutRow {
        marker: None,
        source: "llama-server's first members only (server_slot::id, server_task::id)",
        layout: SERVER_FIRST_MEMBERS,
    },
];

/// The server layout row of a process that `has` the given symbols.
pub fn server_layout_for(has: impl Fn(&str) -> bool) -> &'static ServerLayoutRow {
    SERVER_LAYOUTS
        .iter()
        .find(|r| r.marker.is_none_or(&has))
        .expect("the last server row has no marker")
}

/// Everything the probes read in one process: its libllama row and its server row.
pub fn process_layout(llama: &LlamaLayout, server: &ServerLayout) -> ProcessLayout {
    ProcessLayout {
        classic: llama.classic,
        ext: llama.ext,
        ctx_params: llama.ctx_params,
        server: *server,
    }
}

/// A report of DWARF-derived layouts against the table (`llamaprobe layout`).
pub fn compare_with_table(what: &str, found: &crate::resolve::dwarf::DwarfLayouts) -> String {
    use std::fmt::Write;
    let mut s = format!("{what}: struct layouts from DWARF\n");
    let mut line = |name: &str, found: Option<String>, table: Vec<(Generation, String)>| match found
    {
        None => {
            let _ = writeln!(s, "  {name}: not in this file's DWARF");
        }
        Some(f) => {
            let same: Vec<String> = table
                .iter()
                .filter(|(_, t)| *t == f)
                .map(|(g, _)| format!("{g:?}"))
                .collect();
            let verdict = if same.is_empty() {
                "differs from every table row: add a row to agent/src/targets.rs".to_string()
            } else {
                format!("matches the table row(s) {}", same.join(", "))
            };
            let _ = writeln!(s, "  {name}: {f}\n    {verdict}");
        }
    };
    let table = |f: &dyn Fn(&LlamaLayout) -> String| {
        LAYOUTS
            .iter()
            .map(|r| (r.generation, f(&r.layout)))
            .collect::<Vec<_>>()
    };
    line(
        "llama_batch",
        found.classic.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.classic)),
    );
    line(
        "llama_batch_ext",
        found.ext.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.ext)),
    );
    line(
        "llama_context_params",
        found.ctx_params.map(|l| format!("{l:?}")),
        table(&|l| format!("{:?}", l.ctx_params)),
    );
    s
}

/// Plausible ranges of the context parameters; a value outside is reported unknown.
pub mod plausible {
    pub const N_CTX: std::ops::RangeInclusive<u32> = 1..=16 << 20;
    pub const N_BATCH: std::ops::RangeInclusive<u32> = 1..=16 << 20;
    pub const N_SEQ_MAX: std::ops::RangeInclusive<u32> = 1..=4096;
    pub const N_THREADS: std::ops::RangeInclusive<u32> = 1..=4096;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generation_has_a_decode_probe_and_a_layout() {
        for g in [Generation::BatchExt, Generation::Classic] {
            let decodes = PROBES
                .iter()
                .filter(|p| p.family == Family::Decode && p.applies_to(g))
                .count();
            assert_eq!(decodes, 1, "{g:?} must probe exactly one decode function");
            assert_eq!(layout_for(g, |_| false).generation, g);
            assert_eq!(layout_for(g, |_| false).marker, None);
        }
    }

    #[test]
    fn a_classic_build_with_the_2026_context_parameters_gets_their_layout() {
        let row = layout_for(Generation::Classic, |s| s == CTX_PARAMS_2026_MARKER);
        assert_eq!(row.marker, Some(CTX_PARAMS_2026_MARKER));
        assert_eq!(row.layout.ctx_params.n_threads, 28);
        assert_eq!(row.layout.classic, CLASSIC_BATCH);
        assert_eq!(
            layout_for(Generation::Classic, |_| false)
                .layout
                .ctx_params
                .n_threads,
            16
        );
        // The marker is looked for like the probed functions.
        assert!(wanted_symbols().any(|s| s == CTX_PARAMS_2026_MARKER));
    }

    #[test]
    fn names_are_readable() {
        let names: Vec<&str> = PROBES.iter().map(|p| p.name()).collect();
        assert_eq!(names[0], "llama_context::decode");
        assert!(names.contains(&"llama_decode"));
        assert!(names.contains(&"common_sampler_sample"));
        assert!(names.iter().all(|n| !n.is_empty() && !n.starts_with("_Z")));
    }

    #[test]
    fn generation_detection_prefers_batch_ext() {
        let both = |s: &str| s == BATCH_EXT_DECODE || s == CLASSIC_DECODE;
        assert_eq!(detect_generation(both), Some(Generation::BatchExt));
        assert_eq!(
            detect_generation(|s| s == CLASSIC_DECODE),
            Some(Generation::Classic)
        );
        assert_eq!(detect_generation(|_| false), None);
    }

    /// The batch_ext layout row against the compiler: the fake (tests/fake) defines
    /// `llama_batch_ext` field for field as llama.cpp does, and `layout_ext` prints offsetof.
    #[test]
    fn batch_ext_layout_matches_the_compiler() {
        let dir = crate::test_support::fakes();
        let printed = std::process::Command::new(dir.join("ext/layout_ext"))
            .output()
            .unwrap();
        let text = String::from_utf8(printed.stdout).unwrap();
        let get = |k: &str| -> u32 {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
                .parse()
                .unwrap()
        };
        let l = layout_for(Generation::BatchExt, |_| false).layout.ext;
        assert_eq!(l.tokens_vec, get("tokens") + get("vec_begin"));
        assert_eq!(l.token_size, get("token_size"));
        assert_eq!(l.token_id, get("id"));
        assert_eq!(l.token_output, get("output"));
        assert_eq!(l.token_seq_first_node, get("seq_ids") + get("uset_first"));
        assert_eq!(l.seq_node_value, get("node_value"));
        assert_eq!(l.token_pos, get("pos"));
    }

    /// The same rows derived from DWARF (`llamaprobe layout`): the batch_ext row from the
    /// fake's identical `llama_batch_ext`, the classic batch and the mid-2025 context params
    /// (the fake's) from its classic library.
    #[test]
    fn layouts_derived_from_dwarf_match_the_table() {
        let dir = crate::test_support::fakes();
        let ext = crate::resolve::dwarf::read(&dir.join("ext/layout_ext_g")).unwrap();
        assert_eq!(
            ext.ext,
            Some(layout_for(Generation::BatchExt, |_| false).layout.ext)
        );
        let classic = crate::resolve::dwarf::read(&dir.join("classic/libllama_g.so")).unwrap();
        let row = layout_for(Generation::Classic, |_| false).layout;
        assert_eq!(classic.classic, Some(row.classic));
        assert_eq!(classic.ctx_params, Some(row.ctx_params));
        let report = compare_with_table("fake", &classic);
        assert!(
            report.contains("matches the table row(s) BatchExt, Classic"),
            "{report}"
        );
        let err = crate::resolve::dwarf::read(&dir.join("ext/layout_ext")).unwrap_err();
        assert!(err.to_string().contains("build llama.cpp with -g"));
    }

    #[test]
    fn program_names_exist_in_the_ebpf_object() {
        let obj = crate::attach::EBPF_OBJECT;
        for p in PROBES {
            for prog in std::iter::once(p.entry).chain(p.ret) {
                assert!(
                    obj.windows(prog.len()).any(|w| w == prog.as_bytes()),
                    "program {prog} missing from the eBPF object"
                );
            }
        }
    }
}
