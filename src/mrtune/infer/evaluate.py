"""`mrtune evaluate`: decode a split with a run's model and score it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mrtune.config import with_eval_overrides
from mrtune.errors import MrtuneError
from mrtune.export.portable import make_portable
from mrtune.infer.predict import decode, load_model
from mrtune.run.rundir import RunDir, write_json, write_text_atomic
from mrtune.task.data import load_split, spread_sample
from mrtune.task.mr import score


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
    examples = spread_sample(
        load_split(spec, config.data.input_field, config.data.output_field),
        limit if limit is not None else config.eval.limit,
    )
    tokenizer, model = load_model(run, config, base)
    constrained = config.eval.constrained if constrained is None else constrained
    started = time.perf_counter()
    predictions, stats = decode(run, config, tokenizer, model, [e.sentence for e in examples], progress, constrained)
    seconds = time.perf_counter() - started
    references = [e.meaning_representation for e in examples]
    metrics = score(predictions, references)
    metrics.update(
        split=split if data is None else str(data),
        model="base" if base else "fine-tuned",
        decode_seconds=round(seconds, 2),
        rows_per_s=round(len(examples) / seconds, 2),
        constrained=constrained,
        generated_tokens=stats["generated_tokens"],
        tokens_per_s=round(stats["generated_tokens"] / seconds, 1),
    )
    name = (Path(data).stem if data else split) + ("-base" if base else "")
    out = run.eval_dir(name)
    write_text_atomic(
        out / "predictions.jsonl",
        "".join(
            json.dumps(
                {
                    "target": e.sentence,
                    "reference": e.meaning_representation,
                    "prediction": p,
                    "exact_match": p.strip() == e.meaning_representation.strip(),
                },
                ensure_ascii=False,
            )
            + "\n"
            for e, p in zip(examples, predictions)
        ),
    )
    write_json(out / "metrics.json", metrics)
    make_portable(run)  # the model card shows the new test metrics
    from mrtune.run.report import write_report

    write_report(run)
    return metrics
