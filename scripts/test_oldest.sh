#!/usr/bin/env bash
# The oldest supported transformers, tested: a virtual environment layered on
# the interpreter fastserve is installed in (its site directories follow the
# venv's own: torch, numpy, pytest and fastserve itself, installed or editable,
# are reused, no multi-GB download), with the oldest transformers
# pyproject.toml allows and the libraries it needs pinned inside it, shadowing
# the newer ones outside (checked before the tests). Then the Python tests of
# model loading, tokenization, the padded and packed runners (BERT, RoBERTa,
# DistilBERT, embed and classify, batches past the position table) and parity
# with sentence-transformers run on it. About a minute on 2 cores.
# Expects what scripts/test.sh expects: the package installed with its test
# extra (pip install ".[test]"). Needs the package index for the pins.
#   PYTHON       the interpreter fastserve is installed in (default: python)
#   OLDEST_VENV  where the environment goes (default: build/venv-oldest;
#                reused when it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
VENV="${OLDEST_VENV:-build/venv-oldest}"

# transformers 4.40.0 is the floor in pyproject.toml; it needs tokenizers
# 0.19 and huggingface-hub < 1.0 (0.36.2: the last before 1.0).
# sentence-transformers 3.0.0 is the test extra's floor; it takes
# transformers 4.34 to 4.x.
PINS=(
  "transformers==4.40.0"
  "tokenizers==0.19.1"
  "huggingface-hub==0.36.2"
  "sentence-transformers==3.0.0"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  # No pip of its own: the outer environment's pip, run by the venv's
  # interpreter, installs into the venv (and never removes what is outside).
  "$PYTHON" -m venv --without-pip "$VENV"
  # The outer environment's site directories come after the venv's own, with
  # their .pth files (an editable install's finder among them). Not
  # --system-site-packages: that means the base interpreter's, which misses
  # what is installed when $PYTHON is itself a virtual environment.
  "$PYTHON" - "$VENV" <<'EOF'
import os, site, sys, sysconfig

outer = site.getsitepackages() + [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
outer = [p for i, p in enumerate(outer) if os.path.isdir(p) and p not in outer[:i]]
probe = sys.argv[1] + "/bin/python"
inner = os.popen(f"{probe} -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))'").read().strip()
with open(os.path.join(inner, "zz_outer_site.pth"), "w") as f:
    # A .pth line runs through exec() in a function: a comprehension there
    # sees builtins but not the line's own imports.
    f.write(f"import site; [__import__('site').addsitedir(p) for p in {outer!r}"
            " if p not in __import__('sys').path]\n")
EOF
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --no-input "${PINS[@]}"

# The pinned versions must be what the venv imports, from the venv itself;
# fastserve and torch come from outside it.
"$PY" - "$VENV" "${PINS[@]}" <<'EOF'
import importlib
import os
import sys

venv = os.path.realpath(sys.argv[1])
for pin in sys.argv[2:]:
    dist, version = pin.split("==")
    module = importlib.import_module(dist.replace("-", "_"))
    where = os.path.realpath(module.__file__)
    print(f"{dist} {module.__version__} from {where}")
    if module.__version__ != version or not where.startswith(venv + os.sep):
        sys.exit(f"{dist}: expected {version} from {venv}, got {module.__version__} from {where}")
from sentence_transformers import SentenceTransformer  # noqa: E402,F401  (the parity test imports it)

import torch  # noqa: E402

import fastserve  # noqa: E402
from fastserve import _core  # noqa: E402,F401  (the compiled extension)

for module in (torch, fastserve):
    where = os.path.realpath(module.__file__)
    print(f"{module.__name__} {getattr(module, '__version__', '')} from {where}")
    if where.startswith(venv + os.sep):
        sys.exit(f"{module.__name__} must come from outside {venv}")
EOF

export HF_HUB_OFFLINE=1
"$PY" -m pytest -p no:cacheprovider -q -rs -m "not slow" \
  tests/python/test_engine.py tests/python/test_packed_embeddings.py tests/python/test_text_encoder.py "$@"
