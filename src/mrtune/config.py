"""The one typed configuration of a run. YAML files and `--set key=value` flags only fill it.

Why our own ~100 lines instead of OmegaConf or Hydra: we want every problem (unknown key, wrong type, bad
choice) collected and reported at once, each in one line that says what to change, and a YAML file that
round-trips into the run directory unchanged. Both libraries raise on the first problem with multi-line
messages, and neither knows which values are valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrtune.errors import MrtuneError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""The `model.name` value meaning "the embedded default model" (mrtune.model.resolve finds it)."""

PROMPT_STYLES = ("compact", "seed")


@dataclass
class ModelSettings:
    name: str = EMBEDDED_MODEL
    """A Hugging Face model id, a local directory, or `embedded:smollm2-135m-instruct` (ships with the package)."""
    quantization: str = "none"
    """`none` (weights in `dtype`) or `nf4` (bitsandbytes 4-bit NF4 with double quantization; CUDA only)."""
    dtype: str = "bfloat16"
    """Dtype of the frozen base weights and of the compute: `bfloat16`, `float16` or `float32`. Adapters stay fp32."""
    attn_implementation: str = "sdpa"
    """`sdpa`, `eager` or `flex_attention`, passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: ~1/3 more compute for a fraction of the activation memory."""
    liger_kernel: bool = False
    """Training on CUDA: Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE (package `liger-kernel`), which
    keep fewer activations for the backward pass. The loss stays ours (`train.target_loss`)."""
    compile_layers: bool = False
    """torch.compile each decoder layer on its own (regional compilation), after the adapters are attached: fewer,
    fused kernels where a step is bound by kernel launches, and one compiled graph reused by every layer. The first
    steps pay for the compilation. Best with lora.dropout 0 (dropout adds random-number kernels to every layer)."""


@dataclass
class LoraSettings:
    r: int = 16
    """Rank of the LoRA update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; `all-linear` means every linear layer but the output head (peft's shorthand)."""
    top_layers: int | None = None
    """Adapt only the top N transformer layers (all by default). The backward pass then stops at the lowest adapted
    layer: on a CPU, where the step is compute-bound, half the layers train ~1.5x more rows in the same time. (For
    the CPU demo that did not pay: 15 of 30 layers on 2,000 rows scored 34% exact match, all 30 on 1,360 rows 45%.)"""
    init: str = "default"
    """How the adapters start: `default` (A random, B zero: the update starts at zero), `pissa` (A and B from the
    top singular vectors of each weight, which is kept minus them: training starts on the weight's principal
    directions; PiSSA, arXiv 2404.02948) or `olora` (from a QR decomposition; arXiv 2406.01775). Both are peft's and
    need unquantized weights; the adapter is saved converted to a plain LoRA adapter of rank 2r on the original
    weights, so evaluate, predict and merge load it like any other."""
    rslora: bool = False
    """Rank-stabilized LoRA (peft's `use_rslora`): the update is scaled by alpha / sqrt(r) instead of alpha / r, so a
    high rank still learns at the pace of a low one."""
    dora: bool = False
    """Weight-decomposed LoRA (peft's `use_dora`, arXiv 2402.09353): a learned magnitude per output feature beside
    the low-rank direction update. Slower steps (the weight norm is recomputed each step)."""


@dataclass
class DataSettings:
    train: str = "viggo:train"
    """A JSONL or CSV file, `viggo:<split>` (the bundled ViGGO corpus) or `hf:<dataset id>:<split>` (datasets hub)."""
    validation: str = "viggo:validation"
    test: str = "viggo:test"
    input_field: str = "target"
    """Field holding the sentence (ViGGO calls the sentence `target`: it was built for the opposite direction)."""
    output_field: str = "meaning_representation"
    prompt_style: str = "compact"
    """`compact` (two short headers) or `seed` (the original recipe's instruction prompt, ~170 tokens)."""
    completion_only: bool = True
    """Compute the loss on the meaning representation only, not on the prompt."""
    max_length: int = 512
    """Longest tokenized row (prompt + meaning representation + EOS) accepted."""
    too_long: str = "error"
    """What to do with rows over max_length: `error`, `skip` or `truncate` (each reported with counts)."""
    train_limit: int | None = None
    """Use only this many training rows (an evenly spread sample), e.g. for a quick CPU run."""
    name_substitution: float = 0.0
    """Fraction of training rows whose game name (the `name[...]` slot and its verbatim mention in the sentence) is
    replaced by an invented one (`mrtune.task.augment`), so the model learns to copy names rather than memorise
    them. 0 trains on the rows as they are."""


