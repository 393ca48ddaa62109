// layout_ext.cpp: prints the compiler's layout of the newest-generation `llama_batch_ext` (from
// llama_ext.hpp, a field-for-field copy of the real llama.cpp definition) so that tests can check
// the profiler's layout table against g++/libstdc++. Built as OUTDIR/ext/layout_ext; needs no
// library. Prints ONE line of space-separated key=value pairs (all decimal byte counts), exits 0:
//
//   token_size=96 output=16 seq_ids=24 pos=80 tokens=64        <- first five keys, in this order
//   then: id has_embd embd_off (token member offsets), batch_size, n_tokens_max n_embd_inp
//   n_embd_inp_enc n_seq_max mem n_vocab n_pos_per_embd n_embd embd (batch member offsets),
//   vector_size vec_begin vec_end (std::vector<T>: start / finish pointer offsets),
//   uset_size uset_count uset_first (std::unordered_set<int>: element count offset and offset of
//   the "before begin" pointer to the first node), node_next node_value (hash node: next pointer
//   and the stored int32 seq id). The vector/unordered_set/node values are MEASURED on live
//   objects (libstdc++ internals are private); a value that could not be confirmed prints as -1.
#include "llama_ext.hpp"

#include <cstdio>
#include <cstring>

#pragma GCC diagnostic ignored "-Winvalid-offsetof"

using tok_t = llama_batch_ext::token;

static long word_at(const void * base, size_t off) {
    long v;
    std::memcpy(&v, (const char *) base + off, sizeof v);
    return v;
}

int main() {
    // std::vector<token>: [begin, end, end_of_storage]
    std::vector<tok_t> v(3);
    long vec_begin = -1, vec_end = -1;
    for (size_t off = 0; off + sizeof(long) <= sizeof v; off += sizeof(long)) {
        const long w = word_at(&v, off);
        if (w == (long) (const void *) v.data() && vec_begin < 0) {
            vec_begin = (long) off;
        } else if (w == (long) (const void *) (v.data() + v.size()) && vec_end < 0) {
            vec_end = (long) off;
        }
    }

    // std::unordered_set<llama_seq_id> holding 3 ids: find the element count and the pointer to
    // the first node; check that following node->next from there visits exactly the nodes of
    // the iteration order and ends in NULL. Only addresses known to be nodes are dereferenced:
    // node address = address of the element - node_value (tried for 4 and 8).
    std::unordered_set<llama_seq_id> s = {7, 11, 13};
    std::vector<const char *> elems;
    for (const llama_seq_id & e : s) {
        elems.push_back((const char *) &e);
    }
    long uset_count = -1, uset_first = -1, node_next = -1, node_value = -1;
    for (size_t off = 0; off + sizeof(long) <= sizeof s; off += sizeof(long)) {
        if (word_at(&s, off) == 3 && uset_count < 0) {
            uset_count = (long) off;
        }
    }
    for (size_t nv : {sizeof(void *), sizeof(int32_t)}) {
        for (size_t off = 0; off + sizeof(long) <= sizeof s && uset_first < 0; off += sizeof(long)) {
            if ((const char *) word_at(&s, off) != elems[0] - nv) {
                continue;
            }
            bool ok = true;
            for (size_t k = 0; k < elems.size() && ok; k++) {
                const char * next = (const char *) word_at(elems[k] - nv, 0);
                const char * want = k + 1 < elems.size() ? elems[k + 1] - nv : nullptr;
                ok = next == want;
            }
            if (ok) {
                uset_first = (long) off;
                node_next = 0;
                node_value = (long) nv;
            }
        }
        if (uset_first >= 0) {
            break;
        }
    }

    std::printf(
        "token_size=%zu output=%zu seq_ids=%zu pos=%zu tokens=%zu"
        " id=%zu has_embd=%zu embd_off=%zu"
        " batch_size=%zu n_tokens_max=%zu n_embd_inp=%zu n_embd_inp_enc=%zu n_seq_max=%zu mem=%zu"
        " n_vocab=%zu n_pos_per_embd=%zu n_embd=%zu embd=%zu"
        " vector_size=%zu vec_begin=%ld vec_end=%ld"
        " uset_size=%zu uset_count=%ld uset_first=%ld node_next=%ld node_value=%ld\n",
        sizeof(tok_t), offsetof(tok_t, output), offsetof(tok_t, seq_ids), offsetof(tok_t, pos),
        offsetof(llama_batch_ext, tokens),
        offsetof(tok_t, id), offsetof(tok_t, has_embd), offsetof(tok_t, embd_off),
        sizeof(llama_batch_ext), offsetof(llama_batch_ext, n_tokens_max),
        offsetof(llama_batch_ext, n_embd_inp), offsetof(llama_batch_ext, n_embd_inp_enc),
        offsetof(llama_batch_ext, n_seq_max), offsetof(llama_batch_ext, mem),
        offsetof(llama_batch_ext, n_vocab), offsetof(llama_batch_ext, n_pos_per_embd),
        offsetof(llama_batch_ext, n_embd), offsetof(llama_batch_ext, embd),
        sizeof(std::vector<tok_t>), vec_begin, vec_end,
        sizeof(std::unordered_set<llama_seq_id>), uset_count, uset_first, node_next, node_value);
    return 0;
}
