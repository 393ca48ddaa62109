/*
 * llama_common.c: functions shared by BOTH fake libllama.so builds (compiled with gcc, as C, into
 * classic/libllama.so and ext/libllama.so). Real llama.h prototypes; every function is exported
 * (default visibility, in .dynsym), noinline/noipa/used.
 *
 *   llama_model_load_from_file(path, params)       sleeps 30 ms, returns a non-NULL dummy model
 *                                                    pointer; if `path` contains "missing": sleeps
 *                                                    5 ms and returns NULL.
 *   llama_load_model_from_file(path, params)       DEPRECATED wrapper: only calls
 *                                                    llama_model_load_from_file(path, params)
 *                                                    through a volatile function pointer (so the
 *                                                    exported entry point is executed: a probe on
 *                                                    both symbols fires twice for ONE load) and
 *                                                    returns its result. No sleep of its own.
 *   llama_init_from_model(model, cparams)          sleeps 10 ms, returns a non-NULL dummy context
 *                                                    (also when model is NULL).
 *   llama_new_context_with_model(model, cparams)   DEPRECATED wrapper: only calls
 *                                                    llama_init_from_model through a volatile
 *                                                    function pointer; no sleep of its own.
 *   llama_sampler_sample(smpl, ctx, idx)           sleeps 1 ms, returns 1000 + idx.
 *   llama_synchronize(ctx)                          sleeps 2 ms.
 *
 * model params (72 bytes) and context params (120 bytes) are passed BY VALUE: on x86-64 they are
 * in memory at rsp+8 at the first instruction; on aarch64 a pointer to a caller copy is in x1.
 */
#define _DEFAULT_SOURCE
#include "llama_fake.h"

#include <errno.h>
#include <string.h>
#include <time.h>

/* Dummy objects handed out as model / context handles. The context storage is large and aligned
 * enough to stand in for the C++ `struct llama_context` of llama_ext.cpp (which has no state). */
static long fake_model_storage[8];
static long fake_context_storage[8];

/* Sleeps `us` microseconds (nanosleep, resumed after EINTR; usleep semantics). */
__attribute__((visibility("hidden"))) void fake_sleep_us(long us) {
    if (us <= 0) {
        return;
    }
    struct timespec ts = { us / 1000000L, (us % 1000000L) * 1000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Test hook (not a llama.cpp function): the next decode returns `rc`, whatever its tokens. */
static int32_t g_fail_next = 0;

FAKE_API void fake_fail_next_decode(int32_t rc) {
    g_fail_next = rc;
}

__attribute__((visibility("hidden"))) int32_t fake_decode_rc(int has_first, llama_token first) {
    if (g_fail_next != 0) {
        int32_t rc = g_fail_next;
        g_fail_next = 0;
        return rc;
    }
    if (!has_first) {
        return 0;
    }
    switch (first) {
    case 9001: return 1;  /* no KV slot */
    case 9002: return 2;  /* aborted */
    case 9003: return -1; /* invalid batch */
    case 9004: return -3; /* fatal (< -1) */
    default:   return 0;
    }
}

FAKE_API struct llama_model * llama_model_load_from_file(const char * path_model,
                                                         struct llama_model_params params) {
    (void) params;
    if (path_model != NULL && strstr(path_model, "missing") != NULL) {
        fake_sleep_us(5000);
        return NULL;
    }
    fake_sleep_us(30000);
    /* every load its own model (8 at most), as llama.cpp allocates one per load */
    static int loads = 0;
    return (struct llama_model *) (void *) &fake_model_storage[loads++ % 8];
}

/* volatile: the compiler must load the pointer at run time, so the wrapper cannot inline or
 * tail-merge the callee's body; the pointer holds the exported symbol's address (via the GOT). */
static struct llama_model * (*volatile fake_p_model_load_from_file)(const char *, struct llama_model_params) =
    llama_model_load_from_file;
static struct llama_context * (*volatile fake_p_init_from_model)(struct llama_model *, struct llama_context_params) =
    llama_init_from_model;

FAKE_API struct llama_model * llama_load_model_from_file(const char * path_model,
                                                         struct llama_model_params params) {
    struct llama_model * m = fake_p_model_load_from_file(path_model, params);
    __asm__ __volatile__("" ::: "memory"); /* no tail call: the call returns here */
    return m;
}

FAKE_API struct llama_context * llama_init_from_model(struct llama_model * model,
                                                      struct llama_context_params params) {
    (void) model;
    (void) params;
    fake_sleep_us(10000);
    /* every context its own pointer (8 at most) */
    static int contexts = 0;
    return (struct llama_context *) (void *) &fake_context_storage[contexts++ % 8];
}

FAKE_API struct llama_context * llama_new_context_with_model(struct llama_model * model,
                                                             struct llama_context_params params) {
    struct llama_context * c = fake_p_init_from_model(model, params);
    __asm__ __volatile__("" ::: "memory");
    return c;
}

/* every context has its memory: its own pointer, as llama.cpp's llama_get_memory gives */
static long fake_memory_storage[8];

FAKE_API llama_memory_t llama_get_memory(const struct llama_context * ctx) {
    long i = ((const long *) (const void *) ctx - fake_context_storage) % 8;
    return (llama_memory_t) (void *) &fake_memory_storage[i < 0 ? 0 : i];
}

FAKE_API bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
                                  llama_pos p1) {
    (void) mem;
    (void) seq_id;
    (void) p0;
    (void) p1;
    return true;
}

FAKE_API void llama_memory_clear(llama_memory_t mem, bool data) {
    (void) mem;
    (void) data;
}

FAKE_API llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
                                          int32_t idx) {
    (void) smpl;
    (void) ctx;
    fake_sleep_us(1000);
    return 1000 + idx;
}

FAKE_API void llama_synchronize(struct llama_context * ctx) {
    (void) ctx;
    fake_sleep_us(2000);
}
