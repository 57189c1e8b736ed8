"""docs/python.md's example, executed as written (its code blocks in order, in one namespace,
in a scratch directory), so the documentation cannot drift from the API."""

import os
import re

from conftest import REPO


def test_the_python_guide_runs(tmp_path, monkeypatch):
    text = (REPO / "docs/python.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/python.md has a python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_python"}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), namespace)
    assert (tmp_path / "probe-by-layer.png").stat().st_size > 0
    assert len(namespace["accuracy"]) == namespace["model"].cfg.n_layers
    assert os.path.isfile(tmp_path / "acts" / "gap.json")
