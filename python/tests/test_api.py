"""The Python API against the CLI: the same prompt through `afprobe capture`, `steer`, `generate`
and `capture --score` must give what `Model` gives, and stores must read back as written."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

import afprobe
from conftest import head_rows, read_rows

HOOKS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")


def rows_of_requests(src, dst, n_requests):
    """The free and paid rows of the first n requests of a prompt file."""
    rows = read_rows(src)
    keep = sorted({r["request_id"] for r in rows}, key=[r["request_id"] for r in rows].index)[:n_requests]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows if r["request_id"] in keep))
    return dst


def p_accept(logprob):
    return 1.0 / (1.0 + math.exp(-(logprob["accept"] - logprob["reject"])))


def test_cfg_matches_what_the_model_computes(model):
    logits, cache = model.run_with_cache("Hi", names_filter=["blocks.0.hook_resid_post"])
    assert logits.shape[1] == model.cfg.d_vocab
    assert cache["blocks.0.hook_resid_post"].shape[1] == model.cfg.d_model
    assert len(model.hook_names) == 2 + 5 * model.cfg.n_layers
    assert model.cfg.family == "llama" and model.cfg.dtype == "f32"


def test_run_with_cache_equals_the_cli_capture_bit_for_bit(model, cli, study_prompts, tmp_path):
    prompts = head_rows(study_prompts, tmp_path / "one.jsonl", 1)
    row = read_rows(prompts)[0]
    out = tmp_path / "store"
    cli("capture", "--prompts", prompts, "--hooks", "resid_post,attn_out,mlp_out", "--positions", "all,last", "--out", out)
    stored = load_file(out / "shard-00000.safetensors")

    tokens = model.to_tokens(row)
    np.testing.assert_array_equal(tokens, stored["tokens"])
    logits, cache = model.run_with_cache(row, names_filter=lambda n: n.endswith(HOOKS))
    assert logits.shape == (len(tokens), model.cfg.d_vocab)
    assert len(cache) == 3 * model.cfg.n_layers
    for name, acts in cache.items():
        assert acts.dtype == np.float32
        assert np.array_equal(acts, stored[f"{name}@all"]), name

    last_logits, last = model.run_with_cache(row, names_filter=lambda n: n.endswith(HOOKS), positions="last")
    # The unembedding of one row and of all rows group the GEMM differently: equal to rounding.
    np.testing.assert_allclose(last_logits, logits[-1], rtol=1e-5, atol=1e-4)
    for name, acts in last.items():
        assert np.array_equal(acts, stored[f"{name}@last"]), name
    # Explicit (and negative) positions pick the same rows.
    _, picked = model.run_with_cache(row, names_filter="blocks.7.hook_resid_post", positions=[0, -1])
    np.testing.assert_array_equal(picked["resid_post", 7], cache["blocks.7.hook_resid_post"][[0, -1]])


def test_attention_patterns_come_in_transformerlens_order(model):
    tokens = model.to_tokens("Which way is north?")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.2.attn."))
    pattern = cache["pattern", 2]
    n = len(tokens)
    assert pattern.shape == (model.cfg.n_heads, n, n)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(pattern, k=1) == 0), "causal: no weight on later keys"
    assert cache["q", 2].shape == (n, model.cfg.n_heads, model.cfg.d_head)
    assert cache["k", 2].shape == (n, model.cfg.n_key_value_heads, model.cfg.d_head)


def test_hooks_that_change_nothing_leave_the_logits_bit_for_bit(model):
    prompt = "Name a prime number."
    plain = model.run_with_hooks(prompt)
    point = "blocks.4.hook_resid_post"
    seen = []

    def record(act, name):
        seen.append((name, act.shape))

    def copy(act, name):
        return act.copy()

    for hook in (record, copy):
        np.testing.assert_array_equal(model.run_with_hooks(prompt, fwd_hooks=[(point, hook)]), plain)
    assert seen == [(point, (len(model.to_tokens(prompt)), model.cfg.d_model))]

    v = np.random.default_rng(0).standard_normal(model.cfg.d_model).astype(np.float32)

    def add_in_place(act, name):
        act += v

    def add_returned(act, name):
        return act + v

    a = model.run_with_hooks(prompt, fwd_hooks=[(point, add_in_place)])
    b = model.run_with_hooks(prompt, fwd_hooks=[(point, add_returned)])
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain, atol=1e-3), "steering moved the logits"


def test_the_portable_engine_gives_the_same_cache(model):
    portable = afprobe.Model("smollm2-135m", engine="portable")
    assert portable.cfg.engine == "portable" and model.cfg.engine == "fused"
    prompt = "Which tier is trained on?"
    want_logits, want = model.run_with_cache(prompt, names_filter=lambda n: n.endswith("resid_post"))
    got_logits, got = portable.run_with_cache(prompt, names_filter=lambda n: n.endswith("resid_post"))
    rel = lambda a, b: np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))
    assert rel(got_logits, want_logits) < 1e-5
    for name in want:
        assert rel(got[name], want[name]) < 1e-5, name


def test_a_model_passed_to_a_command_keeps_its_settings():
    portable = afprobe.Model("smollm2-135m", engine="portable", dtype="f32")
    argv = afprobe._argv(["capture"], afprobe._model_options({"model": portable}, "weights_dtype"))
    assert f"--model={portable.cfg.path}" in argv
    assert "--engine=portable" in argv and "--weights-dtype=f32" in argv
    assert not any(a.startswith("--adapter") for a in argv)


def test_a_steering_hook_equals_the_cli_steer_cell(model, cli, study_prompts, tmp_path):
    prompts = head_rows(study_prompts, tmp_path / "one.jsonl", 1)
    row = read_rows(prompts)[0]
    d = np.random.default_rng(1).standard_normal(model.cfg.d_model).astype(np.float32)
    (tmp_path / "v.json").write_text(json.dumps(d.tolist()))
    out = tmp_path / "steer"
    alpha, layer = 3.0, 6
    cli("steer", "--prompts", prompts, "--direction", tmp_path / "v.json", "--layers", layer, "--alphas", alpha,
        "--scale", "norm", "--norm-rows", 1, "--random", 0, "--positions", "all", "--out", out)
    report = json.loads((out / "steer.json").read_text())
    point = f"blocks.{layer}.hook_resid_post"
    cell = next(c for c in report["cells"] if c["kind"] == "direction" and c["alpha"] == alpha)
    vector = (alpha * report["norms"][point] * d / np.linalg.norm(d.astype(np.float64))).astype(np.float32)

    def steer(act, name):
        act += vector

    steered = model.score(row, row["continuations"], fwd_hooks=[(point, steer)])
    plain = model.score(row, row["continuations"])
    cli_row = read_rows(out / "rows.jsonl")[0]
    assert abs(p_accept(plain) - cli_row["p_accept"]) < 1e-6
    assert abs(p_accept(steered) - cell["p_accept"]) < 1e-5
    assert abs(p_accept(steered) - p_accept(plain)) > 1e-3, "the steering vector moved p_accept"


def test_score_equals_capture_score(model, cli, study_prompts, tmp_path):
    prompts = rows_of_requests(study_prompts, tmp_path / "four.jsonl", 2)
    rows = read_rows(prompts)
    assert len(rows) == 4
    one = tmp_path / "one"
    cli("capture", "--prompts", prompts, "--hooks", "resid_post", "--layers", "0", "--positions", "last",
        "--score", "--batch-rows", 1, "--out", one)
    for row, stored in zip(rows, read_rows(one / "rows.jsonl")):
        assert model.score(row, row["continuations"]) == stored["logprob"], row["id"]

    batched = tmp_path / "batched"
    cli("capture", "--prompts", prompts, "--hooks", "resid_post", "--layers", "0", "--positions", "last",
        "--score", "--out", batched)
    scores = model.score(rows, rows[0]["continuations"])
    assert len(scores) == 4
    for score, stored in zip(scores, read_rows(batched / "rows.jsonl")):
        for name, lp in stored["logprob"].items():
            assert abs(score[name] - lp) < 1e-4, (name, score[name], lp)


def test_a_store_reads_back_as_the_cli_wrote_it(cli, study_prompts, tmp_path):
    prompts = rows_of_requests(study_prompts, tmp_path / "six.jsonl", 3)
    for dtype, expect in (("f32", np.float32), ("f16", np.float16)):
        out = tmp_path / dtype
        cli("capture", "--prompts", prompts, "--hooks", "resid_post", "--layers", "0-3", "--positions", "last,cue",
            "--shard-rows", 4, "--dtype", dtype, "--score", "--out", out)
        store = afprobe.open_store(out)
        assert store.rows == read_rows(out / "rows.jsonl")
        assert store.manifest == json.loads((out / "manifest.json").read_text())
        shards = sorted(out.glob("shard-*.safetensors"))
        assert len(shards) == 2
        loaded = [load_file(s) for s in shards]
        assert sorted(store.names) == sorted(n for n in loaded[0] if "@" in n)
        for name in store.names:
            t = store.tensor(name)
            assert t.dtype == expect and t.shape == (6, 576)
            np.testing.assert_array_equal(t, np.concatenate([s[name] for s in loaded]))
        frame = store.to_pandas()
        assert list(frame["id"]) == [r["id"] for r in store.rows]
    single = tmp_path / "single"
    cli("capture", "--prompts", prompts, "--hooks", "resid_post", "--layers", "0", "--positions", "last", "--out", single)
    t = afprobe.open_store(single).tensor("blocks.0.hook_resid_post@last")
    assert isinstance(t, np.memmap) and not t.flags.writeable, "one shard is memory-mapped read-only"


def test_generate_equals_the_cli(model, cli):
    prompt = "What is the capital of France?"
    assert model.generate(prompt, max_new_tokens=16) == cli("generate", "--max-new-tokens", 16, prompt).strip()
    sampled = model.generate(prompt, max_new_tokens=12, temperature=0.9, seed=3)
    assert sampled == model.generate(prompt, max_new_tokens=12, temperature=0.9, seed=3)
    assert sampled == cli("generate", "--max-new-tokens", 12, "--temperature", 0.9, "--seed", 3, prompt).strip()


def test_the_commands_as_functions_write_what_the_cli_writes(cli, study_prompts, tmp_path):
    made = afprobe.prompts(tmp_path / "p.jsonl", cues="xml", requests="builtin-harmful")
    assert made["rows"] == len(read_rows(tmp_path / "p.jsonl")) > 0
    prompts = rows_of_requests(tmp_path / "p.jsonl", tmp_path / "small.jsonl", 8)
    manifest = afprobe.capture(prompts, tmp_path / "acts", hooks="resid_post", layers="0-29", positions="last", score=True)
    assert manifest["row_count"] == 16 and manifest["complete"]

    report = afprobe.gap(tmp_path / "acts", resamples=200)
    twin = tmp_path / "acts-cli"
    twin.mkdir()
    for f in ("manifest.json", "rows.jsonl", "shard-00000.safetensors"):
        (twin / f).write_bytes((tmp_path / "acts" / f).read_bytes())
    cli("gap", twin, "--resamples", 200)
    assert report == json.loads((twin / "gap.json").read_text())

    probes = afprobe.probe(tmp_path / "acts", tmp_path / "probes", label="tier", folds=4, group="request_id", shuffles=2)
    assert probes == json.loads((tmp_path / "probes" / "report.json").read_text())
    assert len(probes["metrics"]) > 0
    figures = afprobe.plot(tmp_path / "probes", tmp_path / "figures")
    assert any(f.endswith(".png") for f in figures["files"])


def test_bad_input_raises_a_clear_exception(model, study_prompts, tmp_path):
    cases = [
        (lambda: model.run_with_cache("x", names_filter=["blocks.1.hook_resid_psot"]), "valid names"),
        (lambda: model.run_with_cache("x", names_filter=["blocks.99.hook_resid_post"]), "has 30 layers"),
        (lambda: model.run_with_cache("x", positions=[10_000]), "out of range"),
        (lambda: model.run_with_cache("x", positions="first"), "'last'"),
        (lambda: model.run_with_cache(np.array([], dtype=np.int64)), "no tokens"),
        (lambda: model.run_with_cache(np.array([10**9])), "token ids must lie"),
        (lambda: model.to_tokens(3.5), "a prompt is text"),
        (lambda: model.to_tokens([{"content": "no role"}]), "'role' and 'content'"),
        (lambda: model.run_with_hooks("x", fwd_hooks=[("blocks.1.hook_resid_post", lambda a, n: a[:1])]), "same shape"),
        (lambda: model.run_with_hooks("x", fwd_hooks=[("blocks.1.attn.hook_z", lambda a, n: None)]), "capture only"),
        (lambda: model.score("x", {}), "continuations is empty"),
        (lambda: model.score([], {"a": "b"}), "empty list"),
        (lambda: afprobe.run("bench", "prefill"), "afprobe binary"),
        (lambda: afprobe.Model(tmp_path / "missing.gguf"), "missing.gguf"),
        (lambda: afprobe.Model(dtype="f8"), "not one of"),
        (lambda: afprobe.Model(device="cuda"), "without the `cuda` feature"),
        (lambda: afprobe.Model(device="tpu"), "unknown device `tpu`"),
        (lambda: afprobe.Model(engine="turbo"), "fused, portable"),
        (lambda: afprobe.open_store(tmp_path), "activation store"),
        (lambda: afprobe.gap(tmp_path / "nothing"), "nothing"),
        (lambda: afprobe.capture(study_prompts, tmp_path / "c", hooks="resid_psot"), "resid_psot"),
        (lambda: afprobe.run("capture", "--no-such-flag"), "--no-such-flag"),
    ]
    for call, words in cases:
        with pytest.raises(afprobe.AfprobeError, match=None) as caught:
            call()
        assert words in str(caught.value), (words, str(caught.value))

    def raises(act, name):
        raise KeyError("from the hook")

    with pytest.raises(KeyError, match="from the hook"):
        model.run_with_hooks("x", fwd_hooks=[("blocks.3.hook_mlp_out", raises)])
    # The model is still usable after every error.
    assert model.run_with_hooks("x").shape[1] == model.cfg.d_vocab


def test_long_calls_release_the_gil(model):
    """Another Python thread runs while the model computes."""
    import threading

    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    thread = threading.Thread(target=count)
    thread.start()
    ids = model.to_tokens("Tell me a long story about probes. " * 40, chat=False)
    before = len(ticks)
    model.run_with_cache(ids, names_filter=[], positions="last")
    during = len(ticks) - before
    done.set()
    thread.join()
    assert during > 10, f"the counting thread ran {during} times during the forward pass"
