#!/usr/bin/env python3
"""Write a tiny random-weight llama GGUF (about 0.6 MB) with llama.cpp's ``gguf`` package.

2 layers, n_embd 64, a 512-token SPM vocabulary with byte fallback (any text
tokenizes), f32 weights drawn from a fixed seed: the same file every time.
Tests use it for fast decode checks; bench/decode.py uses it to make per-token
overhead visible.

Usage: python tools/tiny_model.py OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

N_VOCAB = 512
N_EMBD = 64
N_FF = 128
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_CTX_TRAIN = 4096


def _vocab():
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [a + b for a in "etaoinshr" for b in "etaoinshrdlu"]
    seen = set(tokens)
    for p in pieces:
        if len(tokens) == N_VOCAB:
            break
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(gguf.TokenType.NORMAL)
    i = 0
    while len(tokens) < N_VOCAB:  # pad with unused tokens
        tokens.append(f"<unused{i}>")
        types.append(gguf.TokenType.UNUSED)
        i += 1
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(N_VOCAB - 259)]
    return tokens, scores, types


def write_tiny_model(path: "str | Path", seed: int = 1234, n_embd: int = N_EMBD, n_ff: int = N_FF) -> Path:
    """*n_embd*, *n_ff*: other sizes (multiples of 256 for K-quant blocks, see tests)."""
    import gguf
    import numpy as np

    path = Path(path)
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> "np.ndarray":
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("mullama-tiny")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(n_embd // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    # GGUFWriter takes row-major NumPy shapes: the reverse of ggml's ne
    kv = n_embd // N_HEAD * N_HEAD_KV
    writer.add_tensor("token_embd.weight", w(N_VOCAB, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", w(N_VOCAB, n_embd))
    for i in range(N_LAYER):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(b + "attn_q.weight", w(n_embd, n_embd))
        writer.add_tensor(b + "attn_k.weight", w(kv, n_embd))
        writer.add_tensor(b + "attn_v.weight", w(kv, n_embd))
        writer.add_tensor(b + "attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(b + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(b + "ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(b + "ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(b + "ffn_down.weight", w(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_tiny_model(sys.argv[1]))
