"""`RUN/report.md` and its pictures: one human-readable page per run, rebuilt from what is on disk.

The report is written at the end of `mrtune train` and after every `mrtune evaluate`, so it must cope
with any stage of a run: no history yet, no evaluation yet, a history line torn by a kill, a custom
data file whose references do not parse. Each section is built on its own and a failure becomes a
line in the report instead of an exception: a broken picture must never turn a finished training run
or evaluation into a failed command.

    RUN/report.md
    RUN/loss_curve.png                train and validation loss against step
    RUN/dialogue_acts_<name>.png      per-act exact match and act accuracy, per fine-tuned evaluation
    RUN/confusion_<name>.png          reference act x predicted act counts, per fine-tuned evaluation
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib

# Agg before pyplot: reports are written on headless training machines, where the default GUI backend
# would fail to start.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from mrtune.run.durable import atomic_file, read_jsonl, write_text_atomic  # noqa: E402
from mrtune.run.rundir import RunDir  # noqa: E402
from mrtune.task.mr import INVALID_ACT, METRIC_ROWS, dialogue_act_confusion, slot_errors, try_parse_mr  # noqa: E402

__all__ = [
    "metrics_table",
    "plot_confusion",
    "plot_dialogue_acts",
    "plot_loss_curve",
    "worst_examples",
    "write_report",
]

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
LOSS_CURVE = "loss_curve.png"
# Pictures this module owns; any of them not produced by the current rewrite is stale and removed.
OWNED_PICTURES = (LOSS_CURVE, "dialogue_acts_*.png", "confusion_*.png")

WORST_LIMIT = 20
SLOT_LIMIT = 10
DPI = 110


# -- formatting ------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True is never a meaningful loss or count here.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_seconds(seconds: float) -> str:
    """``12.3 s``, ``3 min 05 s`` or ``1 h 02 min``: the unit a reader would say out loud."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_millions(count: float) -> str:
    return f"{count / 1e6:,.1f} M"


def format_gigabytes(size: float) -> str:
    return f"{size / 1e9:.1f} GB"


def format_percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def format_count(count: float) -> str:
    return f"{count:,.0f}"


_FORMATTERS: dict[str, Callable[[float], str]] = {
    "count": format_count,
    "percent": format_percent,
    "seconds": format_seconds,
}


def _format(value: Any, formatter: Callable[[float], str]) -> str:
    """Format a number; anything else (a string where a number was expected) is shown as written."""
    if value is None:
        return "n/a"
    if not _is_number(value):
        return _cell(str(value))
    return formatter(value)


def _cell(text: Any) -> str:
    """Plain text safe inside a markdown table cell: one line, no column breaks, no stray HTML."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(text: Any) -> str:
    """An inline code span for an MR, fenced with more backticks than the text contains.

    Code spans keep MR brackets and underscores literal; `|` still needs escaping because GFM
    splits table cells before it parses code spans.
    """
    text = " ".join(str(text).split())
    if not text:
        return ""
    longest = _longest_backtick_run(text)
    fence = "`" * (longest + 1)
    # CommonMark strips one space from each end, which lets a span start or end with a backtick.
    padded = f" {text} " if longest else text
    return f"{fence}{padded}{fence}".replace("|", "\\|")


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def _fence(text: str, language: str = "") -> list[str]:
    """A fenced block whose fence is longer than any backtick run inside, so the text cannot close it."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [f"{fence}{language}", text.rstrip("\n"), fence]


