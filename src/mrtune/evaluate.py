"""`mrtune evaluate` and `mrtune predict`: decode meaning representations with a run's model and score them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mrtune.config import with_eval_overrides
from mrtune.data import Example, load_split, spread_sample
from mrtune.errors import MrtuneError
from mrtune.generation import generate
from mrtune.models import load_tokenizer
from mrtune.modeling import default_device, load_trained_model
from mrtune.mr import Vocabulary, score
from mrtune.prompts import build_prompt
from mrtune.rundir import RunDir, write_json, write_text_atomic


def _load(run: RunDir, config, base: bool):
    adapter = None if base else run.require_adapter()
    tokenizer = load_tokenizer(str(run.tokenizer))
    model = load_trained_model(config.model, adapter, default_device())
    return tokenizer, model


def _constraint(run: RunDir, tokenizer):
    """The decoding constraint for this run's vocabulary (acts and attributes of its training split)."""
    from mrtune.constrained import MRConstraint

    if not run.vocabulary.is_file():
        raise MrtuneError(f"{run.vocabulary} is missing, so constrained decoding has no vocabulary: "
                          "pass --no-constrained")
    vocabulary = Vocabulary.from_dict(json.loads(run.vocabulary.read_text(encoding="utf-8")))
    return MRConstraint(tokenizer, vocabulary)


def _decode(run: RunDir, config, tokenizer, model, sentences: list[str], progress: bool,
            constrained: bool) -> tuple[list[str], dict]:
    """Predictions for `sentences`, and the decoding's `generated_tokens` and `seconds`."""
    prompts = [build_prompt(config.data.prompt_style, s) for s in sentences]
    stats: dict = {}
    try:
        predictions = generate(model, tokenizer, prompts, batch_size=config.eval.batch_size,
                               max_new_tokens=config.eval.max_new_tokens,
                               constraint=_constraint(run, tokenizer) if constrained else None,
                               kv_cache=config.eval.kv_cache, progress=progress, stats=stats)
    except torch.OutOfMemoryError:
        raise MrtuneError(
            f"out of GPU memory decoding {config.eval.batch_size} rows at a time: lower eval.batch_size (or "
            f"eval.max_new_tokens) in {run.config_file}"
        ) from None
    return predictions, stats


def evaluate(
    run_dir: str | Path,
    *,
    split: str = "test",
    data: str | None = None,
    limit: int | None = None,
    base: bool = False,
    constrained: bool | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Decode a split (or any data file), score it, and write eval/<name>/{metrics.json,predictions.jsonl}.

    `constrained` (default: the run's eval.constrained) decodes only valid MRs of the run's vocabulary.
    `overrides` (`eval.key=value`) change decoding settings for this call only.
    """
    run = RunDir.open(run_dir)
    config = with_eval_overrides(run.config(), overrides)
    info = run.info()
    if info.get("status") == "diverged" and not base:
        raise MrtuneError(
            f"run {run.path} diverged at step {info.get('diverged_at_step')} (a non-finite loss or gradient "
            f"{config.train.max_skipped_in_a_row} steps in a row), so it has no metrics to report: train it again "
            "with a lower train.learning_rate (--base still scores the untuned model)"
        )
    if split not in ("test", "validation", "train"):
        raise MrtuneError(f"unknown split {split!r}: use test or validation (or --data FILE)")
    spec = data or getattr(config.data, split)
    examples = spread_sample(load_split(spec, config.data.input_field, config.data.output_field),
                             limit if limit is not None else config.eval.limit)
    tokenizer, model = _load(run, config, base)
    constrained = config.eval.constrained if constrained is None else constrained
    started = time.perf_counter()
    predictions, stats = _decode(run, config, tokenizer, model, [e.sentence for e in examples], progress,
                                 constrained)
    seconds = time.perf_counter() - started
    references = [e.meaning_representation for e in examples]
    metrics = score(predictions, references)
    metrics.update(split=split if data is None else str(data), model="base" if base else "fine-tuned",
                   decode_seconds=round(seconds, 2), rows_per_s=round(len(examples) / seconds, 2),
                   constrained=constrained, generated_tokens=stats["generated_tokens"],
                   tokens_per_s=round(stats["generated_tokens"] / seconds, 1))
    name = (Path(data).stem if data else split) + ("-base" if base else "")
    out = run.eval_dir(name)
    write_text_atomic(out / "predictions.jsonl", "".join(
        json.dumps({"target": e.sentence, "reference": e.meaning_representation, "prediction": p,
                    "exact_match": p.strip() == e.meaning_representation.strip()}, ensure_ascii=False) + "\n"
        for e, p in zip(examples, predictions)))
    write_json(out / "metrics.json", metrics)
    from mrtune.report import write_report

    write_report(run)
    return metrics


def predict(
    run_dir: str | Path,
    *,
    sentences: list[str] | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    base: bool = False,
    constrained: bool | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> list[str]:
    """Meaning representations for sentences given directly or as a JSONL/CSV file of rows with the input field.

    `constrained` (default: the run's eval.constrained) decodes only valid MRs of the run's vocabulary.
    """
    run = RunDir.open(run_dir)
    config = with_eval_overrides(run.config(), overrides)
    if input_file is not None:
        if output_file is None:
            raise MrtuneError("--input needs --output FILE.jsonl to write the predictions to")
        if Path(output_file).resolve() == Path(input_file).resolve():
            raise MrtuneError("--output is the same file as --input: choose another output path")
        examples = load_split(input_file, config.data.input_field, output_field=None)
    elif sentences:
        examples = [Example(s, None) for s in sentences]
    else:
        raise MrtuneError('give a sentence (mrtune predict RUN "some sentence") or --input FILE.jsonl')
    tokenizer, model = _load(run, config, base)
    constrained = config.eval.constrained if constrained is None else constrained
    predictions, _ = _decode(run, config, tokenizer, model, [e.sentence for e in examples],
                             progress and input_file is not None, constrained)
    if output_file is not None:
        write_text_atomic(Path(output_file), "".join(
            json.dumps({config.data.input_field: e.sentence, config.data.output_field: p}, ensure_ascii=False)
            + "\n" for e, p in zip(examples, predictions)))
    return predictions
