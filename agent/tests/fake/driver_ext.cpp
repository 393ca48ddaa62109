// driver_ext.cpp: test driver for the NEWEST-generation fake libllama.so (OUTDIR/ext/, RUNPATH
// $ORIGIN). Uses only the C API of llama_fake.h (llama_batch_ext is opaque here).
//
// Usage: driver_ext MODEL_PATH        (MODEL_PATH must NOT contain "missing"; nothing is opened)
//
// Start: prints `ready pid=<pid>`, then waits: one byte from stdin if FAKE_WAIT_STDIN=1, else
// sleeps 1.5 s (see driver_common.h). Then makes EXACTLY these calls, in this order, one stdout
// line each, printed after the call returned. Batches are built with llama_batch_ext_clear /
// _add_token / _set_pos / _set_output_logits (one llama_batch_ext from llama_batch_ext_init,
// reused; these helper calls print nothing). Every token has exactly one seq id and its pos set.
// "runs" = consecutive tokens of one sequence in batch order: (seq id, tokens, outputs).
// Each llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) enters llama_process AND
// llama_context::decode (nested): ONE decode. The compatibility llama_decode (#17) enters
// llama_decode AND llama_context::decode (nested): ONE decode.
//
//  #  call (printed name)              n_tok  batch content / runs                      ret      sleep
//  1  llama_load_model_from_file       -      (MODEL_PATH, mparams)  DEPRECATED wrapper: nonnull  30 ms
//        -> internally calls llama_model_load_from_file once: ONE successful model load
//  2  llama_model_load_from_file       -      ("/nonexistent/missing.gguf")             null     5 ms
//  3  llama_new_context_with_model     -      DEPRECATED wrapper, cparams below          nonnull  10 ms
//        -> internally calls llama_init_from_model once: ONE context
//  4  llama_process D1  12  ids 100..111, pos 0..11, seq 0; output only on the last
//                           runs: (0,12,1)                                               0        2.4 ms
//  5  llama_synchronize                                                                   void     2 ms
//  6  llama_sampler_sample(smpl, ctx, -1)                                                 999      1 ms
//  7  for k = 0..4 (5 generation steps), 3 lines each:
//       llama_process D2..D6 1   id (k==0 ? 999 : 1000), pos 12+k, seq 0, output
//                                runs: (0,1,1)                                            0        0.2 ms
//       llama_synchronize                                                                 void     2 ms
//       llama_sampler_sample(smpl, ctx, 0)                                                1000     1 ms
//  8  llama_process D7  11  "mixed", 3 sequences, in this batch order:
//                           [0]     id 1000,      seq 0, pos 17,   output     (generated FIRST)
//                           [1..6]  ids 200..205, seq 1, pos 0..5, output only on [6]
//                           [7..10] ids 300..303, seq 4, pos 0..3, no output (middle chunk)
//                           runs: (0,1,1) (1,6,1) (4,4,0); 2 outputs                     0        2.2 ms
//  9  llama_process D8   7  (replaces the classic get_one batch) ids 400..406, seq 0,
//                           pos 18..24, output only on the last; runs (0,7,1)            0        1.4 ms
// 10  llama_process D9   1  (replaces get_one) id 407, seq 0, pos 25, output; (0,1,1)    0        0.2 ms
// 11  llama_process D10  1  id 9001, pos 26, seq 0, output; runs (0,1,1)                  1        0.2 ms
// 12  llama_process D11  1  id 9002, pos 26, seq 0, output; runs (0,1,1)                  2        0.2 ms
// 13  llama_process D12  1  id 9003, pos 26, seq 0, output; runs (0,1,1)                 -1        0.2 ms
// 14  llama_process D13  1  id 9004, pos 26, seq 0, output; runs (0,1,1)                 -3        0.2 ms
// 15  llama_process D14 200 ids 500..699, pos 0..199, seq 2; output only on the last
//                           runs: (2,200,1)   (larger than a 64-token scan window)       0        40 ms
// 16  llama_process D15 20  token i (i = 0..19): id 700+i, seq i, pos 0, output
//                           runs: (0,1,1) (1,1,1) ... (19,1,1): 20 runs, 20 outputs      0        4 ms
// 17  llama_decode  D16  3  COMPATIBILITY wrapper, classic 56-byte llama_batch by value:
//                           ids 800..802, seq 3, pos 0..2, logits only on the last
//                           (n_seq_id 1 each, embd NULL); runs (3,3,1)                   0        0.6 ms
// 18  done decodes=16 samples=6
//
// Totals: decodes 16 (llama_context::decode entered 16 times: 15 via llama_process, 1 via
// llama_decode; ok 12, failed 4: ret 1, 2, -1, -3); tokens decoded 263
// (12 + 5 + 11 + 7 + 1 + 4 + 200 + 20 + 3); llama_synchronize 6; llama_sampler_sample 6;
// model loads 2 (1 ok + 1 NULL), each counted ONCE; contexts 1.
// mparams / cparams: identical to driver_classic.c (n_ctx 4096 @+0, n_batch 512 @+4,
// n_ubatch 256 @+8, n_seq_max 4 @+12, n_threads 3 @+16, n_threads_batch 5 @+20).
// Exit 0 when every return value matched the table (else 3 with MISMATCH lines on stderr;
// 4 if building a batch failed).
#include "llama_fake.h"
#include "driver_common.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

static struct llama_batch_ext * g_batch;

static void add(llama_token id, llama_pos pos, llama_seq_id seq, bool out) {
    const int32_t idx = llama_batch_ext_add_token(g_batch, seq, id);
    if (idx < 0 || !llama_batch_ext_set_pos(g_batch, idx, &pos) ||
        (out && !llama_batch_ext_set_output_logits(g_batch, idx, true))) {
        std::fprintf(stderr, "batch construction failed (id %d seq %d pos %d)\n", id, seq, pos);
        std::exit(4);
    }
}

