"""Tests for mrtune.run.report: the report page and its pictures, built from a hand-made run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mrtune.run.report import worst_examples, write_report
from mrtune.run.rundir import RunDir
from mrtune.task.mr import score

# (sentence, reference, prediction): two exact matches, one unparseable prediction, one wrong act,
# one missed slot and one wrong value (with a `|` in the sentence, to check cell escaping).
ROWS = [
    ("Portal 2 is a good game.", "inform(name[Portal 2], rating[good])", "inform(name[Portal 2], rating[good])"),
    ("What kind of game do you like?", "request(specifier[short])", "request(specifier[short])"),
    ("BROKEN Halo is fun to play.", "inform(name[Halo], rating[good])", "inform(name[Halo"),
    ("WRONGACT I think Myst is poor.", "give_opinion(name[Myst], rating[poor])", "inform(name[Myst], rating[poor])"),
    (
        "MISSED Tetris, a 1984 puzzle game.",
        "inform(name[Tetris], genres[puzzle], release_year[1984])",
        "inform(name[Tetris], genres[puzzle])",
    ),
    (
        "VALUE Doom | the classic is excellent.",
        "inform(name[Doom], rating[excellent])",
        "inform(name[Doom], rating[poor])",
    ),
]

PICTURES = {"loss_curve.png", "dialogue_acts_test.png", "confusion_test.png"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _make_run(root: Path) -> RunDir:
    run = RunDir(root / "my-run")
    (run.path / "eval" / "test").mkdir(parents=True)
    (run.path / "eval" / "test-base").mkdir(parents=True)
    (run.path / "run.json").write_text(
        json.dumps(
            {
                "mrtune_version": "0.1.0",
                "status": "finished",
                "model_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "device": "cuda",
                "train_rows": 5103,
                "trainable_parameters": 4_884_480,
                "total_parameters": 139_400_000,
                "total_steps": 100,
                "best_step": 60,
                "best_validation_loss": 0.1234,
                "train_seconds": 3725.4,
                "useful_tokens_per_s": 12345.6,
                "peak_memory_bytes": 12_300_000_000,
            }
        ),
        encoding="utf-8",
    )
    (run.path / "config.yaml").write_text(
        "model:\n  name: smollm2\ntrain:\n  learning_rate: 0.0002\n", encoding="utf-8"
    )
    history = [
        {
            "step": s,
            "epoch": s / 100,
            "train_loss": 3.0 / (s / 10) ** 1.5,
            "learning_rate": 2e-4,
            "grad_norm": 1.0,
            "useful_tokens_per_s": 12000.0,
            "elapsed_s": s * 3.0,
        }
        for s in range(10, 101, 10)
    ]
    history += [{"step": s, "validation_loss": loss} for s, loss in ((30, 0.5), (60, 0.1234), (90, 0.13))]
    _write_jsonl(run.history, history)

    predictions = [row[2] for row in ROWS]
    references = [row[1] for row in ROWS]
    metrics = score(predictions, references)
    metrics.update(split="test", model="fine-tuned", decode_seconds=12.34, rows_per_s=0.49)
    (run.eval_dir("test") / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    _write_jsonl(
        run.eval_dir("test") / "predictions.jsonl",
        [{"target": s, "reference": r, "prediction": p, "exact_match": p == r} for s, r, p in ROWS],
    )
    (run.eval_dir("test-base") / "metrics.json").write_text(
        json.dumps(
            {
                "n": 6,
                "exact_match": 0.05,
                "exact_match_unordered": 0.1,
                "dialogue_act_accuracy": 0.5,
                "slot_precision": 0.25,
                "slot_recall": 0.125,
                "slot_f1": 0.1667,
                "valid_mr_rate": 0.8333,
                "per_dialogue_act": {},
                "split": "test",
                "model": "base",
                "decode_seconds": 75.0,
                "rows_per_s": 0.08,
            }
        ),
        encoding="utf-8",
    )
    return run


def _table_after(text: str, heading: str) -> list[str]:
    """Data rows of the first markdown table after a heading that starts with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table[2:]  # skip header and alignment rows


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[RunDir, str]:
    run = _make_run(tmp_path_factory.mktemp("report"))
    (run.path / "confusion_gone.png").write_bytes(b"\x89PNG stale")  # from an evaluation since deleted
    report = write_report(run)
    assert report == run.path / "report.md"
    return run, report.read_text(encoding="utf-8")


