/*
 * driver_classic.c: test driver for the CLASSIC fake libllama.so (OUTDIR/classic/, RUNPATH $ORIGIN).
 *
 * Usage: driver_classic MODEL_PATH        (MODEL_PATH must NOT contain "missing"; any string works,
 *                                          nothing is opened)
 *
 * Start: prints `ready pid=<pid>`, then waits: one byte from stdin if FAKE_WAIT_STDIN=1, else
 * sleeps 1.5 s (see driver_common.h). Then makes EXACTLY these calls, in this order, one stdout
 * line each (the line is printed after the call returned). Sleeps are the fake's own (the real
 * wall time is a bit longer). "runs" = consecutive tokens of one sequence in batch order:
 * (seq id, tokens, tokens with output/logits flag set).
 *
 *  #  call (printed name)              n_tok  batch content / runs                      ret      sleep
 *  1  llama_load_model_from_file       -      (MODEL_PATH, mparams)  DEPRECATED wrapper: nonnull  30 ms
 *        -> internally calls llama_model_load_from_file(MODEL_PATH) once (not printed):
 *           ONE successful model load in total
 *  2  llama_model_load_from_file       -      ("/nonexistent/missing.gguf")             null     5 ms
 *        -> ONE failed model load
 *  3  llama_new_context_with_model     -      DEPRECATED wrapper, cparams below          nonnull  10 ms
 *        -> internally calls llama_init_from_model once (not printed): ONE context
 *  4  llama_decode  D1  12  ids 100..111, pos 0..11, seq 0; logits only on the last
 *                           runs: (0,12,1)                                               0        2.4 ms
 *  5  llama_synchronize                                                                   void     2 ms
 *  6  llama_sampler_sample(smpl, ctx, -1)                                                 999      1 ms
 *  7  for k = 0..4 (5 generation steps), 3 lines each:
 *       llama_decode D2..D6  1   id (k==0 ? 999 : 1000), pos 12+k, seq 0, logits 1
 *                                runs: (0,1,1)                                            0        0.2 ms
 *       llama_synchronize                                                                 void     2 ms
 *       llama_sampler_sample(smpl, ctx, 0)                                                1000     1 ms
 *  8  llama_decode  D7  11  "mixed", 3 sequences, in this batch order:
 *                           [0]     id 1000,     seq 0, pos 17,   logits 1   (generated token FIRST)
 *                           [1..6]  ids 200..205, seq 1, pos 0..5, logits only on [6] (prompt end)
 *                           [7..10] ids 300..303, seq 4, pos 0..3, logits 0 (middle prompt chunk)
 *                           runs: (0,1,1) (1,6,1) (4,4,0); 2 outputs                     0        2.2 ms
 *  9  llama_decode  D8   7  llama_batch_get_one style: ids 400..406; embd, pos, n_seq_id,
 *                           seq_id, logits all NULL (=> no seq ids; llama.cpp would use
 *                           seq 0, pos 18..24, output on the last only)                  0        1.4 ms
 * 10  llama_decode  D9   1  get_one style: id 407, all pointers but token NULL            0        0.2 ms
 * 11  llama_decode  D10  1  id 9001, pos 26, seq 0, logits 1; runs (0,1,1)                1        0.2 ms
 * 12  llama_decode  D11  1  id 9002, pos 26, seq 0, logits 1; runs (0,1,1)                2        0.2 ms
 * 13  llama_decode  D12  1  id 9003, pos 26, seq 0, logits 1; runs (0,1,1)               -1        0.2 ms
 * 14  llama_decode  D13  1  id 9004, pos 26, seq 0, logits 1; runs (0,1,1)               -3        0.2 ms
 * 15  llama_decode  D14 200 ids 500..699, pos 0..199, seq 2; logits only on the last
 *                           runs: (2,200,1)   (larger than a 64-token scan window)       0        40 ms
 * 16  llama_decode  D15 20  token i (i = 0..19): id 700+i, seq i, pos 0, logits 1
 *                           runs: (0,1,1) (1,1,1) ... (19,1,1): 20 runs, 20 outputs      0        4 ms
 * 17  done decodes=15 samples=6
 *
 * Totals: llama_decode calls 15 (ok 11, failed 4: ret 1, 2, -1, -3); tokens decoded 260
 * (12 + 5 + 11 + 7 + 1 + 4 + 200 + 20); llama_synchronize 6; llama_sampler_sample 6;
 * model loads 2 (1 ok + 1 NULL), each counted ONCE although #1 enters two exported symbols;
 * contexts 1 (counted once although it enters two exported symbols).
 *
 * mparams (llama_model_params, 72 bytes, by value): n_gpu_layers 0, split_mode 1 (LAYER),
 *   main_gpu 0, use_mmap 1, all pointers NULL, other bools 0.
 * cparams (llama_context_params, 120 bytes, by value): n_ctx 4096 (+0), n_batch 512 (+4),
 *   n_ubatch 256 (+8), n_seq_max 4 (+12), n_threads 3 (+16), n_threads_batch 5 (+20),
 *   rope_scaling_type/pooling_type/attention_type -1, floats 0 except yarn_ext_factor -1,
 *   yarn_attn_factor 1, yarn_beta_fast 32, yarn_beta_slow 1, defrag_thold -1; type_k/type_v 1
 *   (F16); callbacks NULL; offload_kqv 1, no_perf 1, other bools 0.
 * Classic batches (not get_one) are built like common_batch_add: every token has n_seq_id 1 and
 * seq_id[i] points to one id; embd is NULL.
 * Exit 0 when every return value matched the table (else 3, with MISMATCH lines on stderr).
 */
