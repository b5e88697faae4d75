# Sourced by bench/gpu-pair.sh and bench/soup.sh on a lent GPU machine, from the repository root, after the staging
# call that stashed .device/site and part 1 of the embedded GGUF under $HOME/stash (this call carries .device/p2):
# the environment, the GGUF joined and converted once (before parallel runs would race to do it), the card in $OUT.
export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site:$HOME/stash/site-extra:$PWD/.device/site:$PWD/.device/site-extra
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MRTUNE_EMBEDDED_GGUF=$HOME/stash/SmolLM2-135M-Instruct.Q4_1.gguf MRTUNE_CACHE=$HOME/stash/cache
if [ ! -f "$MRTUNE_EMBEDDED_GGUF" ] && [ -f "$HOME/stash/p1" ] && [ -f .device/p2 ]; then
    cat "$HOME/stash/p1" .device/p2 > "$MRTUNE_EMBEDDED_GGUF"
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt"
# Its log goes beside the card: the device tool brings back at most 8 files.
python -c "from mrtune.model.resolve import EMBEDDED_MODEL as m, resolve_model_path as r; r(m)" >> "$OUT/card.txt" 2>&1
