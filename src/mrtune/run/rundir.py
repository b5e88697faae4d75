"""The run directory: everything needed to reproduce, evaluate, predict and merge a run, and nothing else.

RUN/
  run.json            what ran: mrtune version, model path, status, best step, timings
  config.yaml         the resolved config (every default spelled out)
  prompt.txt          the prompt template, as the model saw it
  vocabulary.json     dialogue acts and attributes of the training split (for constrained decoding)
  tokenizer/          the tokenizer, with its pad token
  adapter/            the best LoRA adapter by validation loss (PEFT format); with train.method=full, the whole
                      trained model as a PEFT adapter of whole modules (`modules_to_save`)
  checkpoint/         while training: what `mrtune train --resume` needs (see checkpoint.py); removed at the end
  history.jsonl       one line per logged step: train loss, lr, tokens/s, validation loss
  tensorboard/        the same curves for TensorBoard
  eval/<name>/        metrics.json and predictions.jsonl of each `mrtune evaluate` (name: split or data-<file>, -base)
  report.md           the report, with loss_curve.png, dialogue_acts_<name>.png, confusion_<name>.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mrtune.config import Config, from_dict, parse_yaml, to_yaml
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


def refuse_repeats(runs: list[RunDir], where: str, why: str) -> None:
    """Refuse a run given twice in one list of runs (two paths to one directory count as the same run): the
    error says where (`is {where} twice`) and why that is wrong."""
    seen: dict[Path, str] = {}
    for run in runs:
        resolved = run.path.resolve()
        if resolved in seen:
            raise MrtuneError(f"run {run.path} is {where} twice (as {seen[resolved]}): {why}")
        seen[resolved] = str(run.path)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._tokenizer_checked = False  # require_tokenizer parsed tokenizer/ (3.5 MB of JSON for SmolLM2) already

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
        return self.read_json(self.run_json)

    # -- reading, each file checked: a damaged run is named in one line, never a traceback ---------------------
    def damaged(self, file: Path, what: str) -> MrtuneError:
        """The error for a run file that is missing or not what `mrtune train` wrote."""
        return MrtuneError(f"run damaged: {file}: {what}")

    def read_json(self, path: Path, kind: type = dict) -> Any:
        """A JSON file of the run holding a `kind` (an object by default)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self.damaged(path, "missing") from None
        except (OSError, UnicodeDecodeError) as error:
            raise self.damaged(path, f"cannot be read ({getattr(error, 'strerror', None) or error})") from None
        except (json.JSONDecodeError, RecursionError) as error:
            reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "too deep"
            raise self.damaged(path, f"not valid JSON ({reason})") from None
        if not isinstance(data, kind):
            names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
            raise self.damaged(path, f"holds {names.get(type(data), 'a value')}, not {names.get(kind, kind.__name__)}")
        return data

    def read_prompt(self) -> str:
        """prompt.txt: the template the model was trained with (merge ships it beside the merged model)."""
        path = self.path / "prompt.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self.damaged(path, "missing") from None
        except (OSError, UnicodeDecodeError) as error:
            raise self.damaged(path, f"cannot be read ({error})") from None
        if "{sentence}" not in text:
            raise self.damaged(path, "has no {sentence} placeholder, so it is not a prompt template")
        return text

    def require_tokenizer(self) -> str:
        """The run's own tokenizer/ directory (never looked up on the hub), its files parsed once per RunDir."""
        if not self.tokenizer.is_dir():
            raise self.damaged(self.tokenizer, "missing (the tokenizer saved by `mrtune train`)")
        if not self._tokenizer_checked:
            if not (self.tokenizer / "tokenizer_config.json").is_file():
                raise self.damaged(self.tokenizer / "tokenizer_config.json", "missing")
            self.read_json(self.tokenizer / "tokenizer_config.json")
            if (self.tokenizer / "tokenizer.json").exists():
                self.read_json(self.tokenizer / "tokenizer.json")
            self._tokenizer_checked = True
        return str(self.tokenizer)

    def read_vocabulary(self) -> dict[str, Any]:
        from mrtune.task.mr import Vocabulary

        data = self.read_json(self.vocabulary)
        try:
            Vocabulary.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise self.damaged(self.vocabulary, f"not a vocabulary ({type(error).__name__}: {error})") from None
        return data

    def update_info(self, **fields: Any) -> None:
        info = self.info() if self.run_json.is_file() else {}
        info.update(fields)
        write_json(self.run_json, info)

    def config(self) -> Config:
        try:
            data = parse_yaml(self.config_file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise self.damaged(self.config_file, "missing") from None
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as error:
            reason = getattr(error, "problem", None) or str(error).strip().split("\n")[0][:160]
            raise self.damaged(self.config_file, f"unreadable ({reason})") from None
        try:
            return from_dict(data)
        except MrtuneError as error:
            problems = str(error).removeprefix("the run's config.yaml has problems: ")
            raise self.damaged(self.config_file, problems) from None

    def save_config(self, config: Config) -> None:
        write_text_atomic(self.config_file, to_yaml(config))

    def save_tokenizer(self, tokenizer) -> None:
        write_dir_atomic(self.tokenizer, tokenizer.save_pretrained)
        self._tokenizer_checked = False

    def check_intact(self, config: Config, *, adapter: bool = True) -> None:
        """Read and check every file evaluate, predict and merge use, so that each command refuses a damaged run
        the same way, before it loads a model or writes anything (the adapter only when it is used)."""
        self.info()
        self.read_prompt()
        self.require_tokenizer()
        if self.vocabulary.exists():
            self.read_vocabulary()
        if adapter:
            self.require_adapter(config)

    def require_adapter(self, config: Config | None = None) -> Path:
        """The adapter directory, checked: its config is readable, its weights file whole, and its rank the one
        the run's config (`config`, when given) trains (2r for lora.init=pissa|olora, saved converted), or, for
        train.method=full, its modules saved whole (rank means nothing there)."""
        adapter_config = self.adapter / "adapter_config.json"
        if not adapter_config.is_file():
            status = self.info().get("status", "unknown")
            raise MrtuneError(
                f"run {self.path} has no adapter yet (status: {status}): let `mrtune train` reach its first "
                "evaluation, or use --base to score the untuned model"
            )
        saved = self.read_json(adapter_config)
        rank = saved.get("r")
        if config is not None and config.train.method == "full":
            if not saved.get("modules_to_save"):
                raise self.damaged(adapter_config, "saves no whole modules, but the run's config.yaml trains them all")
        elif config is not None:
            expected = config.lora.r if config.lora.init == "default" else 2 * config.lora.r
            if rank != expected:
                raise self.damaged(adapter_config, f"rank r={rank!r}, but the run's config.yaml trains rank {expected}")
        self._check_adapter_weights(rank)
        return self.adapter

    def _check_adapter_weights(self, rank: Any) -> None:
        from safetensors import SafetensorError, safe_open

        weights = self.adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise self.damaged(weights, "missing")
        try:
            with safe_open(str(weights), "np") as handle:
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise self.damaged(weights, f"not a whole safetensors file ({error})") from None
        wrong = [name for name, shape in shapes.items() if "lora_A" in name and shape[:1] != [rank]]
        if wrong:
            raise self.damaged(weights, f"{wrong[0]} has shape {shapes[wrong[0]]}, not rank {rank} as configured")

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
