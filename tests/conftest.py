"""Shared fixtures: a tiny random-init Mistral (2 layers) with a small byte-level BPE tokenizer trained on ViGGO.

The tiny model exercises every real code path (transformers, peft, accelerate) in seconds on CPU; its numbers
mean nothing, its behaviour (parameters change, loss falls, files appear, outputs agree) is what is tested.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parents[1] / "src" / "mrtune" / "data"


def viggo_rows(split: str, n: int) -> list[dict]:
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_viggo_splits(base: Path, sizes) -> dict[str, Path]:
    """The first `n` bundled ViGGO rows of each (split, n) in `sizes`, as base/<split>.jsonl: {split: path}."""
    return {split: write_jsonl(base / f"{split}.jsonl", viggo_rows(split, n)) for split, n in dict(sizes).items()}


def tiny_run_overrides(model_dir: Path, data: dict[str, Path], *settings: str) -> list[str]:
    """--set overrides of a run of the tiny model on `data` ({split: path}): fp32, rank-4 adapters, 8 rows a
    micro-batch, then `settings` (each test's steps, rates and decoding)."""
    return [
        f"model.name={model_dir}",
        "model.dtype=float32",
        *(f"data.{split}={path}" for split, path in data.items()),
        "lora.r=4",
        "lora.alpha=8",
        "train.batch_size=8",
        *settings,
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Mistral with random weights and a 600-token BPE tokenizer, saved as a local model directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-mistral")
    texts = [r["target"] for r in viggo_rows("train", 2000)] + [
        r["meaning_representation"] for r in viggo_rows("train", 2000)
    ]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", model_max_length=1024
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_data(tmp_path) -> dict[str, Path]:
    """Small train/validation/test files cut from ViGGO."""
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", viggo_rows("train", 48)),
        "validation": write_jsonl(tmp_path / "validation.jsonl", viggo_rows("validation", 8)),
        "test": write_jsonl(tmp_path / "test.jsonl", viggo_rows("test", 6)),
    }


@pytest.fixture
def tiny_overrides(tiny_model_dir, tiny_data) -> list[str]:
    """--set overrides that point a run at the tiny model and data and keep it to seconds."""
    return tiny_run_overrides(
        tiny_model_dir,
        tiny_data,
        "lora.dropout=0.0",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.log_every=1",
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        "eval.max_new_tokens=24",
    )


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or directories), by path: equal snapshots mean nothing changed."""
    files = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


# -- the fault suite's finished run (tests/test_faults*.py): shared, so never changed; copy it to damage it ------
FAULT_SETTINGS = ["train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=2", "eval.max_new_tokens=4"]


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault-data")
    return write_viggo_splits(base, (("train", 48), ("validation", 8), ("test", 6)))


@pytest.fixture(scope="session")
def fault_overrides(tiny_model_dir, fault_data):
    return tiny_run_overrides(
        tiny_model_dir,
        fault_data,
        "lora.dropout=0.0",
        "train.log_every=1",
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        *FAULT_SETTINGS,
    )


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, fault_overrides):
    """The uninterrupted run that the faulted-and-resumed runs must end up equal to."""
    from mrtune.config import load_config
    from mrtune.train.recipe import train

    return train(load_config(None, fault_overrides), tmp_path_factory.mktemp("finished") / "run", progress=False)


def train_tiny_run(base: Path, model_dir: Path, rows: dict[str, int], extra: list[str] = ()):
    """A finished run of one training step on the tiny model, with `rows` rows of each ViGGO split, in `base/run`."""
    from mrtune.config import load_config
    from mrtune.train.recipe import train

    data = write_viggo_splits(base, rows)
    settings = [
        f"model.name={model_dir}",
        "model.dtype=float32",
        *(f"data.{split}={path}" for split, path in data.items()),
        "lora.r=2",
        "lora.alpha=4",
        "train.batch_size=8",
        "train.max_steps=1",
        "train.eval_every=1",
        "eval.batch_size=4",
        "eval.max_new_tokens=24",
        *extra,
    ]
    return train(load_config(None, settings), base / "run", progress=False)
