"""The run directory: everything needed to reproduce, evaluate, predict and merge a run, and nothing else.

    RUN/
      run.json            what ran: mrtune version, model path, status, best step, timings
      config.yaml         the resolved config (every default spelled out)
      prompt.txt          the prompt template, as the model saw it
      vocabulary.json     dialogue acts and attributes of the training split (for constrained decoding)
      tokenizer/          the tokenizer, with its pad token
      adapter/            the best LoRA adapter by validation loss (PEFT format)
      history.jsonl       one line per logged step: train loss, lr, tokens/s, validation loss
      tensorboard/        the same curves for TensorBoard
      eval/<name>/        metrics.json and predictions.jsonl of each `mrtune evaluate` (name: split, -base)
      report.md           the report, with loss_curve.png, dialogue_acts_<name>.png, confusion_<name>.png
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mrtune.config import Config, from_dict, to_yaml
from mrtune.errors import MrtuneError


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename: a kill or a full disk never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private (0600); these are ordinary results
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written directory into place; the previous version stays whole until the swap."""
    for file in tmp_dir.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


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
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

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
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunDir":
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise MrtuneError(f"output directory {path} is a file: choose another --output-dir")
        if path.is_dir() and any(path.iterdir()):
            if not (path / "run.json").is_file():
                raise MrtuneError(
                    f"output directory {path} is not empty and holds no mrtune run: choose an empty or new "
                    "--output-dir (nothing there was touched)"
                )
            if not overwrite:
                raise MrtuneError(
                    f"output directory {path} already holds a run: pass --overwrite to replace it, "
                    "or choose another --output-dir"
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not run.path.is_dir():
            raise MrtuneError(f"run directory {path} does not exist: pass the --output-dir of a `mrtune train` run")
        if not run.run_json.is_file() or not run.config_file.is_file():
            raise MrtuneError(
                f"{path} is not an mrtune run directory (no run.json/config.yaml): pass the --output-dir of a "
                "`mrtune train` run"
            )
        return run

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

    def require_adapter(self) -> Path:
        if not (self.adapter / "adapter_config.json").is_file():
            status = self.info().get("status", "unknown")
            raise MrtuneError(
                f"run {self.path} has no adapter yet (status: {status}): let `mrtune train` reach its first "
                "evaluation, or use --base to score the untuned model"
            )
        return self.adapter

    def append_history(self, record: dict[str, Any]) -> None:
        with open(self.history, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text(encoding="utf-8").splitlines() if line.strip()]
