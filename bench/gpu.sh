#!/usr/bin/env bash
# On the lent GPU machine, after ../shared/tools/stage-gpu's two staging calls have put the embedded model and
# bitsandbytes (and liger-kernel, in site-extra) under $HOME/stash: set up the environment and run the benchmark
# (arguments go to `python -m bench.run bench`). Logs and results land in $OUT. Run from the repository root:
#   bash bench/gpu.sh [--only PART ...] [--settings NAME,...]
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site:$HOME/stash/site-extra:$PWD/.device/site-extra PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MRTUNE_EMBEDDED_GGUF=$HOME/stash/SmolLM2-135M-Instruct.Q4_1.gguf MRTUNE_CACHE=$HOME/stash/cache
export BENCH_TMP=$HOME/stash
# BENCH_OUT (default $OUT): where this run's results.json and log go, so one call can hold two runs.
BENCH_OUT=${BENCH_OUT:-$OUT}
mkdir -p "$BENCH_OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib
for name in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "yaml", "tqdm", "matplotlib", "tensorboard", "datasets", "liger_kernel"]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", type(error).__name__)
PY
python -m bench.run bench --out "$BENCH_OUT" "$@" 2>&1 | tee "$BENCH_OUT/bench.log"
