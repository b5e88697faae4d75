#!/usr/bin/env bash
# On a lent GPU (the first call, which stashes .device/site, site-extra and p1 under $HOME/stash): the fp8 tests
# on CUDA, then bench.profile_step of a 4-layer Mistral-7B-width model (random init, 4-bit) at 8,192 packed tokens,
# compiled, in bf16 and with model.fp8_base: the fp8 lever alone, before a whole benchmark spends minutes on it.
set -uo pipefail
mkdir -p "$HOME/stash" && cp -r .device/site .device/site-extra .device/p1 "$HOME/stash/"
export PYTHONPATH=$PWD/src:$PWD:$HOME/stash/site:$HOME/stash/site-extra PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MRTUNE_CACHE=/tmp/mrtune-cache
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/card.txt"
(python -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 || python -c "
import tests.test_fp8 as t
t.test_fp8_of_4bit_weights_matches_bitsandbytes_matmul()
t.test_fp8_matmul_matches_its_emulation_and_approximates_the_exact_product('cuda')
print('fp8 GPU checks passed (without pytest)')") 2>&1 | tail -25 > "$OUT/tests.txt"
python - <<'PY' > "$OUT/shape.txt" 2>&1
import torch
from transformers import MistralConfig, MistralForCausalLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from tests.conftest import viggo_rows
# A 2,000-token BPE tokenizer of ViGGO (the embedded model's is not here yet): a small output head, so the step is
# nearly all decoder layers, where fp8 acts.
bpe = Tokenizer(models.BPE(unk_token=None))
bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
texts = [r[k] for r in viggo_rows("train", 5000) for k in ("target", "meaning_representation")]
bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "</s>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", model_max_length=4096)
config = MistralConfig(vocab_size=len(tokenizer), num_hidden_layers=4)
config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
torch.manual_seed(0)
with torch.device("cuda"):
    model = MistralForCausalLM(config).to(torch.bfloat16)
model.save_pretrained("/tmp/m4")
tokenizer.save_pretrained("/tmp/m4")
print("saved")
PY
COMMON="model.name=/tmp/m4 model.quantization=nf4 data.prompt_style=seed lora.r=8 lora.alpha=16 lora.dropout=0.0
 lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head train.packing=true
 model.attn_implementation=flex_attention model.compile_layers=true"
for tokens in 8192 16384; do
  for fp8 in false true; do
    # shellcheck disable=SC2086
    timeout 150 python -m bench.profile_step --set $COMMON train.batch_tokens=$tokens model.fp8_base=$fp8 \
        --steps 3 --warm 4 --rows 12 > "$OUT/profile-$tokens-fp8-$fp8.txt" 2>&1
    echo "exit $?" >> "$OUT/profile-$tokens-fp8-$fp8.txt"
  done
done
grep -h -E "s/step|passed|failed|exit|rror" "$OUT"/*.txt
