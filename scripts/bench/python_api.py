#!/usr/bin/env python3
"""The Python API's speed beside the CLI and TransformerLens, in one run on one machine.

    python scripts/bench/python_api.py [--model smollm2-135m] [--length 1024] [--repeats 7]
        [--threads 2] [--afprobe-bin target/release/afprobe]
        [--tl-python PY --tl-model HF_DIR [--tl-backend tl_bridge|tl_hooked]]

Run it with the Python that has the afprobe package (`pip install ./python`). It measures:

1. a fresh interpreter's `import afprobe`, model load and first forward (whole process, and
   the parts), beside a bare `python -c pass`;
2. `run_with_cache` on a LENGTH-token prompt capturing every `hook_resid_post` at the last
   token, beside `afprobe bench prefill` (the CLI's timing of the same work, random tokens),
   alternating twice;
3. `run_with_cache` capturing every `hook_resid_pre` and `hook_resid_post` at every position
   with logits at every position, beside TransformerLens's `run_with_cache` with the same names
   filter (scripts/ref/bench_prefill.py --cache resid, float32, same thread count; needs
   TransformerLens in --tl-python and the model as an HF directory, made with
   scripts/ref/gguf_to_hf.py).

Times are medians of --repeats runs after a warm-up; the prompt is real text cut to LENGTH
tokens (prefill speed does not depend on content). Prints a markdown table.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    "Linear probes read a model's residual stream one layer at a time; activation patching "
    "asks which of those activations the model actually uses when it decides to comply. "
)


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fresh_start(model):
    """Whole-process seconds of a fresh interpreter that imports, loads and runs once."""
    code = (
        "import time; t0 = time.perf_counter(); import afprobe; t1 = time.perf_counter(); "
        f"m = afprobe.Model({model!r}); t2 = time.perf_counter(); "
        "m.run_with_cache('Hello', names_filter=[]); t3 = time.perf_counter(); "
        "print(t1 - t0, t2 - t1, t3 - t2)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    whole = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - started
    parts = [float(x) for x in out.stdout.split()]
    return whole, bare, parts


def cli_prefill(afprobe_bin, model, length, repeats, threads):
    """The CLI's median seconds for the prefill with resid_post at the last token."""
    out = subprocess.run(
        [afprobe_bin, "bench", "prefill", "--model", model, "--lengths", str(length),
         "--repeats", str(repeats), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    ).stdout
    row = next(line for line in out.splitlines() if re.match(rf"\s*{length}\s", line))
    return length / float(row.split()[1])


def tl_run_with_cache(python, hf_model, backend, length, repeats, threads):
    out = subprocess.run(
        [python, str(REPO / "scripts/ref/bench_prefill.py"), "--model", hf_model, "--backend", backend,
         "--lengths", str(length), "--repeats", str(repeats), "--threads", str(threads), "--cache", "resid"],
        capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["lengths"][str(length)]["median_s"], result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--afprobe-bin", default=str(REPO / "target/release/afprobe"))
    ap.add_argument("--tl-python")
    ap.add_argument("--tl-model")
    ap.add_argument("--tl-backend", default="tl_bridge", choices=["tl_bridge", "tl_hooked"])
    a = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    # numpy's OpenBLAS starts a thread per core at import; idle, they still take scheduler
    # slots from afprobe's two on a 2-core machine, and the CLI has none.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    import afprobe

    whole, bare, (imported, loaded, first) = fresh_start(a.model)
    model = afprobe.Model(a.model)
    ids = model.to_tokens(TEXT * (a.length // 20 + 1), chat=False)[: a.length]
    assert len(ids) == a.length, "the text is long enough"
    n = model.cfg.n_layers
    post = [f"blocks.{l}.hook_resid_post" for l in range(n)]
    both = [f"blocks.{l}.hook_{k}" for l in range(n) for k in ("resid_pre", "resid_post")]
    # The CLI and the API alternate twice, so a drift in the shared machine's speed (±15 % within
    # minutes here) falls on both; each side's figure is the mean of its two medians.
    py_runs, cli_runs = [], []
    for _ in range(2):
        cli_runs.append(cli_prefill(a.afprobe_bin, a.model, a.length, a.repeats, a.threads))
        py_runs.append(median_time(lambda: model.run_with_cache(ids, names_filter=post, positions="last"), a.repeats))
    py_last, cli_last = statistics.mean(py_runs), statistics.mean(cli_runs)
    py_all = median_time(lambda: model.run_with_cache(ids, names_filter=both), a.repeats)

    rows = [
        ("fresh interpreter: import + load + first forward (whole process)", f"{whole:.2f} s "
         f"(import {imported:.2f}, load {loaded:.2f}, forward {first:.2f}; bare python {bare:.2f})", "", ""),
        (f"{a.length} tokens, every resid_post at the last token",
         f"{py_last:.3f} s ({a.length / py_last:.0f} tok/s)",
         f"CLI `bench prefill`: {cli_last:.3f} s ({a.length / cli_last:.0f} tok/s)",
         f"{py_last / cli_last:.3f}x the CLI's time"),
    ]
    if a.tl_python and a.tl_model:
        tl_s, tl = tl_run_with_cache(a.tl_python, a.tl_model, a.tl_backend, a.length, a.repeats, a.threads)
        rows.append((
            f"{a.length} tokens, every resid_pre + resid_post at every position, all logits",
            f"{py_all:.3f} s ({a.length / py_all:.0f} tok/s)",
            f"TransformerLens {a.tl_backend} (torch {tl['torch']}, {tl['attn']}): {tl_s:.3f} s ({a.length / tl_s:.0f} tok/s)",
            f"{tl_s / py_all:.2f}x faster",
        ))
    else:
        rows.append((f"{a.length} tokens, every resid_pre + resid_post at every position, all logits",
                     f"{py_all:.3f} s ({a.length / py_all:.0f} tok/s)", "(no --tl-python)", ""))
    print(f"model {a.model}, {a.threads} threads, median of {a.repeats} after a warm-up\n")
    print("| work | afprobe Python | peer, same machine, same run | ratio |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
