"""Resumable checkpoints, and what keeps a run's files whole when training stops early.

    RUN/checkpoint/
      adapter/          the LoRA adapter after step N (PEFT format; the best one by validation loss is RUN/adapter/),
                        or with train.method=full the whole model's fp32 master weights, in the same format
      optimizer.pt      optimizer state (AdamW moments and step counts)
      scheduler.pt      learning-rate scheduler state
      rng.pt            Python, NumPy, torch CPU and CUDA random states, one set per process
      state.json        step N and the loop's counters: best validation loss, skipped steps, tokens, seconds

The position in the data needs no saving: the batch plan of an epoch is a function of (seed, epoch) alone
(`batching.plan_batches`), and each optimizer step consumes exactly gradient_accumulation x processes
micro-batches, so step N fixes where the data stream resumes. `state.json` also holds a fingerprint of the
tokenized training rows, so a resume refuses data that changed since the checkpoint instead of silently
training on a different stream.

A checkpoint is built as RUN/checkpoint.tmp/, fsynced, then renamed into place (`durable.write_dir_atomic`): a
kill or a full disk during a save leaves the previous checkpoint whole.

With one process or DDP every rank holds the whole adapter and optimizer state, and the main rank saves them.
Under FSDP both are sharded over the ranks: every rank takes part in gathering their full (unsharded) state on the
main rank, which saves it in the same files (the optimizer's keyed by parameter name rather than by position);
on resume every rank reads the files and keeps its own shards, so a checkpoint is resumed under FSDP only. The
random states of every rank are gathered into rng.pt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from array import array
from pathlib import Path
from typing import Any

import torch

from mrtune.errors import MrtuneError
from mrtune.run.durable import recover_dir, write_dir_atomic, write_json
from mrtune.run.rundir import RunDir

STATE_FILE = "state.json"


def data_fingerprint(rows) -> str:
    """A short hash of the tokenized training rows (ids and labels, in order)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(array("q", [len(row.input_ids), *row.input_ids, *row.labels]).tobytes())
    return digest.hexdigest()[:16]


# -- random states ------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's random states, in types that `torch.load(weights_only=True)` accepts."""
    import numpy as np

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save and load --------------------------------------------------------------------------------------------
def save_checkpoint(
    run: RunDir,
    accelerator,
    model,
    optimizer,
    scheduler,
    state: dict[str, Any],
    adapter_keys: dict[str, str] | None = None,
) -> None:
    """Write RUN/checkpoint/ for resuming after step `state["step"]` (collective: every rank calls it).

    `adapter_keys`: under FSDP, where the adapter's tensors are in the model's state dict (distributed.adapter_keys).
    """
    from accelerate.utils import gather_object

    from mrtune.train.distributed import adapter_state_dict, optimizer_state_dict, save_adapter

    rng_states = gather_object([capture_rng()])  # every rank's, in rank order (dropout masks differ by rank)
    adapter = adapter_state_dict(accelerator, model, adapter_keys)  # None (peft reads it) unless FSDP
    optimizer_state = optimizer_state_dict(accelerator, model, optimizer)
    if accelerator.is_main_process:

        def write(directory: Path) -> None:
            # Never converted (lora.init=pissa|olora): a resume loads it back onto the same rebuilt residual weights.
            save_adapter(accelerator, model, directory / "adapter", adapter)
            torch.save(optimizer_state, directory / "optimizer.pt")
            torch.save(scheduler.state_dict(), directory / "scheduler.pt")
            torch.save(rng_states, directory / "rng.pt")
            write_json(directory / STATE_FILE, state)

        write_dir_atomic(run.checkpoint, write)
    accelerator.wait_for_everyone()


def recover_run(run: RunDir) -> None:
    """Undo what a kill during a save left behind: the previous checkpoint and best adapter back in place."""
    recover_dir(run.checkpoint)
    recover_dir(run.adapter)


def read_checkpoint_state(run: RunDir) -> dict[str, Any]:
    """The state.json of the run's checkpoint (after `recover_run`)."""
    path = run.checkpoint / STATE_FILE
    if not path.is_file():
        every = run.config().train.checkpoint_every
        raise MrtuneError(
            f"run {run.path} has no checkpoint to resume from (it stopped before its first one, written every "
            f"{every} steps): start it again with `mrtune train --config {run.config_file} --output-dir "
            f"{run.path} --overwrite`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MrtuneError(f"{path} is unreadable ({error}): the checkpoint is damaged; start the run again") from None


def load_checkpoint(
    run: RunDir, accelerator, model, optimizer, scheduler, adapter_keys: dict[str, str] | None = None
) -> None:
    """Put the adapter, optimizer, scheduler and random states of RUN/checkpoint/ back in place (collective under
    FSDP, whose `adapter_keys` say where the adapter's tensors go: see save_checkpoint)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from mrtune.train.distributed import load_sharded_adapter, load_sharded_optimizer, uses_fsdp

    directory = run.checkpoint
    fsdp = uses_fsdp(accelerator)
    weights = load_file(directory / "adapter" / "adapter_model.safetensors", device=str(accelerator.device))
    if fsdp:  # every rank reads the same files, so all of them take part in the load or none does
        expected = len(adapter_keys)
        fits = set(weights) == set(adapter_keys)
        if fits:
            fits = not load_sharded_adapter(accelerator, model, weights, adapter_keys)
    else:
        unwrapped = accelerator.unwrap_model(model)
        # The tensors the model saves, not its trainable ones: a full run with a tied output head (train.method=full)
        # saves the one trained embedding matrix under both modules' names.
        expected = len(get_peft_model_state_dict(unwrapped, save_embedding_layers=False))
        fits = len(weights) == expected and not set_peft_model_state_dict(unwrapped, weights).unexpected_keys
    if not fits:
        raise MrtuneError(
            f"the checkpoint in {directory} does not fit the model ({len(weights)} adapter tensors for "
            f"the {expected} this model saves): was {run.config_file} edited? Start the run again instead"
        )
    try:
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        if fsdp:
            load_sharded_optimizer(accelerator, model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        rng_states = torch.load(directory / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise MrtuneError(
            f"the checkpoint in {directory} is unreadable ({str(error)[:160]}): start the run again"
        ) from None
    restore_rng(rng_states[accelerator.process_index])


# -- stopping cleanly -----------------------------------------------------------------------------------------
class StopSignals:
    """SIGINT / SIGTERM ask the training loop to stop after the current step (it saves a checkpoint first).

    A second SIGINT stops at once, as Ctrl-C usually does (the last periodic checkpoint is still there).
    Only the main thread can own signal handlers; elsewhere (a notebook's worker thread) this does nothing.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_number is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal_number = signum
        # os.write, not print: a handler that prints while the loop is printing can raise "reentrant call".
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again stops at once)\n".encode(),
        )

    def requested(self, accelerator) -> int | None:
        """The signal that asked to stop, on any rank (every rank must stop at the same step), or None."""
        signum = self.signal_number or 0
        if accelerator.num_processes > 1:
            signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), reduction="max"))
        return signum or None