#include "llama_fake.h"
#include "driver_common.h"

#define MAX_TOK 256

static struct {
    llama_batch b;
    llama_token tok[MAX_TOK];
    llama_pos pos[MAX_TOK];
    int32_t nseq[MAX_TOK];
    llama_seq_id sid[MAX_TOK];
    llama_seq_id * sidp[MAX_TOK];
    int8_t lg[MAX_TOK];
} cb;

static void cb_clear(void) {
    memset(&cb.b, 0, sizeof cb.b);
    cb.b.token = cb.tok;
    cb.b.embd = NULL;
    cb.b.pos = cb.pos;
    cb.b.n_seq_id = cb.nseq;
    cb.b.seq_id = cb.sidp;
    cb.b.logits = cb.lg;
}

static void cb_add(llama_token id, llama_pos pos, llama_seq_id seq, int out) {
    int i = cb.b.n_tokens++;
    cb.tok[i] = id;
    cb.pos[i] = pos;
    cb.nseq[i] = 1;
    cb.sid[i] = seq;
    cb.sidp[i] = &cb.sid[i];
    cb.lg[i] = (int8_t) (out != 0);
}

/* like llama_batch_get_one(tokens, n): only n_tokens and token set */
static llama_batch get_one(llama_token * tokens, int32_t n) {
    llama_batch b;
    memset(&b, 0, sizeof b);
    b.n_tokens = n;
    b.token = tokens;
    return b;
}

static void decode(struct llama_context * ctx, llama_batch b, int want) {
    int rc = llama_decode(ctx, b);
    driver_decode("llama_decode", rc, want, b.n_tokens);
}

static void sync_and_sample(struct llama_context * ctx, struct llama_sampler * smpl, int32_t idx,
                            llama_token * last) {
    llama_synchronize(ctx);
    driver_sync_done();
    llama_token t = llama_sampler_sample(smpl, ctx, idx);
    driver_sample(t, 1000 + idx);
    *last = t;
}

/*
 * `driver_classic MODEL_PATH retry`: after the same loads and context (#1-3), a prompt and then,
 * for each failure code rc in 1, 2, -1, -3 (i = 0..3), a generation step and a mixed step
 * that each fail once with rc (fake_fail_next_decode) and are retried with the same batch:
 *   P   12 prompt tokens, ids 100..111, seq 0, pos 0..11, output last     0, sample(-1) -> 999
 *   G_i id `last` (999, then 1000), seq 0, pos 12+2i, output                rc, then 0;
 *       sample(0) -> 1000
 *   M_i id 1000, seq 0, pos 13+2i, output; then 4 prompt tokens ids 200+10i.., seq 1+i,
 *       pos 0..3, output on the last                                         rc, then 0;
 *       sample(0) -> 1000, sample(4) -> 1004
 * Totals: 17 decodes (9 ok; 2 each of 1, 2, -1, -3), 13 samples, 6 synchronize (not called
 * here: 0); prompt tokens of successful steps 12 + 4*4 = 28; generated tokens fed back by
 * successful steps 4 + 4 = 8; steps by phase: prompt 1, generation 8, mixed 8.
 */
