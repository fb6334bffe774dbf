"""A short coverage-guided fuzzing run (atheris) of the native bindings with
malformed arrays, in CI. The harness, and how to run it long, is
tests/fuzz/fuzz_bindings.py."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_bindings.py"


def test_malformed_arrays_never_crash_the_bindings(tmp_path):
    pytest.importorskip("atheris")
    runs = int(os.environ.get("FASTSERVE_FUZZ_RUNS", "20000"))
    # libFuzzer stops at a peak resident set (getrusage's maxrss) past
    # -rss_limit_mb, 2 GB by default, and a child started from here begins
    # with this process's resident set counted in its peak (maxrss carries
    # over exec): after a few hundred tests at 2.6 GB, the harness "ran out
    # of memory" before its first input. The limit is 2 GB over that.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    proc = subprocess.run(
        [sys.executable, str(HARNESS), f"-atheris_runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/",
         f"-rss_limit_mb={inherited_mb + 2048}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} in" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
