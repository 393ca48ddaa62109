/*
 * loader_burst.c: loads llama.cpp late, like a Python or Node binding, one library after
 * another (gpt4all dlopens each of its llama.cpp builds in turn and uses one).
 *
 * Usage: loader_burst LIB_A LIB_B N
 *   1. prints `started pid=<pid>` and waits for one byte on stdin;
 *   2. dlopen(LIB_A), prints `loaded a`, waits for a byte;
 *   3. dlopen(LIB_B), prints `loaded b`, waits for a byte;
 *   4. calls LIB_B's llama_decode N times, one token each (llama_batch_get_one style: only the
 *      token array; id 1, so each returns 0 after 0.2 ms), prints `done decodes=N`.
 * Links nothing of llama.cpp. Exit 0; 2 usage; 4 a dlopen or dlsym failed (the error on stderr).
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "llama_fake.h"

static void wait_byte(void) {
    char c;
    ssize_t r = read(0, &c, 1);
    (void) r;
}

static void * open_lib(const char * path) {
    void * h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        exit(4);
    }
    return h;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s LIB_A LIB_B N\n", argv[0]);
        return 2;
    }
    const int n = atoi(argv[3]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("started pid=%ld\n", (long) getpid());
    wait_byte();
    open_lib(argv[1]);
    printf("loaded a\n");
    wait_byte();
    void * b = open_lib(argv[2]);
    printf("loaded b\n");
    wait_byte();
    int32_t (*decode)(struct llama_context *, struct llama_batch) =
        (int32_t (*)(struct llama_context *, struct llama_batch)) dlsym(b, "llama_decode");
    if (decode == NULL) {
        fprintf(stderr, "dlsym llama_decode: %s\n", dlerror());
        return 4;
    }
    llama_token tok = 1;
    for (int i = 0; i < n; i++) {
        struct llama_batch batch = {0};
        batch.n_tokens = 1;
        batch.token = &tok;
        decode(NULL, batch);
    }
    printf("done decodes=%d\n", n);
    return 0;
}
