/*
 * llama_classic.c: FAKE libllama.so of the CLASSIC API generation (llama_decode(ctx, llama_batch)
 * with the 56-byte batch passed BY VALUE). Built by build.sh, together with llama_common.c, as
 * OUTDIR/classic/libllama.so (gcc -O1 -g0 -fPIC -shared, default visibility).
 *
 * Exported symbols (all in .dynsym, real llama.h prototypes, see llama_fake.h):
 *   llama_decode                   (this file)
 *   llama_model_load_from_file, llama_load_model_from_file (deprecated wrapper),
 *   llama_init_from_model, llama_new_context_with_model (deprecated wrapper),
 *   llama_sampler_sample, llama_synchronize                 (llama_common.c)
 *
 * int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch)
 *   - sleeps batch.n_tokens * 200 microseconds (0 if n_tokens <= 0);
 *   - returns, from the FIRST token id batch.token[0] (if batch.token != NULL and n_tokens > 0):
 *       9001 -> 1 (no KV slot), 9002 -> 2 (aborted), 9003 -> -1 (invalid batch),
 *       9004 -> -3 (fatal), anything else -> 0. No token array (embeddings) -> 0.
 *   - reads nothing else; pos / n_seq_id / seq_id / logits may be NULL (llama_batch_get_one).
 *   - calls no other exported function.
 * It has no C++ `llama_context::decode` method (real b5657+ builds do have one); the profiler
 * sees exactly one decode entry point here.
 */
#include "llama_fake.h"

FAKE_API int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch) {
    (void) ctx;
    const int has_first = batch.n_tokens > 0 && batch.token != NULL;
    const int32_t rc = fake_decode_rc(has_first, has_first ? batch.token[0] : 0);
    fake_sleep_us(batch.n_tokens > 0 ? (long) batch.n_tokens * 200L : 0L);
    return rc;
}
