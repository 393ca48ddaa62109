/*
 * libllama.c: the synthetic probe target of `cargo xtask bench` (built as libllama.so with
 * gcc -O2 -fPIC -shared). It exports the three functions llamaprobe needs to accept a library
 * as a classic-generation llama.cpp, with the real llama.h calling convention:
 *
 *   int32_t llama_decode(void *ctx, struct llama_batch batch)   56-byte struct BY VALUE
 *   void    llama_synchronize(void *ctx)
 *   int32_t llama_sampler_sample(void *smpl, void *ctx, int32_t idx)
 *
 * They do (almost) nothing, so the loop in bench_loop.c measures what a probe hit costs.
 */
#include <stdint.h>

#define API __attribute__((noinline, noipa, used, visibility("default")))

typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;

/* The classic batch (llama.h, b3943+): 56 bytes, align 8. */
struct llama_batch {
    int32_t n_tokens;
    llama_token *token;
    float *embd;
    llama_pos *pos;
    int32_t *n_seq_id;
    llama_seq_id **seq_id;
    int8_t *logits;
};

_Static_assert(sizeof(struct llama_batch) == 56, "llama_batch must be 56 bytes");

/* Written so the compiler cannot drop the body. */
volatile int32_t bench_sink;

API int32_t llama_decode(void *ctx, struct llama_batch batch) {
    (void)ctx;
    bench_sink = batch.n_tokens;
    return 0;
}

API void llama_synchronize(void *ctx) {
    (void)ctx;
    bench_sink = 0;
}

API int32_t llama_sampler_sample(void *smpl, void *ctx, int32_t idx) {
    (void)smpl;
    (void)ctx;
    return idx;
}
