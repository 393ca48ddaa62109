//! The probe catalog: every function llamaprobe probes, with its family, generation and the
//! eBPF programs that run at its entry and return.

use super::kinds::{Family, Generation, ProbePoint};

const ALL: &[Generation] = &[];

/// Symbol whose presence marks the batch_ext generation.
pub const BATCH_EXT_DECODE: &str = "_ZN13llama_context6decodeERK15llama_batch_ext";
/// Symbol that marks the classic generation (when the batch_ext one is absent).
pub const CLASSIC_DECODE: &str = "llama_decode";

/// The sampler chain's sampling function (b3681+).
pub const SAMPLER_SAMPLE: &str = "llama_sampler_sample";
/// The 2024 sampling function that marks the legacy generation (with no [`SAMPLER_SAMPLE`]).
pub const LEGACY_SAMPLE: &str = "llama_sample_token";

/// The sampler-chain step probed as a fallback for programs that sample themselves.
pub const SAMPLER_APPLY: &str = "llama_sampler_apply";

/// The entry program of llama-server's `server_queue::post`: where requests are accepted.
pub const TASK_POST: &str = "task_post";
/// The 2024 single-task `server_queue::post(server_task)`: its id is its return value.
pub const TASK_POST_ONE: &str = "task_post_one";
/// Its symbol (it marks that era's server layout too).
pub const TASK_POST_ONE_SYMBOL: &str = "_ZN12server_queue4postE11server_task";
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
        generations: &[Generation::Classic, Generation::Legacy],
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
        family: Family::ContextFree,
        symbol: "llama_free",
        prototype: "void llama_free(struct llama_context * ctx)",
        entry: "context_free",
        ret: None,
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: SAMPLER_SAMPLE,
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
    // 2024: common's sampling (what llama-server and the examples of that time call, the
    // llama_sample_token* below nested inside it), and llama.h's functions embedders call.
    ProbePoint {
        family: Family::Sample,
        symbol: "_Z21llama_sampling_sampleP22llama_sampling_contextP13llama_contextS2_i",
        prototype: "llama_token llama_sampling_sample(struct llama_sampling_context * ctx_sampling, struct llama_context * ctx_main, struct llama_context * ctx_cfg, int idx) [2024]",
        entry: "sample_enter_2024",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: LEGACY_SAMPLE,
        prototype: "llama_token llama_sample_token(struct llama_context * ctx, llama_token_data_array * candidates) [2024]",
        entry: "sample_token_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "llama_sample_token_greedy",
        prototype: "llama_token llama_sample_token_greedy(struct llama_context * ctx, llama_token_data_array * candidates) [2024]",
        entry: "sample_token_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "llama_sample_token_mirostat",
        prototype: "llama_token llama_sample_token_mirostat(struct llama_context * ctx, llama_token_data_array * candidates, float tau, float eta, int32_t m, float * mu) [2024]",
        entry: "sample_token_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "llama_sample_token_mirostat_v2",
        prototype: "llama_token llama_sample_token_mirostat_v2(struct llama_context * ctx, llama_token_data_array * candidates, float tau, float eta, float * mu) [2024]",
        entry: "sample_token_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    ProbePoint {
        family: Family::Sample,
        symbol: "_Z27llama_sample_token_with_rngP13llama_contextP22llama_token_data_arrayRSt23mersenne_twister_engineImLm32ELm624ELm397ELm31ELm2567483615ELm11ELm4294967295ELm7ELm2636928640ELm15ELm4022730752ELm18ELm1812433253EE",
        prototype: "llama_token llama_sample_token_with_rng(struct llama_context * ctx, llama_token_data_array * candidates, std::mt19937 & rng) [2024, C++]",
        entry: "sample_token_enter",
        ret: Some("sample_return"),
        generations: ALL,
    },
    // Programs that apply the sampler chain themselves (node-llama-cpp's addon calls
    // llama_sampler_apply and takes the token it selected; it accepts only into penalty and
    // grammar samplers, when it has them): their tokens are seen at the apply's return. The
    // functions above apply the chain inside (nested: counted once). Detached by the agent
    // from a process once its tokens are seen through one of them.
    ProbePoint {
        family: Family::Sample,
        symbol: SAMPLER_APPLY,
        prototype: "void llama_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p)",
        entry: "sample_apply",
        ret: Some("sample_apply_return"),
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
    ProbePoint {
        family: Family::Memory,
        symbol: "llama_get_memory",
        prototype: "llama_memory_t llama_get_memory(const struct llama_context * ctx) [2025+]",
        entry: "memory_handle",
        ret: Some("memory_handle_return"),
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
    // 2024: one task by value (a copy passed by reference), its id assigned inside and
    // returned.
    ProbePoint {
        family: Family::Server,
        symbol: TASK_POST_ONE_SYMBOL,
        prototype: "int server_queue::post(server_task task) [2024]",
        entry: TASK_POST_ONE,
        ret: Some("task_post_one_return"),
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
