/*
 * bench_loop.c: calls llama_decode (from the synthetic libllama.so) in a tight loop and prints
 * what one call cost. Built by `cargo xtask bench` with gcc -O2, RUNPATH $ORIGIN.
 *
 *   bench_loop ITERATIONS [THREADS]
 *
 * Prints "ready" and waits for one byte on stdin (EOF also starts it), so probes can be attached
 * first; then runs WARMUP calls, then ITERATIONS calls per thread timed with
 * clock_gettime(CLOCK_MONOTONIC), and prints one line:
 *
 *   calls=<total calls including warm-up> threads=<T> ns_per_call=<ns> wall_ns=<ns>
 *
 * ns_per_call is the median over threads of (elapsed ns / ITERATIONS); wall_ns is the time from
 * the start of the first thread's timed loop to the end of the last one.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 1000L
#define MAX_THREADS 64

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

static long iterations;
static pthread_barrier_t barrier;

struct result {
    uint64_t start, end;
    int32_t errors;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *worker(void *arg) {
    struct result *r = arg;
    struct llama_batch batch = {0};
    batch.n_tokens = 1;
    int32_t errors = 0;
    for (long i = 0; i < WARMUP; i++)
        errors += llama_decode(NULL, batch) != 0;
    pthread_barrier_wait(&barrier);
    r->start = now_ns();
    for (long i = 0; i < iterations; i++)
        errors += llama_decode(NULL, batch) != 0;
    r->end = now_ns();
    r->errors = errors;
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s ITERATIONS [THREADS]\n", argv[0]);
        return 2;
    }
    iterations = atol(argv[1]);
    int threads = argc == 3 ? atoi(argv[2]) : 1;
    if (iterations <= 0 || threads <= 0 || threads > MAX_THREADS) {
        fprintf(stderr, "bad ITERATIONS or THREADS\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    char byte;
    if (read(0, &byte, 1) < 0) {
        perror("read stdin");
        return 1;
    }

    pthread_t tid[MAX_THREADS];
    struct result res[MAX_THREADS] = {0};
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    for (int t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, &res[t]);
    for (int t = 0; t < threads; t++)
        pthread_join(tid[t], NULL);

    double per_call[MAX_THREADS];
    uint64_t first = res[0].start, last = res[0].end;
    int32_t errors = 0;
    for (int t = 0; t < threads; t++) {
        per_call[t] = (double)(res[t].end - res[t].start) / (double)iterations;
        if (res[t].start < first) first = res[t].start;
        if (res[t].end > last) last = res[t].end;
        errors += res[t].errors;
    }
    qsort(per_call, (size_t)threads, sizeof per_call[0], cmp_double);
    double median = threads % 2 ? per_call[threads / 2]
                                : (per_call[threads / 2 - 1] + per_call[threads / 2]) / 2.0;
    if (errors) {
        fprintf(stderr, "llama_decode returned non-zero %d times\n", errors);
        return 1;
    }
    printf("calls=%ld threads=%d ns_per_call=%.2f wall_ns=%llu\n",
           (WARMUP + iterations) * threads, threads, median,
           (unsigned long long)(last - first));
    return 0;
}
