"""`mrtune train`: LoRA / QLoRA fine-tuning, one readable loop from data to the best adapter.

Runs on one CPU, one GPU, or several GPUs through Accelerate (`accelerate launch -m mrtune train ...`): each rank
takes its share of every optimizer step's micro-batches, and only the main rank writes the run directory.

Read it top to bottom: the step's pieces (optimizer, schedule, target-only loss, validation loss), `train` (what a
failure leaves in run.json), then `Recipe`: `setup` (checks, data, tokenizer, steps, resume, model, optimizer, run
directory, loop state), `fit` (the loop), `validate` / `checkpoint` between steps, `finish`, `cleanup`. The loop's
counters are a `state.LoopState`, which is also what a checkpoint saves; its records go to `sinks.MetricSinks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mrtune import __version__
from mrtune.config import Config, from_dict
from mrtune.errors import MrtuneError, TrainingInterrupted, first_line
from mrtune.export.portable import make_portable
from mrtune.infer.generation import generate
from mrtune.model.build import (
    attach_full,
    attach_lora,
    compile_decoder_layers,
    eager_for_evaluation,
    load_base_model,
    quantization_config,
    set_checkpointing,
)
from mrtune.model.fp8 import fp8_problem, resolve_fp8_base
from mrtune.model.resolve import load_tokenizer, resolve_model_path
from mrtune.run.durable import is_disk_full, write_dir_atomic, write_json, write_text_atomic
from mrtune.run.rundir import RunDir
from mrtune.task.augment import substitute_names, substitute_specifiers
from mrtune.task.data import find_duplicates, load_splits, spread_sample
from mrtune.task.mr import Vocabulary
from mrtune.task.prompts import build_prompt, template
from mrtune.train.batching import (
    IGNORE_INDEX,
    collate,
    count_targets,
    packed_block_mask,
    plan_batches,
    tokenize_examples,
)
from mrtune.train.checkpoint import (
    STATE_FILE,
    StopSignals,
    data_fingerprint,
    load_checkpoint,
    read_checkpoint_state,
    recover_run,
    save_checkpoint,
)
from mrtune.train.distributed import (
    adapter_keys,
    adapter_state_dict,
    prepare_model_and_optimizer,
    save_adapter,
    uses_fsdp,
    uses_fsdp2,
    wrap_adapters_separately,
)
from mrtune.train.ema import averaged_weights, update_ema
from mrtune.train.memory import MemoryPlan, check_plannable, needs_plan, plan_memory
from mrtune.train.sinks import MetricSinks, ProgressBar
from mrtune.train.state import LoopState


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    settings = config.train
    if settings.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        kind, options = bnb.optim.PagedAdamW8bit, {}
    else:
        # fused=True: one kernel for all adapter tensors instead of several per tensor (CUDA only).
        kind, options = torch.optim.AdamW, {"fused": all(p.is_cuda for p in parameters) or None}
    if settings.loraplus_ratio is not None:
        from accelerate.utils import extract_model_from_parallel
        from peft.optimizers import create_loraplus_optimizer

        # The parameter groups need the adapters' names: those of the model inside the DDP wrapper.
        return create_loraplus_optimizer(
            extract_model_from_parallel(model),
            kind,
            lr=settings.learning_rate,
            loraplus_lr_ratio=settings.loraplus_ratio,
            loraplus_weight_decay=settings.weight_decay,
            **options,
        )
    return kind(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, **options)


def make_scheduler(optimizer, config: Config, total_steps: int, clock: dict | None = None):
    """The learning-rate schedule over `total_steps`; with `train.time_budget_s`, over whichever of the steps and the
    time budget is further along (`clock["elapsed"]`, updated by the loop before each scheduler step)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.train.schedule]
    budget = config.train.time_budget_s
    if budget is None:
        warmup = int(config.train.warmup_ratio * total_steps)
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # transformers' schedules are functions of the step alone; this one reads the clock as well.
    warmup, kind = config.train.warmup_ratio, config.train.schedule

    def factor(step: int) -> float:
        done = min(1.0, max(step / total_steps, clock["elapsed"] / budget))
        if done < warmup:
            return done / warmup
        rest = (done - warmup) / max(1e-9, 1.0 - warmup)
        return {"cosine": 0.5 * (1.0 + math.cos(math.pi * rest)), "linear": 1.0 - rest, "constant": 1.0}[kind]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compute_dtype(model) -> torch.dtype:
    """The dtype the base model was loaded in, which the training computes in. transformers records it in
    config.dtype (a string once save_pretrained has run); the embeddings' dtype says the same except under full
    fine-tuning (model.build.attach_full), whose weights are all fp32. `model` may be wrapped by DDP or FSDP."""
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    dtype = getattr(unwrapped.config, "dtype", None) or unwrapped.get_input_embeddings().weight.dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def compute_autocast(model, device_type: str | None = None):
    """bf16/fp16 compute for the fp32 adapters (see model.build.attach_lora) or the fp32 master weights of a full
    run (attach_full), off for an fp32 model.

    `device_type` is where the compute runs, by default the embeddings' device; under FSDP with CPU offload the
    weights rest on the CPU while the compute runs on the GPU, so the loop passes its inputs'.
    """
    from accelerate.utils import extract_model_from_parallel

    dtype = compute_dtype(model)
    device_type = device_type or extract_model_from_parallel(model).get_input_embeddings().weight.device.type
    # CUDA only: see model.build.attach_lora for why the CPU keeps peft's fp32 adapter compute.
    return torch.autocast(
        device_type=device_type, dtype=dtype, enabled=device_type == "cuda" and dtype != torch.float32
    )


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target (position t predicts token t + 1), shared by the batch's rows.

    Computed on the CPU copy of the labels: on the GPU, `nonzero` would make the host wait for the device at every
    micro-batch, and a small model's step is bound by how far ahead the host can queue kernels.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def target_loss(
    model, batch: dict[str, torch.Tensor], keep: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (`keep` from `target_positions`), with
    `label_smoothing` of the target's probability spread over the vocabulary (training only).

    Logits are computed only at the kept positions (`logits_to_keep`): with the loss on the completion only, that
    skips the prompt's positions, which saves the largest activation of the step (positions x vocabulary in fp32,
    ~0.8 GB per 4,096 tokens with a 49k vocabulary) and its matmul.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:  # packed rows: their flex attention mask
        from accelerate.utils import extract_model_from_parallel

        config = extract_model_from_parallel(model).config  # DDP's or FSDP1's wrapper hides it
        if getattr(config, "_attn_implementation", None) == "flex_attention":
            mask = packed_block_mask(inputs["position_ids"], config)
            if mask is not None:
                inputs["attention_mask"] = mask
    with compute_autocast(model, batch["input_ids"].device.type):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, vocab)
    targets = batch["labels"][:, 1:][:, keep]  # (B, K)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


