#!/usr/bin/env bash
# Scale-out of `mrtune train` on the GPUs of one machine (1, 2, 4, 8: as many as nvidia-smi lists), in two parts:
#   bash bench/scaling.sh 7b    # the random-init Mistral-7B shape in 4-bit NF4, the 7B recipe (configs/mistral-7b-
#                               # qlora.yaml): DDP on 1, 2, 4, 8 GPUs, then FSDP2 (fsdp2-qlora.yaml) and FSDP1
#                               # (fsdp-qlora.yaml) on all of them; $OUT/scaling.json (bench/scaling.py summarise)
#   bash bench/scaling.sh 70b   # a random-init Llama-2-70B shape, bf16 LoRA, FSDP2 over all GPUs, never whole on
#                               # one GPU or in one process (bench/scaling.py big); $OUT/scaling-70b.json, and
#                               # scaling.json again, with it as `fsdp2_70b`, when the 7B runs are in $RUNS
# Every 7B run has the same micro-batch per GPU (8,192 tokens), ~12 optimizer steps; one log per run in $OUT and one
# nvidia-smi memory log per run beside its run directory in $RUNS. Then
#   python -m bench.run publish ... $OUT/scaling.json
# puts scaling_{2,4,8}gpu_7b (DDP tokens/s over one GPU's) into bench/results/latest.json and BENCHMARKS.md.
# Run from the repository root, with bitsandbytes and the SmolLM2 tokenizer staged under $HOME/stash:
#   export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site
# TOKENIZER_DIR (default $HOME/stash/cache/smollm2-135m-instruct) gives the tokenizer of the 7B shape; MODEL_DIR
# (default /tmp/mistral-7b-shape) is reused when it holds a model already; STEPS (default 12) and WARM (default 3:
# steps left out of the rate, flex_attention compiles in the first) tune the runs; COUNTS (default: 1 2 4 8 up to
# the GPUs there are) picks the DDP GPU counts, so that a part can be split over several 10-minute calls (RUNS
# keeps the runs made so far; `summarise` reads whichever are there); FSDP=0 skips the FSDP runs. For the 70B part,
# BIG_STEPS (8), BIG_SEQ_LEN (4096) and BIG_ROWS (1 per GPU) size the run.
set -euo pipefail
: "${OUT:?set OUT to the folder for scaling.json and the logs}"
part=${1:?say which part: bash bench/scaling.sh 7b, or bash bench/scaling.sh 70b}
# NVLink multicast stays off on the lent machines (NCCL, PyTorch, NVSHMEM): it can take the host's GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENIZER_DIR=${TOKENIZER_DIR:-$HOME/stash/cache/smollm2-135m-instruct}
MODEL_DIR=${MODEL_DIR:-/tmp/mistral-7b-shape}
RUNS=${RUNS:-/tmp/mrtune-scaling}
STEPS=${STEPS:-12}
WARM=${WARM:-3}
# PROMPT_STYLE (default: the recipe's compact prompt) sets data.prompt_style, e.g. seed for the seed recipe's rows.
PROMPT_STYLE=${PROMPT_STYLE:-}

gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$gpus" -lt 2 ]; then echo "bench/scaling.sh needs 2 GPUs or more, this machine has $gpus" >&2; exit 1; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p "$OUT" "$RUNS"

# One training run ($1: run name, $2: GPUs, $3: Accelerate config or "" for DDP), with nvidia-smi sampling every
# GPU's memory each 0.5 s into $RUNS/$1.memory.csv while it runs.
train() {
  local name=$1 count=$2 config=$3
  local -a launch=(--num-gpus "$count")
  if [ -n "$config" ]; then launch+=(--accelerate-config "$config"); fi
  if [ "$count" = 1 ]; then launch=(); fi
  echo "$name: $count GPU(s), ${config:-DDP}, $STEPS steps"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$RUNS/$name.memory.csv" &
  local sampler=$!
  local status=0
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((count - 1))) timeout -k 20 "${RUN_TIMEOUT:-420}" \
    python -m mrtune train "${launch[@]}" --config configs/mistral-7b-qlora.yaml "${SETS[@]}" \
    --output-dir "$RUNS/$name" --overwrite > "$OUT/scaling-$name.log" 2>&1 || status=$?
  kill "$sampler"
  if [ "$status" != 0 ]; then tail -n 30 "$OUT/scaling-$name.log"; exit "$status"; fi
}

if [ "$part" = 7b ]; then
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "making the random-init Mistral-7B shape in $MODEL_DIR (tokenizer: $TOKENIZER_DIR)"
    MODEL_DIR="$MODEL_DIR" TOKENIZER_DIR="$TOKENIZER_DIR" python -c 'import os; from pathlib import Path
from bench.run import make_mistral_shape
make_mistral_shape(Path(os.environ["MODEL_DIR"]), os.environ["TOKENIZER_DIR"])'
  fi
  # The 7B recipe as shipped; evaluation only at the last step, on 8 rows (it is left out of tokens/s anyway).
  SETS=(--set "model.name=$MODEL_DIR" --set "train.max_steps=$STEPS" --set train.log_every=1
        --set train.eval_every=100000 --set train.eval_rows=8 --set eval.max_new_tokens=8
        --set train.checkpoint_every=100000 --set data.train_limit=3000)
  if [ -n "$PROMPT_STYLE" ]; then SETS+=(--set "data.prompt_style=$PROMPT_STYLE"); fi
  for count in ${COUNTS-1 2 4 8}; do  # COUNTS="" runs none (the FSDP runs alone)
    if [ "$count" -gt "$gpus" ]; then continue; fi
    if [ "$count" = 1 ]; then train 1gpu 1 ""; else train "${count}gpu_ddp" "$count" ""; fi
  done
  if [ "${FSDP:-1}" != 0 ]; then
    train "${gpus}gpu_fsdp2" "$gpus" configs/accelerate/fsdp2-qlora.yaml
    train "${gpus}gpu_fsdp1" "$gpus" configs/accelerate/fsdp-qlora.yaml
  fi
  python -m bench.scaling summarise --runs "$RUNS" --warm "$WARM" --out "$OUT/scaling.json"
elif [ "$part" = 70b ]; then
  echo "70B shape, bf16 LoRA, FSDP2 over $gpus GPUs"
  timeout -k 20 "${RUN_TIMEOUT:-540}" torchrun --standalone --nproc_per_node "$gpus" -m bench.scaling big --shape 70b \
    --steps "${BIG_STEPS:-8}" --warm "$WARM" --seq-len "${BIG_SEQ_LEN:-4096}" --batch "${BIG_ROWS:-1}" \
    --out "$OUT/scaling-70b.json" > "$OUT/scaling-70b.log" 2>&1 || { tail -n 30 "$OUT/scaling-70b.log"; exit 1; }
  if [ -d "$RUNS/1gpu" ]; then  # the 7B part ran on this machine: one scaling.json with both
    python -m bench.scaling summarise --runs "$RUNS" --warm "$WARM" --big "$OUT/scaling-70b.json" \
      --out "$OUT/scaling.json"
  fi
else
  echo "unknown part $part: say 7b or 70b" >&2; exit 2
fi
