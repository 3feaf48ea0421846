"""Compiling Triton kernels for sm_90 (Hopper) on a machine without a GPU, for the shared-memory tests.

Under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``) ``@triton.jit`` makes interpreter
functions, so the compile scripts run in a subprocess without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_compile_script(script: str, argument: str | None = None, timeout: int = 1200) -> str:
    """Run ``script`` (Python source) in a subprocess without ``TRITON_INTERPRET``, from the
    repository root, with ``argument`` as its ``sys.argv[1]``; its stdout. Skips where Triton has
    no CUDA backend; fails with the subprocess's stderr when it fails."""
    pytest.importorskip("triton.backends.nvidia")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    command = [sys.executable, "-c", script] + ([argument] if argument is not None else [])
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def compile_cases(script: str, cases: list[dict]) -> dict:
    """Run a compile script over ``cases`` (JSON-able dicts with an ``"id"``); the script prints one
    JSON ``[id, result]`` line per case. Returns ``{id: result}``."""
    stdout = run_compile_script(script, json.dumps(cases))
    return dict(json.loads(line) for line in stdout.splitlines())
