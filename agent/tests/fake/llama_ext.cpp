// llama_ext.cpp: FAKE libllama.so of the NEWEST API generation (llama_process + llama_batch_ext).
// Built by build.sh, with llama_common.c (compiled as C by gcc), as OUTDIR/ext/libllama.so
// (g++ -std=c++17 -O1 -g0 -fPIC -shared, default visibility, links libstdc++ dynamically).
//
// Exported (.dynsym), real names and prototypes:
//   C++  int llama_context::decode(const llama_batch_ext &)   _ZN13llama_context6decodeERK15llama_batch_ext
//          - the batch arrives BY REFERENCE: a pointer in the 2nd argument register
//            (rsi on x86-64, x1 on aarch64); `this` in the 1st.
//          - sleeps batch.tokens.size() * 200 microseconds;
//          - returns, from tokens[0].id (0 if the batch is empty): 9001 -> 1, 9002 -> 2,
//            9003 -> -1, 9004 -> -3, anything else -> 0.
//   C    int32_t llama_process(ctx, enum llama_process_type type, llama_batch_ext * batch)
//          - DECODE (1): returns ctx->decode(*batch) (an out-of-line call through the PLT, so a
//            probe on llama_process AND one on llama_context::decode both fire: ONE decode);
//          - ENCODE (0) or anything else: returns -1 without calling decode (drivers never do).
//          - NULL ctx or batch: -1.
//   C    int32_t llama_decode(ctx, struct llama_batch batch)   compatibility wrapper
//          - converts the classic batch into a local llama_batch_ext (token ids; seq ids from
//            n_seq_id/seq_id, or seq 0 if NULL; pos from pos, or i if NULL; output from logits,
//            or only the last token if NULL) and returns ctx->decode(ext) (through the PLT):
//            a probe on llama_decode AND on llama_context::decode both fire: ONE decode.
//            Sleeps nothing of its own.
//   C    llama_batch_ext * llama_batch_ext_init(llama_context * ctx)
//          - new batch: n_tokens_max 4096, n_embd_inp 0, n_embd_inp_enc 0, n_seq_max 64,
//            mem NULL, n_vocab 32000, n_pos_per_embd 1 (ctx may be anything, even NULL).
//   C    void llama_batch_ext_free(llama_batch_ext *), void llama_batch_ext_clear(llama_batch_ext *)
//   C    int32_t llama_batch_ext_add_token(batch, llama_seq_id seq_id, llama_token id)
//          - appends a token (output false, pos {0,0,0,0}, seq_ids {seq_id}); returns its index,
//            or -1 if the batch is full, seq_id is outside [0, n_seq_max) or id outside
//            [0, n_vocab).
//   C    bool llama_batch_ext_set_output_logits(batch, int32_t idx, bool output)
//   C    bool llama_batch_ext_set_pos(batch, int32_t idx, const llama_pos * pos)
//          - copies n_pos_per_embd (= 1) positions; false if idx is out of range or pos NULL.
//   plus (llama_common.c) llama_model_load_from_file, llama_load_model_from_file,
//   llama_init_from_model, llama_new_context_with_model, llama_sampler_sample, llama_synchronize.
// The member functions of llama_batch_ext are exported too (as in a real build); they do not
// call any probed function.
#include "llama_ext.hpp"

#include <new>

// ---- llama_batch_ext members ----

llama_batch_ext::llama_batch_ext(size_t n_tokens_max, size_t n_embd_inp, size_t n_embd_inp_enc,
                                 llama_seq_id n_seq_max, llama_memory_i * mem, llama_token n_vocab,
                                 size_t n_pos_per_embd)
    : n_tokens_max(n_tokens_max),
      n_embd_inp(n_embd_inp),
      n_embd_inp_enc(n_embd_inp_enc),
      n_seq_max(n_seq_max),
      mem(mem),
      n_vocab(n_vocab),
      n_pos_per_embd(n_pos_per_embd) {
    tokens.reserve(n_tokens_max);
}

void llama_batch_ext::clear() {
    n_embd = 0;
    tokens.clear();
    embd.clear();
}

int32_t llama_batch_ext::add_token(llama_seq_id seq_id) {
    if (tokens.size() >= n_tokens_max || seq_id < 0 || seq_id >= n_seq_max) {
        return -1;
    }
    tokens.emplace_back();
    tokens.back().seq_ids.insert(seq_id);
    return (int32_t) (tokens.size() - 1);
}

