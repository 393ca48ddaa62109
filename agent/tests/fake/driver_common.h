/*
 * driver_common.h: start-wait protocol, output lines and self-checks shared by driver_classic.c
 * and driver_ext.cpp (header-only, static functions; C and C++).
 *
 * Start protocol (both drivers):
 *   1. print `ready pid=<pid>` on stdout (flushed);
 *   2. if the environment variable FAKE_WAIT_STDIN is exactly "1": block reading ONE byte from
 *      stdin (EOF or an error also releases it); otherwise sleep 1.5 s (fallback);
 *   3. run the call sequence.
 * Output: stdout is line-buffered; every line is flushed as soon as the call returned.
 *   call <name> ret=<int>           decode (+ ` n_tokens=<n>`), llama_sampler_sample
 *   call <name> ret=nonnull|null    model load, context creation
 *   call llama_synchronize ret=void
 *   done decodes=<n> samples=<n>
 * Every return value is compared with the value the fake library must return; a mismatch is
 * reported on stderr (`MISMATCH ...`) and makes the driver exit 3 (after the `done` line).
 * Exit codes: 0 all as expected, 2 usage, 3 mismatch, 4 batch construction failed (ext only).
 */
#ifndef FAKE_DRIVER_COMMON_H
#define FAKE_DRIVER_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int g_mismatches = 0;
static int g_decodes = 0;
static int g_samples = 0;

static void driver_wait_for_start(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%ld\n", (long) getpid());
    fflush(stdout);
    const char * w = getenv("FAKE_WAIT_STDIN");
    if (w != NULL && strcmp(w, "1") == 0) {
        char c;
        ssize_t r = read(0, &c, 1);
        (void) r;
    } else {
        struct timespec ts = { 1, 500000000L };
        nanosleep(&ts, NULL);
    }
}

static void driver_mismatch(const char * name, const char * got, const char * want) {
    fprintf(stderr, "MISMATCH %s: got %s, want %s\n", name, got, want);
    g_mismatches++;
}

static void driver_ptr(const char * name, const void * got, int want_nonnull) {
    const char * g = got != NULL ? "nonnull" : "null";
    printf("call %s ret=%s\n", name, g);
    fflush(stdout);
    if ((got != NULL) != (want_nonnull != 0)) {
        driver_mismatch(name, g, want_nonnull ? "nonnull" : "null");
    }
}

static void driver_decode(const char * name, int got, int want, int n_tokens) {
    g_decodes++;
    printf("call %s ret=%d n_tokens=%d\n", name, got, n_tokens);
    fflush(stdout);
    if (got != want) {
        char g[32], w[32];
        snprintf(g, sizeof g, "%d", got);
        snprintf(w, sizeof w, "%d", want);
        driver_mismatch(name, g, w);
    }
}

static void driver_sample(int got, int want) {
    g_samples++;
    printf("call llama_sampler_sample ret=%d\n", got);
    fflush(stdout);
    if (got != want) {
        char g[32], w[32];
        snprintf(g, sizeof g, "%d", got);
        snprintf(w, sizeof w, "%d", want);
        driver_mismatch("llama_sampler_sample", g, w);
    }
}

static void driver_sync_done(void) {
    printf("call llama_synchronize ret=void\n");
    fflush(stdout);
}

static int driver_finish(void) {
    printf("done decodes=%d samples=%d\n", g_decodes, g_samples);
    fflush(stdout);
    return g_mismatches == 0 ? 0 : 3;
}

#endif /* FAKE_DRIVER_COMMON_H */
