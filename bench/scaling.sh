#!/usr/bin/env bash
# Data-parallel scaling of `mrtune train` on a 2-GPU machine: the random-init Mistral-7B shape in 4-bit NF4, the
# 7B recipe (configs/mistral-7b-qlora.yaml: packed rows, flex_attention, 8,192 tokens per micro-batch, no
# checkpointing), ~12 optimizer steps on 1 GPU, then on 2 GPUs (DDP, the same micro-batch per GPU). Writes
# $OUT/scaling.json ({"tokens_per_s_1gpu", "tokens_per_s_2gpu", "scaling_2gpu_7b", "card", ...}) and one log per
# run. Then (FSDP=0 skips it) the same on 2 GPUs with FSDP (configs/accelerate/fsdp-qlora.yaml), added to
# scaling.json: its tokens/s, and whether its adapter has the DDP run's tensors.
# Run from the repository root, with bitsandbytes and the SmolLM2 tokenizer staged under $HOME/stash:
#   export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site
#   bash bench/scaling.sh
# TOKENIZER_DIR (default $HOME/stash/cache/smollm2-135m-instruct) gives the tokenizer of the 7B shape; MODEL_DIR
# (default /tmp/mistral-7b-shape) is reused when it holds a model already; STEPS (default 12) and WARM (default 3:
# steps left out of the rate, flex_attention compiles in the first) tune the run.
set -euo pipefail
: "${OUT:?set OUT to the folder for scaling.json and the logs}"
# NVLink multicast stays off on the lent machines (NCCL, PyTorch, NVSHMEM): it can take the host's GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENIZER_DIR=${TOKENIZER_DIR:-$HOME/stash/cache/smollm2-135m-instruct}
MODEL_DIR=${MODEL_DIR:-/tmp/mistral-7b-shape}
RUNS=${RUNS:-/tmp/mrtune-scaling}
STEPS=${STEPS:-12}
# PROMPT_STYLE (default: the recipe's compact prompt) sets data.prompt_style, e.g. seed for the seed recipe's rows.
PROMPT_STYLE=${PROMPT_STYLE:-}
WARM=${WARM:-3}

gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -lt 2 ]; then echo "bench/scaling.sh needs 2 GPUs, this machine has $gpus" >&2; exit 1; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
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

echo "1 GPU: $STEPS steps"
CUDA_VISIBLE_DEVICES=0 python -m mrtune train --config configs/mistral-7b-qlora.yaml "${SETS[@]}" \
  --output-dir "$RUNS/1gpu" --overwrite > "$OUT/scaling-1gpu.log" 2>&1 || { tail -n 30 "$OUT/scaling-1gpu.log"; exit 1; }
echo "2 GPUs (DDP): $STEPS steps"
python -m mrtune train --num-gpus 2 --config configs/mistral-7b-qlora.yaml "${SETS[@]}" \
  --output-dir "$RUNS/2gpu" --overwrite > "$OUT/scaling-2gpu.log" 2>&1 || { tail -n 30 "$OUT/scaling-2gpu.log"; exit 1; }

python -m bench.scaling --one "$RUNS/1gpu" --two "$RUNS/2gpu" --warm "$WARM" --out "$OUT/scaling.json"

if [ "${FSDP:-1}" != 0 ]; then
  echo "2 GPUs (FSDP, sharded 4-bit): $STEPS steps"
  timeout -k 20 "${FSDP_TIMEOUT:-300}" python -m mrtune train --num-gpus 2 --accelerate-config configs/accelerate/fsdp-qlora.yaml \
    --config configs/mistral-7b-qlora.yaml "${SETS[@]}" --output-dir "$RUNS/2gpu-fsdp" --overwrite \
    > "$OUT/scaling-2gpu-fsdp.log" 2>&1 || { tail -n 30 "$OUT/scaling-2gpu-fsdp.log"; exit 1; }
  python -m bench.scaling --one "$RUNS/1gpu" --two "$RUNS/2gpu" --fsdp "$RUNS/2gpu-fsdp" --warm "$WARM" \
    --out "$OUT/scaling.json"
fi