static int run_retries(struct llama_context * ctx, struct llama_sampler * smpl) {
    static const int rcs[4] = { 1, 2, -1, -3 };
    llama_token last = 0;
    cb_clear();
    for (int i = 0; i < 12; i++) {
        cb_add(100 + i, i, 0, i == 11);
    }
    decode(ctx, cb.b, 0);
    last = llama_sampler_sample(smpl, ctx, -1);
    driver_sample(last, 999);
    for (int i = 0; i < 4; i++) {
        for (int attempt = 0; attempt < 2; attempt++) {
            if (attempt == 0) {
                fake_fail_next_decode(rcs[i]);
            }
            cb_clear();
            cb_add(last, 12 + 2 * i, 0, 1);
            decode(ctx, cb.b, attempt == 0 ? rcs[i] : 0);
        }
        last = llama_sampler_sample(smpl, ctx, 0);
        driver_sample(last, 1000);
        for (int attempt = 0; attempt < 2; attempt++) {
            if (attempt == 0) {
                fake_fail_next_decode(rcs[i]);
            }
            cb_clear();
            cb_add(last, 13 + 2 * i, 0, 1);
            for (int k = 0; k < 4; k++) {
                cb_add(200 + 10 * i + k, k, 1 + i, k == 3);
            }
            decode(ctx, cb.b, attempt == 0 ? rcs[i] : 0);
        }
        last = llama_sampler_sample(smpl, ctx, 0);
        driver_sample(last, 1000);
        driver_sample(llama_sampler_sample(smpl, ctx, 4), 1004);
    }
    return driver_finish();
}

/*
 * `driver_classic MODEL_PATH two-contexts`: a program with two contexts on two models, as a
 * speculative decoder has (the second model is "/models/draft-model.gguf"; nothing is opened):
 *   load MODEL_PATH (A), load the draft (B), context a on A, context b on B (the cparams
 *   below), then
 *   a: 5 prompt tokens ids 100..104, seq 0, pos 0..4, output last; sample(a, -1) -> 999
 *   b: 3 prompt tokens ids 200..202, seq 0, pos 0..2, output last; sample(b, -1) -> 999
 *   a: 3 generation steps, id 999 then 1000 at pos 5..7; sample(a, 0) -> 1000 after each
 *   b: 2 generation steps, id 999 then 1000 at pos 3..4; sample(b, 0) -> 1000 after each
 * Totals: context a 4 decodes (prompt 5 tokens, 3 generated fed back), 4 samples; context b
 * 3 decodes of 5 tokens, 3 samples.
 */
static int run_two_contexts(const char * model_path, struct llama_model_params mp,
                            struct llama_context_params cp, struct llama_sampler * smpl) {
    struct llama_model * ma = llama_model_load_from_file(model_path, mp);
    driver_ptr("llama_model_load_from_file", ma, 1);
    struct llama_model * mb = llama_model_load_from_file("/models/draft-model.gguf", mp);
    driver_ptr("llama_model_load_from_file", mb, 1);
    struct llama_context * a = llama_init_from_model(ma, cp);
    driver_ptr("llama_init_from_model", a, 1);
    struct llama_context * b = llama_init_from_model(mb, cp);
    driver_ptr("llama_init_from_model", b, 1);
    struct { struct llama_context * ctx; int first_id, n_prompt, n_gen; llama_token last; } c[2] = {
        { a, 100, 5, 3, 0 },
        { b, 200, 3, 2, 0 },
    };
    for (int k = 0; k < 2; k++) {
        cb_clear();
        for (int i = 0; i < c[k].n_prompt; i++) {
            cb_add(c[k].first_id + i, i, 0, i == c[k].n_prompt - 1);
        }
        decode(c[k].ctx, cb.b, 0);
        c[k].last = llama_sampler_sample(smpl, c[k].ctx, -1);
        driver_sample(c[k].last, 999);
    }
    for (int k = 0; k < 2; k++) {
        for (int g = 0; g < c[k].n_gen; g++) {
            cb_clear();
            cb_add(c[k].last, c[k].n_prompt + g, 0, 1);
            decode(c[k].ctx, cb.b, 0);
            c[k].last = llama_sampler_sample(smpl, c[k].ctx, 0);
            driver_sample(c[k].last, 1000);
        }
    }
    return driver_finish();
}

