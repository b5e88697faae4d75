"""The training loop's parts that need no model: LoopState (checkpoint state, clock) and the metric sinks."""

from __future__ import annotations

import math
import time

import pytest

from mrtune.errors import MrtuneError
from mrtune.run.rundir import RunDir
from mrtune.train.sinks import HistorySink, MetricSinks, ProgressBar, TensorBoardSink
from mrtune.train.state import LoopState

# state.json as mrtune wrote it before LoopState (a checkpoint of step 6 of 12).
OLD_STATE_JSON = {
    "step": 6,
    "total_steps": 12,
    "processes": 1,
    "data_fingerprint": "0123456789abcdef",
    "best_validation_loss": 2.5,
    "bad_in_a_row": 1,
    "skipped_steps": 2,
    "useful_tokens": 4000,
    "padded_tokens": 4500,
    "train_seconds": 12.5,
    "eval_seconds": 3.25,
    "fsdp": False,
    "mrtune_version": "0.1.0",
}


def test_a_checkpoint_of_before_loads_and_saves_the_same_keys():
    state = LoopState.from_state_dict(OLD_STATE_JSON)
    assert (state.step, state.best_validation_loss, state.bad_in_a_row, state.skipped_steps) == (6, 2.5, 1, 2)
    assert (state.useful_tokens, state.padded_tokens, state.train_seconds, state.eval_seconds) == (
        4000,
        4500,
        12.5,
        3.25,
    )
    state.start_clock()
    saved = state.state_dict()
    assert saved.keys() == OLD_STATE_JSON.keys()
    assert {k: v for k, v in saved.items() if k not in ("train_seconds", "mrtune_version")} == {
        k: v for k, v in OLD_STATE_JSON.items() if k not in ("train_seconds", "mrtune_version")
    }
    assert 12.5 <= saved["train_seconds"] < 13.5  # the clock continues from the checkpoint's training time


def test_no_best_loss_yet_is_saved_as_null_and_read_back_as_infinity():
    state = LoopState(total_steps=4, processes=2, data_fingerprint="f", fsdp=True)
    state.start_clock()
    saved = state.state_dict()
    assert saved["best_validation_loss"] is None and saved["step"] == 0 and saved["fsdp"] is True
    again = LoopState(total_steps=0, processes=0, data_fingerprint="", fsdp=False)
    again.load_state_dict(saved)
    assert math.isinf(again.best_validation_loss) and (again.total_steps, again.processes, again.fsdp) == (4, 2, True)


def test_a_checkpoint_of_before_fsdp_reads_as_not_sharded_and_a_damaged_one_is_refused():
    before_fsdp = {k: v for k, v in OLD_STATE_JSON.items() if k != "fsdp"}
    assert LoopState.from_state_dict(before_fsdp).fsdp is False
    damaged = {k: v for k, v in OLD_STATE_JSON.items() if k not in ("step", "useful_tokens")}
    with pytest.raises(MrtuneError, match=r"RUN/checkpoint/state.json lacks step, useful_tokens: the checkpoint is"):
        LoopState.from_state_dict(damaged, "RUN/checkpoint/state.json")


def test_resume_refusals_name_what_changed():
    saved = LoopState.from_state_dict(OLD_STATE_JSON)
    same = LoopState(total_steps=12, processes=1, data_fingerprint="0123456789abcdef", fsdp=False)
    assert saved.resume_refusal(same) is None
    assert saved.resume_refusal(LoopState(12, 1, "other", False)) == "the training data or tokenizer changed"
    assert saved.resume_refusal(LoopState(12, 2, same.data_fingerprint, False)) == (
        "it ran on 1 process(es), this resume on 2"
    )
    assert saved.resume_refusal(LoopState(12, 1, same.data_fingerprint, True)) == (
        "it ran without FSDP, this resume with it"
    )


def test_the_clock_leaves_evaluation_out():
    state = LoopState(total_steps=1, processes=1, data_fingerprint="f", fsdp=False)
    state.start_clock()
    time.sleep(0.05)
    state.eval_seconds += 0.05  # as if those 50 ms were spent evaluating
    assert 0 <= state.elapsed() < 0.04


class RecordingSink:
    def __init__(self):
        self.records, self.flushes, self.closes = [], 0, 0

    def log(self, record):
        self.records.append(record)

    def flush(self):
        self.flushes += 1

    def close(self, failed=False):
        self.closes += 1
        self.failed = failed


def test_metric_sinks_fan_out_and_close_once():
    first, second = RecordingSink(), RecordingSink()
    sinks = MetricSinks([first])
    sinks.add(second)
    sinks.log({"step": 1, "train_loss": 2.0})
    sinks.flush()
    sinks.close(failed=True)
    sinks.close()  # a second close is harmless
    assert first.records == second.records == [{"step": 1, "train_loss": 2.0}]
    assert (first.flushes, first.closes, second.closes, second.failed) == (1, 1, 1, True)


def test_history_and_tensorboard_sinks_write_what_the_loop_logs(tmp_path):
    run = RunDir(tmp_path)
    history = HistorySink(run)
    history.log({"step": 1, "train_loss": 2.0})
    history.log({"step": 1, "validation_loss": 2.5})
    assert run.read_history() == [{"step": 1, "train_loss": 2.0}, {"step": 1, "validation_loss": 2.5}]

    class Writer:
        scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    board = TensorBoardSink(Writer())
    board.log({"step": 3, "epoch": 0.0, "train_loss": 1.5, "learning_rate": 1e-3, "grad_norm": 0.5,
               "useful_tokens": 10, "useful_tokens_per_s": 99.0, "elapsed_s": 1.0})  # fmt: skip
    board.log({"step": 4, "validation_loss": 1.25})
    assert Writer.scalars == [
        ("loss/train", 1.5, 3),
        ("learning_rate", 1e-3, 3),
        ("grad_norm", 0.5, 3),
        ("useful_tokens_per_s", 99.0, 3),
        ("loss/validation", 1.25, 4),
    ]


def test_the_progress_bar_shows_loss_speed_and_time_left(capsys):
    bar = ProgressBar(total=10, initial=2, time_budget_s=60.0, enabled=True)
    bar.advance()
    bar.log({"step": 3, "validation_loss": 1.0})  # not a training record: no postfix
    assert not bar.bar.postfix and bar.bar.n == 3
    bar.log({"step": 3, "train_loss": 1.23456, "useful_tokens_per_s": 512.4, "elapsed_s": 15.2})
    assert bar.bar.postfix == "left=45s, loss=1.2346, tok_s=512"  # tqdm sorts the keys
    bar.close()
    assert "3/10" in capsys.readouterr().err
