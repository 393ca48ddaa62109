// A minimal program of our own that embeds a prebuilt libllama (the `npm` fixture: the
// libllama of npm `@node-llama-cpp/linux-x64@3.22.1`), the way a host application does.
//
// It makes a fixed, known sequence of calls, so a profiler attached to it can be checked
// exactly:
//
//   llama_model_load_from_file(argv[1])         1 model load
//   llama_init_from_model(n_ctx 512, n_batch 64, 1 thread) 1 context
//   llama_decode(llama_batch_get_one(9 tokens))   1 prompt step (BOS, 300..307)
//   12 x { llama_sampler_sample(greedy chain, ctx, -1); feed the token back with
//          llama_decode(llama_batch_get_one(1)) except after the last sample }
//
// so 12 decode steps (1 prompt + 11 generation), 9 prompt tokens, 12 samples, 12 generated
// tokens. It prints exactly that on stdout and exits 0.
//
// Environment: DRIVER_WAIT_STDIN=1 makes it wait for one byte on stdin before doing anything
// (so a profiler can attach first); otherwise it starts at once.
//
// The package ships no llama.h, so the few types and prototypes are declared here. The
// parameter structs are passed by value, so their sizes must be right: 80 and 160 bytes in
// this llama.cpp (v0.5.0; the same layout as the llama.cpp of llama-cpp-python 0.3.36, and
// what the library's own llama_{model,context}_default_params write). Only the leading
// context fields, up to the ones we set, are named.
//
// Build: gcc -O1 -o driver driver.c -L<libdir> -l:libllama.v0.5.0.so -ldl -Wl,-rpath,<libdir>

#define _GNU_SOURCE
#include <dlfcn.h>
#include <libgen.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;

struct llama_model;
struct llama_context;
struct llama_sampler;

struct llama_model_params {
    _Alignas(8) unsigned char opaque[80];
};

struct llama_context_params {
    uint32_t n_ctx;                 // offset 0
    uint32_t n_batch;               // 4
    uint32_t n_ubatch;              // 8
    uint32_t n_seq_max;             // 12
    uint32_t n_rs_seq;              // 16
    uint32_t n_outputs_max;         // 20
    uint32_t n_outputs_max_per_seq; // 24
    int32_t n_threads;              // 28
    int32_t n_threads_batch;        // 32
    _Alignas(8) unsigned char rest[120]; // from offset 40
};

_Static_assert(sizeof(struct llama_model_params) == 80, "llama_model_params is 80 bytes");
_Static_assert(sizeof(struct llama_context_params) == 160, "llama_context_params is 160 bytes");
_Static_assert(offsetof(struct llama_context_params, n_threads) == 28, "n_threads at 28");

// The classic 56-byte batch (b3943+).
struct llama_batch {
    int32_t n_tokens;
    llama_token *token;
    float *embd;
    llama_pos *pos;
    int32_t *n_seq_id;
    llama_seq_id **seq_id;
    int8_t *logits;
};

_Static_assert(sizeof(struct llama_batch) == 56, "llama_batch is 56 bytes");

struct llama_sampler_chain_params {
    bool no_perf;
};

void llama_backend_init(void);
void llama_backend_free(void);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);
struct llama_model *llama_model_load_from_file(const char *path, struct llama_model_params params);
void llama_model_free(struct llama_model *model);
struct llama_context *llama_init_from_model(struct llama_model *model,
                                            struct llama_context_params params);
void llama_free(struct llama_context *ctx);
uint32_t llama_n_ctx(const struct llama_context *ctx);
uint32_t llama_n_batch(const struct llama_context *ctx);
int32_t llama_n_threads(struct llama_context *ctx);
struct llama_batch llama_batch_get_one(llama_token *tokens, int32_t n_tokens);
int32_t llama_decode(struct llama_context *ctx, struct llama_batch batch);
struct llama_sampler *llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler *chain, struct llama_sampler *smpl);
struct llama_sampler *llama_sampler_init_greedy(void);
llama_token llama_sampler_sample(struct llama_sampler *smpl, struct llama_context *ctx, int32_t idx);
void llama_sampler_free(struct llama_sampler *smpl);

#define N_PROMPT 9
#define N_GENERATE 12

// Builds of llama.cpp with GGML_BACKEND_DL (this one) register no CPU backend until one is
// loaded from a file: load the best libggml-cpu-*.so next to libllama, as hosts do.
static void load_backends(void) {
    typedef size_t (*dev_count_fn)(void);
    typedef void (*load_all_fn)(const char *);
    dev_count_fn dev_count = (dev_count_fn)dlsym(RTLD_DEFAULT, "ggml_backend_dev_count");
    load_all_fn load_all = (load_all_fn)dlsym(RTLD_DEFAULT, "ggml_backend_load_all_from_path");
    if (dev_count == NULL || load_all == NULL || dev_count() > 0) {
        return;
    }
    Dl_info info;
    if (dladdr((void *)llama_decode, &info) == 0 || info.dli_fname == NULL) {
        return;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s", info.dli_fname);
    load_all(dirname(path));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    const char *wait = getenv("DRIVER_WAIT_STDIN");
    if (wait != NULL && strcmp(wait, "1") == 0) {
        char byte;
        if (read(STDIN_FILENO, &byte, 1) != 1) {
            fprintf(stderr, "driver: no start byte on stdin\n");
            return 1;
        }
    }

    llama_backend_init();
    load_backends();

    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "driver: could not load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 512;
    cparams.n_batch = 64;
    // One thread: ggml's worker threads spin at every graph node, and the default 4 of them on a
    // small (or busy) machine make each step of this tiny model take milliseconds.
    cparams.n_threads = 1;
    cparams.n_threads_batch = 1;
    struct llama_context *ctx = llama_init_from_model(model, cparams);
    if (ctx == NULL) {
        fprintf(stderr, "driver: could not create a context\n");
        return 1;
    }
    // The context read our parameters where we wrote them: the struct layout above is right.
    if (llama_n_ctx(ctx) != 512 || llama_n_batch(ctx) != 64 || llama_n_threads(ctx) != 1) {
        fprintf(stderr, "driver: context has n_ctx %u, n_batch %u, n_threads %d: wrong layout\n",
                llama_n_ctx(ctx), llama_n_batch(ctx), llama_n_threads(ctx));
        return 1;
    }
    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    // BOS, then ids below the tiny model's vocabulary size (588).
    llama_token prompt[N_PROMPT] = {1, 300, 301, 302, 303, 304, 305, 306, 307};
    int decodes = 0, samples = 0, generated = 0;

    int32_t rc = llama_decode(ctx, llama_batch_get_one(prompt, N_PROMPT));
    decodes++;
    if (rc != 0) {
        fprintf(stderr, "driver: prompt decode returned %d\n", rc);
        return 1;
    }
    for (int i = 0; i < N_GENERATE; i++) {
        llama_token token = llama_sampler_sample(smpl, ctx, -1);
        samples++;
        generated++;
        if (i + 1 == N_GENERATE) {
            break; // the last token is sampled, never decoded
        }
        rc = llama_decode(ctx, llama_batch_get_one(&token, 1));
        decodes++;
        if (rc != 0) {
            fprintf(stderr, "driver: decode %d returned %d\n", decodes, rc);
            return 1;
        }
    }

    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();

    printf("driver decodes=%d prompt_tokens=%d generated=%d samples=%d\n", decodes, N_PROMPT,
           generated, samples);
    fflush(stdout);
    return 0;
}
