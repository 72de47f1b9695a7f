"""Running a kernel test file under Triton's interpreter on the CPU: the file, run as a script in a
subprocess with TRITON_INTERPRET=1 (it must be set before triton.jit builds a kernel), prints one JSON
line of results, which the file's tests then check."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkout_env(**extra) -> dict:
    """The environment for a subprocess that imports graphopt from this checkout."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_interpreted(script: str) -> dict:
    """The JSON that `python script` prints last, run with this checkout importable (skips without triton)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, script], env=checkout_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
