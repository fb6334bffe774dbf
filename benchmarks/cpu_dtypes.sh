#!/usr/bin/env bash
# Every CPU-precision figure of benchmarks/README.md ("CPU dtypes" and the
# sections after it) for this machine, one command, into one folder:
#     bash benchmarks/cpu_dtypes.sh OUT_DIR
# About 25 minutes on a 2-core VM. Run it alone on the machine (the figures
# are ratios measured side by side, but another process still moves them).
# Writes OUT_DIR/machine.txt (lscpu, the commit, torch's configuration) and
# one .json/.log pair per benchmark; a benchmark that does not apply here
# (bf16_isa_ab.py without AVX512-BF16, gemm_ab.py without oneDNN) says why
# in its log and the rest still run. Needs what run_all.sh needs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/cpu_dtypes.sh OUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1
{
    lscpu
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch; print(torch.__version__); print(torch.__config__.show())"
} > "$out/machine.txt" 2>&1
failed=()
run() {  # run NAME COMMAND...: COMMAND's output into $out/NAME.log
    local name=$1
    shift
    echo "cpu_dtypes.sh: $name" >&2
    if ! "$@" > "$out/$name.log" 2>&1; then
        failed+=("$name")
        tail -3 "$out/$name.log" >&2
    fi
}
py=benchmarks/python
run cpu_dtype python $py/cpu_dtype.py --n 400 --repeats 3 --threads --emulated --out "$out/cpu_dtype"
run gemm_ab python $py/gemm_ab.py --rounds 6 --out "$out/gemm_ab.json"
run gemm_ab_bf16 python $py/gemm_ab.py --dtype bfloat16 --rounds 6 --out "$out/gemm_ab_bf16.json"
run bf16_isa_ab python $py/bf16_isa_ab.py --rounds 6 --out "$out/bf16_isa_ab.json"
run autocast_ab python $py/autocast_ab.py --rounds 6 --out "$out/autocast_ab.json"
run op_profile python $py/op_profile.py --out "$out/op_profile.json"
run op_profile_bf16 python $py/op_profile.py --dtype bfloat16 --out "$out/op_profile_bf16.json"
run online_dtype python $py/load.py --rates 60,120,180,240 --slo-ms 100 --json \
    --backends fastserve/model,fastserve/model@autocast,fastserve/model@bfloat16
if [ ${#failed[@]} -gt 0 ]; then
    echo "cpu_dtypes.sh: did not complete: ${failed[*]} (see their logs in $out)" >&2
    exit 1
fi
echo "cpu_dtypes.sh: every figure in $out" >&2
