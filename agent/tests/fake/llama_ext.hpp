// llama_ext.hpp: the C++ types of the NEWEST llama.cpp API generation, as used by the fake
// ext/libllama.so (llama_ext.cpp) and by layout_ext.cpp. C++17 only.
//
// `struct llama_batch_ext` is copied field for field from the real llama.cpp `src/llama-batch.h`
// (the generation with llama_process / llama_batch_ext, 2026): same members, same order, same
// types, same default initialisers, GGML_MROPE_SECTIONS = 4. Only non-virtual member functions
// are declared in addition (they do not change the layout). With libstdc++ on LP64:
//   sizeof(llama_batch_ext) = 112, tokens at +64, embd at +88
//   sizeof(llama_batch_ext::token) = 96: id +0, has_embd +4, embd_off +8, output +16,
//   seq_ids +24 (std::unordered_set<int>, 56 bytes), pos +80 (4 x int32)
// layout_ext prints the compiler's values.
//
// `struct llama_context` is a stand-in with the real name, so that the method
// `int llama_context::decode(const llama_batch_ext &)` has the real mangled name
// _ZN13llama_context6decodeERK15llama_batch_ext.
#pragma once

#include "llama_fake.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <unordered_set>
#include <vector>

#define GGML_MROPE_SECTIONS 4

struct llama_memory_i; // opaque

struct llama_batch_ext {
    const size_t n_tokens_max;     // max number of tokens that can be stored in the batch
    const size_t n_embd_inp;       // decoder embd row width
    const size_t n_embd_inp_enc;   // encoder embd row width
    const llama_seq_id n_seq_max;  // max number of sequences
    llama_memory_i * mem;          // memory for position inference
    const llama_token n_vocab;     // max token ID that we accept
    const size_t n_pos_per_embd;

    // actual embd row width of this batch, set by the first set_token_embd()
    size_t n_embd = 0;

    struct token {
        llama_token  id = LLAMA_TOKEN_NULL;
        bool         has_embd = false; // whether embd_off is set
        size_t       embd_off = 0;     // index offset in the embd array
        bool         output = false;
        std::unordered_set<llama_seq_id> seq_ids;
        std::array<llama_pos, GGML_MROPE_SECTIONS> pos = {0, 0, 0, 0};
    };
    std::vector<token> tokens;
    std::vector<float> embd;

    // build without a llama_context (same parameter list as the real test constructor)
    llama_batch_ext(
            size_t n_tokens_max,
            size_t n_embd_inp,
            size_t n_embd_inp_enc,
            llama_seq_id n_seq_max,
            llama_memory_i * mem,
            llama_token n_vocab,
            size_t n_pos_per_embd);

    void clear();

    // add an entry; returns its index or -1
    int32_t add_token(llama_seq_id seq_id);

    bool set_token_id(int32_t idx, llama_token id);
    bool set_token_pos(int32_t idx, const llama_pos * pos_in);
    bool set_output(int32_t idx, bool output);
};

struct llama_context {
    int decode(const llama_batch_ext & batch);
    int dummy;
};
