"""A short coverage-guided fuzzing run (atheris) of the native bindings with
malformed arrays, in CI. The harness, and how to run it long, is
tests/fuzz/fuzz_bindings.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_bindings.py"


def test_malformed_arrays_never_crash_the_bindings(tmp_path):
    pytest.importorskip("atheris")
    runs = int(os.environ.get("FASTSERVE_FUZZ_RUNS", "20000"))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), f"-atheris_runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} in" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
