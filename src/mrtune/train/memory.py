"""The memory planner behind `train.batch_tokens: auto` and `model.gradient_checkpointing: auto`.

People use QLoRA because their card is small, and the fastest setting on an 80 GB card (8,192 tokens a
micro-batch, no checkpointing) does not start on a 24 GB one. The planner measures instead of guessing:

1. Probe: a forward and backward pass on real training rows at three micro-batch sizes, with checkpointing off and
   on (the modes left open), each recording the peak memory the caching allocator handed out. A probe that runs
   out of memory only marks its size as too large.
2. Model: peak memory is a straight line in the micro-batch's tokens, `fixed + per_token * tokens`, per mode
   (weights, gradients and workspace are fixed; activations grow with the tokens). The optimizer's moments, not
   yet allocated during the probe, are added to `fixed`.
3. Choose: within `cap * (1 - MARGIN)`, the mode and token budget with the highest predicted speed
   (`predicted_speed`). The process is then held to the cap (`set_per_process_memory_fraction`), so a wrong
   prediction fails as an out-of-memory error, which the loop already reports cleanly, rather than taking memory
   that is not ours.

The probes keep the random states as they were, so a planned run trains exactly like one given the chosen values.
Measurements of what it chose on each cap: BENCHMARKS.md ("Memory planner").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from mrtune.config import AUTO, Config
from mrtune.errors import MrtuneError
from mrtune.model.build import set_checkpointing

MARGIN = 0.10
"""Share of the cap kept free: the caching allocator's fragmentation (it reserves more than it hands out) and the
error of a straight line fitted to the probes."""
TOKEN_STEP = 256
"""Budgets are multiples of this: shapes stay friendly to the GEMM kernels and to flex attention's 128 blocks."""
MAX_TOKENS = 16_384
"""The largest budget the planner picks. Speed grows slowly past it (`predicted_speed`: 16k tokens is 0.8 of the
ceiling, 32k 0.89) while each micro-batch holds ever more rows, i.e. ever fewer optimizer steps an epoch."""
HALF_SPEED_TOKENS = 4_096
"""Tokens a micro-batch at which a step runs at half its ceiling speed: the fixed per-step work (kernel launches,
dequantization of the 4-bit weights, the optimizer) weighs as much as that many tokens. Fitted to the H200 runs of
the 7B recipe with checkpointing in BENCHMARKS.md (2,048 / 4,096 / 8,192 tokens: 3,984 / 5,762 / 7,957 tok/s)."""
CHECKPOINTING_SPEED = 0.67
"""Speed with checkpointing relative to without, at the same tokens: it recomputes each layer's forward (the same
H200 runs: 7,957 vs 11,946 tokens/s at 8,192 tokens)."""


def predicted_speed(tokens: int, checkpointing: bool) -> float:
    """Relative training speed (tokens/s, ceiling 1) of a micro-batch size and mode; only comparisons matter."""
    return tokens / (tokens + HALF_SPEED_TOKENS) * (CHECKPOINTING_SPEED if checkpointing else 1.0)


@dataclass(frozen=True)
class Probe:
    tokens: int
    checkpointing: bool
    peak_bytes: int | None
    """Peak bytes allocated during the forward and backward pass; None: it ran out of memory."""


