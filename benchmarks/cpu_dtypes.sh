#!/usr/bin/env bash
# The CPU-precision benchmarks of benchmarks/README.md ("CPU dtypes" and the
# sections after it) for this machine, one command, into one folder:
#     bash benchmarks/cpu_dtypes.sh OUT_DIR
# Runs cpu_dtype.py, gemm_ab.py in float32 and bfloat16 (with one request at
# a time in bfloat16), bf16_buckets.py, bf16_isa_ab.py, autocast_ab.py,
# op_profile.py in float32 and bfloat16, and load.py's online goodput per
# dtype. It does not run the rest of those sections' figures
# (gemm_micro.py, gemm_ab.py --whole, the fastserve_bench kernel tables, the
# online run with FASTSERVE_PACKED_ATTENTION=runs, mkl_packed.py,
# mm_concurrency.py, share.py and others): their commands are in the README.
# About 11 minutes on the 2-core AMD EPYC with AVX512-BF16, 25 on the AVX2
# one (bf16 emulated there). Run it alone on the machine (the
# figures are ratios measured side by side, but another process still moves
# them). A relative OUT_DIR is taken from the current directory.
# Writes OUT_DIR/machine.txt (lscpu, the commit, torch's configuration) and
# for each benchmark NAME.log (its output) and its results: NAME.json, or
# the folder cpu_dtype/ (cpu_dtype.json and .md); online_dtype.json is the
# JSON that load.py prints after its table. A benchmark that does not apply
# on this CPU (bf16_isa_ab.py without AVX512-BF16, autocast_ab.py without
# native bf16, gemm_ab.py without oneDNN or, in bfloat16, without oneDNN's
# bf16 products, bf16_buckets.py without them too) exits 2 and says why in its log: it is reported as skipped
# and the rest still run. Exits 1 if any benchmark failed, else 0.
# Needs what run_all.sh needs.
set -uo pipefail
usage="usage: bash benchmarks/cpu_dtypes.sh OUT_DIR"
case "${1:-}" in
    -h | --help)
        echo "$usage"
        exit 0
        ;;
    "")
        echo "$usage" >&2
        exit 2
        ;;
esac
out=$(realpath -m -- "$1")
cd "$(dirname "$0")/.."
mkdir -p "$out" || exit 1
export HF_HUB_OFFLINE=1
{
    lscpu
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch; print(torch.__version__); print(torch.__config__.show())"
} > "$out/machine.txt" 2>&1
failed=()
skipped=()
run() {  # run NAME COMMAND...: COMMAND's output into $out/NAME.log; 0 if it ran
    local name=$1 rc=0
    shift
    echo "cpu_dtypes.sh: $name" >&2
    "$@" > "$out/$name.log" 2>&1 || rc=$?
    # 2 is "does not apply on this CPU"; argparse also exits 2, after "usage:".
    if [ $rc -eq 2 ] && ! grep -q '^usage: ' "$out/$name.log"; then
        skipped+=("$name")
        echo "cpu_dtypes.sh: $name skipped: $(tail -1 "$out/$name.log")" >&2
    elif [ $rc -ne 0 ]; then
        failed+=("$name")
        tail -3 "$out/$name.log" >&2
    fi
    return $rc
}
py=benchmarks/python
run cpu_dtype python $py/cpu_dtype.py --n 400 --repeats 3 --threads --emulated --out "$out/cpu_dtype"
run gemm_ab python $py/gemm_ab.py --rounds 6 --out "$out/gemm_ab.json"
run gemm_ab_bf16 python $py/gemm_ab.py --dtype bfloat16 --rounds 6 --single 3 20 60 128 --out "$out/gemm_ab_bf16.json"
run bf16_buckets python $py/bf16_buckets.py --out "$out/bf16_buckets.json"
run bf16_isa_ab python $py/bf16_isa_ab.py --rounds 6 --out "$out/bf16_isa_ab.json"
run autocast_ab python $py/autocast_ab.py --rounds 6 --out "$out/autocast_ab.json"
run op_profile python $py/op_profile.py --out "$out/op_profile.json"
run op_profile_bf16 python $py/op_profile.py --dtype bfloat16 --out "$out/op_profile_bf16.json"
# load.py prints its table and then, on the last line, the JSON, both to stdout.
if run online_dtype python $py/load.py --rates 60,120,180,240 --slo-ms 100 --json \
    --backends fastserve/model,fastserve/model@autocast,fastserve/model@bfloat16; then
    if ! tail -n 1 "$out/online_dtype.log" \
        | python -c "import json, sys; json.dump(json.load(sys.stdin), sys.stdout, indent=1)" \
        > "$out/online_dtype.json" 2> /dev/null; then
        rm -f "$out/online_dtype.json"
        failed+=("online_dtype (no JSON on the last line of its log)")
    fi
fi
if [ ${#skipped[@]} -gt 0 ]; then
    echo "cpu_dtypes.sh: skipped, not for this CPU: ${skipped[*]} (see their logs in $out)" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "cpu_dtypes.sh: failed: ${failed[*]} (see their logs in $out)" >&2
    exit 1
fi
echo "cpu_dtypes.sh: done, results in $out" >&2
