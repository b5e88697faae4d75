#!/usr/bin/env bash
# Does averaging more seeds help? (`mrtune average`, issue 16.) On a lent machine with two GPUs (after the staging
# of bench/gpu-env.sh): configs/smollm2-final.yaml trained with five seeds on each GPU at once, then three averages
# (each GPU's five, and all ten) and every run scored on the test split, the ten-run average also on unseen game
# names. Only the shipped commands run (mrtune train, average, evaluate). One JSON of every score, $OUT/soup.json,
# and the logs. Run from the repository root:
#   bash bench/soup.sh "10 11 12 13 14" "15 16 17 18 19"
# SOUP_SET (more train --set overrides) and SOUP_EVAL (more evaluate arguments) shrink it for a check on a CPU, e.g.
#   SOUP_SET="train.max_steps=2 data.train_limit=64" SOUP_EVAL="--limit 4" bash bench/soup.sh "1 2" "3 4"
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: bash bench/soup.sh 'SEEDS FOR GPU 0' 'SEEDS FOR GPU 1'" >&2; exit 2; }
source bench/gpu-env.sh
work=/tmp/soup
mkdir -p "$work"
mrtune() { python -m mrtune "$@"; }
started=$SECONDS
for gpu in 0 1; do
    seeds=$1; shift
    for seed in $seeds; do
        overrides=()
        for setting in "train.seed=$seed" train.eval_rows=100 ${SOUP_SET:-}; do overrides+=(--set "$setting"); done
        CUDA_VISIBLE_DEVICES=$gpu mrtune train --config configs/smollm2-final.yaml --output-dir "$work/s$seed" \
            "${overrides[@]}" > "$work/train-s$seed.log" 2>&1 &
    done
    eval "group$gpu=\"$seeds\""
done
wait
echo "trained in $((SECONDS - started)) s" > "$work/times.txt"
runs() { for seed in $1; do [ -f "$work/s$seed/adapter/adapter_config.json" ] && echo "$work/s$seed"; done; }
# shellcheck disable=SC2154,SC2046,SC2086  # group0/group1 are set by eval above; the run lists split on purpose
{ mrtune average $(runs "$group0") --output-dir "$work/avg-g0" > "$work/average-g0.log" 2>&1 &
  mrtune average $(runs "$group1") --output-dir "$work/avg-g1" > "$work/average-g1.log" 2>&1 &
  mrtune average $(runs "$group0 $group1") --output-dir "$work/avg-all" > "$work/average-all.log" 2>&1 &
  python -m mrtune.task.generalization --out "$work/unseen-names.jsonl" > /dev/null 2>&1 & wait; }
echo "averaged at $((SECONDS - started)) s" >> "$work/times.txt"
i=0
for run in $(runs "$group0 $group1") "$work/avg-g0" "$work/avg-g1" "$work/avg-all"; do
    CUDA_VISIBLE_DEVICES=$((i % 2)) mrtune evaluate "$run" ${SOUP_EVAL:-} > "$run.evaluate.log" 2>&1 &
    i=$((i + 1))
done
CUDA_VISIBLE_DEVICES=1 mrtune evaluate "$work/avg-all" --data "$work/unseen-names.jsonl" ${SOUP_EVAL:-} > "$work/avg-all.unseen.log" 2>&1 &
wait
echo "scored at $((SECONDS - started)) s" >> "$work/times.txt"
python - "$work" > "$OUT/soup.json" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
scores = {}
for metrics in sorted(work.glob("*/eval/*/metrics.json")):
    m = json.loads(metrics.read_text())
    keys = ("n", "exact_match", "slot_f1", "dialogue_act_accuracy", "valid_mr_rate", "load_seconds", "decode_seconds")
    scores[f"{metrics.parts[-4]}/{metrics.parts[-2]}"] = {k: m.get(k) for k in keys}
for run in sorted(work.glob("s*/run.json")):
    scores[f"{run.parent.name}/train_seconds"] = json.loads(run.read_text()).get("train_seconds")
members = {
    run.parent.name: [Path(p).name for p in json.loads(run.read_text())["averaged_from"]]
    for run in sorted(work.glob("avg-*/run.json"))
}
times = (work / "times.txt").read_text().splitlines()
print(json.dumps({"scores": scores, "members": members, "times": times}, indent=1))
PY
tar czf "$OUT/logs.tgz" -C "$work" --exclude='*.safetensors' --exclude='tokenizer*' --exclude='checkpoint*' \
    $(cd "$work" && ls -d ./*.log ./*/eval ./*/run.json ./times.txt 2>/dev/null)
cat "$work/times.txt"