/*
 * `driver_classic MODEL_PATH eval-loops`: the eval loops of programs on libllama (after the same
 * loads and context, #1-3; m = llama_get_memory(ctx)). A sample after every decode
 * (sample(-1) -> 999 after a prompt, sample(0) -> 1000 after a generation step); generation
 * steps feed the last sampled id back, one token, output on.
 *   W  warm-up: 2 tokens ids 1, 2, seq 0, pos 0..1, output last; llama_memory_clear(m, true);
 *      no sample
 *   A  a binding's loop that truncates at its end before every step:
 *      seq_rm(m, -1, n_past, -1) then decode, for: prompt 6 tokens ids 100..105 pos 0..5,
 *      4 generation steps pos 6..9 (n_past 0, 6, 7, 8, 9: nothing held is removed)
 *   B  a prefix cache: seq_rm(m, 0, 4, -1) (keeps pos 0..3), prompt 3 tokens ids 110..112
 *      pos 4..6, 2 generation steps pos 7..8
 *   C  no memory calls, two sequences interleaved: prompt seq 1 (4 tokens ids 120..123 pos
 *      0..3), prompt seq 2 (3 tokens ids 130..132 pos 0..2), then twice: a generation step on
 *      seq 1 (pos 4, 5), one on seq 2 (pos 3, 4); then a new prompt on seq 1 (3 tokens ids
 *      140..142 pos 6..8)
 * Requests: 1 warm-up (not a request), then
 *   R1 seq 0 prompt 6 cached 0 generated 5, 5 steps, closed by B's seq_rm (memory_reused)
 *   R2 seq 0 prompt 3 cached 4 generated 3, 3 steps (open at the end)
 *   R3 seq 1 prompt 4 cached 0 generated 3, 3 steps, closed by the new prompt (next_request)
 *   R4 seq 2 prompt 3 cached 0 generated 3, 3 steps (open at the end)
 *   R5 seq 1 prompt 3 cached 6 generated 1, 1 step (open at the end)
 * Totals: 16 decodes, 15 samples, 6 seq_rm, 1 clear.
 */
static int run_eval_loops(struct llama_context * ctx, struct llama_sampler * smpl) {
    llama_memory_t mem = llama_get_memory(ctx);
    printf("call llama_get_memory ret=%s\n", mem != NULL ? "nonnull" : "null");
    llama_token last = 0;
    /* W */
    cb_clear();
    cb_add(1, 0, 0, 0);
    cb_add(2, 1, 0, 1);
    decode(ctx, cb.b, 0);
    llama_memory_clear(mem, true);
    printf("call llama_memory_clear ret=void\n");
    /* A */
    int n_past = 0;
    for (int step = 0; step < 5; step++) {
        bool ok = llama_memory_seq_rm(mem, -1, n_past, -1);
        printf("call llama_memory_seq_rm ret=%d\n", ok ? 1 : 0);
        cb_clear();
        if (step == 0) {
            for (int i = 0; i < 6; i++) {
                cb_add(100 + i, i, 0, i == 5);
            }
        } else {
            cb_add(last, n_past, 0, 1);
        }
        decode(ctx, cb.b, 0);
        n_past += cb.b.n_tokens;
        last = llama_sampler_sample(smpl, ctx, -1 + (step > 0));
        driver_sample(last, step == 0 ? 999 : 1000);
    }
    /* B */
    bool ok = llama_memory_seq_rm(mem, 0, 4, -1);
    printf("call llama_memory_seq_rm ret=%d\n", ok ? 1 : 0);
    for (int step = 0; step < 3; step++) {
        cb_clear();
        if (step == 0) {
            for (int i = 0; i < 3; i++) {
                cb_add(110 + i, 4 + i, 0, i == 2);
            }
        } else {
            cb_add(last, 6 + step, 0, 1);
        }
        decode(ctx, cb.b, 0);
        last = llama_sampler_sample(smpl, ctx, -1 + (step > 0));
        driver_sample(last, step == 0 ? 999 : 1000);
    }
    /* C */
    struct { llama_seq_id seq; int first_id, n_prompt; llama_token last; } s[2] = {
        { 1, 120, 4, 0 },
        { 2, 130, 3, 0 },
    };
    for (int k = 0; k < 2; k++) {
        cb_clear();
        for (int i = 0; i < s[k].n_prompt; i++) {
            cb_add(s[k].first_id + i, i, s[k].seq, i == s[k].n_prompt - 1);
        }
        decode(ctx, cb.b, 0);
        s[k].last = llama_sampler_sample(smpl, ctx, -1);
        driver_sample(s[k].last, 999);
    }
    for (int g = 0; g < 2; g++) {
        for (int k = 0; k < 2; k++) {
            cb_clear();
            cb_add(s[k].last, s[k].n_prompt + g, s[k].seq, 1);
            decode(ctx, cb.b, 0);
            s[k].last = llama_sampler_sample(smpl, ctx, 0);
            driver_sample(s[k].last, 1000);
        }
    }
    cb_clear();
    for (int i = 0; i < 3; i++) {
        cb_add(140 + i, 6 + i, 1, i == 2);
    }
    decode(ctx, cb.b, 0);
    driver_sample(llama_sampler_sample(smpl, ctx, -1), 999);
    return driver_finish();
}

