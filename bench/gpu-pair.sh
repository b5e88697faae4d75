#!/usr/bin/env bash
# On a lent machine with two GPUs (after the staging of bench/gpu.sh's header, or ../shared/tools/stage-gpu's first
# call, with .device/p2 carried by this one): two benchmark runs at once, one per
# GPU, each with its own seed-recipe runs, results in $OUT/g0 and $OUT/g1 (publish both files). Every 7B ratio then
# divides by the seed measured on the same GPU in the same call. Run from the repository root, e.g.
#   bash bench/gpu-pair.sh "--only mistral --seed-runs 2 --settings packed-8192-compiled-dropout0" \
#                          "--only memory-plan --compiled-caps --seed-runs 2"
# BENCH_LIMIT (seconds, default 540): each run is stopped there; its results.json keeps what finished.
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: bash bench/gpu-pair.sh 'ARGS FOR GPU 0' 'ARGS FOR GPU 1'" >&2; exit 2; }
source bench/gpu-env.sh
run() {  # GPU index, then the bench arguments as one string
    local gpu=$1 out=$OUT/g$1 scratch=/tmp/bench-g$1
    mkdir -p "$out" "$scratch"
    # shellcheck disable=SC2086  # the arguments are one string on purpose: split them here
    CUDA_VISIBLE_DEVICES=$gpu BENCH_TMP=$scratch timeout "${BENCH_LIMIT:-540}" \
        python -m bench.run bench --out "$out" --model-dir "$scratch/mistral-7b-shape" $2 > "$out/log.txt" 2>&1
    echo "bench exit $?" >> "$out/log.txt"
    rm -f "$out/BENCHMARKS-gpu.md"  # publish rebuilds it from results.json; the device tool returns 8 files at most
    tar czf "$out/children.tgz" --exclude='*.safetensors' -C "$scratch" bench-children 2>/dev/null
}
run 0 "$1" &
run 1 "$2" &
wait
tail -n 2 "$OUT/g0/log.txt" "$OUT/g1/log.txt"
