/*
 * profile_target.c: test program for --profile-cpu. One executable with the fake libllama
 * (llama_common.c) and its own `llama_decode` (classic API), which spends CPU time, not sleep,
 * in two functions of known cost:
 *
 *   burn_alpha(us), burn_beta(us), burn_outside(us): each spins until its thread has used `us`
 *   microseconds of CPU (CLOCK_THREAD_CPUTIME_ID, checked every ~20 us of work), so the shares
 *   below hold in CPU time on a busy machine too.
 *
 * Usage: profile_target ROUNDS. Prints `ready pid=<pid>`, waits (driver_common.h: one byte on
 * stdin with FAKE_WAIT_STDIN=1, else 1.5 s), then ROUNDS times:
 *   1. llama_decode, PROMPT step: 12 tokens of seq 0 at pos 0..11, output on the last.
 *      The main thread runs burn_alpha 7000 us then burn_beta 3000 us        (70% / 30%).
 *   2. 3 x llama_decode, GENERATION step: 1 token of seq 0 at pos 12+k, output.
 *      The main thread hands burn_alpha 1000 us to the worker thread (which otherwise sleeps
 *      on a pipe) and waits for it (blocked on a pipe), then runs burn_beta 4000 us
 *                                                                            (20% / 80%).
 *      The worker's samples join the step through the process's step mark.
 *   3. llama_memory_clear; burn_outside 1000 us outside any llama.cpp call.
 * Per round: prompt 10 ms, generation 15 ms, other 1 ms of CPU. Then `done decodes=<n>`.
 * Built twice by build.sh: with frame pointers (profile/profile_target_fp) and without
 * (profile/profile_target_nofp); every function here is noinline, so each is its own frame.
 */
#define _GNU_SOURCE
#include "llama_fake.h"
#include "driver_common.h"

#include <pthread.h>

#define NOINLINE __attribute__((noinline, noipa, used))

static long thread_cpu_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000L + ts.tv_nsec / 1000L;
}

static volatile unsigned long sink_;

/* About 20 us of arithmetic between clock reads; the result is kept so it is not removed. */
#define SPIN(us)                                                         \
    do {                                                                 \
        const long end_ = thread_cpu_us() + (us);                        \
        unsigned long x_ = sink_;                                        \
        while (thread_cpu_us() < end_) {                                 \
            for (int i_ = 0; i_ < 20000; i_++) {                         \
                x_ = x_ * 6364136223846793005UL + 1442695040888963407UL; \
                __asm__ volatile("" : "+r"(x_));                         \
            }                                                            \
        }                                                                \
        sink_ = x_;                                                      \
    } while (0)

NOINLINE void burn_alpha(long us) { SPIN(us); }
NOINLINE void burn_beta(long us) { SPIN(us); }
NOINLINE void burn_outside(long us) { SPIN(us); }

static int to_worker[2], from_worker[2];

static void * worker(void * arg) {
    (void) arg;
    long us;
    while (read(to_worker[0], &us, sizeof us) == (ssize_t) sizeof us) {
        burn_alpha(us);
        char done = 1;
        if (write(from_worker[1], &done, 1) != 1) break;
    }
    return NULL;
}

NOINLINE static void on_worker(long us) {
    char done;
    if (write(to_worker[1], &us, sizeof us) != (ssize_t) sizeof us) abort();
    if (read(from_worker[0], &done, 1) != 1) abort();
}

FAKE_API int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch) {
    (void) ctx;
    if (batch.n_tokens > 1) {
        burn_alpha(7000);
        burn_beta(3000);
    } else {
        on_worker(1000);
        burn_beta(4000);
    }
    return 0;
}

static llama_token tok[16];
static llama_pos pos[16];
static int32_t nseq[16];
static llama_seq_id sid[16];
static llama_seq_id * sidp[16];
static int8_t lg[16];

static llama_batch batch_of(int n, int pos0) {
    for (int i = 0; i < n; i++) {
        tok[i] = 100 + pos0 + i;
        pos[i] = pos0 + i;
        nseq[i] = 1;
        sid[i] = 0;
        sidp[i] = &sid[i];
        lg[i] = i == n - 1;
    }
    llama_batch b = {0};
    b.n_tokens = n;
    b.token = tok;
    b.pos = pos;
    b.n_seq_id = nseq;
    b.seq_id = sidp;
    b.logits = lg;
    return b;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s ROUNDS\n", argv[0]);
        return 2;
    }
    const int rounds = atoi(argv[1]);
    if (pipe(to_worker) || pipe(from_worker)) return 1;
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL)) return 1;
    driver_wait_for_start();
    struct llama_model_params mp = {0};
    struct llama_model * model = llama_model_load_from_file("/profile/target.gguf", mp);
    struct llama_context_params cp = {0};
    cp.n_ctx = 4096;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_seq_max = 1;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    int decodes = 0;
    for (int r = 0; r < rounds; r++) {
        llama_decode(ctx, batch_of(12, 0));
        decodes++;
        for (int k = 0; k < 3; k++) {
            llama_decode(ctx, batch_of(1, 12 + k));
            decodes++;
        }
        llama_memory_clear(llama_get_memory(ctx), true);
        burn_outside(1000);
    }
    printf("done decodes=%d\n", decodes);
    return 0;
}
