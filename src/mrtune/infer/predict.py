"""`mrtune predict`: meaning representations for new sentences, and the loading and decoding evaluate shares."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mrtune.config import with_eval_overrides
from mrtune.errors import MrtuneError
from mrtune.infer.generation import generate
from mrtune.model.build import default_device, load_trained_model
from mrtune.model.resolve import load_tokenizer
from mrtune.run.rundir import RunDir, write_text_atomic
from mrtune.task.data import Example, load_split
from mrtune.task.mr import Vocabulary
from mrtune.task.prompts import build_prompt


def load_model(run: RunDir, config, base: bool):
    """The run's tokenizer and model: base + adapter, or the untuned base with `base`."""
    adapter = None if base else run.require_adapter()
    tokenizer = load_tokenizer(str(run.tokenizer))
    model = load_trained_model(config.model, adapter, default_device())
    return tokenizer, model


def load_constraint(run: RunDir, tokenizer):
    """The decoding constraint for this run's vocabulary (acts and attributes of its training split)."""
    from mrtune.infer.constrained import MRConstraint

    if not run.vocabulary.is_file():
        raise MrtuneError(
            f"{run.vocabulary} is missing, so constrained decoding has no vocabulary: pass --no-constrained"
        )
    vocabulary = Vocabulary.from_dict(json.loads(run.vocabulary.read_text(encoding="utf-8")))
    return MRConstraint(tokenizer, vocabulary)


def decode(
    run: RunDir, config, tokenizer, model, sentences: list[str], progress: bool, constrained: bool
) -> tuple[list[str], dict]:
    """Predictions for `sentences`, and the decoding's `generated_tokens` and `seconds`."""
    prompts = [build_prompt(config.data.prompt_style, s) for s in sentences]
    constraint = load_constraint(run, tokenizer) if constrained else None
    return decode_prompts(run, config, tokenizer, model, prompts, constraint, progress)


def decode_prompts(
    run: RunDir, config, tokenizer, model, prompts: list[str], constraint, progress: bool = False
) -> tuple[list[str], dict]:
    """Completions of ready-made prompts with the run's eval settings, and the decoding's `generated_tokens` and
    `seconds`. `constraint` (from `load_constraint`, or None to decode freely) may be kept across calls: it computes
    each mask once (`mrtune serve` holds one for its lifetime)."""
    stats: dict = {}
    try:
        predictions = generate(
            model,
            tokenizer,
            prompts,
            batch_size=config.eval.batch_size,
            max_new_tokens=config.eval.max_new_tokens,
            constraint=constraint,
            kv_cache=config.eval.kv_cache,
            progress=progress,
            stats=stats,
        )
    except torch.OutOfMemoryError:
        raise MrtuneError(
            f"out of GPU memory decoding {config.eval.batch_size} rows at a time: lower eval.batch_size (or "
            f"eval.max_new_tokens) in {run.config_file}"
        ) from None
    return predictions, stats


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
    tokenizer, model = load_model(run, config, base)
    constrained = config.eval.constrained if constrained is None else constrained
    predictions, _ = decode(
        run, config, tokenizer, model, [e.sentence for e in examples], progress and input_file is not None, constrained
    )
    if output_file is not None:
        write_text_atomic(
            Path(output_file),
            "".join(
                json.dumps({config.data.input_field: e.sentence, config.data.output_field: p}, ensure_ascii=False)
                + "\n"
                for e, p in zip(examples, predictions)
            ),
        )
    return predictions
