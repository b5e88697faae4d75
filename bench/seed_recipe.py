"""The seed recipe, kept as the reference implementation the project is measured against (not part of the product).

What the original notebook did, step for step: Hugging Face Trainer; 4-bit NF4 with double quantization and bf16
compute; `prepare_model_for_kbit_training`; gradient checkpointing; LoRA r=8, alpha 16, dropout 0.05 on
q,k,v,o,gate,up,down and lm_head; the instruction prompt with the meaning representation appended, tokenized with
`padding="max_length"` to 512 tokens and labels equal to the inputs (loss on the prompt too); pad token = EOS, so
`DataCollatorForLanguageModeling` masks the EOS away with the padding; batch 2 x gradient accumulation 4;
paged_adamw_8bit; lr 2.5e-5; 1,000 steps. Only the number of steps, the logging and the saving differ here: the
benchmark times a few steps instead of 1,000 and saves nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SEED_PROMPT = """Given a target sentence construct the underlying meaning representation of the input sentence as a single function with attributes and attribute values.
This function should describe the target string accurately and the function must be one of the following ['inform', 'request', 'give_opinion', 'confirm', 'verify_attribute', 'suggest', 'request_explanation', 'recommend', 'request_attribute'].
The attributes must be one of the following: ['name', 'exp_release_date', 'release_year', 'developer', 'esrb', 'rating', 'genres', 'player_perspective', 'platforms', 'available_on_steam', 'has_linux_release', 'has_mac_release', 'specifier']

### Target sentence:
{target}

### Meaning representation:
{meaning_representation}
"""


def run_seed(model_dir: str, tokenizer_dir: str, rows: list[dict], max_steps: int, warmup_steps: int = 2) -> dict:
    """Train `max_steps` optimizer steps of the seed recipe and time them (steady state, after warm-up)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, device_map={"": 0})
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_dir, padding_side="left", add_eos_token=True, add_bos_token=True
    )
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(row):
        result = tokenizer(SEED_PROMPT.format(**row), truncation=True, max_length=512, padding="max_length")
        result["labels"] = result["input_ids"].copy()
        return result

    dataset = [tokenize(row) for row in rows]  # the notebook used datasets.map; a list is what Trainer needs
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    )
    model = get_peft_model(model, lora)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = Timer()
    args = TrainingArguments(
        output_dir="/tmp/seed-recipe",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=max_steps,
        learning_rate=2.5e-5,
        bf16=True,
        optim="paged_adamw_8bit",
        logging_steps=25,
        save_strategy="no",
        eval_strategy="no",
        gradient_checkpointing=True,
        report_to=[],
        warmup_steps=1,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[timer],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    model.config.use_cache = False
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start] + timer.times[:-1], timer.times)][warmup_steps:]
    step_s = statistics.median(steps)
    rows_per_step = 2 * 4
    # Useful tokens: what the rows hold without padding (the seed pads every row to 512).
    useful = statistics.mean(sum(r["attention_mask"]) for r in dataset)
    return {
        "step_s": step_s,
        "padded_tokens_per_s": rows_per_step * 512 / step_s,
        "useful_tokens_per_s": rows_per_step * useful / step_s,
        "mean_useful_tokens_per_row": useful,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "steps_timed": len(steps),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = Path(__file__).parents[1] / "src" / "mrtune" / "data" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()][: args.steps * 8 + 16]
    Path(args.out).write_text(json.dumps(run_seed(args.model_dir, args.tokenizer_dir, rows, args.steps), indent=2))