bool llama_batch_ext::set_token_id(int32_t idx, llama_token id) {
    if (idx < 0 || (size_t) idx >= tokens.size() || id < 0 || id >= n_vocab) {
        return false;
    }
    tokens[idx].id = id;
    return true;
}

bool llama_batch_ext::set_token_pos(int32_t idx, const llama_pos * pos_in) {
    if (idx < 0 || (size_t) idx >= tokens.size() || pos_in == nullptr) {
        return false;
    }
    for (size_t k = 0; k < n_pos_per_embd && k < GGML_MROPE_SECTIONS; k++) {
        tokens[idx].pos[k] = pos_in[k];
    }
    return true;
}

bool llama_batch_ext::set_output(int32_t idx, bool output) {
    if (idx < 0 || (size_t) idx >= tokens.size()) {
        return false;
    }
    tokens[idx].output = output;
    return true;
}

// ---- the probed method ----

FAKE_API int llama_context::decode(const llama_batch_ext & batch) {
    const size_t n = batch.tokens.size();
    const int rc = fake_decode_rc(n > 0, n > 0 ? batch.tokens[0].id : 0);
    fake_sleep_us((long) n * 200L);
    return rc;
}

// ---- C API ----

extern "C" {

FAKE_API llama_batch_ext * llama_batch_ext_init(llama_context * ctx) {
    (void) ctx;
    return new (std::nothrow) llama_batch_ext(4096, 0, 0, 64, nullptr, 32000, 1);
}

FAKE_API void llama_batch_ext_free(llama_batch_ext * batch) {
    delete batch;
}

FAKE_API void llama_batch_ext_clear(llama_batch_ext * batch) {
    if (batch != nullptr) {
        batch->clear();
    }
}

FAKE_API int32_t llama_batch_ext_add_token(llama_batch_ext * batch, llama_seq_id seq_id, llama_token id) {
    if (batch == nullptr || id < 0 || id >= batch->n_vocab) {
        return -1;
    }
    const int32_t idx = batch->add_token(seq_id);
    if (idx < 0) {
        return -1;
    }
    batch->set_token_id(idx, id);
    return idx;
}

FAKE_API bool llama_batch_ext_set_output_logits(llama_batch_ext * batch, int32_t idx, bool output) {
    return batch != nullptr && batch->set_output(idx, output);
}

FAKE_API bool llama_batch_ext_set_pos(llama_batch_ext * batch, int32_t idx, const llama_pos * pos) {
    return batch != nullptr && batch->set_token_pos(idx, pos);
}

FAKE_API int32_t llama_process(llama_context * ctx, enum llama_process_type type, llama_batch_ext * batch) {
    if (ctx == nullptr || batch == nullptr || type != LLAMA_PROCESS_TYPE_DECODE) {
        return -1;
    }
    const int rc = ctx->decode(*batch);
    __asm__ __volatile__("" ::: "memory"); // keep it a call, not a tail jump
    return rc;
}

FAKE_API int32_t llama_decode(llama_context * ctx, struct llama_batch batch) {
    if (ctx == nullptr || batch.n_tokens < 0) {
        return -1;
    }
    llama_batch_ext ext((size_t) batch.n_tokens, 0, 0, 64, nullptr, 32000, 1);
    for (int32_t i = 0; i < batch.n_tokens; i++) {
        ext.tokens.emplace_back();
        llama_batch_ext::token & t = ext.tokens.back();
        t.id = batch.token != nullptr ? batch.token[i] : LLAMA_TOKEN_NULL;
        if (batch.seq_id != nullptr && batch.n_seq_id != nullptr) {
            for (int32_t s = 0; s < batch.n_seq_id[i]; s++) {
                t.seq_ids.insert(batch.seq_id[i][s]);
            }
        } else {
            t.seq_ids.insert(0);
        }
        t.pos[0] = batch.pos != nullptr ? batch.pos[i] : i;
        t.output = batch.logits != nullptr ? batch.logits[i] != 0 : i == batch.n_tokens - 1;
    }
    const int rc = ctx->decode(ext);
    __asm__ __volatile__("" ::: "memory");
    return rc;
}

} // extern "C"
