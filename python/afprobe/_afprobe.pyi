"""Type stubs of the native module (python/src/lib.rs); use the `afprobe` package's API."""

from os import PathLike
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

class AfprobeError(Exception):
    """An error reported by afprobe: the message says what is wrong, where, and what to do."""

HookCall = Callable[[np.ndarray, str], np.ndarray]

class NativeModel:
    def __init__(
        self, spec: Optional[str] = None, adapter: Optional[str] = None, dtype: str = "auto", engine: Optional[str] = None, device: str = "cpu"
    ) -> None: ...
    def cfg(self) -> Dict[str, Any]: ...
    def format_chat(self, messages: Sequence[Tuple[str, str]]) -> str: ...
    def encode(self, text: str) -> List[int]: ...
    def encode_plain(self, text: str) -> List[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def hook_names(self, internals: bool) -> List[str]: ...
    def run(
        self,
        tokens: Sequence[int],
        names: Sequence[str],
        rows: Optional[Sequence[int]] = None,
        logits: str = "all",
        hooks: Sequence[Tuple[str, HookCall]] = ...,
    ) -> Tuple[Optional[np.ndarray], Dict[str, np.ndarray]]: ...
    def generate(
        self,
        tokens: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        hooks: Sequence[Tuple[str, HookCall]] = ...,
    ) -> List[int]: ...
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        hooks: Sequence[Tuple[str, HookCall]] = ...,
    ) -> List[List[float]]: ...

def run_command(args: Sequence[str]) -> None: ...
def open_store(path: Union[str, PathLike]) -> Tuple[str, List[str], List[str], List[Path]]: ...
def version() -> str: ...
