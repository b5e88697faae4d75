"""The run directory: everything needed to reproduce, evaluate, predict and merge a run, and nothing else.

RUN/
  run.json            what ran: mrtune version, model path, status, best step, timings
  config.yaml         the resolved config (every default spelled out)
  prompt.txt          the prompt template, as the model saw it
  vocabulary.json     dialogue acts and attributes of the training split (for constrained decoding)
  tokenizer/          the tokenizer, with its pad token
  adapter/            the best LoRA adapter by validation loss (PEFT format)
  checkpoint/         while training: what `mrtune train --resume` needs (see checkpoint.py); removed at the end
  history.jsonl       one line per logged step: train loss, lr, tokens/s, validation loss
  tensorboard/        the same curves for TensorBoard
  eval/<name>/        metrics.json and predictions.jsonl of each `mrtune evaluate` (name: split, -base)
  report.md           the report, with loss_curve.png, dialogue_acts_<name>.png, confusion_<name>.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mrtune.config import Config, from_dict, to_yaml
from mrtune.errors import MrtuneError
from mrtune.run.durable import (
    FileLock,
    LockHeld,
    append_jsonl,
    is_locked,
    read_jsonl,
    write_dir_atomic,
    write_json,
    write_text_atomic,
)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def initial_adapter(self) -> Path:
        """The adapter as lora.init=pissa|olora made it, before training: what a saved adapter is converted against
        (removed when the run finishes)."""
        return self.path / "adapter-init"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def history(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def vocabulary(self) -> Path:
        return self.path / "vocabulary.json"

    def eval_dir(self, name: str) -> Path:
        return self.path / "eval" / name

    # -- life cycle ----------------------------------------------------------------------------------
    @classmethod
    def check_new(cls, path: str | Path, overwrite: bool = False) -> None:
        """Refuse an output directory that `create` would not take, touching nothing: `mrtune train` asks this
        first, and replaces an old run (--overwrite) only once the config, data and model have all been checked."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise MrtuneError(f"output directory {path} is a file: choose another --output-dir")
        if path.is_dir() and any(path.iterdir()):
            if not (path / "run.json").is_file():
                raise MrtuneError(
                    f"output directory {path} is not empty and holds no mrtune run: choose an empty or new "
                    "--output-dir (nothing there was touched)"
                )
            existing = cls(path)
            if existing.is_locked():
                raise MrtuneError(
                    f"output directory {path} holds a run that another process is training right now: choose "
                    "another --output-dir (nothing there was touched)"
                )
            if not overwrite:
                resumable = (existing.checkpoint / "state.json").is_file() or (
                    existing.path / "checkpoint.old" / "state.json"
                ).is_file()
                hint = f"resume it with `mrtune train --resume {path}`, " if resumable else ""
                raise MrtuneError(
                    f"output directory {path} already holds a run (status: {existing.status()}): {hint}pass "
                    "--overwrite to replace it, or choose another --output-dir (nothing there was touched)"
                )

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> RunDir:
        """A new, empty run directory at `path`; with `overwrite`, the run there is removed first."""
        cls.check_new(path, overwrite)
        path = Path(path)
        if path.is_dir() and any(path.iterdir()):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not run.path.is_dir():
            raise MrtuneError(f"run directory {path} does not exist: pass the --output-dir of a `mrtune train` run")
        if not run.run_json.is_file() or not run.config_file.is_file():
            raise MrtuneError(
                f"{path} is not an mrtune run directory (no run.json/config.yaml): pass the --output-dir of a "
                "`mrtune train` run"
            )
        return run

    def status(self) -> str:
        try:
            return str(self.info().get("status", "unknown"))
        except MrtuneError:
            return "unreadable run.json"

    # -- lock: one training process per run ------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on the run directory while training writes it.

        flock on the directory itself (durable.file_lock), so no lock file is left behind, and the kernel releases
        it when the process dies, SIGKILL included: a stale lock never blocks a resume.
        """
        lock = FileLock(self.path)
        try:
            lock.acquire(blocking=False)
        except LockHeld:
            raise MrtuneError(
                f"run {self.path} is being trained by another process right now: wait for it to end, or stop "
                f"it (Ctrl-C or SIGTERM saves a checkpoint) and then `mrtune train --resume {self.path}`"
            ) from None
        self._lock = lock

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def is_locked(self) -> bool:
        """Whether another process holds `lock()` on this run right now."""
        return getattr(self, "_lock", None) is None and is_locked(self.path)

    def info(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise MrtuneError(f"{self.run_json} is unreadable ({error}): the run directory is damaged") from None

    def update_info(self, **fields: Any) -> None:
        info = self.info() if self.run_json.is_file() else {}
        info.update(fields)
        write_json(self.run_json, info)

    def config(self) -> Config:
        try:
            data = yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise MrtuneError(f"{self.config_file} is unreadable ({error}): the run directory is damaged") from None
        return from_dict(data)

    def save_config(self, config: Config) -> None:
        write_text_atomic(self.config_file, to_yaml(config))

    def save_tokenizer(self, tokenizer) -> None:
        write_dir_atomic(self.tokenizer, tokenizer.save_pretrained)

    def require_adapter(self) -> Path:
        if not (self.adapter / "adapter_config.json").is_file():
            status = self.info().get("status", "unknown")
            raise MrtuneError(
                f"run {self.path} has no adapter yet (status: {status}): let `mrtune train` reach its first "
                "evaluation, or use --base to score the untuned model"
            )
        return self.adapter

    def append_history(self, record: dict[str, Any]) -> None:
        append_jsonl(self.history, record)

    def read_history(self) -> list[dict[str, Any]]:
        """The history's records; a line torn by a kill in the middle of an append is left out."""
        return read_jsonl(self.history)[0]

    def truncate_history(self, last_step: int) -> int:
        """Keep only the records up to `last_step` (the resumed checkpoint's step), so that the steps replayed
        after a resume are not logged twice. Returns how many records were dropped."""
        if not self.history.is_file():
            return 0
        records = self.read_history()
        kept = [r for r in records if r.get("step", 0) <= last_step]
        write_text_atomic(self.history, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)