def test_title_and_summary_are_humanised(written):
    _, text = written
    assert text.startswith("# Run `my-run`: finished\n")
    assert "| Training time | 1 h 02 min |" in text
    assert "| Peak GPU memory | 12.3 GB |" in text
    assert "| Trainable parameters | 4.9 M of 139.4 M (3.50%) |" in text
    assert "| Best validation loss | 0.1234 |" in text


def test_metrics_table_has_one_column_per_evaluation(written):
    _, text = written
    assert "| Metric | test | test-base |" in text
    assert "| Rows (n) | 6 | 6 |" in text
    assert "| Exact match | 33.3% | 5.0% |" in text
    assert "| Dialogue-act accuracy | 66.7% | 50.0% |" in text  # the wrong act and the unparseable row
    assert "| Valid MR rate | 83.3% | 83.3% |" in text
    assert "| Decode time | 12.3 s | 1 min 15 s |" in text


def test_exactly_the_expected_pictures_are_written_atomically(written):
    run, text = written
    assert {p.name for p in run.path.glob("*.png")} == PICTURES  # no base pictures; the stale one removed
    for name in PICTURES:
        assert (run.path / name).read_bytes().startswith(b"\x89PNG")
        assert f"]({name})" in text
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_worst_examples_put_unparseable_first_and_skip_exact_matches(written):
    _, text = written
    table = _table_after(text, "#### Worst examples")
    assert len(table) == 4
    assert "BROKEN" in table[0] and "unparseable" in table[0]
    # Then by share of reference slots right: 1/2, 2/3, 2/2 (right slots, wrong act).
    assert ["VALUE" in table[1], "MISSED" in table[2], "WRONGACT" in table[3]] == [True] * 3
    assert "Doom \\| the classic" in table[1]
    assert not any("Portal 2" in row or "specifier" in row for row in table)


def test_slot_error_table(written):
    _, text = written
    table = _table_after(text, "#### Slots most often missed and invented")
    # Missed: name+rating (unparseable), release_year, rating (wrong value) -> rating 2; invented: rating 1.
    assert table[0] == "| 1 | `rating` | 2 | `rating` | 1 |"


def test_config_is_shown_as_yaml(written):
    _, text = written
    assert "```yaml\nmodel:\n  name: smollm2\ntrain:\n  learning_rate: 0.0002\n```" in text


def test_rewriting_is_idempotent(written):
    run, text = written
    write_report(run)
    assert (run.path / "report.md").read_text(encoding="utf-8") == text


def test_worst_examples_order_and_limit():
    rows = [{"target": s, "reference": r, "prediction": p} for s, r, p in ROWS]
    worst = worst_examples(rows, limit=2)
    assert [w["target"].split()[0] for w in worst] == ["BROKEN", "VALUE"]
    assert (worst[1]["correct_slots"], worst[1]["reference_slots"]) == (1, 2)


def test_run_with_only_run_json_still_gets_a_report(tmp_path):
    run = RunDir(tmp_path / "early")
    run.path.mkdir()
    (run.path / "run.json").write_text(json.dumps({"status": "running"}), encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    assert text.startswith("# Run `early`: running")
    assert "No training history yet" in text
    assert "No evaluation yet" in text
    assert not list(run.path.glob("*.png"))


def test_damaged_pieces_become_lines_not_exceptions(tmp_path):
    run = _make_run(tmp_path)
    with open(run.history, "a", encoding="utf-8") as handle:
        handle.write('{"step": 110, "train_lo')  # torn by a kill
    (run.eval_dir("test-base") / "metrics.json").write_text("{not json", encoding="utf-8")
    (run.eval_dir("mydata")).mkdir()
    (run.eval_dir("mydata") / "metrics.json").write_text(json.dumps({"n": 1, "model": "fine-tuned"}), encoding="utf-8")
    _write_jsonl(
        run.eval_dir("mydata") / "predictions.jsonl",
        [{"target": "x", "reference": "not an MR", "prediction": "inform(name[X])", "exact_match": False}],
    )
    text = write_report(run).read_text(encoding="utf-8")
    assert "1 unreadable line(s) of history.jsonl were skipped" in text
    assert "`eval/test-base/metrics.json` is unreadable" in text
    assert "| Metric | mydata | test |" in text
    assert "reference that is not a valid MR" in text
    assert (run.path / "loss_curve.png").is_file()
