#!/usr/bin/env python3
"""A random-weight model of Llama-3.1-8B's shape, as an HF directory, generated on a device.

    python make_random_llama.py OUT_DIR --tokenizer-from HF_DIR [--layers 32] [--dtype bf16]
        [--device cuda]

The config is meta-llama/Llama-3.1-8B's (d_model 4096, d_mlp 14336, 32 heads, 8 KV heads,
vocab 128256, rope theta 500000 with llama3 scaling), with --layers blocks (32 is the real
depth; fewer make a smaller rehearsal). Weights are transformers' own initialisation
(normal, std 0.02), drawn on --device and saved as safetensors shards at --dtype. Prefill
speed does not depend on the weights' values. The tokenizer files are copied from
--tokenizer-from (any tokenizer with fewer ids than the vocabulary: benchmarks draw random ids).
"""
import argparse
import os
import shutil
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=a.layers,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlamaForCausalLM(config).to(dtype)
    os.makedirs(a.out_dir, exist_ok=True)
    model.save_pretrained(a.out_dir, safe_serialization=True, max_shard_size="4GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(a.tokenizer_from, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out_dir, name))
    n = sum(p.numel() for p in model.parameters())
    print(f"make_random_llama: {n / 1e9:.2f}B parameters, {a.layers} layers, {a.dtype}, "
          f"on {a.device}, in {time.time() - t0:.1f}s -> {a.out_dir}")


if __name__ == "__main__":
    main()
