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
export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site:$HOME/stash/site-extra:$PWD/.device/site:$PWD/.device/site-extra
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MRTUNE_EMBEDDED_GGUF=$HOME/stash/SmolLM2-135M-Instruct.Q4_1.gguf MRTUNE_CACHE=$HOME/stash/cache
# The embedded GGUF travels in two parts (stage-gpu): part 1 stashed by the previous call, part 2 carried by this one.
if [ ! -f "$MRTUNE_EMBEDDED_GGUF" ] && [ -f "$HOME/stash/p1" ] && [ -f .device/p2 ]; then
    cat "$HOME/stash/p1" .device/p2 > "$MRTUNE_EMBEDDED_GGUF"
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt"
# Converted once here, before the two runs (and their children) would race to do it. (Its log goes beside the card:
# the device tool brings back at most 8 files.)
python -c "from mrtune.model.resolve import EMBEDDED_MODEL as m, resolve_model_path as r; r(m)" >> "$OUT/card.txt" 2>&1
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
