/*
 * llama_fake.h: the public C types and prototypes of the FAKE libllama.so used by llamaprobe's
 * integration tests. Shared by llama_classic.c, llama_common.c, llama_ext.cpp and both drivers.
 *
 * Everything here mirrors the real llama.cpp `include/llama.h` (same names, same prototypes, same
 * struct layouts on x86-64 and aarch64), so the probes see exactly what they would see on a real
 * build:
 *   - struct llama_batch           : the classic 56-byte batch (b3943+), passed BY VALUE to
 *                                    llama_decode (on the stack on x86-64, by pointer in x1 on
 *                                    aarch64).
 *   - struct llama_model_params    : the mid-2025 field list, 72 bytes (> 16, passed in memory).
 *   - struct llama_context_params  : the mid-2025 field list, 120 bytes; n_ctx +0, n_batch +4,
 *                                    n_ubatch +8, n_seq_max +12, n_threads +16,
 *                                    n_threads_batch +20 (static asserts below).
 * The newest-generation C++ type `llama_batch_ext` is defined in llama_ext.cpp (C++ only); this
 * header only declares it opaque, as the real llama.h does.
 *
 * Behaviour of the functions: see llama_common.c, llama_classic.c, llama_ext.cpp.
 */
#ifndef LLAMA_FAKE_H
#define LLAMA_FAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Exported API functions: kept out of line, never cloned or IPA-optimised, kept in .dynsym
 * (default visibility, like a real llama.cpp Linux build). */
#if defined(__GNUC__) && !defined(__clang__)
#define FAKE_API __attribute__((noinline, noipa, used, visibility("default")))
#else
#define FAKE_API __attribute__((noinline, used, visibility("default")))
#endif

#define LLAMA_TOKEN_NULL (-1)

typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct llama_model;
struct llama_context;
struct llama_sampler;
struct ggml_tensor;
struct llama_model_kv_override;
struct llama_model_tensor_buft_override;
typedef struct ggml_backend_device * ggml_backend_dev_t;
typedef bool (*llama_progress_callback)(float progress, void * user_data);
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);

enum llama_split_mode { LLAMA_SPLIT_MODE_NONE = 0, LLAMA_SPLIT_MODE_LAYER = 1, LLAMA_SPLIT_MODE_ROW = 2 };
enum llama_rope_scaling_type { LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1 };
enum llama_pooling_type { LLAMA_POOLING_TYPE_UNSPECIFIED = -1 };
enum llama_attention_type { LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1 };
enum ggml_type { GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1 };

/* The classic batch: 56 bytes, align 8. */
typedef struct llama_batch {
    int32_t n_tokens;        /*  0 */
    llama_token  *  token;   /*  8 */
    float        *  embd;    /* 16 */
    llama_pos    *  pos;     /* 24 */
    int32_t      *  n_seq_id;/* 32 */
    llama_seq_id ** seq_id;  /* 40 */
    int8_t       *  logits;  /* 48  (output flags) */
} llama_batch;

/* Real llama.h field list (mid-2025, b5xxx-b6xxx): 72 bytes on LP64. */
struct llama_model_params {
    ggml_backend_dev_t * devices;                                       /*  0 */
    const struct llama_model_tensor_buft_override * tensor_buft_overrides; /* 8 */
    int32_t n_gpu_layers;                                               /* 16 */
    enum llama_split_mode split_mode;                                   /* 20 */
    int32_t main_gpu;                                                   /* 24 */
    const float * tensor_split;                                         /* 32 */
    llama_progress_callback progress_callback;                          /* 40 */
    void * progress_callback_user_data;                                 /* 48 */
    const struct llama_model_kv_override * kv_overrides;                /* 56 */
    bool vocab_only;                                                    /* 64 */
    bool use_mmap;                                                      /* 65 */
    bool use_mlock;                                                     /* 66 */
    bool check_tensors;                                                 /* 67 */
    bool use_extra_bufts;                                               /* 68 */
};