@torch.no_grad()
def validation_loss(model, rows, pad_token_id, batch_size, device, accelerator) -> float:
    """Mean loss per target token over the validation rows (gathered across ranks).

    Every rank runs the same number of forward passes: under FSDP each one gathers the weights from all ranks, so
    a rank with a batch fewer (rows not divisible by ranks x batch size) runs its first batch again, uncounted.
    """
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of token losses, token count)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    mine.sort(key=lambda i: len(rows[i]))  # similar lengths together: little padding
    most_rows = math.ceil(len(rows) / accelerator.num_processes)  # the share of rank 0, the largest
    for start in range(0, most_rows, batch_size):
        indices = mine[start : start + batch_size]
        counted = 1.0 if indices else 0.0
        batch = collate([rows[i] for i in indices or mine[:batch_size] or [0]], pad_token_id)
        keep, n = target_positions(batch["labels"]).to(device), count_targets(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = target_loss(model, batch, keep)
        total += counted * torch.stack([loss.float(), torch.tensor(float(n), device=device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def check_hardware(config: Config, device: torch.device) -> None:
    """Settings this machine (`device`: this process's) cannot run, all reported before anything is loaded or
    written."""
    problems = []
    if config.model.quantization == "nf4":
        try:
            quantization_config(config.model)  # says what to change without a CUDA GPU or bitsandbytes
        except MrtuneError as error:
            problems.append(str(error))
    if config.train.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        problems.append(
            "train.optimizer=paged_adamw_8bit needs a CUDA GPU (bitsandbytes): on this machine set "
            "--set train.optimizer=adamw"
        )
    if config.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        problems.append(
            "model.attn_implementation=flex_attention cannot train on this machine (PyTorch has no "
            "flex attention backward on CPU): set --set model.attn_implementation=sdpa"
        )
    if config.model.liger_kernel and not torch.cuda.is_available():
        problems.append(
            "model.liger_kernel=true needs a CUDA GPU (Liger's kernels are Triton): set --set model.liger_kernel=false"
        )
    if config.model.fp8_base is True and (problem := fp8_problem(device)):  # this rank's GPU, not GPU 0
        problems.append(problem)
    if problems:
        raise MrtuneError("; ".join(problems))


def out_of_memory_message(config: Config, error: BaseException, plan: MemoryPlan | None = None) -> str:
    """What to change when a step does not fit in GPU memory, leaving out what is already set (`config`: the one
    that ran, with the memory planner's choices in it when `plan` made them)."""
    first = first_line(error)[:160]
    if plan is not None:
        return (
            f"out of GPU memory ({first}) within the memory planner's {plan.cap_gb:g} GB cap, although it predicted "
            f"a peak of {plan.predicted_peak_gb:g} GB: start the run again with a lower train.max_memory_gb (say "
            f"{0.8 * plan.cap_gb:.0f}), or set train.batch_tokens below {plan.batch_tokens}"
        )
    if config.train.batch_tokens:
        advice = [f"lower train.batch_tokens (now {config.train.batch_tokens})"]
    else:
        advice = [
            f"lower train.batch_size (now {config.train.batch_size}; raise train.gradient_accumulation to "
            "keep the step size) or set train.batch_tokens to cap the tokens of a micro-batch"
        ]
    if not config.model.gradient_checkpointing:
        advice.append("set model.gradient_checkpointing=true (~1/3 more compute, a fraction of the activations)")
    if config.model.quantization != "nf4" and config.train.method == "lora":
        advice.append("set model.quantization=nf4 (4-bit base weights, CUDA)")
    return f"out of GPU memory ({first}): start the run again with lower memory settings: " + "; ".join(advice)


@dataclass
class _RunInProgress:
    """What `train`'s failure handling knows of the run being trained."""

    locked: RunDir | None = None  # the run directory this process holds the lock of
    run: RunDir | None = None  # set once the run is ours to mark failed (created, or checked for a resume)
    checkpoint_step: int | None = None  # the step of the last checkpoint on disk
    config: Config | None = None  # the config that runs, once the memory planner has filled in its `auto` values
    memory_plan: MemoryPlan | None = None


def train(
    config: Config, output_dir: str | Path, *, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> RunDir:
    """Fine-tune into `output_dir`; with `resume`, continue the stopped run there from its last checkpoint.

    However a run stops, the files it saved stay whole (see checkpoint.py) and run.json says why: status
    `interrupted` (SIGINT/SIGTERM, after a checkpoint), `diverged`, or `failed` with the error.
    """
    progress_state = _RunInProgress()
    try:
        with StopSignals() as stop:
            recipe = Recipe(config, Path(output_dir), progress_state, stop, progress=progress)
            try:
                recipe.setup(overwrite=overwrite, resume=resume)
                recipe.fit()
                recipe.finish()
            except BaseException as error:
                with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
                    recipe.cleanup(failed=not isinstance(error, TrainingInterrupted))
                raise
            recipe.cleanup()
            return recipe.run
    except TrainingInterrupted:
        raise
    except BaseException as error:
        message = None
        if isinstance(error, torch.OutOfMemoryError):
            message = out_of_memory_message(progress_state.config or config, error, progress_state.memory_plan)
        elif is_disk_full(error):
            message = _disk_full_message(progress_state, error)
        _mark_failed(
            progress_state,
            message or str(error) or type(error).__name__,
            "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
        )
        if message:
            raise MrtuneError(message) from None
        raise
    finally:
        if progress_state.locked is not None:
            progress_state.locked.unlock()


def _disk_full_message(progress_state: _RunInProgress, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    run = progress_state.run
    if run is None:
        return f"the disk is full{where}: free some space and start again"
    if progress_state.checkpoint_step is None:
        saved = "no checkpoint was written yet, so start the run again with --overwrite"
    else:
        saved = (
            f"then `mrtune train --resume {run.path}` continues from the checkpoint of step "
            f"{progress_state.checkpoint_step}"
        )
    return (
        f"the disk filled up while writing to {run.path}{where}: the files saved before are intact (a save "
        f"in progress was dropped); free some space, {saved}"
    )


def _mark_failed(progress_state: _RunInProgress, message: str, status: str = "failed") -> None:
    """Record in run.json why the run stopped, unless it says so already (diverged, interrupted)."""
    run = progress_state.run
    if run is None:
        return
    try:
        if run.info().get("status") == "running":
            run.update_info(status=status, error=message[:500])
    except (OSError, MrtuneError):  # a full disk may refuse even this small write; the error is still raised
        pass


def _refuse_unresumable(run: RunDir) -> None:
    """Runs that `--resume` must not continue, refused before anything is loaded."""
    info = run.info()
    status = info.get("status")
    if status == "finished":
        raise MrtuneError(
            f"run {run.path} already finished ({info.get('total_steps')} steps): there is nothing to resume; "
            f"evaluate it with `mrtune evaluate {run.path}`, or train a new run in another --output-dir"
        )
    if status == "diverged":
        raise MrtuneError(
            f"run {run.path} diverged at step {info.get('diverged_at_step')}: resuming would replay the same "
            "steps into the same divergence; start a new run with a lower train.learning_rate"
        )


def micro_batches(lengths: list[int], plan: dict) -> Iterator[tuple[int, list[int]]]:
    """(epoch, micro-batch row indices) forever, in the deterministic order of each epoch's plan."""
    epoch = 0
    while True:
        for indices in plan_batches(lengths, epoch=epoch, **plan):
            yield epoch, indices
        epoch += 1


class Recipe:
    """One `mrtune train` run, in the shape of torchtune's recipes: `setup()` checks everything and builds the data,
    model, optimizer and loop state; `fit()` is the loop, `validate()` and `checkpoint()` what it calls between
    steps; `finish()` records the result; `cleanup()` closes the metric sinks however the run ended.

    Only the main rank writes the run directory; every rank runs the same collective calls in the same order.
    """

    def __init__(self, config: Config, output_dir: Path, failure: _RunInProgress, stop: StopSignals, *, progress):
        from accelerate import Accelerator

        self.config, self.settings, self.output_dir = config, config.train, output_dir
        self.failure, self.stop, self.show_progress = failure, stop, progress
        self.accelerator = Accelerator()
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.fsdp = uses_fsdp(self.accelerator)
        self.device = self.accelerator.device
        self.run: RunDir | None = None
        self.sinks = MetricSinks([])
        self.memory_plan: MemoryPlan | None = None  # set when the memory planner chose batch_tokens/checkpointing
        self.schedule_clock = {"elapsed": 0.0}  # training seconds so far, for a schedule on a time budget

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self, *, overwrite: bool, resume: bool) -> None:
        """Every check comes first (settings, data, hardware, the model's name, the output directory, a resume's
        checkpoint), so that a refused run touches nothing; then the model and optimizer; the run directory last,
        so that --overwrite replaces an old run only once everything else has been checked."""
        self._check_settings(resume)
        self._resolve_fp8()
        self._setup_data()
        self._setup_tokenizer()
        planned = needs_plan(self.config)  # then the step count waits for the planner's batch_tokens
        if not planned:
            self._setup_steps()
        saved = None
        if resume:
            saved = self._setup_resume()
        elif self.is_main:
            RunDir.check_new(self.output_dir, overwrite)
        self._setup_model()
        if planned:
            self._plan_memory()
            self._setup_steps()
        self._compile_model()
        self._setup_optimizer(saved)
        self._setup_run_dir(saved, overwrite)
        self._setup_state(saved)

    def _check_settings(self, resume: bool) -> None:
        lora_init = self.config.lora.init
        if self.fsdp and self.settings.method == "full":
            raise MrtuneError(
                "train.method=full is not available under FSDP (its trainable copies share storage with the "
                "modules peft keeps, which FSDP would shard apart): train on one GPU or with DDP, or set "
                "train.method=lora"
            )
        if self.fsdp and lora_init != "default":
            raise MrtuneError(
                f"lora.init={lora_init} is not available under FSDP (the adapter's conversion to "
                "plain LoRA needs the whole model on one rank): set lora.init=default, or train with DDP"
            )
        if self.fsdp and not uses_fsdp2(self.accelerator) and self.settings.loraplus_ratio is not None:
            raise MrtuneError(
                "train.loraplus_ratio is not available under FSDP1 (its flat parameters hide which adapter "
                "tensor is A and which B): unset it, or train with FSDP2 (fsdp_version: 2) or DDP"
            )
        if self.fsdp and self.config.model.fp8_base is True:
            raise MrtuneError(
                "model.fp8_base=true is not available under FSDP (FSDP shards and gathers the weights the fp8 "
                "layers read, and that is untested): set model.fp8_base=false, or train on one GPU or with DDP"
            )
        if self.settings.ema_decay is not None and (self.fsdp or self.settings.optimizer != "adamw"):
            raise MrtuneError(
                "train.ema_decay needs train.optimizer=adamw without FSDP (the averages live in AdamW's per-tensor "
                "state, which FSDP shards and the 8-bit optimizer stores its own way): unset it, or use DDP and adamw"
            )
        check_plannable(self.config, self.device, self.fsdp)
        if resume and needs_plan(self.config):  # a run's config.yaml holds the planner's choices, not `auto`
            raise MrtuneError(
                f"the config.yaml of {self.output_dir} says `auto` for memory settings: set the values its run "
                "used (run.json, memory_plan) in it, then resume"
            )
        if resume:
            _refuse_unresumable(RunDir.open(self.output_dir))

    def _resolve_fp8(self) -> None:
        """model.fp8_base=auto becomes true or false now, said and recorded (config.yaml) as what the run did."""
        if self.config.model.fp8_base != "auto":
            return
        on, why = resolve_fp8_base(
            "auto", self.device, lora=self.settings.method == "lora", fsdp=self.fsdp, dora=self.config.lora.dora
        )
        config = from_dict(self.config.to_dict())  # a copy: the caller's config stays as given
        config.model.fp8_base = on
        self.config, self.settings, self.failure.config = config, config.train, config
        if self.is_main:
            tqdm.write(f"model.fp8_base=auto: fp8 base matmuls {why}")

    def _warn(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"warning: {message}")

    def _setup_data(self) -> None:
        """Data first, so that bad data fails in a second, before any model is loaded: the problems of every split
        (train, validation and test) in one error; then what this machine cannot run."""
        data = self.config.data
        splits = load_splits(
            {"train": data.train, "validation": data.validation, "test": data.test},
            data.input_field,
            data.output_field,
        )
        sample = spread_sample(splits["train"], data.train_limit)
        sample = substitute_names(sample, data.name_substitution, self.settings.seed)
        self.train_examples = substitute_specifiers(sample, data.specifier_substitution, self.settings.seed)
        self.validation_examples = spread_sample(splits["validation"], self.settings.eval_rows)
        self.data_warnings = find_duplicates({**splits, "train": self.train_examples})
        for warning in self.data_warnings:
            self._warn(warning)
        template(data.prompt_style)  # unknown style: fail now
        check_hardware(self.config, self.device)

    def _setup_tokenizer(self) -> None:
        """The tokenizer and the tokenized rows (the output directory is still untouched if the model cannot be had)."""
        data, name = self.config.data, self.config.model.name
        model_path = resolve_model_path(name) if self.is_main else None
        self.accelerator.wait_for_everyone()
        self.model_path = model_path or resolve_model_path(name)  # other ranks reuse the main rank's cache
        self.tokenizer = load_tokenizer(self.model_path)
        limit = min(data.max_length, getattr(self.tokenizer, "model_max_length", 10**9) or 10**9)
        tokenize = dict(completion_only=data.completion_only, max_length=limit, too_long=data.too_long)
        self.train_rows, report = tokenize_examples(self.train_examples, self.tokenizer, data.prompt_style, **tokenize)
        self.validation_rows, validation_report = tokenize_examples(
            self.validation_examples, self.tokenizer, data.prompt_style, **tokenize
        )
        self.rows_too_long = report.too_long
        for split, split_report in (("training", report), ("validation", validation_report)):
            if split_report.too_long:
                verb = "skipped" if split_report.action == "skip" else "truncated"
                self.data_warnings.append(
                    f"{split_report.too_long} {split} row(s) longer than {limit} tokens were {verb} "
                    f"(data.too_long={split_report.action})"
                )
                self._warn(self.data_warnings[-1])
        if not self.train_rows or not self.validation_rows:
            split = "training" if not self.train_rows else "validation"
            raise MrtuneError(f"no {split} rows left after data.too_long={report.action}: raise data.max_length")

    def _setup_steps(self) -> None:
        """The step count: an optimizer step consumes gradient_accumulation micro-batches on each rank."""
        settings = self.settings
        self.lengths = [len(r) for r in self.train_rows]
        self.plan = dict(
            batch_size=settings.batch_size,
            batch_tokens=settings.batch_tokens,
            packing=settings.packing,
            group_by_length=settings.group_by_length,
            seed=settings.seed,
        )
        self.micro_per_step = settings.gradient_accumulation * self.world
        self.steps_per_epoch = max(1, len(plan_batches(self.lengths, epoch=0, **self.plan)) // self.micro_per_step)
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * self.steps_per_epoch))

    def _new_state(self) -> LoopState:
        return LoopState(
            total_steps=self.total_steps,
            processes=self.world,
            data_fingerprint=data_fingerprint(self.train_rows),
            fsdp=self.fsdp,
        )

    def _setup_resume(self) -> LoopState:
        """The stopped run: its lock taken, what a kill mid-save left put back, and its checkpoint checked against
        this set-up (data, processes, FSDP, steps) before any model is loaded."""
        run = RunDir.open(self.output_dir)
        if self.is_main:
            run.lock()
            self.failure.locked = run
            recover_run(run)
        self.accelerator.wait_for_everyone()
        saved = LoopState.from_state_dict(read_checkpoint_state(run), str(run.checkpoint / STATE_FILE))
        changed = saved.resume_refusal(self._new_state())
        if changed:
            raise MrtuneError(
                f"cannot resume {run.path} exactly: {changed} since its checkpoint (step {saved.step}); "
                "restore the original set-up, or start a new run"
            )
        if saved.total_steps != self.total_steps:
            raise MrtuneError(
                f"cannot resume {run.path}: {run.config_file} now gives {self.total_steps} steps, its checkpoint "
                f"{saved.total_steps}; restore the original config.yaml"
            )
        self.failure.checkpoint_step = saved.step
        self.run = self.failure.run = run
        return saved

    def _setup_model(self) -> None:
        """The frozen base model with fp32 LoRA adapters, or (train.method=full) with every weight trainable in
        fp32."""
        from accelerate.utils import set_seed

        set_seed(self.settings.seed)
        # Under FSDP the model is loaded with no device map: 4-bit weights go to this rank's GPU (bitsandbytes'
        # default), others stay where accelerate's cpu_ram_efficient_loading puts them (rank 0: CPU, others: meta),
        # and FSDP moves its shards to the GPU (or keeps them in CPU memory with offload) and broadcasts rank 0's.
        settings = self.config.model
        if needs_plan(self.config):  # the planner probes without checkpointing and compiles nothing: see _plan_memory
            settings = dataclasses.replace(settings, gradient_checkpointing=False, compile_layers=False)
        model = load_base_model(settings, None if self.fsdp else self.device, self.model_path)
        if self.settings.method == "full":
            model = attach_full(model, settings)
        else:
            model = attach_lora(model, self.config.lora, settings)
        self.saved_keys = None  # under FSDP, where the saved adapter's tensors are in the gathered state dict
        if self.fsdp:
            wrap_adapters_separately(model, self.accelerator)
            self.saved_keys = adapter_keys(model)
        # lora.init=pissa|olora: the adapter as initialized, what saved adapters are converted against (save_adapter).
        self.initial = None if self.config.lora.init == "default" else RunDir(self.output_dir).initial_adapter
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        # A full run's frozen parameters are peft's originals, which share the trainable copies' storage (attach_full).
        self.total_parameters = self.trainable + (0 if self.settings.method == "full" else frozen)
        self.model = model

    def _plan_memory(self) -> None:
        """Fill in `auto` for train.batch_tokens / model.gradient_checkpointing from probe steps (train/memory.py).
        The run then goes on, and records itself (config.yaml, run.json), exactly as if given the chosen values."""
        rows = sorted(self.train_rows, key=len, reverse=True)  # the longest rows: the most memory per token
        packing, pad_token_id = self.settings.packing, self.tokenizer.pad_token_id

        def run_step(tokens: int) -> None:
            if packing:
                chosen, used = [], 0
                for row in rows:
                    if used + len(row) > tokens:
                        break
                    chosen.append(row)
                    used += len(row)
            else:  # padded rows count their padding
                chosen = rows[: max(1, tokens // len(rows[0]))]
            batch = collate(chosen, pad_token_id, packing, tokens if packing else None)
            keep = target_positions(batch["labels"]).to(self.device)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            try:
                target_loss(self.model, batch, keep).backward()
            finally:  # out of memory in the backward pass leaves some gradients behind
                self.model.zero_grad(set_to_none=True)

        plan = plan_memory(self.model, self.config, self.device, run_step, len(rows[0]))
        if self.world > 1:  # every rank must cut the same micro-batches: all take rank 0's plan
            from accelerate.utils import broadcast_object_list

            plan = broadcast_object_list([plan])[0]
            set_checkpointing(self.model, plan.gradient_checkpointing)
        config = from_dict(self.config.to_dict())
        config.train.batch_tokens = plan.batch_tokens
        config.model.gradient_checkpointing = plan.gradient_checkpointing
        self.config, self.settings = config, config.train
        self.failure.config, self.failure.memory_plan = config, plan
        self.memory_plan = plan
        if self.is_main:
            tqdm.write(plan.summary())

    def _compile_model(self) -> None:
        """torch.compile, once the model's settings are final (the memory planner probes an uncompiled model)."""
        if self.config.model.compile_layers and self.memory_plan is not None:  # else attach_lora/attach_full did
            compile_decoder_layers(self.model, self.config.model.compile_mode)
        if self.settings.compile:
            # In place: the module keeps its type, so peft's and accelerate's APIs still apply.
            self.model.compile(mode=self.config.model.compile_mode)
        if self.is_main and (self.config.model.compile_layers or self.settings.compile):
            # torch.compile works at the first call: the progress bar would sit at step 0 with no word of why.
            what = "each decoder layer" if self.config.model.compile_layers else "the model"
            tqdm.write(
                f"torch.compile ({what}, mode {self.config.model.compile_mode}): the first step compiles, which "
                "takes seconds on a small model and a minute or more on a 7B one"
            )

    def _setup_optimizer(self, saved: LoopState | None) -> None:
        """The optimizer and schedule; a resume puts back their state, the adapter's and the random states."""

        def build(prepared_or_not):  # FSDP1 builds on the prepared (flat) parameters, FSDP2 before sharding
            optimizer = make_optimizer(prepared_or_not, self.config)
            return optimizer, make_scheduler(optimizer, self.config, self.total_steps, self.schedule_clock)

        self.model, self.optimizer, self.scheduler = prepare_model_and_optimizer(self.accelerator, self.model, build)
        if saved is not None:
            self._save_initial_adapter()  # before the checkpoint's adapter replaces the initial one
            load_checkpoint(self.run, self.accelerator, self.model, self.optimizer, self.scheduler, self.saved_keys)

    def _setup_run_dir(self, saved: LoopState | None, overwrite: bool) -> None:
        """The run directory describes itself before the first step: a new one (an old run replaced only now, with
        --overwrite), or the resumed one, whose steps after the checkpoint are replayed and logged again."""
        if saved is None:
            self.run = RunDir.create(self.output_dir, overwrite) if self.is_main else RunDir(self.output_dir)
            if self.is_main:
                self.run.lock()
                self.failure.locked = self.run
            self.failure.run = self.run
            self._save_initial_adapter()
        if self.is_main and saved is not None:
            self.run.truncate_history(saved.step)
            resumed = self.run.info().get("resumed_at_steps", []) + [saved.step]
            self.run.update_info(status="running", resumed_at_steps=resumed)
        elif self.is_main:
            self._describe_new_run()
        self.accelerator.wait_for_everyone()

    def _save_initial_adapter(self) -> None:
        """Save the adapter as lora.init=pissa|olora made it, before any training or checkpoint changes it."""
        if self.initial is not None and self.is_main:
            # A resumed run rebuilds the same init (an exact decomposition), and saves it again.
            peft_model = self.accelerator.unwrap_model(self.model)
            with warnings.catch_warnings():  # peft's advice to convert the adapter: save_adapter does, every time
                warnings.filterwarnings("ignore", message=".*(PiSSA|OLoRA) changes the base weights")
                write_dir_atomic(
                    self.initial, lambda directory: peft_model.save_pretrained(directory, save_embedding_layers=False)
                )

    def _describe_new_run(self) -> None:
        run, config = self.run, self.config
        run.save_config(config)
        write_text_atomic(run.path / "prompt.txt", template(config.data.prompt_style))
        run.save_tokenizer(self.tokenizer)
        vocabulary = Vocabulary.from_mrs(e.meaning_representation for e in self.train_examples)
        write_json(run.vocabulary, vocabulary.to_dict())
        run.update_info(
            mrtune_version=__version__,
            status="running",
            model_path=str(self.model_path),
            device=str(self.device),
            processes=self.world,
            train_rows=len(self.train_rows),
            validation_rows=len(self.validation_rows),
            rows_too_long=self.rows_too_long,
            trainable_parameters=self.trainable,
            total_parameters=self.total_parameters,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            data_warnings=self.data_warnings,
            memory_plan=self.memory_plan.to_dict() if self.memory_plan else None,
        )

    def _setup_state(self, saved: LoopState | None) -> None:
        """The loop's counters (a resume's as they were at its checkpoint) and the metric sinks."""
        self.state = saved if saved is not None else self._new_state()
        resumed_at = None if saved is None else saved.step
        self.sinks = MetricSinks.for_run(self.config, self.run, resumed_at=resumed_at, is_main=self.is_main)
        self.progress = ProgressBar(
            total=self.total_steps,
            initial=self.state.step,
            time_budget_s=self.settings.time_budget_s,
            enabled=self.show_progress and self.is_main,
        )
        self.sinks.add(self.progress)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train from the state's step to the last one, or until the time budget runs out."""
        state, settings = self.state, self.settings
        start_step = state.step
        stream = micro_batches(self.lengths, self.plan)
        for _ in range(start_step * self.micro_per_step):  # a resume continues the data stream where it stopped
            next(stream)
        state.start_clock()
        self.model.train()
        # CUDA graphs (compile_mode reduce-overhead, which the config accepts only with something compiled) reuse
        # their output buffers between replays: marking where a step begins tells torch that the previous step's
        # outputs (loss, activations) are no longer needed.
        graphs = self.config.model.compile_mode == "reduce-overhead"
        for step in range(start_step + 1, self.total_steps + 1):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # Between two steps, the only moment the adapter, optimizer and data position agree: the periodic
            # checkpoint, and the clean stop that SIGINT/SIGTERM asked for.
            signum = self.stop.requested(self.accelerator)
            if signum or (state.step > start_step and state.step % settings.checkpoint_every == 0):
                self.checkpoint(signum)
            epoch, batches = self._next_batches(stream)
            step_loss, grad_norm = self._forward_backward(batches)
            self.schedule_clock["elapsed"] = state.elapsed()
            out_of_time = settings.time_budget_s is not None and _any_rank(
                self.accelerator, self.schedule_clock["elapsed"] >= settings.time_budget_s, self.device
            )
            state.step = step
            if not self._update(step_loss, grad_norm):
                continue
            self.progress.advance()
            last = step == self.total_steps or out_of_time
            if self.is_main and (step % settings.log_every == 0 or last):
                self.sinks.log(self._training_record(epoch, step_loss, grad_norm))
            if step % settings.eval_every == 0 or last:
                self.validate()
            if out_of_time:
                state.stopped_early = step
                break

    def _next_batches(self, stream: Iterator[tuple[int, list[int]]]) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """The step's micro-batches, all ranks' (each rank knows them all), and the epoch they come from."""
        settings, rows = self.settings, self.train_rows
        group = [next(stream) for _ in range(self.micro_per_step)]
        # A packed micro-batch is padded to the token budget (one padding row, < one row's worth): one shape for
        # every step, so flex attention and torch.compile compile once; varying lengths cost a recompilation
        # (~0.5 s) per step.
        pad_to = settings.batch_tokens if settings.packing else None
        batches = [
            collate([rows[i] for i in indices], self.tokenizer.pad_token_id, settings.packing, pad_to)
            for _, indices in group
        ]
        self.state.useful_tokens += sum(len(rows[i]) for _, indices in group for i in indices)
        self.state.padded_tokens += sum(b["input_ids"].numel() for b in batches)
        return group[-1][0], batches

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward through this rank's share of the step's micro-batches; the step's loss (summed
        over ranks) and its gradient norm before clipping."""
        accelerator, world, device = self.accelerator, self.world, self.device
        step_targets = sum(count_targets(b) for b in batches)  # over all ranks: every rank divides by the same
        mine = batches[accelerator.process_index :: world]
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(mine):
            keep = target_positions(batch["labels"]).to(device, non_blocking=True)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = accelerator.no_sync(self.model) if i < len(mine) - 1 else contextlib.nullcontext()
            with sync:
                # Divide by the whole step's target count, so the step's gradient is the mean over all of its
                # target tokens whatever their split into micro-batches (DDP averages over ranks: x world).
                loss = target_loss(self.model, batch, keep, self.settings.label_smoothing) / step_targets
                accelerator.backward(loss * world)
            step_loss += loss.detach()
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        # An infinite bound only measures: the clipping factor min(1, bound / norm) is then exactly 1.
        bound = self.settings.max_grad_norm or math.inf
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), bound)
        return step_loss, grad_norm

    def _update(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Take the optimizer step, or drop it (False) when its loss or gradient is not finite: a non-finite update
        would poison the adapter. Too many dropped in a row is divergence, which ends the run."""
        state = self.state
        # One host sync for both checks (each `bool(tensor)` waits for the device).
        health = torch.stack([step_loss.float(), torch.as_tensor(grad_norm, device=self.device).float()])
        if not bool(torch.isfinite(health).all()):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            state.skipped_steps += 1
            state.bad_in_a_row += 1
            if state.bad_in_a_row >= self.settings.max_skipped_in_a_row:
                self._diverged()
            return False
        state.bad_in_a_row = 0
        self.optimizer.step()
        if self.settings.ema_decay is not None:
            update_ema(self.optimizer, self.settings.ema_decay)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _diverged(self) -> None:
        state = self.state
        if self.is_main:
            self.run.update_info(status="diverged", diverged_at_step=state.step, skipped_steps=state.skipped_steps)
        raise MrtuneError(
            f"training diverged: {state.bad_in_a_row} steps in a row had a non-finite loss or gradient (step "
            f"{state.step}): lower train.learning_rate or use model.dtype=float32; the best adapter so far "
            f"is kept in {self.run.adapter}"
        )

    def _training_record(self, epoch: int, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> dict:
        state = self.state
        elapsed = state.elapsed()
        return {
            "step": state.step,
            "epoch": round(epoch + 0.0, 3),
            "train_loss": step_loss.item(),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "useful_tokens": state.useful_tokens,
            "padded_tokens": state.padded_tokens,
            "useful_tokens_per_s": round(state.useful_tokens / elapsed, 1),
            "elapsed_s": round(elapsed, 3),
        }

    # -- between steps -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """The validation loss; the adapter saved as RUN/adapter/ when it is the best so far; a sample shown. With
        train.ema_decay, all three use the weights' moving average."""
        # Eager: the compiled layers' graphs are for the training step's shapes (model.build.eager_for_evaluation).
        with averaged_weights(self.optimizer, self.settings.ema_decay is not None), eager_for_evaluation():
            self._validate()

    def _validate(self) -> None:
        state, accelerator = self.state, self.accelerator
        eval_started = time.perf_counter()
        rows, pad_token_id, batch_size = self.validation_rows, self.tokenizer.pad_token_id, self.settings.batch_size
        loss = validation_loss(self.model, rows, pad_token_id, batch_size, self.device, accelerator)
        improved = loss < state.best_validation_loss  # the same on every rank: the loss is summed over ranks
        state.best_validation_loss = min(state.best_validation_loss, loss)
        # FSDP: every rank takes part in gathering the adapter.
        tensors = adapter_state_dict(accelerator, self.model, self.saved_keys) if improved else None
        if self.is_main:
            self.sinks.log({"step": state.step, "validation_loss": loss})
            if improved:
                write_dir_atomic(
                    self.run.adapter,
                    lambda directory: save_adapter(accelerator, self.model, directory, tensors, self.initial),
                )
                self.run.update_info(best_step=state.step, best_validation_loss=loss)
            self._show_sample(loss)
        accelerator.wait_for_everyone()
        state.eval_seconds += time.perf_counter() - eval_started

    def _show_sample(self, loss: float) -> None:
        """One validation sentence, its expected MR and the model's, below the validation loss (main rank)."""
        sample = self.validation_examples[0]
        if self.fsdp:  # rank 0 alone cannot run the model: its weights are sharded over the ranks
            output = "(no sample under FSDP; `mrtune evaluate` the run)"
        else:
            model = self.accelerator.unwrap_model(self.model)
            self.model.eval()
            with compute_autocast(model):
                output = generate(
                    model,
                    self.tokenizer,
                    [build_prompt(self.config.data.prompt_style, sample.sentence)],
                    max_new_tokens=self.config.eval.max_new_tokens,
                    # A static cache takes the weights' dtype: fp32 for a full run's master weights, while autocast
                    # computes keys and values in bf16 (index_copy_ refuses the mix). A dynamic cache keeps theirs.
                    kv_cache="dynamic" if self.settings.method == "full" else "auto",
                    progress=False,
                )[0]
            self.model.train()
        best = " (best)" if loss == self.state.best_validation_loss else ""
        tqdm.write(
            f"step {self.state.step}: validation loss {loss:.4f}{best}\n"
            f"  sentence:  {sample.sentence}\n  expected:  {sample.meaning_representation}\n"
            f"  generated: {output}"
        )

    def checkpoint(self, signum: int | None) -> None:
        """Save RUN/checkpoint/ after `state.step` steps; then, if a signal asked for it, stop with a way to resume."""
        done = self.state.step
        saved = self.state.state_dict()
        save_checkpoint(self.run, self.accelerator, self.model, self.optimizer, self.scheduler, saved, self.saved_keys)
        self.failure.checkpoint_step = done
        self.sinks.flush()
        if signum is None:
            return
        if self.is_main:
            self.run.update_info(status="interrupted", interrupted_at_step=done)
        raise TrainingInterrupted(
            f"interrupted at step {done} of {self.total_steps} ({signal.Signals(signum).name}): "
            f"resume with `mrtune train --resume {self.run.path}`",
            signum,
        )

    # -- the end -----------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Record the result in run.json, drop what only a resume needs, and write the report."""
        state = self.state
        train_seconds = state.elapsed()
        if self.is_main:
            self.run.update_info(
                status="finished",
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                train_seconds=round(train_seconds, 1),
                eval_seconds=round(state.eval_seconds, 1),
                useful_tokens=state.useful_tokens,
                padded_tokens=state.padded_tokens,
                skipped_steps=state.skipped_steps,
                useful_tokens_per_s=round(state.useful_tokens / train_seconds, 1),
                **({"stopped_by_time_budget_at_step": state.stopped_early} if state.stopped_early else {}),
                peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            )
            # A finished run cannot be resumed: its checkpoint (adapter + 2x its size of optimizer state) would be
            # dead weight.
            shutil.rmtree(self.run.checkpoint, ignore_errors=True)
            shutil.rmtree(self.run.initial_adapter, ignore_errors=True)  # the saved adapter is converted already
            make_portable(self.run)
            from mrtune.run.report import write_report

            write_report(self.run)
        self.accelerator.wait_for_everyone()

    def cleanup(self, failed: bool = False) -> None:
        """Close the metric sinks (history, progress bar, TensorBoard, W&B), however the run ended."""
        self.sinks.close(failed)


def _any_rank(accelerator, flag: bool, device) -> bool:
    """True on every rank when it is true on any: all ranks must stop at the same step (their clocks differ)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=device), reduction="sum") > 0)
