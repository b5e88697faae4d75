"""The training loop's state: the counters a checkpoint saves beside the adapter, optimizer, scheduler and random
states (RUN/checkpoint/state.json), and the clock that keeps evaluation out of the training time."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from mrtune import __version__
from mrtune.errors import MrtuneError


@dataclass
class LoopState:
    """Where the loop stands after `step` optimizer steps (skipped ones included).

    The first four fields describe the set-up the run was started in: a resume must match them exactly. The data
    position needs no field: step N fixes it (see checkpoint.py).
    """

    total_steps: int
    processes: int  # ranks: each step consumes gradient_accumulation x processes micro-batches
    data_fingerprint: str  # checkpoint.data_fingerprint of the tokenized training rows
    fsdp: bool  # the optimizer state is saved keyed by parameter name under FSDP, by position elsewhere
    step: int = 0
    best_validation_loss: float = math.inf
    bad_in_a_row: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    skipped_steps: int = 0
    useful_tokens: int = 0  # tokens of the rows trained on, all ranks, padding excluded
    padded_tokens: int = 0  # tokens of the micro-batches as run, padding included
    train_seconds: float = 0.0  # at the last checkpoint (or 0): `elapsed()` is the running value
    eval_seconds: float = 0.0  # evaluation, kept out of the training time and throughput
    stopped_early: int | None = None  # the step at which train.time_budget_s ran out (never saved: the run ends)
    _started: float = field(default=0.0, repr=False, compare=False)

    # -- the clock ---------------------------------------------------------------------------------------------
    def start_clock(self) -> None:
        """Count training seconds from now on, on top of those before the checkpoint."""
        self._started = time.perf_counter() - self.train_seconds - self.eval_seconds

    def elapsed(self) -> float:
        """Training seconds so far: wall time since the start, less evaluation."""
        return time.perf_counter() - self._started - self.eval_seconds

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What RUN/checkpoint/state.json holds (JSON types; the keys of every mrtune checkpoint so far)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "processes": self.processes,
            "data_fingerprint": self.data_fingerprint,
            "best_validation_loss": None if math.isinf(self.best_validation_loss) else self.best_validation_loss,
            "bad_in_a_row": self.bad_in_a_row,
            "skipped_steps": self.skipped_steps,
            "useful_tokens": self.useful_tokens,
            "padded_tokens": self.padded_tokens,
            "train_seconds": self.elapsed(),
            "eval_seconds": self.eval_seconds,
            "fsdp": self.fsdp,
            "mrtune_version": __version__,
        }

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], where: str = "state.json") -> LoopState:
        """The state `state_dict` saved; `where` names the file in the error a damaged one gives."""
        names = {f.name for f in dataclasses.fields(cls) if f.name not in ("stopped_early", "_started")}
        missing = sorted(names - {"fsdp"} - set(saved))  # checkpoints of mrtune before FSDP have no "fsdp"
        if missing:
            raise MrtuneError(
                f"{where} lacks {', '.join(missing)}: the checkpoint is damaged or not mrtune's; start the run again"
            )
        values = {name: saved[name] for name in names if name in saved}
        values["fsdp"] = bool(saved.get("fsdp", False))
        if values["best_validation_loss"] is None:
            values["best_validation_loss"] = math.inf
        return cls(**values)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take every saved field of `saved` (a `state_dict()`), in place."""
        restored = self.from_state_dict(saved)
        for f in dataclasses.fields(self):
            if f.name not in ("stopped_early", "_started"):
                setattr(self, f.name, getattr(restored, f.name))

    def resume_refusal(self, now: LoopState) -> str | None:
        """Why a run saved in this state cannot continue exactly in the set-up `now` (None: it can)."""
        if self.data_fingerprint != now.data_fingerprint:
            return "the training data or tokenizer changed"
        if self.processes != now.processes:
            return f"it ran on {self.processes} process(es), this resume on {now.processes}"
        if self.fsdp != now.fsdp:
            return "it ran with FSDP, this resume without" if self.fsdp else "it ran without FSDP, this resume with it"
        return None