int main(int argc, char ** argv) {
    int retry = argc == 3 && strcmp(argv[2], "retry") == 0;
    int two = argc == 3 && strcmp(argv[2], "two-contexts") == 0;
    int loops = argc == 3 && strcmp(argv[2], "eval-loops") == 0;
    if (argc != 2 && !retry && !two && !loops) {
        fprintf(stderr, "usage: %s MODEL_PATH [retry | two-contexts | eval-loops]\n", argv[0]);
        return 2;
    }
    driver_wait_for_start();

    struct llama_model_params mp;
    memset(&mp, 0, sizeof mp);
    mp.n_gpu_layers = 0;
    mp.split_mode = LLAMA_SPLIT_MODE_LAYER;
    mp.use_mmap = true;

    struct llama_context_params cp;
    memset(&cp, 0, sizeof cp);
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

    static long sampler_storage0[4];
    if (two) {
        return run_two_contexts(argv[1], mp, cp, (struct llama_sampler *) (void *) sampler_storage0);
    }

    /* 1-3: model and context */
    struct llama_model * model = llama_load_model_from_file(argv[1], mp);
    driver_ptr("llama_load_model_from_file", model, 1);
    struct llama_model * missing = llama_model_load_from_file("/nonexistent/missing.gguf", mp);
    driver_ptr("llama_model_load_from_file", missing, 0);
    struct llama_context * ctx = llama_new_context_with_model(model, cp);
    driver_ptr("llama_new_context_with_model", ctx, 1);

    static long sampler_storage[4];
    struct llama_sampler * smpl = (struct llama_sampler *) (void *) sampler_storage;
    llama_token last = 0;
    if (retry) {
        return run_retries(ctx, smpl);
    }
    if (loops) {
        return run_eval_loops(ctx, smpl);
    }

    /* 4-6: prompt of 12 tokens, seq 0 */
    cb_clear();
    for (int i = 0; i < 12; i++) {
        cb_add(100 + i, i, 0, i == 11);
    }
    decode(ctx, cb.b, 0);
    sync_and_sample(ctx, smpl, -1, &last);

    /* 7: 5 generation steps */
    for (int k = 0; k < 5; k++) {
        cb_clear();
        cb_add(last, 12 + k, 0, 1);
        decode(ctx, cb.b, 0);
        sync_and_sample(ctx, smpl, 0, &last);
    }

    /* 8: mixed batch: generated token of seq 0 first, then prompt end of seq 1, then a middle
     * prompt chunk of seq 4 */
    cb_clear();
    cb_add(last, 17, 0, 1);
    for (int i = 0; i < 6; i++) {
        cb_add(200 + i, i, 1, i == 5);
    }
    for (int i = 0; i < 4; i++) {
        cb_add(300 + i, i, 4, 0);
    }
    decode(ctx, cb.b, 0);

    /* 9-10: llama_batch_get_one style batches */
    static llama_token one7[7] = { 400, 401, 402, 403, 404, 405, 406 };
    static llama_token one1[1] = { 407 };
    decode(ctx, get_one(one7, 7), 0);
    decode(ctx, get_one(one1, 1), 0);

    /* 11-14: failing decodes */
    static const int fail_ids[4] = { 9001, 9002, 9003, 9004 };
    static const int fail_rc[4] = { 1, 2, -1, -3 };
    for (int f = 0; f < 4; f++) {
        cb_clear();
        cb_add(fail_ids[f], 26, 0, 1);
        decode(ctx, cb.b, fail_rc[f]);
    }

    /* 15: large prompt, 200 tokens, seq 2 */
    cb_clear();
    for (int i = 0; i < 200; i++) {
        cb_add(500 + i, i, 2, i == 199);
    }
    decode(ctx, cb.b, 0);

    /* 16: 20 sequences of one prompt token each, all outputs */
    cb_clear();
    for (int s = 0; s < 20; s++) {
        cb_add(700 + s, 0, s, 1);
    }
    decode(ctx, cb.b, 0);

    return driver_finish();
}
