#!/usr/bin/env python3
"""Prefill tokens/s and peak RSS of llama.cpp (llama-cpp-python) on a GGUF, the
peer for `afprobe bench prefill --dtype quantized` (docs/performance.md).

    VENV/bin/python scripts/bench/llamacpp_prefill.py --model MODEL.gguf --lengths 256 --repeats 3 --threads 2

It takes the arguments of scripts/ref/bench_prefill.py and prints the same JSON
line last, so `afprobe bench prefill` runs it as its reference, one process per
length, side by side in one table:

    afprobe bench prefill --model MODEL.gguf --dtype quantized \
        --ref-python VENV/bin/python --ref-script scripts/bench/llamacpp_prefill.py --ref-model MODEL.gguf

Random token ids, the whole prompt in one batch, logits at the last position
only; one warm-up, then the median of --repeats timed evaluations.
"""
import argparse
import json
import resource
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", type=int, required=True, help="one length (a process per length)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    # `afprobe bench prefill` passes its own device and dtype to every reference:
    # llama.cpp runs here on the CPU, at the types the GGUF stores.
    ap.add_argument("--device", default="cpu", help="cpu only")
    ap.add_argument("--dtype", default="f32", help="ignored: the GGUF's own block types run")
    a = ap.parse_args()
    if a.device != "cpu":
        sys.exit(f"llamacpp_prefill.py: --device {a.device}: this peer runs on the CPU only")
    # Imported after parsing, so that --help needs only the standard library.
    import numpy as np
    from llama_cpp import Llama

    n = a.lengths
    llm = Llama(model_path=a.model, n_ctx=n + 8, n_batch=n, n_ubatch=n, n_threads=a.threads,
                n_threads_batch=a.threads, logits_all=False, verbose=False, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, llm.n_vocab() - 100, size=n).tolist()
    times = []
    for i in range(a.repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        if i > 0:
            times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = statistics.median(times)
    print(f"llama.cpp {n} tokens: {n / median:.1f} tok/s, peak RSS {rss_mb:.0f} MB")
    print(json.dumps({"lengths": {str(n): {"median_s": median, "tok_per_s_median": n / median}},
                      "peak_rss_mb": rss_mb, "threads": a.threads}))


if __name__ == "__main__":
    main()
