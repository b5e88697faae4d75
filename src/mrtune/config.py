"""The one typed configuration of a run. YAML files and `--set key=value` flags only fill it.

Why our own ~100 lines instead of OmegaConf or Hydra: we want every problem (unknown key, wrong type, bad
choice) collected and reported at once, each in one line that says what to change, and a YAML file that
round-trips into the run directory unchanged. Both libraries raise on the first problem with multi-line
messages, and neither knows which values are valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from mrtune.errors import MrtuneError, first_line
from mrtune.task.prompts import PromptStyle

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""The `model.name` value meaning "the embedded default model" (mrtune.model.resolve finds it)."""

AUTO = "auto"
"""The value that hands a field to the memory planner (`mrtune.train.memory`): a field annotated
`... | Literal["auto"]` accepts it beside its own type."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts (`Annotated[int, Range(1, 2048)]`); NaN and infinities never pass."""

    low: float
    high: float
    low_open: bool = False
    """True: `low` itself is not allowed (for fields that must be strictly positive)."""
    high_open: bool = False
    """True: `high` itself is not allowed (a dropout of 1 would drop everything)."""

    def problem(self, value: float) -> str | None:
        if self.low_open and value <= self.low:
            return f"must be greater than {_number(self.low)}"
        if self.high_open and value >= self.high:
            return f"must be below {_number(self.high)}"
        if value < self.low or value > self.high:
            return f"must be between {_number(self.low)} and {_number(self.high)}"
        return None


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


POSITIVE = Range(0, 1e9, low_open=True)
"""Any finite value above zero (a learning rate, a ratio, seconds)."""
COUNT = Range(1, 10**9)
"""A count of steps, rows or tokens: at least one."""
SEED = Range(0, 2**32 - 1)
"""What numpy's and torch's seeding accept."""


