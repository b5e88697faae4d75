"""Training, best checkpoint, resume, signals and files, checked on the values a broken implementation gets wrong.

Each test kills a class of realistic bug that once passed the whole suite (issue 18): packed rows attending to
each other in the training step, the adapter saved at every evaluation rather than only on improvement, the best
validation loss forgotten on resume, a data fingerprint that ignores the labels, a second Ctrl-C ignored, and a
text write that is not atomic. Only public entry points are used (`train`, the CLI, the run directory's files),
and the runs are stopped through accelerate's public `Accelerator.backward`.

The runs use a learning rate high enough that the validation loss rises again after its best step: the best
adapter must then be an earlier one than the last, which is what tells a correct best-checkpoint from a broken one.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.errors import MrtuneError
from mrtune.run.durable import write_json, write_text_atomic
from mrtune.run.rundir import RunDir

STEPS = 3  # with these settings the validation loss is best at step 1 and higher at steps 2 and 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import write_viggo_splits

    base = tmp_path_factory.mktemp("bugs-train-data")
    return write_viggo_splits(base, (("train", 32), ("validation", 8), ("test", 4)))


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, data) -> list[str]:
    from conftest import tiny_run_overrides

    return tiny_run_overrides(
        tiny_model_dir,
        data,
        "lora.dropout=0.0",
        f"train.max_steps={STEPS}",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.learning_rate=0.2",  # high on purpose: the validation loss rises again after its best step
        "train.schedule=constant",  # a schedule independent of max_steps: a shorter run is a prefix of a longer
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        "eval.max_new_tokens=4",
    )


def _train(overrides, path, *extra):
    from mrtune.train.recipe import train

    return train(load_config(None, [*overrides, *extra]), path, progress=False)


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> RunDir:
    return _train(overrides, tmp_path_factory.mktemp("bugs-train-reference") / "run")


def _validation(run: RunDir) -> list[tuple[int, float]]:
    return [(r["step"], r["validation_loss"]) for r in run.read_history() if "validation_loss" in r]


def _best_step(run: RunDir) -> int:
    losses = _validation(run)
    best = min(loss for _, loss in losses)
    return next(step for step, loss in losses if loss == best)  # the first step to reach it is the one saved


def _adapter(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(run.adapter / "adapter_model.safetensors")


def _same_adapter(run: RunDir, other: RunDir) -> bool:
    mine, theirs = _adapter(run), _adapter(other)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _fail_backward_at(monkeypatch, call: int, action=None) -> None:
    """Make the `call`-th backward pass (one per step here) fail: out of GPU memory, or `action()`."""
    from accelerate import Accelerator

    real = Accelerator.backward
    seen = {"calls": 0}

    def backward(self, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == call:
            if action is not None:
                action()
            else:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)


def test_a_packed_step_computes_the_loss_of_the_rows_run_alone(overrides, tmp_path):
    """One step over all 32 rows, padded or packed into one sequence: the same loss and the same update.

    Packed rows are separated only by their position ids; a step that does not pass them to the model lets every
    row attend to the rows before it, and its loss differs.
    """
    one_step = ["train.max_steps=1", "data.max_length=256"]
    padded = _train(overrides, tmp_path / "padded", *one_step, "train.batch_size=32")
    packed = _train(overrides, tmp_path / "packed", *one_step, "train.packing=true", "train.batch_tokens=4096")
    first, second = padded.read_history(), packed.read_history()
    assert first[0]["useful_tokens"] == second[0]["useful_tokens"]  # the same rows in the one micro-batch
    assert second[0]["padded_tokens"] == 4096 != first[0]["padded_tokens"]
    assert second[0]["train_loss"] == pytest.approx(first[0]["train_loss"], rel=1e-5)
    assert _validation(packed)[0][1] == pytest.approx(_validation(padded)[0][1], rel=1e-4)


def test_the_adapter_on_disk_is_the_best_steps(reference, overrides, tmp_path):
    losses = _validation(reference)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    best_step = _best_step(reference)
    assert best_step < STEPS, f"the validation loss never rose again ({losses}): raise train.learning_rate here"
    info = reference.info()
    assert info["best_step"] == best_step
    assert info["best_validation_loss"] == min(loss for _, loss in losses)
    # The same run stopped at the best step ends with the adapter of that step.
    shorter = _train(overrides, tmp_path / "shorter", f"train.max_steps={best_step}")
    assert _validation(shorter) == losses[:best_step]
    assert _same_adapter(reference, shorter), "the adapter on disk is not the best step's"


def test_resume_remembers_the_best_validation_loss(reference, overrides, tmp_path, monkeypatch):
    """Stopped right after the best step's checkpoint, a resumed run must not take a worse later step for the best."""
    best_step = _best_step(reference)
    run = RunDir(tmp_path / "run")
    _fail_backward_at(monkeypatch, call=best_step + 1)  # dies in the step after the best, once it is checkpointed
    with pytest.raises(MrtuneError, match="out of GPU memory"):
        _train(overrides, run.path)
    monkeypatch.undo()
    assert json.loads((run.checkpoint / "state.json").read_text())["step"] == best_step
    assert main(["train", "--resume", str(run.path)]) == 0
    assert _validation(run) == _validation(reference)
    for key in ("best_step", "best_validation_loss"):
        assert run.info()[key] == reference.info()[key], key
    assert _same_adapter(run, reference)


