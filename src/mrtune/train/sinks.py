"""Where the training loop's records go: one interface (`log(record)`, `flush()`, `close(failed)`) in front of the
run's history.jsonl, the progress bar, TensorBoard and Weights & Biases.

A record is a flat dict with a "step": a training record (train_loss, learning_rate, grad_norm, tokens, elapsed_s)
or a validation record (validation_loss).
"""

from __future__ import annotations

from typing import Any, Protocol

from tqdm.auto import tqdm

from mrtune.config import Config
from mrtune.errors import MrtuneError
from mrtune.run.rundir import RunDir

Record = dict[str, Any]


class MetricSink(Protocol):
    def log(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self, failed: bool = False) -> None:
        """The run ended (`failed`: by an error; a stop asked for by a signal is not a failure)."""
        ...


class HistorySink:
    """RUN/history.jsonl, one line per record, appended as it comes (a kill tears at most the last line)."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, record: Record) -> None:
        self.run.append_history(record)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class ProgressBar:
    """The tqdm bar: advanced once per optimizer step taken; a training record sets its loss and speed."""

    def __init__(self, *, total: int, initial: int, time_budget_s: float | None, enabled: bool):
        self.time_budget_s = time_budget_s
        # With a time budget the bar's total is the step count's upper bound; its postfix says the time left.
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            disable=not enabled,
            desc="training" if time_budget_s is None else f"training ({time_budget_s:.0f} s budget)",
        )

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, record: Record) -> None:
        if "train_loss" not in record:
            return
        left = {}
        if self.time_budget_s is not None:
            left = {"left": f"{max(0.0, self.time_budget_s - record['elapsed_s']):.0f}s"}
        self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['useful_tokens_per_s']:.0f}", **left)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.bar.close()


class TensorBoardSink:
    """RUN/tensorboard/: the curves of the history, for TensorBoard."""

    SCALARS = {
        "train_loss": "loss/train",
        "learning_rate": "learning_rate",
        "grad_norm": "grad_norm",
        "useful_tokens_per_s": "useful_tokens_per_s",
        "validation_loss": "loss/validation",
    }

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run: RunDir, purge_step: int | None = None) -> TensorBoardSink | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an install dependency; tolerate a trimmed environment
            return None
        # purge_step: on resume, TensorBoard drops the events logged after the checkpoint, which are replayed.
        return cls(SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=purge_step))

    def log(self, record: Record) -> None:
        for key, tag in self.SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["step"])

    def flush(self) -> None:
        self.writer.flush()  # its events up to a checkpoint must survive a kill (it flushes every 2 min otherwise)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (train.wandb_project), named after the run directory."""

    def __init__(self, config: Config, run: RunDir):
        try:
            import wandb
        except ImportError:
            raise MrtuneError("train.wandb_project is set but wandb is not installed: pip install wandb") from None
        self.wandb_run = wandb.init(
            project=config.train.wandb_project, config=config.to_dict(), dir=str(run.path), name=run.path.name
        )

    def log(self, record: Record) -> None:
        self.wandb_run.log(record, step=record["step"])

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.wandb_run.finish(exit_code=1 if failed else 0)


class MetricSinks:
    """Every sink of a run behind one `log` / `flush` / `close`; closing twice is harmless."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    @classmethod
    def for_run(cls, config: Config, run: RunDir, *, resumed_at: int | None, is_main: bool) -> MetricSinks:
        """History, TensorBoard and W&B on the main rank; none elsewhere (only the main rank writes the run)."""
        if not is_main:
            return cls([])
        sinks: list[MetricSink] = [HistorySink(run)]
        tensorboard = TensorBoardSink.open(run, purge_step=None if resumed_at is None else resumed_at + 1)
        if tensorboard is not None:
            sinks.append(tensorboard)
        if config.train.wandb_project:
            sinks.append(WandbSink(config, run))
        return cls(sinks)

    def add(self, sink: MetricSink) -> None:
        self.sinks.append(sink)

    def log(self, record: Record) -> None:
        for sink in self.sinks:
            sink.log(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)
