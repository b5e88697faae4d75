"""Evaluation, prediction and merge, checked on the values a broken implementation gets wrong.

Each test kills a class of realistic bug that once passed the whole suite (issue 18): `evaluate --base` scoring
the fine-tuned model, batched generation writing rows back in the wrong order, and `merge` not merging. The run is
trained hard enough (lm_head adapted, a high learning rate) that the fine-tuned model decodes differently from the
base one, so every comparison below can tell the two apart.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.infer.generation import generate
from mrtune.infer.merge import merge
from mrtune.model.build import load_base_model
from mrtune.model.resolve import load_tokenizer
from mrtune.task.mr import score
from mrtune.task.prompts import build_prompt

METRICS = ("exact_match", "exact_match_unordered", "dialogue_act_accuracy", "slot_f1", "valid_mr_rate", "n")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    from conftest import tiny_run_overrides, write_viggo_splits

    from mrtune.train.recipe import train

    base = tmp_path_factory.mktemp("bugs-infer")
    data = write_viggo_splits(base, (("train", 48), ("validation", 8), ("test", 7)))
    overrides = tiny_run_overrides(
        tiny_model_dir,
        data,
        "lora.dropout=0.0",
        "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
        "train.max_steps=8",
        "train.eval_every=8",
        "train.learning_rate=3e-2",
        "train.warmup_ratio=0.0",
        "eval.batch_size=3",
        "eval.max_new_tokens=20",
    )
    config = load_config(None, overrides)
    return train(config, base / "run", progress=False), config


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_base_scores_the_untuned_model(tuned):
    """`--base` metrics equal those of the base model decoded directly, and differ from the fine-tuned ones."""
    run, config = tuned
    assert main(["evaluate", str(run.path), "--base", "--no-constrained"]) == 0
    assert main(["evaluate", str(run.path), "--no-constrained"]) == 0
    base_rows = _rows(run.eval_dir("test-base") / "predictions.jsonl")
    tuned_rows = _rows(run.eval_dir("test") / "predictions.jsonl")
    base_metrics = json.loads((run.eval_dir("test-base") / "metrics.json").read_text())

    tokenizer = load_tokenizer(str(run.tokenizer))
    untuned = load_base_model(config.model, torch.device("cpu")).eval()
    prompts = [build_prompt(config.data.prompt_style, row["target"]) for row in base_rows]
    expected = generate(untuned, tokenizer, prompts, batch_size=3, max_new_tokens=20, progress=False)

    assert [row["prediction"] for row in base_rows] == expected
    assert [row["prediction"] for row in tuned_rows] != expected  # the fine-tuned model decodes otherwise
    assert base_metrics["model"] == "base"
    direct = score(expected, [row["reference"] for row in base_rows])
    assert {k: base_metrics[k] for k in METRICS} == {k: direct[k] for k in METRICS}


def test_batched_generation_returns_rows_in_input_order(tiny_model_dir):
    """Generation sorts prompts by length into batches; each output must still pair with its own prompt.

    Prompts in ascending length order (generation decodes the longest first), 7 rows in batches of 3 (uneven).
    The raw sentences are the prompts: they end in different tokens, so the random model's outputs differ.
    """
    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(config.model, torch.device("cpu")).eval()
    from conftest import viggo_rows

    prompts = sorted((row["target"] for row in viggo_rows("test", 7)), key=len)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert len(set(alone)) >= 4, alone  # distinct outputs: a permutation would show
    for batch_size in (2, 3, 7):
        assert generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=6, progress=False) == alone


def test_merge_folds_the_adapter_into_the_weights(tuned, tmp_path, tiny_model_dir):
    """The merged model is a plain model whose adapted weights moved and whose logits are the adapter's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, config = tuned
    merged_dir = merge(run.path, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()  # a standalone model, not an adapter pointing at one
    merged = load_file(merged_dir / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    for name, tensor in base.items():
        if any(f"{module}." in name for module in adapted):
            assert (merged[name] - tensor).abs().max() > 1e-4, f"{name} did not take the adapter's update"
        else:
            assert torch.equal(merged[name], tensor), f"{name} is not adapted, yet changed"

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    untuned = load_base_model(config.model, torch.device("cpu")).eval()
    with torch.no_grad():
        base_logits = untuned(ids).logits
        adapter_logits = PeftModel.from_pretrained(untuned, str(run.adapter)).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 0.1  # the adapter matters
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