def _table(header: list[str], rows: Iterable[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _image(alt: str, filename: str) -> str:
    # Eval names come from data file stems and may hold spaces, which would end a bare link target.
    return f"![{_cell(alt)}]({quote(filename)})"


# -- reading what is on disk -----------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a {type(data).__name__}, not an object")
    return data


class _Evaluation:
    """One `eval/<name>/` folder: its metrics and (read on demand) its predictions."""

    def __init__(self, name: str, folder: Path, metrics: dict[str, Any]):
        self.name = name
        self.folder = folder
        self.metrics = metrics
        self._predictions: tuple[list[dict[str, Any]], int] | None = None

    @property
    def is_base(self) -> bool:
        model = self.metrics.get("model")
        return model == "base" if model is not None else self.name.endswith("-base")

    def predictions(self) -> tuple[list[dict[str, Any]], int]:
        """Rows with a string reference and prediction, and how many lines could not be used."""
        if self._predictions is None:
            records, skipped = read_jsonl(self.folder / "predictions.jsonl")
            usable = [
                r for r in records if isinstance(r.get("reference"), str) and isinstance(r.get("prediction"), str)
            ]
            self._predictions = (usable, skipped + len(records) - len(usable))
        return self._predictions


def _load_evaluations(run: RunDir, notes: list[str]) -> list[_Evaluation]:
    root = run.path / "eval"
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:  # no eval/ yet (the usual case), or unreadable
        if root.exists():
            notes.append(f"`eval/` is unreadable ({_cell(error)})")
        return []
    evaluations = []
    for folder in folders:
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            notes.append(f"`eval/{folder.name}` has no metrics.json yet (evaluation unfinished?)")
            continue
        try:
            evaluations.append(_Evaluation(folder.name, folder, _read_json_object(metrics_file)))
        except (OSError, ValueError) as error:
            notes.append(f"`eval/{folder.name}/metrics.json` is unreadable ({_cell(error)})")
    return evaluations


# -- pictures --------------------------------------------------------------------------------------


def _save_png(fig: plt.Figure, path: Path) -> None:
    """Save beside the target and rename, so a reader (or a kill) never sees half a PNG."""
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=DPI)


def _series(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) pairs sorted by step, dropping NaN/inf losses so one bad step cannot blank the plot."""
    points = [(r["step"], r[key]) for r in history if _is_number(r.get("step")) and _is_number(r.get(key))]
    return sorted(points)


def plot_loss_curve(history: list[dict[str, Any]], path: Path, best_step: Any = None) -> bool:
    """Train loss (line) and validation loss (markers) against step, the best step starred.

    Returns False, writing nothing, when the history holds no loss at all.
    """
    train = _series(history, "train_loss")
    validation = _series(history, "validation_loss")
    if not train and not validation:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    try:
        if train:
            ax.plot(*zip(*train), color="tab:blue", linewidth=1.2, label="train loss")
        if validation:
            ax.plot(*zip(*validation), color="tab:orange", marker="o", linewidth=1.2, label="validation loss")
        _mark_best(ax, validation, best_step)
        values = [value for _, value in train + validation]
        # Early loss is often 10-100x the final one; a linear axis would flatten everything after warm-up.
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return True


def _mark_best(ax: plt.Axes, validation: list[tuple[float, float]], best_step: Any) -> None:
    """Star run.json's best step (the saved adapter); without it, the lowest validation loss."""
    if _is_number(best_step):
        losses = [loss for step, loss in validation if step == best_step]
        ax.axvline(best_step, color="grey", linestyle="--", linewidth=1)
        if not losses:
            return  # the best step's record is not in the history (e.g. a trimmed file): the line still shows it
        point = (best_step, losses[-1])
    elif validation:
        point = min(validation, key=lambda pair: pair[1])
        ax.axvline(point[0], color="grey", linestyle="--", linewidth=1)
    else:
        return
    ax.plot(
        [point[0]],
        [point[1]],
        linestyle="none",
        marker="*",
        markersize=15,
        color="tab:red",
        label=f"best: step {point[0]:g}, {point[1]:.4f}",
    )


def plot_dialogue_acts(per_dialogue_act: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """Horizontal bars per reference act: exact match and act accuracy in %, ``n`` in each label."""
    acts = [act for act, row in sorted(per_dialogue_act.items()) if isinstance(row, dict)]
    if not acts:
        return False
    rows = [per_dialogue_act[act] for act in acts]
    labels = [f"{act} (n={_format(row.get('n'), format_count)})" for act, row in zip(acts, rows)]
    exact = [_percent_or_zero(row.get("exact_match")) for row in rows]
    act_accuracy = [_percent_or_zero(row.get("dialogue_act_accuracy")) for row in rows]
    positions = np.arange(len(acts))
    height = 0.38
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.55 * len(acts)))
    try:
        bars = ax.barh(positions - height / 2, exact, height, color="tab:blue", label="exact match")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        bars = ax.barh(positions + height / 2, act_accuracy, height, color="tab:green", label="dialogue-act accuracy")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()  # alphabetical from the top, as in the tables
        ax.set_xlim(0, 108)  # room for the value labels of 100% bars
        ax.set_xlabel("%")
        # Title left and legend right, both above the axes, so neither covers a bar whatever the act count.
        ax.set_title(title, loc="left")
        ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=2, frameon=False, fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return True


