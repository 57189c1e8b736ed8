"""afprobe from Python: a model with TransformerLens-named hooks, activation stores, and
afprobe's commands as functions, on afprobe's Rust engine (docs/python.md).

>>> import afprobe
>>> model = afprobe.Model("smollm2-135m")
>>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: n.endswith("resid_post"))
>>> cache["blocks.3.hook_resid_post"].shape        # [pos, d_model]
>>> store = afprobe.open_store("activations/demo")

Every array is a numpy array (float32 activations and logits, int64 token ids). Long calls
release the GIL; afprobe's errors are raised as `afprobe.AfprobeError` with afprobe's message,
and an exception raised inside a hook function is raised again unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _afprobe
from ._afprobe import AfprobeError

__version__: str = _afprobe.version()

__all__ = [
    "AfprobeError",
    "ActivationCache",
    "Config",
    "Model",
    "Store",
    "open_store",
    "prompts",
    "capture",
    "gap",
    "probe",
    "steer",
    "patch",
    "ablate",
    "attribute",
    "sample",
    "plot",
    "run",
]

#: A prompt: text (wrapped in the chat template as one user turn when ``chat=True``, used as it
#: is otherwise), chat messages (``[{"role": ..., "content": ...}]``), a row of a prompt file
#: (``{"messages": [...]}`` or ``{"text": ...}``, with its ``assistant_prefix``, rendered as
#: ``afprobe capture`` renders it), or token ids.
Prompt = Union[str, Sequence[Mapping[str, str]], Mapping[str, Any], Sequence[int], np.ndarray]
#: ``fn(activation, hook_name)``: edit ``activation`` (float32 ``[pos, d_model]``) in place and
#: return None, or return a replacement of the same shape.
HookFunction = Callable[[np.ndarray, str], Optional[np.ndarray]]
#: Which positions to keep: None (every position), ``"last"``, an index or a list of indices
#: (negative ones count from the end, as in numpy).
Positions = Union[None, str, int, Sequence[int]]


@dataclass(frozen=True)
class Config:
    """A model's facts, under TransformerLens's ``cfg`` names."""

    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    #: The context window (prompts longer than this are refused).
    n_ctx: int
    #: The architecture family (llama, qwen2, gemma3, ...).
    family: str
    #: The weight precision it was loaded at (f32, f16, bf16, quantized).
    dtype: str
    #: What runs the forward pass: fused (CPU kernels) or portable (candle tensor ops).
    engine: str
    #: Where it runs: cpu, cuda:N or metal:N.
    device: str
    #: The model file or directory.
    path: str


class ActivationCache(dict):
    """Cached activations by TransformerLens hook name (a ``dict`` of numpy arrays).

    Also indexed the TransformerLens way: ``cache["resid_post", 3]`` is
    ``cache["blocks.3.hook_resid_post"]``, and ``cache["pattern", 3]`` is
    ``cache["blocks.3.attn.hook_pattern"]``.
    """

    _ATTENTION = ("q", "k", "v", "z", "pattern")

    def __getitem__(self, key: Union[str, Tuple[str, int]]) -> np.ndarray:
        if isinstance(key, tuple):
            kind, layer = key
            inner = "attn.hook_" if kind in self._ATTENTION else "hook_"
            key = f"blocks.{layer}.{inner}{kind}"
        return super().__getitem__(key)


class Model:
    """A model loaded by afprobe, run with TransformerLens-named hooks.

    Args:
        spec: any ``--model`` spec: an alias (``smollm2-135m``, ``gemma3-270m``,
            ``qwen2.5-coder-0.5b``), a ``.gguf`` file, an HF directory, or a hub-cache id.
            The default model is fetched on first use.
        adapter: a PEFT LoRA adapter directory applied at load.
        dtype: weight precision: ``f32``, ``f16``, ``bf16``, ``quantized`` (GGUF) or ``auto``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"metal"``; a GPU needs a build with
            the ``cuda`` or ``metal`` feature (docs/hooks-and-api.md "Devices").
        engine: ``"fused"`` (hand-written CPU kernels, the fast path on the CPU) or
            ``"portable"`` (candle tensor ops; the same activations at every hook,
            docs/hooks-and-api.md "Engines"). Default: fused on the CPU, portable elsewhere.

    Raises:
        AfprobeError: the model cannot be found, fetched or read (the message says which file
            and what to do).
    """

    def __init__(
        self,
        spec: Union[None, str, os.PathLike] = "smollm2-135m",
        adapter: Union[None, str, os.PathLike] = None,
        dtype: str = "f32",
        device: str = "cpu",
        engine: Optional[str] = None,
    ) -> None:
        self.adapter = None if adapter is None else os.fspath(adapter)
        self._native = _afprobe.NativeModel(
            None if spec is None else os.fspath(spec), self.adapter, dtype, engine, device
        )
        self.cfg = Config(**{k: str(v) if k == "path" else v for k, v in self._native.cfg().items()})

    def __repr__(self) -> str:
        c = self.cfg
        return f"Model({c.family}, n_layers={c.n_layers}, d_model={c.d_model}, dtype={c.dtype}, path={c.path!r})"

    @property
    def hook_names(self) -> List[str]:
        """Every hook point's name in forward order (attention internals excepted)."""
        return self._native.hook_names(False)

    def to_tokens(self, prompt: Prompt, chat: bool = True) -> np.ndarray:
        """Token ids ``int64 [pos]`` of ``prompt``.

        Text is wrapped in the model's chat template as one user turn with the assistant
        header appended (transformers' ``apply_chat_template(add_generation_prompt=True)``)
        when ``chat`` is true, and tokenized as it is otherwise (special tokens written in it
        become single ids). Messages always go through the template; ids pass through.
        """
        if isinstance(prompt, np.ndarray) or (
            isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (int, np.integer))
        ):
            ids = np.asarray(prompt)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise AfprobeError(f"token ids must be a 1-D integer array, not {ids.dtype} {ids.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.d_vocab):
                raise AfprobeError(f"token ids must lie in [0, {self.cfg.d_vocab}) for this model")
            return ids.astype(np.int64)
        if isinstance(prompt, Mapping):
            if "messages" in prompt:
                text = self.format_chat(prompt["messages"])
            elif "text" in prompt:
                text = prompt["text"]
            else:
                raise AfprobeError("a prompt row needs `messages` or `text` (docs/capture-and-store.md)")
            text += prompt.get("assistant_prefix", "")
        elif isinstance(prompt, str):
            text = self._native.format_chat([("user", prompt)]) if chat else prompt
        elif isinstance(prompt, (list, tuple)):
            text = self.format_chat(prompt)
        else:
            raise AfprobeError(
                f"a prompt is text, a list of messages or token ids, not {type(prompt).__name__}"
            )
        return np.asarray(self._native.encode(text), dtype=np.int64)

    def format_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The chat template applied to ``messages``, with the assistant header appended."""
        try:
            pairs = [(m["role"], m["content"]) for m in messages]
        except (KeyError, TypeError) as e:
            raise AfprobeError(
                "a message list must hold dicts with 'role' and 'content', e.g. "
                "[{'role': 'user', 'content': 'Hi'}]"
            ) from e
        return self._native.format_chat(pairs)

    def to_string(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        """The text of token ids (special tokens kept)."""
        return self._native.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_str_tokens(self, prompt: Prompt, chat: bool = True) -> List[str]:
        """Each token of ``prompt`` as text."""
        return [self._native.decode([int(i)]) for i in self.to_tokens(prompt, chat)]

    def _rows(self, positions: Positions, n: int) -> Optional[List[int]]:
        if positions is None:
            return None
        if isinstance(positions, str):
            if positions != "last":
                raise AfprobeError(f"positions {positions!r}: give None, 'last', or indices")
            return [n - 1]
        items = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
        rows = []
        for p in items:
            p = int(p)
            if not -n <= p < n:
                raise AfprobeError(f"position {p} is out of range for a prompt of {n} tokens")
            rows.append(p % n)
        return rows

    def _names(self, names_filter: Union[None, str, Sequence[str], Callable[[str], bool]]) -> List[str]:
        if names_filter is None:
            return self.hook_names
        if isinstance(names_filter, str):
            return [names_filter]
        if callable(names_filter):
            return [n for n in self._native.hook_names(True) if names_filter(n)]
        return list(names_filter)

    @staticmethod
    def _hooks(fwd_hooks: Sequence[Tuple[str, HookFunction]]) -> List[Tuple[str, Callable]]:
        def wrap(fn: HookFunction) -> Callable[[np.ndarray, str], np.ndarray]:
            def call(activation: np.ndarray, name: str) -> np.ndarray:
                out = fn(activation, name)
                return activation if out is None else np.ascontiguousarray(out, dtype=np.float32)

            return call

        return [(name, wrap(fn)) for name, fn in fwd_hooks]

    def run_with_cache(
        self,
        prompt: Prompt,
        names_filter: Union[None, str, Sequence[str], Callable[[str], bool]] = None,
        positions: Positions = None,
        chat: bool = True,
        fwd_hooks: Sequence[Tuple[str, HookFunction]] = (),
    ) -> Tuple[np.ndarray, ActivationCache]:
        """Runs ``prompt`` once, caching the hook points ``names_filter`` selects.

        Args:
            names_filter: None (every hook point but the attention internals), a name, a list
                of names, or ``fn(name) -> bool`` over every name including the attention
                internals (``blocks.{l}.attn.hook_q``, ``hook_k``, ``hook_v``, ``hook_z``,
                ``hook_pattern``, computed exactly only when asked for).
            positions: the positions cached and given logits: None (all), ``"last"``, or indices.
            fwd_hooks: hook functions applied during the run (as in :meth:`run_with_hooks`).

        Returns:
            ``(logits, cache)``: logits float32 ``[pos, d_vocab]`` (``[d_vocab]`` for
            ``positions="last"``); the cache maps names to float32 ``[pos, d_model]``
            (``hook_q``/``k``/``v``/``z``: ``[pos, head, d_head]``; ``hook_pattern``:
            ``[head, query_pos, key_pos]``, TransformerLens's order).

        Raises:
            AfprobeError: an unknown hook name (the message lists the valid ones), a layer
                past the model, a position out of range, an empty or too long prompt.
        """
        tokens = self.to_tokens(prompt, chat)
        rows = self._rows(positions, len(tokens))
        names = self._names(names_filter)
        last = isinstance(positions, str) and positions == "last"
        logits_at = "last" if last else ("all" if rows is None else "rows")
        logits, cache = self._native.run(
            tokens.tolist(), names, rows, logits_at, self._hooks(fwd_hooks)
        )
        if last:
            logits = logits[0]
        return logits, ActivationCache(cache)

    def run_with_hooks(
        self,
        prompt: Prompt,
        fwd_hooks: Sequence[Tuple[str, HookFunction]] = (),
        positions: Positions = None,
        chat: bool = True,
    ) -> np.ndarray:
        """Runs ``prompt`` with hook functions and returns the logits.

        Each ``(name, fn)`` in ``fwd_hooks`` calls ``fn(activation, name)`` at hook point
        ``name`` with float32 ``[pos, d_model]``: edit it in place and return None, or return a
        replacement of the same shape (steering, patching and ablation from Python). Several
        hooks at one point run in order. Attention internals are capture only.

        Returns:
            logits float32 ``[pos, d_vocab]`` (``[d_vocab]`` for ``positions="last"``).
        """
        logits, _ = self.run_with_cache(prompt, [], positions, chat, fwd_hooks)
        return logits

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
        fwd_hooks: Sequence[Tuple[str, HookFunction]] = (),
        chat: bool = True,
    ) -> str:
        """The model's continuation of ``prompt`` as text, as ``afprobe generate`` writes it.

        Greedy at ``temperature=0``; otherwise sampled with ``top_p`` nucleus sampling from a
        generator seeded by ``seed``. Stops at the end-of-turn token or after
        ``max_new_tokens``. Hook functions run on the prompt and on every new token.
        """
        tokens = self.to_tokens(prompt, chat)
        ids = self._native.generate(
            tokens.tolist(), max_new_tokens, temperature, top_p, seed, self._hooks(fwd_hooks)
        )
        return self.to_string(ids)

    def score(
        self,
        prompt: Union[Prompt, List[Prompt]],
        continuations: Mapping[str, str],
        chat: bool = True,
        fwd_hooks: Sequence[Tuple[str, HookFunction]] = (),
    ) -> Union[Dict[str, float], List[Dict[str, float]]]:
        """Σ log p of each continuation after the prompt, teacher-forced on the prompt's KV cache
        (what ``capture --score`` writes as ``logprob``).

        ``continuations`` maps names to text (e.g. ``{"accept": "<request_fully_accepted/>",
        "reject": "<rejected/>"}``), tokenized as the model writes it. A list of prompts is run
        as one batch: the prefix they share once, then one token tree holding every prompt's
        rest and its continuations, as a batched capture does.

        Hook functions run on the prompt and on the continuation tokens (as ``afprobe steer``
        runs its cells); with a list of prompts they see the rows of the batch's token tree.

        Returns:
            ``{name: log_prob}`` (natural log), or a list of them for a list of prompts.
        """
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise AfprobeError("score got an empty list of prompts")
        first = prompt[0] if isinstance(prompt, (list, tuple)) else None
        # A list of prompts, not one prompt given as ids or as messages.
        many = first is not None and not isinstance(first, (int, np.integer)) and not (
            isinstance(first, Mapping) and "role" in first
        )
        prompts = list(prompt) if many else [prompt]
        if not continuations:
            raise AfprobeError("continuations is empty; give e.g. {'accept': '<request_fully_accepted/>'}")
        names = list(continuations)
        conts = [self._native.encode_plain(continuations[n]) for n in names]
        tokens = [self.to_tokens(p, chat).tolist() for p in prompts]
        scores = [dict(zip(names, s)) for s in self._native.score(tokens, conts, self._hooks(fwd_hooks))]
        return scores if many else scores[0]


class Store:
    """A finished activation store written by ``afprobe capture`` (docs/capture-and-store.md).

    Attributes:
        path: the store directory.
        manifest: ``manifest.json`` as a dict (model, prompts, hooks, positions, dtype, shards).
        rows: the row records of ``rows.jsonl``, in store order.
        names: the tensor names, ``{hook}@{position}``.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        manifest, rows, names, shards = _afprobe.open_store(os.fspath(path))
        self.path = Path(path)
        self.manifest: Dict[str, Any] = json.loads(manifest)
        self.rows: List[Dict[str, Any]] = [json.loads(r) for r in rows]
        self.names: List[str] = list(names)
        self._shards = [Path(s) for s in shards]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={len(self.rows)}, names={len(self.names)})"

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` of every row, ``[rows, d_model]`` in the stored dtype (float32,
        or float16 for ``capture --dtype f16``).

        The shard files are memory-mapped read-only; a store of one shard is returned as the
        map itself, a store of several as their concatenation (a copy). ``…@all`` tensors hold
        one row per prompt token, row after row (each row's ``n_tokens`` says how many).

        Raises:
            AfprobeError: the store has no tensor of that name (the message lists some).
        """
        if name not in self.names:
            shown = ", ".join(self.names[:6]) + (f" and {len(self.names) - 6} more" if len(self.names) > 6 else "")
            raise AfprobeError(f"{self.path}: no tensor `{name}`; this store has {shown}")
        d_model = self.manifest["model"]["d_model"]
        parts = [_memmap_safetensors(shard, name) for shard in self._shards]
        for shard, part in zip(self._shards, parts):
            if part.ndim != 2 or part.shape[1] != d_model:
                raise AfprobeError(
                    f"{shard}: tensor `{name}` has shape {list(part.shape)}, expected [rows, {d_model}]; "
                    "the store is damaged (run `afprobe store verify`)"
                )
        if not parts:
            return np.zeros((0, d_model), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def to_pandas(self) -> "Any":
        """The rows as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Store.to_pandas needs pandas: pip install pandas") from e
        return pd.DataFrame(self.rows)


def open_store(path: Union[str, os.PathLike]) -> Store:
    """Opens a finished activation store; an incomplete or damaged one raises
    :class:`AfprobeError` with what to do (e.g. ``capture ... --resume``)."""
    return Store(path)


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}


def _memmap_safetensors(path: Path, name: str) -> np.ndarray:
    """One tensor of a .safetensors file, memory-mapped (format: an 8-byte little-endian header
    length, a JSON header of dtype, shape and data offsets, then the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header.get(name)
    if entry is None:
        raise AfprobeError(f"{path}: missing tensor `{name}`; the store is damaged (run `afprobe store verify`)")
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise AfprobeError(f"{path}: tensor `{name}` has dtype {entry['dtype']}, which numpy cannot map")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end == begin:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)


# --- the commands --------------------------------------------------------------------------


def _argv(words: Sequence[str], options: Mapping[str, Any]) -> List[str]:
    """``afprobe`` arguments from keyword options: ``foo_bar=x`` → ``--foo-bar=x``; True → the
    flag alone; False or None → left out; a list or tuple → its items joined by commas."""
    argv = [os.fspath(w) for w in words]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv.append(f"{flag}={','.join(os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value)}")
        else:
            argv.append(f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
    return argv


def _model_options(options: Mapping[str, Any], dtype_flag: str = "dtype") -> Dict[str, Any]:
    """``model=Model(...)`` as the options that load the same model: its file, adapter, weight
    precision (``dtype_flag``: capture calls it ``weights_dtype``), device and engine. The command loads
    it again, as the CLI would."""
    model = options.get("model")
    if not isinstance(model, Model):
        return dict(options)
    return {
        **options,
        "model": model.cfg.path,
        "adapter": model.adapter,
        dtype_flag: options.get(dtype_flag, model.cfg.dtype),
        "engine": options.get("engine", model.cfg.engine),
        "device": options.get("device", model.cfg.device),
    }


def run(*args: str) -> None:
    """Runs any afprobe command in this process, e.g. ``afprobe.run("store", "info", "activations/x")``.
    A usage error raises :class:`AfprobeError` with the command line's message. ``bench``
    starts afprobe processes of its own, so it needs the binary."""
    args = [os.fspath(a) for a in args]
    if args[:1] == ["bench"]:
        raise AfprobeError("`bench` starts afprobe processes of its own; run it with the afprobe binary")
    _afprobe.run_command(args)


def _report(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _run_dir_command(command: str, marker: str, out: Union[str, os.PathLike], options: Mapping[str, Any]) -> Dict[str, Any]:
    dtype_flag = "weights_dtype" if command == "capture" else "dtype"
    _afprobe.run_command(_argv([command], {**_model_options(options, dtype_flag), "out": out}))
    return _report(Path(out) / marker)


def prompts(out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe prompts``: writes the study's prompt rows to ``out`` (JSONL).
    Options as on the command line (``setting``, ``variations``, ``cues``, ``requests``, ...).
    Returns ``{"out": path, "rows": count}``."""
    _afprobe.run_command(_argv(["prompts"], {**options, "out": out}))
    with open(out) as f:
        count = sum(1 for line in f if line.strip())
    return {"out": os.fspath(out), "rows": count}


def capture(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe capture``: an activation store in ``out``. Options as on the command line
    (``model``, ``hooks``, ``layers``, ``positions``, ``score``, ``batch_rows``, ``resume``, ...).
    Returns the store's manifest."""
    return _run_dir_command("capture", "manifest.json", out, {"prompts": prompts, **options})


def gap(dir: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe gap``: the compliance gap of a scored capture or sampling run; returns gap.json."""
    _afprobe.run_command(_argv(["gap", dir], options))
    return _report(Path(dir) / "gap.json")


def probe(acts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe probe``: probes per layer on a store; returns report.json. Options as on the
    command line (``label``, ``positions``, ``method``, ``folds``, ``control``, ``seed``, ...)."""
    return _run_dir_command("probe", "report.json", out, {"acts": acts, **options})


def steer(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe steer``: a steering sweep; returns steer.json."""
    return _run_dir_command("steer", "steer.json", out, {"prompts": prompts, **options})


def patch(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe patch``: activation patching between paired rows; returns patch.json."""
    return _run_dir_command("patch", "patch.json", out, {"prompts": prompts, **options})


def ablate(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe ablate``: directional ablation; returns ablate.json."""
    return _run_dir_command("ablate", "ablate.json", out, {"prompts": prompts, **options})


def attribute(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe attribute``: direct logit attribution of the decision; returns attribute.json."""
    return _run_dir_command("attribute", "attribute.json", out, {"prompts": prompts, **options})


def sample(prompts: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe sample``: sampled responses classified by their answer tags; returns sample.json."""
    return _run_dir_command("sample", "sample.json", out, {"prompts": prompts, **options})


def plot(input: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """``afprobe plot``: the figures of a probe run or a run directory into ``out``.
    Returns ``{"out": path, "files": [the files in out]}``."""
    _afprobe.run_command(_argv(["plot", input], {**options, "out": out}))
    files = sorted(os.fspath(p) for p in Path(out).iterdir() if p.is_file())
    return {"out": os.fspath(out), "files": files}
