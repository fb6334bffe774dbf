#!/usr/bin/env bash
# The project's test command: C++ unit tests (Release, then ThreadSanitizer
# and AddressSanitizer+UBSan builds) through ctest, then the Python tests.
# Expects the package installed (pip install ".[test]"); installs the
# system packages the C++ build needs (GoogleTest, ...) itself when they are
# missing (scripts/setup_system.sh). FASTSERVE_NO_SANITIZERS=1 skips the
# sanitizer builds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
# Tests never reach a model hub: they use tiny local models and the shipped MiniLM.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [[ "${FASTSERVE_NO_SANITIZERS:-0}" == 1 ]]; then
  bash scripts/cpp_tests.sh --no-sanitizers
else
  bash scripts/cpp_tests.sh
fi
python -m pytest tests/python -q -m "not slow" "$@"
