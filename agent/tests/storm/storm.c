/*
 * storm.c: the overload test's target, on the benchmark's synthetic libllama.so
 * (xtask/assets/bench/libllama.c), built by the test with gcc -O2.
 *
 *   storm THREADS SECONDS CALM_CALLS
 *
 * Prints "ready" and waits for a line on stdin (probes are attached first). Then THREADS
 * threads call llama_decode as fast as they can for SECONDS; prints "storm calls=N". Waits for
 * a second line on stdin, makes CALM_CALLS calls from one thread, prints "calm calls=N" and
 * waits for a third line before it exits (so that the agent can read its last events).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct llama_batch {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
};

int32_t llama_decode(void *ctx, struct llama_batch batch);

static double seconds;
static long counts[64];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void one_call(void) {
    int32_t token = 1, pos = 0, n_seq = 1, seq0 = 0;
    int32_t *seq = &seq0;
    int8_t logits = 1;
    struct llama_batch b = {1, &token, NULL, &pos, &n_seq, &seq, &logits};
    llama_decode((void *)0x1, b);
}

static void *storm(void *arg) {
    long *n = arg;
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < 256; i++) {
            one_call();
        }
        *n += 256;
    }
    return NULL;
}

static void wait_line(void) {
    char line[16];
    if (!fgets(line, sizeof line, stdin)) {
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: storm THREADS SECONDS CALM_CALLS\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    seconds = atof(argv[2]);
    long calm = atol(argv[3]);
    if (threads < 1 || threads > 64) {
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    wait_line();
    pthread_t t[64];
    for (int i = 0; i < threads; i++) {
        pthread_create(&t[i], NULL, storm, &counts[i]);
    }
    long total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        total += counts[i];
    }
    printf("storm calls=%ld\n", total);
    wait_line();
    for (long i = 0; i < calm; i++) {
        one_call();
    }
    printf("calm calls=%ld\n", calm);
    wait_line();
    return 0;
}