static int g_n_tokens = 0;

static void begin() {
    llama_batch_ext_clear(g_batch);
    g_n_tokens = 0;
}

static void tok(llama_token id, llama_pos pos, llama_seq_id seq, bool out) {
    add(id, pos, seq, out);
    g_n_tokens++;
}

static void process(struct llama_context * ctx, int want) {
    const int rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, g_batch);
    driver_decode("llama_process", rc, want, g_n_tokens);
}

static void sync_and_sample(struct llama_context * ctx, struct llama_sampler * smpl, int32_t idx,
                            llama_token * last) {
    llama_synchronize(ctx);
    driver_sync_done();
    const llama_token t = llama_sampler_sample(smpl, ctx, idx);
    driver_sample(t, 1000 + idx);
    *last = t;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL_PATH\n", argv[0]);
        return 2;
    }
    driver_wait_for_start();

    llama_model_params mp;
    std::memset(&mp, 0, sizeof mp);
    mp.n_gpu_layers = 0;
    mp.split_mode = LLAMA_SPLIT_MODE_LAYER;
    mp.use_mmap = true;

    llama_context_params cp;
    std::memset(&cp, 0, sizeof cp);
    cp.n_ctx = 4096;
    cp.n_batch = 512;
    cp.n_ubatch = 256;
    cp.n_seq_max = 4;
    cp.n_threads = 3;
    cp.n_threads_batch = 5;
    cp.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED;
    cp.pooling_type = LLAMA_POOLING_TYPE_UNSPECIFIED;
    cp.attention_type = LLAMA_ATTENTION_TYPE_UNSPECIFIED;
    cp.yarn_ext_factor = -1.0f;
    cp.yarn_attn_factor = 1.0f;
    cp.yarn_beta_fast = 32.0f;
    cp.yarn_beta_slow = 1.0f;
    cp.defrag_thold = -1.0f;
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.offload_kqv = true;
    cp.no_perf = true;

    // 1-3: model and context
    llama_model * model = llama_load_model_from_file(argv[1], mp);
    driver_ptr("llama_load_model_from_file", model, 1);
    llama_model * missing = llama_model_load_from_file("/nonexistent/missing.gguf", mp);
    driver_ptr("llama_model_load_from_file", missing, 0);
    llama_context * ctx = llama_new_context_with_model(model, cp);
    driver_ptr("llama_new_context_with_model", ctx, 1);

    g_batch = llama_batch_ext_init(ctx);
    if (g_batch == nullptr) {
        std::fprintf(stderr, "llama_batch_ext_init failed\n");
        return 4;
    }
    static long sampler_storage[4];
    llama_sampler * smpl = (llama_sampler *) (void *) sampler_storage;
    llama_token last = 0;

    // 4-6: prompt of 12 tokens, seq 0
    begin();
    for (int i = 0; i < 12; i++) {
        tok(100 + i, i, 0, i == 11);
    }
    process(ctx, 0);
    sync_and_sample(ctx, smpl, -1, &last);

    // 7: 5 generation steps
    for (int k = 0; k < 5; k++) {
        begin();
        tok(last, 12 + k, 0, true);
        process(ctx, 0);
        sync_and_sample(ctx, smpl, 0, &last);
    }

    // 8: mixed batch
    begin();
    tok(last, 17, 0, true);
    for (int i = 0; i < 6; i++) {
        tok(200 + i, i, 1, i == 5);
    }
    for (int i = 0; i < 4; i++) {
        tok(300 + i, i, 4, false);
    }
    process(ctx, 0);

    // 9-10: what the classic driver sends as get_one batches, with explicit seq 0 and positions
    begin();
    for (int i = 0; i < 7; i++) {
        tok(400 + i, 18 + i, 0, i == 6);
    }
    process(ctx, 0);
    begin();
    tok(407, 25, 0, true);
    process(ctx, 0);

    // 11-14: failing decodes
    static const int fail_ids[4] = {9001, 9002, 9003, 9004};
    static const int fail_rc[4] = {1, 2, -1, -3};
    for (int f = 0; f < 4; f++) {
        begin();
        tok(fail_ids[f], 26, 0, true);
        process(ctx, fail_rc[f]);
    }

    // 15: large prompt, 200 tokens, seq 2
    begin();
    for (int i = 0; i < 200; i++) {
        tok(500 + i, i, 2, i == 199);
    }
    process(ctx, 0);

    // 16: 20 sequences of one prompt token each, all outputs
    begin();
    for (int s = 0; s < 20; s++) {
        tok(700 + s, 0, s, true);
    }
    process(ctx, 0);

    // 17: the compatibility llama_decode with a classic batch: 3 prompt tokens of seq 3
    {
        llama_token t[3] = {800, 801, 802};
        llama_pos p[3] = {0, 1, 2};
        int32_t ns[3] = {1, 1, 1};
        llama_seq_id sid[3] = {3, 3, 3};
        llama_seq_id * sp[3] = {&sid[0], &sid[1], &sid[2]};
        int8_t lg[3] = {0, 0, 1};
        llama_batch b;
        std::memset(&b, 0, sizeof b);
        b.n_tokens = 3;
        b.token = t;
        b.embd = nullptr;
        b.pos = p;
        b.n_seq_id = ns;
        b.seq_id = sp;
        b.logits = lg;
        const int rc = llama_decode(ctx, b);
        driver_decode("llama_decode", rc, 0, b.n_tokens);
    }

    llama_batch_ext_free(g_batch);
    return driver_finish();
}