@dataclass
class TrainSettings:
    epochs: float = 2.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    time_budget_s: float | None = None
    """Stop after this many seconds of training (evaluations not counted), with the learning-rate schedule run to
    its end by then: the schedule follows the budget's elapsed fraction, or the steps' if that is further along.
    For a run that must end in time on any machine (the CPU demo); how many rows it sees then depends on the
    machine, so such runs are not reproducible step for step."""
    batch_size: int = 8
    """Rows per micro-batch (ignored when batch_tokens is set)."""
    batch_tokens: int | None = None
    """Token budget per micro-batch instead of a fixed row count (padded rows count their padding)."""
    gradient_accumulation: int = 1
    packing: bool = False
    """Concatenate a micro-batch's rows into one sequence without padding (position ids restart at each row)."""
    group_by_length: bool = True
    """Batch rows of similar length together to cut padding (batches are still visited in random order)."""
    compile: bool = False
    """torch.compile the model: fewer, fused kernels (a small model's step is bound by kernel launches). The first
    steps pay for the compilation (packed micro-batches are always padded to batch_tokens: one shape serves all)."""
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    """`cosine`, `linear` or `constant`, after warmup."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loraplus_ratio: float | None = None
    """LoRA+ (peft's `create_loraplus_optimizer`): the B matrices learn this many times faster than the A matrices,
    which take `learning_rate`. The LoRA+ paper reports faster convergence at a ratio of ~16 with an A rate about
    half plain LoRA's. Not under FSDP (its flat parameters hide which tensor is A and which B)."""
    optimizer: str = "adamw"
    """`adamw` (torch, fused on CUDA) or `paged_adamw_8bit` (bitsandbytes, as in the seed recipe)."""
    eval_every: int = 100
    """Optimizer steps between validation-loss evaluations (the best adapter by validation loss is kept)."""
    eval_rows: int | None = 200
    """Validation rows used for the validation loss (an evenly spread sample); None for all."""
    log_every: int = 10
    checkpoint_every: int = 100
    """Optimizer steps between resumable checkpoints in RUN/checkpoint/ (`mrtune train --resume RUN`); one is
    also saved when SIGINT/SIGTERM stops the run. It holds the adapter and 2x its size of optimizer state."""
    max_skipped_in_a_row: int = 10
    """Steps with a non-finite loss or gradient are skipped (the adapter is left as it was); after this many in a
    row the run stops as diverged."""
    seed: int = 0
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (needs `pip install wandb`)."""


@dataclass
class EvalSettings:
    batch_size: int = 32
    max_new_tokens: int = 160
    """Generation budget per row; ViGGO's longest meaning representation is ~110 tokens with SmolLM2's tokenizer."""
    limit: int | None = None
    """Score only this many rows (an evenly spread sample, so every dialogue act is represented)."""
    kv_cache: str = "auto"
    """`static`: the attention cache is allocated once for the batch's whole budget, so each decoding step reuses the
    same buffers (a growing `dynamic` cache reallocates every step: the first decode of a process on a GPU ran ~3x
    slower per step that way). `auto`: static on CUDA, dynamic on CPU (where a static cache only adds work)."""
    constrained: bool = True
    """Decode only valid MRs: acts and attributes of the run's vocabulary.json, no attribute twice, closed within
    max_new_tokens (`mrtune.infer.constrained`). `--no-constrained` on evaluate/predict turns it off for one command."""


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.quantization": ("none", "nf4"),
    "lora.init": ("default", "pissa", "olora"),
    "model.dtype": ("bfloat16", "float16", "float32"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention"),
    "data.prompt_style": PROMPT_STYLES,
    "data.too_long": ("error", "skip", "truncate"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "paged_adamw_8bit"),
    "eval.kv_cache": ("auto", "dynamic", "static"),
}


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """Convert a YAML or command-line value to the field's type, or record why it cannot be."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307 - our own annotations only
    args = typing.get_args(annotation)
    if type(None) in args:  # `X | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [str(v) for v in value]
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    type_name = getattr(annotation, "__name__", str(annotation))
    problems.append(f"{key}: expected {type_name}, got {value!r}")
    return None


def _apply(config: Config, key: str, value: Any, problems: list[str]) -> None:
    section_name, _, field_name = key.partition(".")
    section = getattr(config, section_name, None) if section_name in _sections() else None
    if section is None or not field_name:
        problems.append(f"unknown config key '{key}' (sections: {', '.join(_sections())})")
        return
    fields = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in fields:
        problems.append(f"unknown config key '{key}' (known in '{section_name}': {', '.join(fields)})")
        return
    coerced = _coerce(value, fields[field_name].type, key, problems)
    if key in CHOICES and coerced is not None and coerced not in CHOICES[key]:
        problems.append(f"{key}: {coerced!r} is not one of {', '.join(CHOICES[key])}")
        return
    setattr(section, field_name, coerced)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _flatten(data: Any, prefix: str, out: dict[str, Any], problems: list[str], source: str) -> None:
    if not isinstance(data, dict):
        problems.append(f"{source}: '{prefix or 'top level'}' must be a mapping of keys, got {data!r}")
        return
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if not prefix and isinstance(value, dict):
            _flatten(value, full, out, problems, source)
        else:
            out[full] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then a YAML file, then `key=value` overrides; report every problem at once."""
    config = Config()
    problems: list[str] = []
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MrtuneError(f"config file {path} does not exist: pass an existing YAML file (see configs/)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MrtuneError(f"config file {path} is not valid YAML ({first}): fix the file") from None
        _flatten(data, "", values, problems, str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=3e-4")
            continue
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    for key, value in values.items():
        _apply(config, key, value, problems)
    problems += validate(config)
    if problems:
        where = f" in {path}" if path else ""
        raise MrtuneError(f"{len(problems)} config problem(s){where}: " + "; ".join(problems))
    return config


def validate(config: Config) -> list[str]:
    """Cross-field checks that a type alone cannot express."""
    problems = []
    positive = {
        "lora.r": config.lora.r,
        "lora.top_layers": config.lora.top_layers,
        "train.batch_size": config.train.batch_size,
        "train.gradient_accumulation": config.train.gradient_accumulation,
        "train.eval_every": config.train.eval_every,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.max_skipped_in_a_row": config.train.max_skipped_in_a_row,
        "train.time_budget_s": config.train.time_budget_s,
        "data.max_length": config.data.max_length,
        "eval.batch_size": config.eval.batch_size,
        "eval.max_new_tokens": config.eval.max_new_tokens,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    if not 0 <= config.data.name_substitution <= 1:
        problems.append(f"data.name_substitution must be between 0 and 1, got {config.data.name_substitution}")
    if config.train.learning_rate is not None and config.train.learning_rate <= 0:
        problems.append(f"train.learning_rate must be positive, got {config.train.learning_rate}")
    if config.train.max_steps is None and config.train.epochs is not None and config.train.epochs <= 0:
        problems.append("train.epochs must be positive (or set train.max_steps)")
    if config.lora.init != "default" and config.model.quantization != "none":
        problems.append(
            f"lora.init={config.lora.init} starts from the base weights' decomposition, which 4-bit "
            "weights do not allow: set lora.init=default or model.quantization=none"
        )
    if config.train.batch_tokens is not None and config.train.batch_tokens < config.data.max_length:
        problems.append(
            f"train.batch_tokens ({config.train.batch_tokens}) must be at least data.max_length "
            f"({config.data.max_length}) so that every row fits in a micro-batch"
        )
    return problems


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def with_eval_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A trained run's config with `eval.*` settings changed for one command (`mrtune evaluate --set ...`)."""
    if not overrides:
        return config
    problems: list[str] = []
    config = from_dict(config.to_dict())  # a copy: the run's own config stays as it was trained
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().startswith("eval."):
            problems.append(
                f"--set {item!r}: only eval.* settings can change after training, e.g. --set eval.batch_size=64"
            )
            continue
        _apply(config, key.strip(), yaml.safe_load(raw) if raw.strip() else "", problems)
    problems += validate(config)
    if problems:
        raise MrtuneError(f"{len(problems)} problem(s) with --set: " + "; ".join(problems))
    return config


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a run directory (the same checks as for a user's file)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    _flatten(data, "", values, problems, "config")
    config = Config()
    for key, value in values.items():
        _apply(config, key, value, problems)
    if problems:
        raise MrtuneError("the run's config.yaml has problems: " + "; ".join(problems))
    return config
