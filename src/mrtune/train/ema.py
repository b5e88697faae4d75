"""An exponential moving average of the trainable weights (`train.ema_decay`): validation, the best adapter and the
sample between steps use the average, training goes on from the live weights.

Averaging the last stretch of a run's weights (checkpoint averaging, Polyak averaging) smooths the noise of the
final steps; the moving average does it without keeping checkpoints. The averages live in the optimizer's state,
one `ema` tensor beside each parameter's Adam moments, so the run's checkpoint saves them and `--resume` restores
them with no format of their own. torch's `swa_utils.AveragedModel` would copy the whole model (a 4-bit 7B base
included) where only the adapters train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _trainable(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


@torch.no_grad()
def update_ema(optimizer: torch.optim.Optimizer, decay: float) -> None:
    """After an optimizer step: each average moves towards its parameter by (1 - d), where d warms up as
    (1 + n) / (10 + n) over the n updates so far, up to `decay`, so that the first steps' weights (near the
    initial adapter) do not dominate a short run's average (TensorFlow's ExponentialMovingAverage rule). One fused
    `_foreach_lerp_` for all tensors: this runs every step, and a 7B model's adapters are ~450 tensors."""
    averages, targets, updates = [], [], 0
    for parameter in _trainable(optimizer):
        state = optimizer.state[parameter]
        if "ema" not in state:
            state["ema"] = parameter.detach().clone()
            state["ema_updates"] = 0  # a Python int: counting on the host costs no device sync
            continue
        updates = state["ema_updates"] = state["ema_updates"] + 1
        averages.append(state["ema"])
        targets.append(parameter.detach())
    if averages:
        torch._foreach_lerp_(averages, targets, 1 - min(decay, (1 + updates) / (10 + updates)))


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer, enabled: bool) -> Iterator[None]:
    """The parameters hold their averages inside the block and their live values again after it."""
    swapped = [p for p in _trainable(optimizer) if enabled and "ema" in optimizer.state[p]]
    live = [p.detach().clone() for p in swapped]
    with torch.no_grad():
        for parameter in swapped:
            parameter.copy_(optimizer.state[parameter]["ema"])
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in zip(swapped, live):
                parameter.copy_(value)