@pytest.fixture
def stopped_run(overrides, tmp_path, monkeypatch) -> RunDir:
    """A run that died in step 2, after the checkpoint of step 1."""
    run = RunDir(tmp_path / "stopped")
    _fail_backward_at(monkeypatch, call=2)
    with pytest.raises(MrtuneError, match="out of GPU memory"):
        _train(overrides, run.path)
    monkeypatch.undo()
    assert json.loads((run.checkpoint / "state.json").read_text())["step"] == 1
    return run


def _refused_as_changed_data(run: RunDir, capsys) -> None:
    capsys.readouterr()
    before = (run.checkpoint / "state.json").read_bytes(), run.history.read_bytes()
    assert main(["train", "--resume", str(run.path)]) == 2
    assert "the training data or tokenizer changed since its checkpoint" in capsys.readouterr().err
    assert ((run.checkpoint / "state.json").read_bytes(), run.history.read_bytes()) == before


def test_resume_refuses_changed_labels(stopped_run, capsys):
    """The loss on the whole row instead of the completion: the same token ids, other labels."""
    config = stopped_run.config_file.read_text(encoding="utf-8")
    assert config.count("completion_only: true") == 1
    stopped_run.config_file.write_text(config.replace("completion_only: true", "completion_only: false"))
    _refused_as_changed_data(stopped_run, capsys)


def test_resume_refuses_changed_meaning_representations(stopped_run, data, tmp_path, capsys):
    rows = [json.loads(line) for line in data["train"].read_text(encoding="utf-8").splitlines()]
    rows[5]["meaning_representation"] = rows[5]["meaning_representation"].replace("[", "[not ", 1)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = stopped_run.config_file.read_text(encoding="utf-8")
    assert config.count(str(data["train"])) == 1
    stopped_run.config_file.write_text(config.replace(str(data["train"]), str(changed)))
    _refused_as_changed_data(stopped_run, capsys)


def test_a_second_ctrl_c_stops_at_once(overrides, tmp_path, monkeypatch):
    """The first SIGINT asks for a checkpoint after the step; a second one, within the step, stops at once."""

    def press_ctrl_c_twice():
        signal.raise_signal(signal.SIGINT)  # runs the handler now: stop after this step
        signal.raise_signal(signal.SIGINT)  # and again: stop now

    run = RunDir(tmp_path / "run")
    handler = signal.getsignal(signal.SIGINT)
    _fail_backward_at(monkeypatch, call=3, action=press_ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        _train(overrides, run.path)
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers were given back
    info = run.info()
    assert info["status"] == "interrupted" and "interrupted_at_step" not in info
    assert max(r["step"] for r in run.read_history()) == 2  # step 3 never finished
    assert json.loads((run.checkpoint / "state.json").read_text())["step"] == 2  # the last periodic one


@pytest.mark.parametrize("write", [write_text_atomic, write_json], ids=["text", "json"])
def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, write):
    """A write that fails half-way (here: text that cannot be encoded) must leave the old content, no stray file."""
    path = tmp_path / "metrics.json"
    write(path, {"exact_match": 0.5} if write is write_json else "old content\n")
    before = path.read_bytes()
    bad = "x" * 100_000 + "\ud800"  # a lone surrogate: UTF-8 cannot encode it
    with pytest.raises(UnicodeEncodeError):
        write(path, {"text": bad} if write is write_json else bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_zero_decay_average_is_the_live_weights(reference, overrides, tmp_path):
    """train.ema_decay=0 averages nothing away: swapping the average in and out around each validation must leave
    the run exactly as without it (a swap that loses the live weights, or saves the wrong ones, shows here)."""
    run = _train(overrides, tmp_path / "ema0", "train.ema_decay=0.0")
    assert _validation(run) == _validation(reference)
    assert _same_adapter(run, reference)


def test_a_run_with_an_average_validates_it_and_resumes_to_the_same_result(reference, overrides, tmp_path, monkeypatch):
    averaged = _train(overrides, tmp_path / "ema", "train.ema_decay=0.5")
    losses = _validation(averaged)
    assert losses[0] == _validation(reference)[0]  # one update: the average is the weights
    assert losses[1:] != _validation(reference)[1:]  # then validation sees the average, not the last step
    run = RunDir(tmp_path / "stopped-ema")
    _fail_backward_at(monkeypatch, call=3)  # dies in step 3, after step 2's checkpoint
    with pytest.raises(MrtuneError, match="out of GPU memory"):
        _train(overrides, run.path, "train.ema_decay=0.5")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run.path)]) == 0
    assert _validation(run) == losses  # the averages came back from the checkpoint
    assert _same_adapter(run, averaged)


def test_an_average_is_refused_where_it_cannot_live(overrides, tmp_path):
    path = tmp_path / "refused"
    with pytest.raises(MrtuneError, match="train.ema_decay needs train.optimizer=adamw"):
        _train(overrides, path, "train.ema_decay=0.9", "train.optimizer=paged_adamw_8bit")
    assert not path.exists()
