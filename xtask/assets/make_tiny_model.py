#!/usr/bin/env python3
"""Write a tiny random-weight `llama` GGUF model for llamaprobe's tests.

The weights are random (fixed seed), so the text it generates is garbage, but the file is a real
GGUF model that llama.cpp (llama-server, llama-cli, llama-simple) loads and runs. It uses PyPI
`gguf`, llama.cpp's own writer, and numpy.

    make_tiny_model.py OUT.gguf                 # 2 layers, n_embd 64, 4 heads, 2 KV heads, ff 128
    make_tiny_model.py --large OUT.gguf         # 4 layers, n_embd 256, ff 512
    make_tiny_model.py --n-embd 128 ... OUT.gguf
"""

import argparse
import sys

import gguf
import numpy as np

# A few dozen common English words; each gets a "▁word" token (and the prefixes SPM needs to
# reach it by merging pairs).
WORDS = """
the of and to in is you that it he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look
two more write go see number no way could people my than first been call who its now find long down
day did get come made may part hello world llama probe token model server request
""".split()

SPACE = "\u2581"  # "▁", SentencePiece's word-boundary mark


def build_vocab():
    """Return (tokens, scores, token_types) of a small SentencePiece (SPM) vocabulary."""
    tokens, scores, types = [], [], []

    def add(text, score, ttype):
        tokens.append(text)
        scores.append(score)
        types.append(ttype)

    add("<unk>", 0.0, gguf.TokenType.UNKNOWN)
    add("<s>", 0.0, gguf.TokenType.CONTROL)
    add("</s>", 0.0, gguf.TokenType.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE)

    seen = set()
    pieces = [SPACE]
    # printable ASCII; the space character is spelled "▁" in SPM vocabularies
    pieces += [chr(c) for c in range(0x21, 0x7F)]
    for word in WORDS:
        full = SPACE + word
        # every prefix ("▁h", "▁he", ...) so that pairwise merging can build the whole word
        pieces += [full[:i] for i in range(2, len(full) + 1)]
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        # SPM merges the pair with the highest score first: prefer longer pieces
        add(piece, -1000.0 + 10.0 * len(piece) - 0.001 * len(tokens), gguf.TokenType.NORMAL)
    return tokens, scores, types


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="path of the .gguf file to write")
    ap.add_argument("--large", action="store_true", help="preset: 4 layers, n_embd 256, ff 512")
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--n-embd", type=int, default=None)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-ff", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="type of the 2-D weight tensors")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    n_layer = args.n_layer or (4 if args.large else 2)
    n_embd = args.n_embd or (256 if args.large else 64)
    n_ff = args.n_ff or (512 if args.large else 128)
    n_head, n_head_kv = args.n_head, args.n_head_kv
    if n_embd % n_head or n_head % n_head_kv:
        sys.exit("n_embd must be a multiple of n_head, and n_head a multiple of n_head_kv")
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    tokens, scores, types = build_vocab()
    n_vocab = len(tokens)

    rng = np.random.default_rng(args.seed)
    wtype = np.float16 if args.dtype == "f16" else np.float32

    def weight(rows, cols):
        # numpy shape (rows, cols) is GGUF/ggml shape [cols, rows]: rows = outputs, cols = inputs
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (1.0 / np.sqrt(cols))).astype(wtype)

    def norm(n):
        # norm weights stay f32 (as llama.cpp's converters write them)
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(args.output, "llama")
    w.add_name("llamaprobe-tiny-large" if args.large else "llamaprobe-tiny")
    w.add_context_length(args.n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.dtype == "f16" else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(n_embd))
        w.add_tensor(p + "attn_q.weight", weight(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", weight(n_embd_kv, n_embd))
        w.add_tensor(p + "attn_v.weight", weight(n_embd_kv, n_embd))
        w.add_tensor(p + "attn_output.weight", weight(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        w.add_tensor(p + "ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", weight(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm(n_embd))
    w.add_tensor("output.weight", weight(n_vocab, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(
        f"model: llama, {n_layer} layers, n_embd {n_embd}, {n_head}/{n_head_kv} heads, "
        f"ff {n_ff}, ctx {args.n_ctx}, vocab {n_vocab}, {args.dtype}"
    )


if __name__ == "__main__":
    main()
