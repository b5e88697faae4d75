"""Resume: a training run stopped at any moment continues from its last checkpoint to the very same result.

The reference is an uninterrupted run with the same seed. The stopped-and-resumed runs must match it bit for bit
(tolerance zero): every adapter tensor, and the train loss, gradient norm, learning rate and validation loss of
every step. LoRA dropout is on, so this also checks that the random states are restored, and the 12 steps span
two epochs, so the data position is restored across an epoch boundary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.run.rundir import RunDir

RESUME_SETTINGS = [
    "train.max_steps=12",
    "train.checkpoint_every=3",
    "train.eval_every=4",
    "lora.dropout=0.1",
    "eval.max_new_tokens=4",
]
CURVE_KEYS = ("step", "epoch", "train_loss", "grad_norm", "learning_rate", "useful_tokens", "validation_loss")


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, tmp_path_factory):
    from conftest import write_viggo_splits

    base = tmp_path_factory.mktemp("resume-data")
    data = write_viggo_splits(base, (("train", 48), ("validation", 8), ("test", 6)))
    return [
        f"model.name={tiny_model_dir}",
        "model.dtype=float32",
        *(f"data.{s}={p}" for s, p in data.items()),
        "lora.r=4",
        "lora.alpha=8",
        "train.batch_size=8",
        "train.log_every=1",
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        *RESUME_SETTINGS,
    ]


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> RunDir:
    from mrtune.train.recipe import train

    return train(load_config(None, overrides), tmp_path_factory.mktemp("reference") / "run", progress=False)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _curve(run: RunDir) -> list[tuple]:
    return [tuple(record.get(key) for key in CURVE_KEYS) for record in run.read_history()]


def assert_same_as_uninterrupted(run: RunDir, reference: RunDir) -> None:
    expected = load_file(reference.adapter / "adapter_model.safetensors")
    actual = load_file(run.adapter / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs"
    assert _curve(run) == _curve(reference)  # also: no step logged twice
    info, expected_info = run.info(), reference.info()
    for key in ("status", "best_step", "best_validation_loss", "skipped_steps", "useful_tokens", "padded_tokens"):
        assert info[key] == expected_info[key], key
    assert not run.checkpoint.exists()


def _checkpoint_step(run: RunDir) -> int | None:
    try:
        return json.loads((run.checkpoint / "state.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError):  # not written yet, or in the middle of its swap
        return None


@pytest.mark.slow  # a real training process: ~5 s of imports before its first step
def test_sigkilled_training_resumes_to_the_uninterrupted_result(overrides, reference, tmp_path):
    run = RunDir(tmp_path / "killed")
    log = tmp_path / "train.log"
    # The same intra-op thread count as this process: float sums split over threads must split the same way.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mrtune", "train", "--output-dir", str(run.path), *_sets(overrides)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:  # kill once a checkpoint exists and a later step has been trained and logged
            step = _checkpoint_step(run)
            logged = [r["step"] for r in run.read_history() if "train_loss" in r]
            if step is not None and logged and max(logged) > step:
                break
            assert process.poll() is None, f"training ended before it could be killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint within 120 s:\n{log.read_text()}"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert run.info()["status"] == "running"  # killed: it could not say anything else
    checkpoint_step = _checkpoint_step(run)
    assert max(r["step"] for r in run.read_history()) > checkpoint_step  # steps past the checkpoint were logged

    assert main(["train", "--resume", str(run.path)]) == 0
    assert_same_as_uninterrupted(run, reference)
    assert run.info()["resumed_at_steps"] == [checkpoint_step]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_resumes(overrides, reference, tmp_path, capsys, signal_number):
    run = RunDir(tmp_path / "stopped")

    def send_after_step_4():
        while not any(r.get("step", 0) >= 4 for r in run.read_history()):
            time.sleep(0.005)
        os.kill(os.getpid(), signal_number)

    # A signal that came after training had ended would reach pytest's own handlers: catch it here instead.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    sender = threading.Thread(target=send_after_step_4, daemon=True)
    try:
        sender.start()
        code = main(["train", "--output-dir", str(run.path), *_sets(overrides)])
        sender.join(timeout=10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert code == 128 + signal_number
    info = run.info()
    stopped_at = info["interrupted_at_step"]
    assert 4 <= stopped_at < 12 and info["status"] == "interrupted"
    assert capsys.readouterr().err.endswith(
        f"interrupted at step {stopped_at} of 12 ({signal.Signals(signal_number).name}): resume with "
        f"`mrtune train --resume {run.path}`\n"
    )
    assert _checkpoint_step(run) == stopped_at  # the step in progress was finished, then saved
    assert max(r["step"] for r in run.read_history()) == stopped_at

    assert main(["train", "--resume", str(run.path)]) == 0
    assert_same_as_uninterrupted(run, reference)