def fitted_tokens(probes: list[Probe], budget_bytes: float, extra_bytes: float) -> tuple[int, float] | None:
    """(the largest multiple of TOKEN_STEP whose predicted peak fits the budget, that peak) for one mode's probes,
    or None when not even the smallest probe fits. With one probe that fitted (the larger ran out of memory), the
    line cannot be drawn: its size is the answer if it fits."""
    good = sorted((p for p in probes if p.peak_bytes is not None), key=lambda p: p.tokens)
    if not good:
        return None
    if len(good) == 1:
        peak = good[0].peak_bytes + extra_bytes
        return (good[0].tokens, peak) if peak <= budget_bytes else None
    low, high = good[0], good[-1]
    per_token = max(0.0, (high.peak_bytes - low.peak_bytes) / (high.tokens - low.tokens))
    fixed = low.peak_bytes - per_token * low.tokens + extra_bytes
    most = MAX_TOKENS if per_token == 0 else (budget_bytes - fixed) / per_token
    tokens = min(MAX_TOKENS, int(most) // TOKEN_STEP * TOKEN_STEP)
    failed = [p.tokens for p in probes if p.peak_bytes is None]
    if failed:  # a probe that ran out of memory bounds the line's answer from above
        tokens = min(tokens, (min(failed) - 1) // TOKEN_STEP * TOKEN_STEP)
    if tokens < low.tokens:
        return None
    return tokens, fixed + per_token * tokens


@dataclass
class MemoryPlan:
    """What the planner chose, and from which measurements (run.json's `memory_plan`)."""

    batch_tokens: int
    gradient_checkpointing: bool
    cap_gb: float
    predicted_peak_gb: float
    probes: list[dict] = field(default_factory=list)
    options: list[dict] = field(default_factory=list)
    """Every mode considered: its largest fitting budget and predicted speed (relative)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        mode = "on" if self.gradient_checkpointing else "off"
        return (
            f"memory plan: train.batch_tokens={self.batch_tokens}, gradient checkpointing {mode} (predicted peak "
            f"{self.predicted_peak_gb:.1f} GB of a {self.cap_gb:.1f} GB cap)"
        )


def choose(
    probes: list[Probe],
    cap_bytes: float,
    extra_bytes: float,
    *,
    batch_tokens: int | str | None,
    checkpointing: bool | str,
) -> MemoryPlan:
    """The fastest (tokens, mode) that fits `cap_bytes` with the margin; MrtuneError naming what to change when
    nothing fits. `batch_tokens` / `checkpointing` are the config's values: AUTO leaves them to the planner."""
    budget = cap_bytes * (1 - MARGIN)
    modes = [False, True] if checkpointing == AUTO else [bool(checkpointing)]
    options = []
    for mode in modes:
        mine = [p for p in probes if p.checkpointing == mode]
        fit = fitted_tokens(mine, budget, extra_bytes)  # a fixed batch_tokens was the one size probed
        if fit is not None:
            options.append(
                dict(
                    gradient_checkpointing=mode,
                    batch_tokens=fit[0],
                    predicted_peak_gb=round(fit[1] / 1e9, 2),
                    predicted_speed=round(predicted_speed(fit[0], mode), 3),
                )
            )
    shown = [dict(tokens=p.tokens, gradient_checkpointing=p.checkpointing, peak_gb=_gb(p.peak_bytes)) for p in probes]
    if not options:
        smallest = min((p for p in probes if p.peak_bytes is not None), key=lambda p: p.peak_bytes, default=None)
        needed = f"{(smallest.peak_bytes + extra_bytes) / 1e9:.1f} GB" if smallest else "more than the card has"
        advice = ["raise train.max_memory_gb if the card has more"]
        if checkpointing is False:
            advice.append("set model.gradient_checkpointing=auto")
        advice.append("use model.quantization=nf4 or lower data.max_length")
        raise MrtuneError(
            f"training does not fit in {cap_bytes / 1e9:.1f} GB of GPU memory (the smallest micro-batch tried "
            f"needs {needed}, plus a {MARGIN:.0%} margin): " + "; ".join(advice)
        )
    best = max(options, key=lambda o: o["predicted_speed"])
    return MemoryPlan(
        batch_tokens=best["batch_tokens"],
        gradient_checkpointing=best["gradient_checkpointing"],
        cap_gb=round(cap_bytes / 1e9, 2),
        predicted_peak_gb=best["predicted_peak_gb"],
        probes=shown,
        options=options,
    )


def _gb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e9, 3)


def needs_plan(config: Config) -> bool:
    return AUTO in (config.train.batch_tokens, config.model.gradient_checkpointing)


def check_plannable(config: Config, device: torch.device, fsdp: bool) -> None:
    """What the planner cannot do, refused before anything is loaded."""
    if not needs_plan(config):
        return
    fields = [
        key
        for key, value in (
            ("train.batch_tokens", config.train.batch_tokens),
            ("model.gradient_checkpointing", config.model.gradient_checkpointing),
        )
        if value == AUTO
    ]
    given = ", ".join(f"{key}=auto" for key in fields)
    if device.type != "cuda":
        raise MrtuneError(
            f"{given} plans GPU memory, and this run has no CUDA GPU: set a number for train.batch_tokens and "
            "true or false for model.gradient_checkpointing (on a CPU, memory is rarely the limit)"
        )
    if fsdp:
        raise MrtuneError(
            f"{given} is not available under FSDP (the probe measures one process's whole model): set "
            "train.batch_tokens and model.gradient_checkpointing to numbers and true/false"
        )
    if config.train.batch_tokens == AUTO and config.data.max_length > MAX_TOKENS:
        raise MrtuneError(
            f"train.batch_tokens=auto plans at most {MAX_TOKENS} tokens, and data.max_length is "
            f"{config.data.max_length}: set train.batch_tokens, or lower data.max_length"
        )


def cap_bytes(config: Config, device: torch.device) -> float:
    """The memory to plan within: train.max_memory_gb, else what the card has free plus what we already hold."""
    free, total = torch.cuda.mem_get_info(device)
    ours = free + torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    if fraction is not None:  # a cap set by whoever started this process (the benchmark, a notebook)
        ours = min(ours, fraction(device) * total)
    if config.train.max_memory_gb is not None:
        wanted = config.train.max_memory_gb * 1e9
        if wanted > total:
            raise MrtuneError(
                f"train.max_memory_gb={config.train.max_memory_gb:g} but the GPU has {total / 1e9:.1f} GB: lower it"
            )
        ours = min(ours, wanted)
    return ours


def optimizer_bytes(model, config: Config) -> float:
    """The optimizer's state, allocated at its first step (after the probes): AdamW's two fp32 moments a trainable
    value; the 8-bit paged optimizer's two bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * (2 if config.train.optimizer == "paged_adamw_8bit" else 8)


def probe_sizes(config: Config, longest_row: int) -> list[int]:
    """The micro-batch sizes probed: the smallest budget a row fits in, twice and four times that (the line through
    the smallest and the largest that fit is extrapolated: activations grow linearly in tokens with packing)."""
    if config.train.batch_tokens != AUTO:
        return [int(config.train.batch_tokens)]
    low = max(TOKEN_STEP, math.ceil(max(longest_row, config.data.max_length) / TOKEN_STEP) * TOKEN_STEP)
    return sorted({min(low * k, MAX_TOKENS) for k in (1, 2, 4)})


def measure_peak(run_step: Callable[[int], None], tokens: int, device: torch.device) -> int | None:
    """Peak bytes allocated during `run_step(tokens)` (a forward and backward pass), None if it ran out of memory.
    What the probe allocated is given back before the next one."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_step(tokens)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def fewer_fragments() -> None:
    """Let the caching allocator grow segments in place (`expandable_segments`) unless the user configured it.

    The probes predict what tensors take (allocated bytes); a cap bounds what the allocator reserves. With its
    default fixed-size segments, steps of ever-changing activation sizes fragment them: on the H200, a planned
    16,384-token step held 22.9 GB reserved for 14.4 GB allocated and ran out of memory under a 16 GB cap.
    Expandable segments keep reserved close to allocated. Set at run time, through torch's private setter (the
    environment variable is read only when CUDA starts, which may be done already): it applies to the segments
    allocated from now on."""
    import os

    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def hold_to_cap(cap: float, device: torch.device) -> None:
    _, total = torch.cuda.mem_get_info(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def plan_memory(
    model, config: Config, device: torch.device, run_step: Callable[[int], None], longest_row: int
) -> MemoryPlan:
    """Probe `model` (in train mode, checkpointing off) with `run_step(tokens)`, choose, and hold the process to
    the cap. `run_step` runs a forward and backward pass on a micro-batch of `tokens` and clears the gradients."""
    if device.type == "cuda" and device.index is None:  # torch.cuda's memory queries want an index
        device = torch.device("cuda", torch.cuda.current_device())
    fewer_fragments()
    cap = cap_bytes(config, device)
    extra = optimizer_bytes(model, config)
    sizes = probe_sizes(config, longest_row)
    checkpointing = config.model.gradient_checkpointing
    modes = [False, True] if checkpointing == AUTO else [bool(checkpointing)]
    probes = []
    # Dropout in the probes must not move the run's random states (the CPU's, and this GPU's when there is one).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for mode in modes:
            set_checkpointing(model, mode)
            for tokens in sizes:
                peak = measure_peak(run_step, tokens, device)
                probes.append(Probe(tokens, mode, peak))
                if peak is None:
                    break  # a larger size would not fit either
    plan = choose(probes, cap, extra, batch_tokens=config.train.batch_tokens, checkpointing=checkpointing)
    set_checkpointing(model, plan.gradient_checkpointing)
    hold_to_cap(cap, device)
    return plan
