"""Shared fixtures: the default model (SmolLM2-135M-Instruct, fetched on first use), the CLI
binary the Python API is compared with, and a small prompt file written by that CLI."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import afprobe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def afprobe_bin() -> str:
    """The CLI: $AFPROBE_BIN (tests/python.rs sets it), else the release build, else PATH."""
    for candidate in (os.environ.get("AFPROBE_BIN"), REPO / "target/release/afprobe", shutil.which("afprobe")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("no afprobe binary: run `cargo build --release` or set AFPROBE_BIN")


@pytest.fixture(scope="session")
def cli(afprobe_bin):
    """Runs the CLI binary and returns its stdout; a failure fails the test with its stderr."""

    def run(*args):
        done = subprocess.run([afprobe_bin, *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, f"afprobe {' '.join(map(str, args))} failed:\n{done.stderr}"
        return done.stdout

    return run


@pytest.fixture(scope="session")
def model() -> afprobe.Model:
    return afprobe.Model("smollm2-135m", dtype="f32")


@pytest.fixture(scope="session")
def study_prompts(tmp_path_factory, cli) -> Path:
    """The study's prompts for the xml cue (36 requests x 2 tiers), written by the CLI."""
    path = tmp_path_factory.mktemp("prompts") / "xml.jsonl"
    cli("prompts", "--cues", "xml", "--out", path)
    return path


def head_rows(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of a prompt file."""
    lines = src.read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


def read_rows(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