@dataclass
class ModelSettings:
    name: str = EMBEDDED_MODEL
    """A Hugging Face model id, a local directory, or `embedded:smollm2-135m-instruct` (ships with the package)."""
    quantization: Literal["none", "nf4"] = "none"
    """`none` (weights in `dtype`) or `nf4` (bitsandbytes 4-bit NF4 with double quantization; CUDA only)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the frozen base weights and of the compute: `bfloat16`, `float16` or `float32`. Adapters stay fp32."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """`sdpa`, `eager` or `flex_attention`, passed to transformers."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute activations in the backward pass: ~1/3 more compute for a fraction of the activation memory.
    `auto` (CUDA): the memory planner turns it on only when that makes training faster within the memory cap
    (`train.max_memory_gb`), i.e. when it buys enough more tokens per micro-batch."""
    liger_kernel: bool = False
    """Training on CUDA: Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE (package `liger-kernel`), which
    keep fewer activations for the backward pass. The loss stays ours (`train.target_loss`)."""
    compile_layers: bool = False
    """torch.compile each decoder layer on its own (regional compilation), after the adapters are attached: fewer,
    fused kernels where a step is bound by kernel launches, and one compiled graph reused by every layer. The first
    steps pay for the compilation. Best with lora.dropout 0 (dropout adds random-number kernels to every layer)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode for model.compile_layers and train.compile: `reduce-overhead` replays each compiled
    graph as a CUDA graph (one launch instead of hundreds, for steps bound by the host; needs static shapes, which
    packed steps have, and keeps its own memory pool); `max-autotune-no-cudagraphs` benchmarks GEMM kernels at
    compile time (minutes)."""
    fp8_base: bool | Literal["auto"] = False
    """LoRA training on fp8 GPUs (compute capability 8.9+: H100, H200, L4, RTX 40): the frozen base weights'
    matmuls, forward and backward, run in fp8 (e4m3, one scale per row of each operand, bf16 out), about twice
    bf16's GEMM rate; 4-bit weights are dequantized as before. Adapters, output head, attention and loss stay
    bf16/fp32, and evaluation and generation run in bf16. Pays where GEMMs dominate (7B-sized layers, thousands of
    tokens a step); on a 135M model it changes little but precision (model/fp8.py). `auto` (the 7B recipe's): on
    where it can run (LoRA on such a GPU, not under FSDP, not DoRA), said at start and recorded in config.yaml."""


@dataclass
class LoraSettings:
    r: Annotated[int, Range(1, 4096)] = 16
    """Rank of the LoRA update matrices."""
    alpha: Annotated[int, Range(1, 1_000_000)] = 32
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.05
    """Dropout on the adapter's input, from 0 (none) to below 1."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; `all-linear` means every linear layer but the output head (peft's shorthand)."""
    top_layers: Annotated[int, COUNT] | None = None
    """Adapt only the top N transformer layers (all by default). The backward pass then stops at the lowest adapted
    layer: on a CPU, where the step is compute-bound, half the layers train ~1.5x more rows in the same time. (For
    the CPU demo that did not pay: 15 of 30 layers on 2,000 rows scored 34% exact match, all 30 on 1,360 rows 45%.)"""
    init: Literal["default", "pissa", "olora"] = "default"
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
    """A JSONL or CSV file, `viggo:<split>` (the bundled ViGGO corpus) or `hf:<dataset id>:<split>` (datasets hub);
    several joined by `+` are read in turn (`viggo:train+viggo:validation`)."""
    validation: str = "viggo:validation"
    test: str = "viggo:test"
    input_field: str = "target"
    """Field holding the sentence (ViGGO calls the sentence `target`: it was built for the opposite direction)."""
    output_field: str = "meaning_representation"
    prompt_style: PromptStyle = "compact"
    """`compact` (two short headers) or `seed` (the original recipe's instruction prompt, ~170 tokens)."""
    completion_only: bool = True
    """Compute the loss on the meaning representation only, not on the prompt."""
    max_length: Annotated[int, Range(8, 1_000_000)] = 512
    """Longest tokenized row (prompt + meaning representation + EOS) accepted."""
    too_long: Literal["error", "skip", "truncate"] = "error"
    """What to do with rows over max_length: `error`, `skip` or `truncate` (each reported with counts)."""
    train_limit: Annotated[int, COUNT] | None = None
    """Use only this many training rows (an evenly spread sample), e.g. for a quick CPU run."""
    name_substitution: Annotated[float, Range(0, 1)] = 0.0
    """Fraction of training rows whose game name (the `name[...]` slot and its verbatim mention in the sentence) is
    replaced by an invented one (`mrtune.task.augment`), so the model learns to copy names rather than memorise
    them. 0 trains on the rows as they are."""
    specifier_substitution: Annotated[float, Range(0, 1)] = 0.0
    """Fraction of the training rows with a `specifier[...]` slot whose specifier word (slot and sentence together) is
    replaced by another adjective (`mrtune.task.augment`), so the model learns to copy specifiers it has never seen
    (most of the test split's are not in training) rather than paraphrase them."""


@dataclass
class TrainSettings:
    method: Literal["lora", "full"] = "lora"
    """What trains: `lora` (adapters on the frozen base: the `lora` section) or `full` (full fine-tuning: every
    weight of the base, kept in fp32 as master weights, with bf16 compute under autocast on CUDA when model.dtype
    is bfloat16). A full run saves its trained weights as a peft adapter of whole modules (`modules_to_save`), so
    evaluate, predict, merge and serve take it like any run; it holds 16 bytes a parameter (fp32 weight, gradient
    and AdamW's two moments: ~2.2 GB for SmolLM2-135M) and saves ~4 bytes a parameter at each improvement. The
    `lora` section's r, alpha, dropout and target_modules then do not apply; the settings that would change an
    adapter's training (lora.init, lora.rslora, lora.dora, lora.top_layers, train.loraplus_ratio) and 4-bit
    weights are refused. It wants a far lower train.learning_rate than LoRA's 1e-3 (full fine-tuning commonly uses
    1e-5 to 1e-4). Not under FSDP."""
    epochs: Annotated[float, Range(0, 100_000, low_open=True)] = 2.0
    max_steps: Annotated[int, COUNT] | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    time_budget_s: Annotated[float, POSITIVE] | None = None
    """Stop after this many seconds of training (evaluations not counted), with the learning-rate schedule run to
    its end by then: the schedule follows the budget's elapsed fraction, or the steps' if that is further along.
    For a run that must end in time on any machine (the CPU demo); how many rows it sees then depends on the
    machine, so such runs are not reproducible step for step."""
    batch_size: Annotated[int, Range(1, 1_000_000)] = 8
    """Rows per micro-batch (ignored when batch_tokens is set)."""
    batch_tokens: Annotated[int, COUNT] | Literal["auto"] | None = None
    """Token budget per micro-batch instead of a fixed row count (padded rows count their padding). `auto` (CUDA):
    the memory planner measures the memory a token takes in a probe step or two at start and picks the largest
    budget that fits `train.max_memory_gb` (with `model.gradient_checkpointing: auto`, and whether to checkpoint);
    what it chose is in run.json (`memory_plan`) and the run's config.yaml."""
    max_memory_gb: Annotated[float, POSITIVE] | None = None
    """GPU memory the memory planner plans within, in GB (10^9 bytes), and that the process may then use
    (`torch.cuda.set_per_process_memory_fraction`); default: all the memory the card has free at start."""
    gradient_accumulation: Annotated[int, Range(1, 1_000_000)] = 1
    packing: bool = False
    """Concatenate a micro-batch's rows into one sequence without padding (position ids restart at each row)."""
    group_by_length: bool = True
    """Batch rows of similar length together to cut padding (batches are still visited in random order)."""
    compile: bool = False
    """torch.compile the model: fewer, fused kernels (a small model's step is bound by kernel launches). The first
    steps pay for the compilation (packed micro-batches are always padded to batch_tokens: one shape serves all)."""
    learning_rate: Annotated[float, Range(0, 1, low_open=True)] = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """`cosine`, `linear` or `constant`, after warmup."""
    warmup_ratio: Annotated[float, Range(0, 1)] = 0.03
    weight_decay: Annotated[float, Range(0, 1)] = 0.0
    max_grad_norm: Annotated[float, POSITIVE] | None = 1.0
    """Gradients are clipped to this total norm (a norm, so above zero); none turns clipping off (the norm is still
    computed, logged and checked for being finite)."""
    ema_decay: Annotated[float, Range(0, 1, high_open=True)] | None = None
    """Validate, keep and sample from an exponential moving average of the trained weights with this decay (e.g.
    0.999: about the last thousand steps), instead of the last step's weights (`mrtune.train.ema`)."""
    label_smoothing: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    """Share of each target token's probability spread over the vocabulary in the training loss (0: plain
    cross-entropy). Validation loss is always plain, so runs with and without stay comparable."""
    loraplus_ratio: Annotated[float, Range(0, 10_000, low_open=True)] | None = None
    """LoRA+ (peft's `create_loraplus_optimizer`): the B matrices learn this many times faster than the A matrices,
    which take `learning_rate`. The LoRA+ paper reports faster convergence at a ratio of ~16 with an A rate about
    half plain LoRA's. Not under FSDP (its flat parameters hide which tensor is A and which B)."""
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    """`adamw` (torch, fused on CUDA) or `paged_adamw_8bit` (bitsandbytes, as in the seed recipe)."""
    eval_every: Annotated[int, COUNT] = 100
    """Optimizer steps between validation-loss evaluations (the best adapter by validation loss is kept)."""
    eval_rows: Annotated[int, COUNT] | None = 200
    """Validation rows used for the validation loss (an evenly spread sample); None for all."""
    log_every: Annotated[int, COUNT] = 10
    checkpoint_every: Annotated[int, COUNT] = 100
    """Optimizer steps between resumable checkpoints in RUN/checkpoint/ (`mrtune train --resume RUN`); one is
    also saved when SIGINT/SIGTERM stops the run. It holds the adapter and 2x its size of optimizer state."""
    max_skipped_in_a_row: Annotated[int, COUNT] = 10
    """Steps with a non-finite loss or gradient are skipped (the adapter is left as it was); after this many in a
    row the run stops as diverged."""
    seed: Annotated[int, SEED] = 0
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (needs `pip install wandb`)."""


@dataclass
class EvalSettings:
    batch_size: Annotated[int, Range(1, 1_000_000)] = 32
    max_new_tokens: Annotated[int, Range(1, 1_000_000)] = 160
    """Generation budget per row; ViGGO's longest meaning representation is ~110 tokens with SmolLM2's tokenizer."""
    limit: Annotated[int, COUNT] | None = None
    """Score only this many rows (an evenly spread sample, so every dialogue act is represented)."""
    kv_cache: Literal["auto", "dynamic", "static"] = "auto"
    """`static`: the attention cache is allocated once for the batch's whole budget, so each decoding step reuses the
    same buffers (a growing `dynamic` cache reallocates every step: the first decode of a process on a GPU ran ~3x
    slower per step that way). `auto`: static on CUDA, dynamic on CPU (where a static cache only adds work)."""
    constrained: bool = True
    """Decode only valid MRs: acts and attributes of the run's vocabulary.json, no attribute twice, closed within
    max_new_tokens (`mrtune.infer.constrained`). `--no-constrained` on evaluate/predict turns it off for one command."""
    constrain_values: bool = True
    """With `constrained`: a closed attribute (rating, esrb, platforms, genres, ...: vocabulary.json's
    closed_values) takes only items its training values had. `--set eval.constrain_values=false` lets any value
    through, as before closed values existed, to compare on the same model."""


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_shown = reprlib.Repr()
_shown.maxlevel, _shown.maxlist, _shown.maxdict, _shown.maxstring, _shown.maxother = 2, 4, 4, 60, 60


def shown(value: Any) -> str:
    """A value as an error message shows it: capped, so a YAML alias bomb (a few lines that expand to billions of
    items) or a megabyte string cannot hang or flood the message."""
    text = _shown.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports an unhashable key
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, but a duplicated key is an error."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects


@functools.cache
def _field_types(section: type) -> dict[str, Any]:
    """The fields' annotations, resolved (this module uses `from __future__ import annotations`), with Annotated."""
    return typing.get_type_hints(section, include_extras=True)


def _is_auto(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Literal and typing.get_args(annotation) == (AUTO,)


def _unwrap(annotation: Any) -> tuple[Any, bool, Range | None, bool]:
    """(the base type, whether None is allowed, the Range if any, whether `auto` is allowed) of a field's
    annotation: `T`, `T | None`, `T | Literal["auto"]` or `T | Literal["auto"] | None`, T possibly Annotated."""
    optional = auto = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        optional, auto = type(None) in args, any(_is_auto(a) for a in args)
        (annotation,) = [a for a in args if a is not type(None) and not _is_auto(a)]
    bounds = None
    if typing.get_origin(annotation) is Annotated:
        annotation, *extras = typing.get_args(annotation)
        bounds = next((e for e in extras if isinstance(e, Range)), None)
    return annotation, optional, bounds, auto


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as the annotation's type; TypeError or ValueError when it cannot be."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if not isinstance(value, str):
            raise TypeError
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise TypeError
        return [str(v) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        if isinstance(value, str) and len(value) > 30:  # int() of thousands of digits is slow, and never sane here
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError
        return str(value)
    raise TypeError


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> tuple[bool, Any]:
    """(True, the value as the field's type) or (False, None) with the reason recorded in `problems`."""
    base, optional, _, auto = _unwrap(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return True, None
    if auto and isinstance(value, str) and value.strip().lower() == AUTO:
        return True, AUTO
    try:
        return True, _convert(value, base)
    except (TypeError, ValueError, OverflowError):
        pass
    if typing.get_origin(base) is Literal:
        problems.append(f"{key}: {shown(value)} is not one of {', '.join(typing.get_args(base))}")
    else:
        kind = {float: "a finite number", list: "a list of names"}.get(
            typing.get_origin(base) or base, getattr(base, "__name__", str(base))
        )
        problems.append(f"{key}: expected {kind}{' or auto' if auto else ''}, got {shown(value)}")
    return False, None


def _check(key: str, value: Any, annotation: Any) -> str | None:
    """Why a field's value is outside what its annotation allows (a Literal's choices, a Range), or None."""
    base, optional, bounds, auto = _unwrap(annotation)
    if value is None:
        return None if optional else f"{key} must be set"
    if auto and value == AUTO:
        return None
    if typing.get_origin(base) is Literal and value not in typing.get_args(base):
        return f"{key}: {shown(value)} is not one of {', '.join(typing.get_args(base))}"
    if bounds is not None and isinstance(value, (int, float)):
        if not math.isfinite(value):
            return f"{key} must be a finite number, got {value}"
        reason = bounds.problem(value)
        if reason:
            return f"{key} {reason}, got {_number(value)}" + (" (or none, to turn it off)" if optional else "")
    return None


def _apply(config: Config, key: str, value: Any, problems: list[str]) -> None:
    section_name, _, field_name = key.partition(".")
    section = getattr(config, section_name, None) if section_name in _sections() else None
    if section is None or not field_name:
        problems.append(f"unknown config key {shown(key)} (sections: {', '.join(_sections())})")
        return
    types_ = _field_types(type(section))
    if field_name not in types_:
        problems.append(f"unknown config key {shown(key)} (known in '{section_name}': {', '.join(types_)})")
        return
    ok, coerced = _coerce(value, types_[field_name], key, problems)
    if ok:
        setattr(section, field_name, coerced)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _flatten(data: Any, prefix: str, out: dict[str, Any], problems: list[str], source: str) -> None:
    if not isinstance(data, dict):
        problems.append(f"{source}: '{prefix or 'top level'}' must be a mapping of keys, got {shown(data)}")
        return
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if not prefix and isinstance(value, dict):
            _flatten(value, full, out, problems, source)
        else:
            out[full] = value


def _read_yaml_file(path: Path) -> Any:
    if not path.is_file():
        raise MrtuneError(f"config file {path} does not exist: pass an existing YAML file (see configs/)")
    try:
        return parse_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8, a 5,000-digit int
        first = first_line(error)
        if isinstance(error, yaml.MarkedYAMLError) and error.problem and "duplicate key" in error.problem:
            first = error.problem
        raise MrtuneError(f"config file {path} is not valid YAML ({first[:200]}): fix the file") from None


def _override_value(raw: str, item: str, problems: list[str]) -> tuple[bool, Any]:
    try:
        return True, parse_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        reason = getattr(error, "problem", None) or str(error).split(";")[0][:100] or type(error).__name__
        problems.append(f"--set {shown(item)}: the value is not valid YAML ({reason})")
        return False, None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then a YAML file, then `key=value` overrides; report every problem at once."""
    config = Config()
    problems: list[str] = []
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _flatten(_read_yaml_file(path), "", values, problems, str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(f"--set {shown(item)}: expected key=value, e.g. --set train.learning_rate=3e-4")
            continue
        ok, value = _override_value(raw, item, problems)
        if ok:
            values[key.strip()] = value
    for key, value in values.items():
        _apply(config, key, value, problems)
    problems += validate(config)
    if problems:
        where = f" in {path}" if path else ""
        raise MrtuneError(f"{len(problems)} config problem(s){where}: " + "; ".join(problems))
    return config


def validate(config: Config) -> list[str]:
    """Every field against its annotation (choices, ranges, finiteness), then what no one field can say alone."""
    problems = []
    for section_name in _sections():
        section = getattr(config, section_name)
        for name, annotation in _field_types(type(section)).items():
            problem = _check(f"{section_name}.{name}", getattr(section, name), annotation)
            if problem:
                problems.append(problem)
    if config.lora.init != "default" and config.model.quantization != "none":
        problems.append(
            f"lora.init={config.lora.init} starts from the base weights' decomposition, which 4-bit "
            "weights do not allow: set lora.init=default or model.quantization=none"
        )
    if config.train.method == "full":
        problems += _full_problems(config)
    if config.model.fp8_base is True and config.lora.dora:
        problems.append(
            "model.fp8_base=true with lora.dora=true: DoRA reads the base weights outside the fp8 matmul each step; "
            "set one of them false"
        )
    problems += _compile_problems(config)
    tokens, longest = config.train.batch_tokens, config.data.max_length
    if isinstance(tokens, int) and isinstance(longest, int) and tokens < longest:
        problems.append(
            f"train.batch_tokens ({tokens}) must be at least data.max_length ({longest}) so that every row fits "
            "in a micro-batch"
        )
    return problems


def _compile_problems(config: Config) -> list[str]:
    """A compile mode that would do nothing, or run slower than no compilation at all."""
    model, problems = config.model, []
    if model.compile_mode != "default" and not (model.compile_layers or config.train.compile):
        problems.append(
            f"model.compile_mode={model.compile_mode} applies to compiled code, and nothing is compiled: set "
            "model.compile_layers=true (or train.compile=true), or drop model.compile_mode"
        )
    if model.compile_mode == "reduce-overhead" and model.gradient_checkpointing is not False:
        # Measured: with checkpointing on, each step re-recorded the graphs (BENCHMARKS.md, fourth GPU round).
        problems.append(
            "model.compile_mode=reduce-overhead (CUDA graphs) with gradient checkpointing ran 50x slower (18.8 s a "
            "step instead of 0.39 on the 7B shape): set model.gradient_checkpointing=false, or "
            "model.compile_mode=default"
        )
    return problems


def _full_problems(config: Config) -> list[str]:
    """The settings train.method=full cannot honour, each named with what to change."""
    lora, problems = config.lora, []
    if config.model.quantization == "nf4":
        problems.append(
            "train.method=full trains every weight, which 4-bit weights cannot be: set model.quantization=none, "
            "or train.method=lora"
        )
    adapter_only = {  # they shape the adapters a full run does not have: silently ignoring them would mislead
        f"lora.init={lora.init}": lora.init != "default",
        "lora.rslora=true": lora.rslora,
        "lora.dora=true": lora.dora,
        f"lora.top_layers={lora.top_layers}": lora.top_layers is not None,
        f"train.loraplus_ratio={config.train.loraplus_ratio}": config.train.loraplus_ratio is not None,
    }
    if config.model.fp8_base is True:
        problems.append(
            "model.fp8_base=true runs the frozen base weights' matmuls in fp8, and train.method=full freezes none: "
            "set model.fp8_base=false, or train.method=lora"
        )
    problems += [
        f"{setting} shapes LoRA adapters, which train.method=full does not train: drop it, or set train.method=lora"
        for setting, is_set in adapter_only.items()
        if is_set
    ]
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
                f"--set {shown(item)}: only eval.* settings can change after training, e.g. --set eval.batch_size=64"
            )
            continue
        ok, value = _override_value(raw, item, problems)
        if ok:
            _apply(config, key.strip(), value, problems)
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
    problems += validate(config) if not problems else []
    if problems:
        raise MrtuneError("the run's config.yaml has problems: " + "; ".join(problems))
    return config