/* Real llama.h field list (mid-2025, b5xxx-b6xxx, before flash_attn_type): 120 bytes on LP64. */
struct llama_context_params {
    uint32_t n_ctx;                                     /*   0 */
    uint32_t n_batch;                                   /*   4 */
    uint32_t n_ubatch;                                  /*   8 */
    uint32_t n_seq_max;                                 /*  12 */
    int32_t  n_threads;                                 /*  16 */
    int32_t  n_threads_batch;                           /*  20 */
    enum llama_rope_scaling_type rope_scaling_type;     /*  24 */
    enum llama_pooling_type      pooling_type;          /*  28 */
    enum llama_attention_type    attention_type;        /*  32 */
    float    rope_freq_base;                            /*  36 */
    float    rope_freq_scale;                           /*  40 */
    float    yarn_ext_factor;                           /*  44 */
    float    yarn_attn_factor;                          /*  48 */
    float    yarn_beta_fast;                            /*  52 */
    float    yarn_beta_slow;                            /*  56 */
    uint32_t yarn_orig_ctx;                             /*  60 */
    float    defrag_thold;                              /*  64 */
    ggml_backend_sched_eval_callback cb_eval;           /*  72 */
    void *   cb_eval_user_data;                         /*  80 */
    enum ggml_type type_k;                              /*  88 */
    enum ggml_type type_v;                              /*  92 */
    ggml_abort_callback abort_callback;                 /*  96 */
    void *   abort_callback_data;                       /* 104 */
    bool embeddings;                                    /* 112 */
    bool offload_kqv;                                   /* 113 */
    bool flash_attn;                                    /* 114 */
    bool no_perf;                                       /* 115 */
    bool op_offload;                                    /* 116 */
    bool swa_full;                                      /* 117 */
    bool kv_unified;                                    /* 118 */
};

#if defined(__LP64__) || defined(_LP64)
#ifdef __cplusplus
#define FAKE_STATIC_ASSERT static_assert
#else
#define FAKE_STATIC_ASSERT _Static_assert
#endif
FAKE_STATIC_ASSERT(sizeof(struct llama_batch) == 56, "llama_batch size");
FAKE_STATIC_ASSERT(offsetof(struct llama_batch, token) == 8, "llama_batch.token");
FAKE_STATIC_ASSERT(offsetof(struct llama_batch, pos) == 24, "llama_batch.pos");
FAKE_STATIC_ASSERT(offsetof(struct llama_batch, seq_id) == 40, "llama_batch.seq_id");
FAKE_STATIC_ASSERT(offsetof(struct llama_batch, logits) == 48, "llama_batch.logits");
FAKE_STATIC_ASSERT(sizeof(struct llama_model_params) == 72, "llama_model_params size");
FAKE_STATIC_ASSERT(sizeof(struct llama_context_params) == 120, "llama_context_params size");
FAKE_STATIC_ASSERT(offsetof(struct llama_context_params, n_threads) == 16, "cparams.n_threads");
FAKE_STATIC_ASSERT(offsetof(struct llama_context_params, n_threads_batch) == 20, "cparams.n_threads_batch");
#endif

/* ---- common to both generations (llama_common.c) ---- */
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
/* deprecated */
struct llama_model * llama_load_model_from_file(const char * path_model, struct llama_model_params params);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
/* deprecated */
struct llama_context * llama_new_context_with_model(struct llama_model * model, struct llama_context_params params);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_synchronize(struct llama_context * ctx);

/* classic entry point (llama_classic.c); in the ext lib a compatibility wrapper (llama_ext.cpp) */
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);

/* ---- newest generation only (llama_ext.cpp) ---- */
enum llama_process_type {
    LLAMA_PROCESS_TYPE_ENCODE = 0,
    LLAMA_PROCESS_TYPE_DECODE = 1,
};
struct llama_batch_ext;
struct llama_batch_ext * llama_batch_ext_init(struct llama_context * ctx);
void    llama_batch_ext_free(struct llama_batch_ext * batch);
void    llama_batch_ext_clear(struct llama_batch_ext * batch);
int32_t llama_batch_ext_add_token(struct llama_batch_ext * batch, llama_seq_id seq_id, llama_token id);
bool    llama_batch_ext_set_output_logits(struct llama_batch_ext * batch, int32_t idx, bool output);
bool    llama_batch_ext_set_pos(struct llama_batch_ext * batch, int32_t idx, const llama_pos * pos);
int32_t llama_process(struct llama_context * ctx, enum llama_process_type type, struct llama_batch_ext * batch);

/* KV memory (2025+ API) */
typedef struct llama_memory_i * llama_memory_t;
llama_memory_t llama_get_memory(const struct llama_context * ctx);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_memory_clear(llama_memory_t mem, bool data);

/* ---- test hook of the fake (exported, not a llama.cpp function) ---- */
/* the next decode returns rc (then decodes go by token id again) */
void fake_fail_next_decode(int32_t rc);

/* ---- internal helpers shared by the fake libs (hidden: not in .dynsym) ---- */
__attribute__((visibility("hidden"))) void fake_sleep_us(long us);
/* decode return code chosen by the first token id: 9001 -> 1, 9002 -> 2, 9003 -> -1,
 * 9004 -> -3, anything else (or no token) -> 0 */
__attribute__((visibility("hidden"))) int32_t fake_decode_rc(int has_first, llama_token first);

#ifdef __cplusplus
}
#endif

#endif /* LLAMA_FAKE_H */
