"""`mrtune evaluate`: decode a split with a run's model and score it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mrtune.config import with_eval_overrides
from mrtune.errors import MrtuneError
from mrtune.export.portable import refresh_model_card
from mrtune.infer.predict import decode_members, open_members
from mrtune.run.outputs import building_dir
from mrtune.run.rundir import RunDir
from mrtune.task.data import load_split, spread_sample
from mrtune.task.mr import Vocabulary, majority_vote, score

DATA_PREFIX = "data-"
"""eval/data-<name>/ holds the results of `--data FILE`: never a split's name, never a path out of eval/."""


def data_eval_name(data: str) -> str:
    """eval/'s folder name for a data file: `data-` and the file's stem reduced to letters, digits, `_`, `-`, `.`.

    >>> data_eval_name("../../test.jsonl"), data_eval_name(".."), data_eval_name("my set/ünï.csv")
    ('data-test', 'data-file', 'data-n')
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", Path(data).stem).strip("._-")[:60]
    return DATA_PREFIX + (stem or "file")


def _results_dir(run: RunDir, split: str, data: str | None, base: bool, ensemble: bool = False) -> Path:
    """eval/<split>[-base|-ensemble] or eval/data-<name>[-base|-ensemble]; a data folder of another file of the same
    name is refused."""
    name = (data_eval_name(data) if data else split) + ("-base" if base else "-ensemble" if ensemble else "")
    out = run.eval_dir(name)
    if data and (out / "metrics.json").is_file():
        previous = run.read_json(out / "metrics.json").get("data_file")
        if previous != str(Path(data).resolve()):
            raise MrtuneError(
                f"{out} holds the results of another data file ({previous}): rename {data}, or remove that folder "
                "if its results are no longer wanted (nothing was touched)"
            )
    return out


def _check_run(run: RunDir, config, base: bool) -> None:
    info = run.info()
    if info.get("status") == "diverged" and not base:
        raise MrtuneError(
            f"run {run.path} diverged at step {info.get('diverged_at_step')} (a non-finite loss or gradient "
            f"{config.train.max_skipped_in_a_row} steps in a row), so it has no metrics to report: train it again "
            "with a lower train.learning_rate (--base still scores the untuned model)"
        )


def evaluate(
    run_dir: str | Path,
    *,
    split: str = "test",
    data: str | None = None,
    limit: int | None = None,
    base: bool = False,
    constrained: bool | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    ensemble: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Decode a split (or any data file), score it, and write eval/<name>/{metrics.json,predictions.jsonl}.

    <name> is the split, or data-<file name> for `data` (see data_eval_name), with -base for the base model.
    `constrained` (default: the run's eval.constrained) decodes only valid MRs of the run's vocabulary.
    `overrides` (`eval.key=value`) change decoding settings for this call only. `ensemble`: more runs whose models
    also decode, each row scored on the MR most of the models wrote (`majority_vote`), in eval/<name>-ensemble.
    """
    run = RunDir.open(run_dir)
    config = with_eval_overrides(run.config(), overrides)
    run.check_intact(config, adapter=not base)
    _check_run(run, config, base)
    if split not in ("test", "validation", "train"):
        raise MrtuneError(f"unknown split {split!r}: use test or validation (or --data FILE)")
    members = open_members(run, config, ensemble, overrides, base)
    for member, member_config in members[1:]:
        _check_run(member, member_config, base)
    out = _results_dir(run, split, data, base, ensemble=len(members) > 1)
    spec = data or getattr(config.data, split)
    examples = spread_sample(
        load_split(spec, config.data.input_field, config.data.output_field),
        limit if limit is not None else config.eval.limit,
        "--limit" if limit is not None else "eval.limit",
    )
    outputs, stats = decode_members(members, examples, base, constrained, progress)
    predictions = majority_vote(outputs) if len(outputs) > 1 else outputs[0]
    constrained = config.eval.constrained if constrained is None else constrained
    seconds = stats["decode_seconds"]
    # Whether closed values bound this decoding: a run from before them has none in its vocabulary.json.
    constrained_values = (
        constrained and config.eval.constrain_values and bool(Vocabulary.from_dict(run.read_vocabulary()).closed_values)
    )
    references = [e.meaning_representation for e in examples]
    metrics = score(predictions, references)
    metrics.update(
        split=split if data is None else f"data file {Path(data).name}",
        model="base" if base else "fine-tuned",
        load_seconds=round(stats["load_seconds"], 2),
        decode_seconds=round(seconds, 2),
        rows_per_s=round(len(examples) / seconds, 2),
        constrained=constrained,
        constrained_values=constrained_values,
        generated_tokens=stats["generated_tokens"],
        tokens_per_s=round(stats["generated_tokens"] / seconds, 1),
    )
    if data:
        metrics["data_file"] = str(Path(data).resolve())
    if len(members) > 1:
        metrics["ensemble"] = {
            "members": [str(member.path.resolve()) for member, _ in members],
            "members_exact_match": [score(p, references)["exact_match"] for p in outputs],
        }
    rows = [
        {
            "target": e.sentence,
            "reference": e.meaning_representation,
            "prediction": p,
            "exact_match": p.strip() == e.meaning_representation.strip(),
        }
        for e, p in zip(examples, predictions)
    ]
    with building_dir(out) as tmp:  # predictions and metrics replace the previous pair together, or not at all
        (tmp / "predictions.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    refresh_model_card(run)  # the model card shows the new test metrics
    from mrtune.run.report import write_report

    write_report(run)
    return metrics
