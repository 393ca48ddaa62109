/*
 * driver_ending.c: a program on the CLASSIC fake libllama.so (OUTDIR/classic/, RUNPATH $ORIGIN)
 * that ends inside a probed call, for llamaprobe's tests of how a traced process ends.
 *
 * Usage: driver_ending segv | hang | exit N
 *
 * Start: the protocol of driver_common.h (`ready pid=<pid>`, then one byte from stdin if
 * FAKE_WAIT_STDIN=1). Then ONE normal llama_decode of 4 tokens (ids 100..103, pos 0..3, seq 0,
 * logits on the last; returns 0), printed `call llama_decode ret=0 n_tokens=4`, then:
 *   segv    prints `crashing`, then calls llama_decode with n_tokens 4 and an invalid token
 *           pointer (address 16): the fake reads token[0] and the process dies of SIGSEGV
 *           INSIDE llama_decode (on the main thread).
 *   hang    starts one thread; it and the main thread each print `entering tid=<tid>` and call
 *           llama_decode with 50000 tokens (the fake sleeps 200 us per token: 10 s). Meant to
 *           be killed (SIGKILL) while BOTH threads are inside llama_decode; exits 0 if not.
 *   exit N  calls exit(N) (outside any probed call).
 */
#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>

#include "llama_fake.h"
#pragma GCC diagnostic ignored "-Wunused-function"
#include "driver_common.h"

#define LONG_TOKENS 50000

static struct llama_batch batch_of(int32_t n, llama_token * token, llama_pos * pos,
                                   int32_t * n_seq_id, llama_seq_id ** seq_id, int8_t * logits) {
    struct llama_batch b;
    memset(&b, 0, sizeof b);
    b.n_tokens = n;
    b.token = token;
    b.pos = pos;
    b.n_seq_id = n_seq_id;
    b.seq_id = seq_id;
    b.logits = logits;
    return b;
}

static struct llama_batch long_batch(void) {
    llama_token * token = calloc(LONG_TOKENS, sizeof *token);
    if (token == NULL) {
        exit(4);
    }
    for (int i = 0; i < LONG_TOKENS; i++) {
        token[i] = 500 + (i % 1000);
    }
    /* get_one style: no positions or sequences (llama.cpp assigns them). */
    return batch_of(LONG_TOKENS, token, NULL, NULL, NULL, NULL);
}

static void * long_decode(void * ctx) {
    struct llama_batch b = long_batch();
    printf("entering tid=%ld\n", (long) syscall(SYS_gettid));
    fflush(stdout);
    llama_decode((struct llama_context *) ctx, b);
    return NULL;
}

int main(int argc, char ** argv) {
    if (argc < 2 || (strcmp(argv[1], "exit") == 0 && argc < 3)) {
        fprintf(stderr, "usage: %s segv | hang | exit N\n", argv[0]);
        return 2;
    }
    driver_wait_for_start();
    static int ctx_storage;
    struct llama_context * ctx = (struct llama_context *) &ctx_storage;

    llama_token token[4] = { 100, 101, 102, 103 };
    llama_pos pos[4] = { 0, 1, 2, 3 };
    int32_t n_seq_id[4] = { 1, 1, 1, 1 };
    llama_seq_id seq0 = 0;
    llama_seq_id * seq_id[4] = { &seq0, &seq0, &seq0, &seq0 };
    int8_t logits[4] = { 0, 0, 0, 1 };
    int rc = llama_decode(ctx, batch_of(4, token, pos, n_seq_id, seq_id, logits));
    driver_decode("llama_decode", rc, 0, 4);

    if (strcmp(argv[1], "segv") == 0) {
        printf("crashing\n");
        fflush(stdout);
        llama_decode(ctx, batch_of(4, (llama_token *) (uintptr_t) 16, pos, n_seq_id, seq_id, logits));
        return 1; /* not reached */
    }
    if (strcmp(argv[1], "hang") == 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, long_decode, ctx) != 0) {
            return 4;
        }
        long_decode(ctx);
        pthread_join(t, NULL);
        return 0;
    }
    if (strcmp(argv[1], "exit") == 0) {
        exit(atoi(argv[2]));
    }
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
