#!/usr/bin/env bash
# The oldest supported transformers, tested: a virtual environment layered on
# the installed one (--system-site-packages: torch, numpy, pytest and fastserve
# itself, installed or editable, are reused, no multi-GB download) with the
# oldest transformers pyproject.toml allows and the libraries it needs pinned
# inside it, shadowing the newer ones outside. Then the Python tests of model
# loading, tokenization, the padded and packed runners (BERT, RoBERTa,
# DistilBERT, embed and classify) and parity with sentence-transformers run on
# it. About two minutes on 2 cores.
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
# 0.19 and huggingface-hub < 1.0; sentence-transformers 3.0.0 is the test
# extra's floor (and the first 3.x, which needs transformers < 5).
PINS=(
  "transformers==4.40.0"
  "tokenizers==0.19.1"
  "huggingface-hub==0.36.2"
  "sentence-transformers==3.0.0"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  # No pip of its own: the outer environment's pip, run by the venv's
  # interpreter, installs into the venv (and never removes what is outside).
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
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
