#!/usr/bin/env python3
"""A Llama-shaped GGUF with random weights, quantized to Q4_K_M by llama.cpp,
for `--dtype quantized` memory and speed (docs/performance.md).

`--shape 1b`: Llama 3.2 1B's body (16 layers, d_model 2048, 32 query and 8
key/value heads of 64, MLP 8192, rope base 500000, tied embeddings) with
SmolLM2's vocabulary (49,152 tokens). `--shape 8b`: Llama 3.1 8B's (32 layers,
d_model 4096, 32 query and 8 key/value heads of 128, MLP 14336, an untied
output head, 128,256 tokens: SmolLM2's 49,152 followed by reserved control
tokens, so the embedding and head have 8B's size). The tokenizer metadata is
copied from the default model's GGUF so that afprobe and llama.cpp both load
the file with a real tokenizer. Weights are N(0, 0.02), norms 1, seeded; the
8B body repeats four distinct layers' weights (the f16 intermediate is written
from memory, 16 GB of it otherwise).

Needs `gguf` and numpy, and llama-cpp-python (built from source with the
CMAKE_ARGS in scripts/ref/ref_llamacpp.py) for llama.cpp's quantizer; from
the repository root:

    VENV/bin/python scripts/bench/make_llama_q4k.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR --shape 8b

Writes OUT_DIR/llama{1b,8b}-f16.gguf (2.3 or 16 GB, removed afterwards unless
--keep-f16) and OUT_DIR/llama{1b,8b}-q4_k_m.gguf (0.8 or 4.7 GB).
"""
import argparse
import ctypes
import os

import gguf
import numpy as np

# layers, d_model, query heads, key/value heads, head width, MLP width, vocabulary
# (None: the tokenizer's own), distinct layers, tied head.
SHAPES = {
    "1b": (16, 2048, 32, 8, 64, 8192, None, 16, True),
    "8b": (32, 4096, 32, 8, 128, 14336, 128256, 4, False),
}


# GGUFWriter's setter for each tokenizer key copied from the default model.
TOKENIZER_SETTERS = {
    "tokenizer.ggml.model": "add_tokenizer_model",
    "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list",
    "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.chat_template": "add_chat_template",
}


def copy_tokenizer(src, w, vocab):
    """Copies the tokenizer, padded with reserved control tokens to `vocab`
    entries when given; returns the vocabulary size."""
    r = gguf.GGUFReader(src)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    extra = (vocab or len(tokens)) - len(tokens)
    for key, setter in TOKENIZER_SETTERS.items():
        if key == "tokenizer.ggml.tokens":
            value = tokens + [f"<|reserved_special_token_{i}|>" for i in range(extra)]
        elif key == "tokenizer.ggml.token_type":
            value = types + [gguf.TokenType.CONTROL] * extra
        elif key in r.fields:
            value = r.fields[key].contents()
        else:
            continue
        getattr(w, setter)(value)
    return len(tokens) + extra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer_gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--keep-f16", action="store_true")
    a = ap.parse_args()
    LAYERS, D, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, DISTINCT, TIED = SHAPES[a.shape]
    os.makedirs(a.out_dir, exist_ok=True)
    f16 = os.path.join(a.out_dir, f"llama{a.shape}-f16.gguf")
    q4k = os.path.join(a.out_dir, f"llama{a.shape}-q4_k_m.gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(f16, "llama")
    w.add_name(f"random Llama-{a.shape.upper()}-shaped model")
    w.add_block_count(LAYERS)
    w.add_context_length(8192)
    w.add_embedding_length(D)
    w.add_feed_forward_length(MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = copy_tokenizer(a.tokenizer_gguf, w, VOCAB)

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", normal(vocab, D))
    if not TIED:
        w.add_tensor("output.weight", normal(vocab, D))
    w.add_tensor("output_norm.weight", np.ones(D, dtype=np.float32))
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, D),
        "attn_k": (KV_HEADS * HEAD_DIM, D),
        "attn_v": (KV_HEADS * HEAD_DIM, D),
        "attn_output": (D, HEADS * HEAD_DIM),
        "ffn_gate": (MLP, D),
        "ffn_up": (MLP, D),
        "ffn_down": (D, MLP),
    }
    # The writer keeps references, so repeated layers cost no memory.
    layers = [{k: normal(*s) for k, s in shapes.items()} for _ in range(DISTINCT)]
    for l in range(LAYERS):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(D, dtype=np.float32))
        for k, t in layers[l % DISTINCT].items():
            w.add_tensor(p + k + ".weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(f16.encode(), q4k.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")
    if not a.keep_f16:
        os.remove(f16)
    print(q4k, os.path.getsize(q4k), "bytes")


if __name__ == "__main__":
    main()