def _percent_or_zero(rate: Any) -> float:
    return rate * 100 if _is_number(rate) else 0.0


def plot_confusion(confusion: dict[str, dict[str, int]], path: Path, title: str) -> bool:
    """Heat map of reference act (rows) x predicted act (columns), counts written in the cells.

    Colours are row-normalised so a rare act's mistakes show as clearly as a common one's; the
    ``<invalid>`` column (predictions that do not parse) is always last and always present.
    """
    references = list(confusion)
    if not references:
        return False
    predicted = {act for row in confusion.values() for act in row} - {INVALID_ACT}
    columns = references + sorted(predicted - set(references)) + [INVALID_ACT]
    counts = np.array([[confusion[ref].get(col, 0) for col in columns] for ref in references], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.75 * len(columns), 2.0 + 0.5 * len(references)))
    try:
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (row, column), count in np.ndenumerate(counts):
            if count:
                colour = "white" if shares[row, column] > 0.55 else "black"
                ax.text(column, row, f"{count:.0f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
        ax.set_yticks(range(len(references)), references)
        ax.set_xlabel("predicted act")
        ax.set_ylabel("reference act")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="share of the reference act's rows")
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
    return True


# -- tables ----------------------------------------------------------------------------------------


def metrics_table(evaluations: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: one column per evaluation, one row per metric (rates as percentages, 1 decimal)."""
    header = ["Metric"] + [_cell(name) for name, _ in evaluations]
    rows = [["Model"] + [_cell(metrics.get("model", "?")) for _, metrics in evaluations]]
    for label, key, kind in METRIC_ROWS:
        rows.append([label] + [_format(metrics.get(key), _FORMATTERS[kind]) for _, metrics in evaluations])
    return _table(header, rows, ["---"] + ["---:"] * len(evaluations))


def _slot_counts(reference: Any, prediction: Any) -> tuple[int, int]:
    """(reference slots the prediction got right, reference slots); order-insensitive like `score`."""
    reference_slots = set(reference.slots)
    prediction_slots = set(prediction.slots) if prediction is not None else set()
    return len(reference_slots & prediction_slots), len(reference_slots)


def _is_exact(row: dict[str, Any]) -> bool:
    flag = row.get("exact_match")
    if isinstance(flag, bool):
        return flag
    return row["prediction"].strip() == row["reference"].strip()


def worst_examples(rows: list[dict[str, Any]], limit: int = WORST_LIMIT) -> list[dict[str, Any]]:
    """The ``limit`` worst non-exact predictions, worst first, each with ``correct_slots``/``reference_slots``.

    Order: unparseable predictions first, then by the share of reference slots predicted correctly
    (lowest first), then a wrong dialogue act before a right one, then file order. A reference that
    does not parse (a custom data file) counts as 0 correct so it is not hidden.
    """
    ranked = []
    for index, row in enumerate(rows):
        if _is_exact(row):
            continue
        prediction, reference = try_parse_mr(row["prediction"]), try_parse_mr(row["reference"])
        if reference is None:
            correct, total, share, same_act = 0, 0, 0.0, False
        else:
            correct, total = _slot_counts(reference, prediction)
            # A slot-less reference that the prediction matched on slots is fully "right" on slots.
            share = correct / total if total else 1.0
            same_act = prediction is not None and prediction.dialogue_act == reference.dialogue_act
        key = (prediction is not None, share, same_act, index)
        ranked.append(
            (key, {**row, "parsed": prediction is not None, "correct_slots": correct, "reference_slots": total})
        )
    ranked.sort(key=lambda pair: pair[0])
    return [example for _, example in ranked[:limit]]


def _worst_examples_table(examples: list[dict[str, Any]]) -> list[str]:
    rows = []
    for rank, example in enumerate(examples, 1):
        slots = f"{example['correct_slots']}/{example['reference_slots']}" if example["parsed"] else "unparseable"
        rows.append(
            [
                str(rank),
                _cell(example.get("target", "")),
                _code(example["reference"]),
                _code(example["prediction"]),
                slots,
            ]
        )
    return _table(
        ["#", "Sentence", "Expected", "Predicted", "Slots right"], rows, ["---:", "---", "---", "---", "---:"]
    )


def _slot_error_table(rows: list[dict[str, Any]]) -> list[str]:
    """Top attributes missed and invented, side by side (a wrong value counts as both)."""
    errors = slot_errors([r["prediction"] for r in rows], [r["reference"] for r in rows])
    missed = list(errors["missed"].items())[:SLOT_LIMIT]
    invented = list(errors["invented"].items())[:SLOT_LIMIT]
    if not missed and not invented:
        return ["No slot was missed or invented."]
    table_rows = []
    for rank in range(max(len(missed), len(invented))):
        left = [f"`{missed[rank][0]}`", format_count(missed[rank][1])] if rank < len(missed) else ["", ""]
        right = [f"`{invented[rank][0]}`", format_count(invented[rank][1])] if rank < len(invented) else ["", ""]
        table_rows.append([str(rank + 1)] + left + right)
    return _table(
        ["#", "Missed attribute", "Rows", "Invented attribute", "Rows"],
        table_rows,
        ["---:", "---", "---:", "---", "---:"],
    )


# -- sections --------------------------------------------------------------------------------------


def _section(build: Callable[[], list[str]], what: str) -> list[str]:
    """Run one section builder; a failure becomes a line in the report, never the caller's exception."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - a report must not fail a finished train/evaluate
        log.warning("report: could not build %s: %s: %s", what, type(error).__name__, error)
        return [f"_Could not build {what}: {_cell(type(error).__name__)}: {_cell(error)}_", ""]


# (label, run.json key, formatter); trainable/total parameters are combined in _summary_rows.
SUMMARY_FIELDS = (
    ("mrtune version", "mrtune_version", str),
    ("Model", "model_path", str),
    ("Device", "device", str),
    ("Training rows", "train_rows", format_count),
    ("Total steps", "total_steps", format_count),
    ("Stopped by the time budget at step", "stopped_by_time_budget_at_step", format_count),
    ("Best step", "best_step", format_count),
    ("Best validation loss", "best_validation_loss", lambda v: f"{v:.4f}"),
    ("Training time", "train_seconds", format_seconds),
    ("Useful tokens/s", "useful_tokens_per_s", format_count),
    ("Peak GPU memory", "peak_memory_bytes", format_gigabytes),
)


def _summary_rows(info: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, key, formatter in SUMMARY_FIELDS:
        if key in info:
            rows.append([label, _format(info[key], formatter) if formatter is not str else _cell(info[key])])
    trainable, total = info.get("trainable_parameters"), info.get("total_parameters")
    if _is_number(trainable) and _is_number(total) and total > 0:
        rows.append(
            [
                "Trainable parameters",
                f"{format_millions(trainable)} of {format_millions(total)} ({trainable / total:.2%})",
            ]
        )
    else:
        for label, value in (("Trainable parameters", trainable), ("Total parameters", total)):
            if value is not None:
                rows.append([label, _format(value, format_millions)])
    # Anything else run.json records (start/finish times, token counts) is shown as written.
    shown = {key for _, key, _ in SUMMARY_FIELDS} | {"status", "trainable_parameters", "total_parameters"}
    for key in sorted(set(info) - shown):
        value = info[key]
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
        rows.append([_cell(key), _cell(text if len(text) <= 120 else text[:117] + "...")])
    return rows


def _summary_section(info: dict[str, Any]) -> list[str]:
    rows = _summary_rows(info)
    if not rows:
        return ["## Summary", "", "run.json records nothing yet.", ""]
    return ["## Summary", "", *_table(["", ""], rows), ""]


def _training_section(run: RunDir, info: dict[str, Any], produced: set[str]) -> list[str]:
    lines = ["## Training", ""]
    history, skipped = read_jsonl(run.history)
    if skipped:
        lines += [f"_{skipped} unreadable line(s) of history.jsonl were skipped._", ""]
    train_points = len(_series(history, "train_loss"))
    validation_points = len(_series(history, "validation_loss"))
    if not train_points and not validation_points:
        return lines + ["No training history yet: history.jsonl is missing or holds no loss.", ""]
    if plot_loss_curve(history, run.path / LOSS_CURVE, info.get("best_step")):
        produced.add(LOSS_CURVE)
        lines += [_image("Loss curve", LOSS_CURVE), ""]
    lines += [f"{train_points} train-loss and {validation_points} validation-loss records.", ""]
    return lines


def _evaluation_section(evaluations: list[_Evaluation], notes: list[str]) -> list[str]:
    lines = ["## Evaluation", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if not evaluations:
        return lines + ["No evaluation yet: run `mrtune evaluate` on this run directory.", ""]
    data_files = [
        f"- `{_cell(e.name)}` scores the data file `{_cell(e.metrics['data_file'])}`, not a split"
        for e in evaluations
        if e.metrics.get("data_file")
    ]
    return (
        lines
        + metrics_table([(e.name, e.metrics) for e in evaluations])
        + [""]
        + data_files
        + ([""] if data_files else [])
    )


def _details_section(run: RunDir, evaluation: _Evaluation, produced: set[str]) -> list[str]:
    """Pictures, slot errors and worst examples of one fine-tuned evaluation, each part on its own."""
    name = evaluation.name
    lines = [f"### {_cell(name)}", ""]

    def acts() -> list[str]:
        filename = f"dialogue_acts_{name}.png"
        per_act = evaluation.metrics.get("per_dialogue_act")
        if isinstance(per_act, dict) and plot_dialogue_acts(per_act, run.path / filename, f"{name}: per dialogue act"):
            produced.add(filename)
            return [_image(f"Per dialogue act, {name}", filename), ""]
        return ["No per-dialogue-act metrics.", ""]

    lines += _section(acts, f"the dialogue-act chart of {name}")
    rows, unusable = evaluation.predictions()
    if unusable:
        lines += [f"_{unusable} line(s) of predictions.jsonl were unusable and skipped._", ""]
    scorable = [r for r in rows if try_parse_mr(r["reference"]) is not None]
    if len(scorable) < len(rows):
        # `mr` rejects a whole list over one bad reference; leave those rows out of confusion and slots only.
        lines += [
            f"_{len(rows) - len(scorable)} row(s) have a reference that is not a valid MR; "
            "they are left out of the confusion matrix and slot counts._",
            "",
        ]
    if not rows:
        return lines + ["No predictions.jsonl rows to analyse.", ""]

    def confusion() -> list[str]:
        if not scorable:
            return []
        filename = f"confusion_{name}.png"
        matrix = dialogue_act_confusion([r["prediction"] for r in scorable], [r["reference"] for r in scorable])
        if plot_confusion(matrix, run.path / filename, f"{name}: dialogue-act confusion"):
            produced.add(filename)
            return [_image(f"Dialogue-act confusion, {name}", filename), ""]
        return []

    def slots() -> list[str]:
        if not scorable:
            return []
        return ["#### Slots most often missed and invented", "", *_slot_error_table(scorable), ""]

    def worst() -> list[str]:
        examples = worst_examples(rows)
        heading = [f"#### Worst examples ({len(examples)} of {sum(not _is_exact(r) for r in rows)} wrong)", ""]
        if not examples:
            return heading + [f"All {len(rows)} predictions are exact matches.", ""]
        return heading + _worst_examples_table(examples) + [""]

    lines += _section(confusion, f"the confusion matrix of {name}")
    lines += _section(slots, f"the slot error table of {name}")
    lines += _section(worst, f"the worst examples of {name}")
    return lines


def _config_section(run: RunDir) -> list[str]:
    if not run.config_file.is_file():
        return ["## Configuration", "", "No config.yaml.", ""]
    text = run.config_file.read_text(encoding="utf-8", errors="replace")
    try:
        yaml.safe_load(text)
        note = []
    except yaml.YAMLError:
        note = ["_config.yaml does not parse as YAML; shown as written._", ""]
    # A blank line after <summary> lets GitHub render the fence inside <details> as markdown.
    return [
        "## Configuration",
        "",
        *note,
        "<details><summary>config.yaml</summary>",
        "",
        *_fence(text, "yaml"),
        "",
        "</details>",
        "",
    ]


def _remove_stale_pictures(run: RunDir, produced: set[str]) -> None:
    """Drop owned pictures this rewrite did not produce (a deleted eval, a plot that now fails)."""
    for pattern in OWNED_PICTURES:
        for path in run.path.glob(pattern):
            if path.name not in produced:
                try:
                    path.unlink()
                except OSError as error:
                    log.warning("report: could not remove stale %s: %s", path, error)


# -- entry point -----------------------------------------------------------------------------------


def write_report(run: RunDir) -> Path:
    """(Re)write ``RUN/report.md`` and its PNGs from what is on disk; returns the report's path.

    Missing or damaged pieces (no history, no evaluation, a torn line) become lines in the report.
    Only failing to write report.md itself raises, as that is a disk problem the user must see.
    """
    notes: list[str] = []
    info: dict[str, Any] = {}
    if run.run_json.is_file():
        try:
            info = _read_json_object(run.run_json)
        except (OSError, ValueError) as error:
            notes.append(f"run.json is unreadable ({_cell(error)})")
    else:
        notes.append("no run.json")
    status = info.get("status", "unknown")
    produced: set[str] = set()
    lines = [f"# Run `{run.path.name}`: {_cell(status)}", ""]
    lines += [f"_{note}_" for note in notes] + ([""] if notes else [])
    lines += _section(lambda: _summary_section(info), "the summary")
    lines += _section(lambda: _training_section(run, info, produced), "the loss curve")
    eval_notes: list[str] = []
    evaluations = _load_evaluations(run, eval_notes)
    lines += _section(lambda: _evaluation_section(evaluations, eval_notes), "the metrics table")
    for evaluation in evaluations:
        if not evaluation.is_base:
            lines += _section(
                lambda e=evaluation: _details_section(run, e, produced), f"the details of {evaluation.name}"
            )
    lines += _section(lambda: _config_section(run), "the configuration")
    _remove_stale_pictures(run, produced)
    report = run.path / REPORT_NAME
    write_text_atomic(report, "\n".join(lines).rstrip("\n") + "\n")
    return report
