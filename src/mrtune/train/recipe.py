"""`mrtune train`: LoRA / QLoRA fine-tuning, one readable loop from data to the best adapter.

Runs on one CPU, one GPU, or several GPUs through Accelerate (`accelerate launch -m mrtune train ...`): each rank
takes its share of every optimizer step's micro-batches, and only the main rank writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mrtune import __version__
from mrtune.config import Config
from mrtune.errors import MrtuneError, TrainingInterrupted
from mrtune.infer.generation import generate
from mrtune.model.build import attach_lora, load_base_model, quantization_config
from mrtune.model.resolve import load_tokenizer, resolve_model_path
from mrtune.run.rundir import RunDir, write_dir_atomic, write_json, write_text_atomic
from mrtune.task.augment import substitute_names
from mrtune.task.data import find_duplicates, load_splits, spread_sample
from mrtune.task.mr import Vocabulary
from mrtune.task.prompts import build_prompt, template
from mrtune.train.batching import IGNORE_INDEX, collate, count_targets, plan_batches, tokenize_examples
from mrtune.train.checkpoint import (
    StopSignals,
    data_fingerprint,
    is_disk_full,
    load_checkpoint,
    read_checkpoint_state,
    recover_run,
    save_checkpoint,
)
from mrtune.train.distributed import (
    adapter_keys,
    adapter_state_dict,
    save_adapter,
    uses_fsdp,
    wrap_adapters_separately,
)


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


def compute_autocast(model, device_type: str | None = None):
    """bf16/fp16 compute for the fp32 adapters (see modeling.attach_lora), off for an fp32 model.

    The compute dtype is the embeddings' (never quantized): the dtype the base model was loaded in. `model` may be
    wrapped by DDP or FSDP. `device_type` is where the compute runs, by default the embeddings' device; under FSDP
    with CPU offload the weights rest on the CPU while the compute runs on the GPU, so the loop passes its inputs'.
    """
    from accelerate.utils import extract_model_from_parallel

    embeddings = extract_model_from_parallel(model).get_input_embeddings().weight
    dtype, device_type = embeddings.dtype, device_type or embeddings.device.type
    # CUDA only: see modeling.attach_lora for why the CPU keeps peft's fp32 adapter compute.
    return torch.autocast(
        device_type=device_type, dtype=dtype, enabled=device_type == "cuda" and dtype != torch.float32
    )


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target (position t predicts token t + 1), shared by the batch's rows.

    Computed on the CPU copy of the labels: on the GPU, `nonzero` would make the host wait for the device at every
    micro-batch, and a small model's step is bound by how far ahead the host can queue kernels.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def target_loss(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (`keep` from `target_positions`).

    Logits are computed only at the kept positions (`logits_to_keep`): with the loss on the completion only, that
    skips the prompt's positions, which saves the largest activation of the step (positions x vocabulary in fp32,
    ~0.8 GB per 4,096 tokens with a 49k vocabulary) and its matmul.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with compute_autocast(model, batch["input_ids"].device.type):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, vocab)
    targets = batch["labels"][:, 1:][:, keep]  # (B, K)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
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


def check_hardware(config: Config) -> None:
    """Settings this machine cannot run, all reported before anything is loaded or written."""
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
    if problems:
        raise MrtuneError("; ".join(problems))


def out_of_memory_message(config: Config, error: BaseException) -> str:
    """What to change when a step does not fit in GPU memory, leaving out what is already set."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if config.train.batch_tokens:
        advice = [f"lower train.batch_tokens (now {config.train.batch_tokens})"]
    else:
        advice = [
            f"lower train.batch_size (now {config.train.batch_size}; raise train.gradient_accumulation to "
            "keep the step size) or set train.batch_tokens to cap the tokens of a micro-batch"
        ]
    if not config.model.gradient_checkpointing:
        advice.append("set model.gradient_checkpointing=true (~1/3 more compute, a fraction of the activations)")
    if config.model.quantization != "nf4":
        advice.append("set model.quantization=nf4 (4-bit base weights, CUDA)")
    return f"out of GPU memory ({first}): start the run again with lower memory settings: " + "; ".join(advice)


@dataclass
class _RunInProgress:
    """What `train`'s failure handling knows of the run being trained."""

    locked: RunDir | None = None  # the run directory this process holds the lock of
    run: RunDir | None = None  # set once the run is ours to mark failed (created, or checked for a resume)
    checkpoint_step: int | None = None  # the step of the last checkpoint on disk


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
            return _train(
                config, Path(output_dir), progress_state, stop, overwrite=overwrite, progress=progress, resume=resume
            )
    except TrainingInterrupted:
        raise
    except BaseException as error:
        message = None
        if isinstance(error, torch.OutOfMemoryError):
            message = out_of_memory_message(config, error)
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


def _checkpoint_to_resume(run: RunDir, progress_state: _RunInProgress, accelerator) -> dict:
    """Take the run's lock, put back what a kill mid-save left, and read the state of its last checkpoint."""
    if accelerator.is_main_process:
        run.lock()
        progress_state.locked = run
        recover_run(run)
    accelerator.wait_for_everyone()
    return read_checkpoint_state(run)


def _train(
    config: Config,
    output_dir: Path,
    progress_state: _RunInProgress,
    stop: StopSignals,
    *,
    overwrite: bool,
    progress: bool,
    resume: bool,
) -> RunDir:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    fsdp = uses_fsdp(accelerator)
    settings = config.train
    if fsdp and config.lora.init != "default":
        raise MrtuneError(
            f"lora.init={config.lora.init} is not available under FSDP (the adapter's conversion to "
            "plain LoRA needs the whole model on one rank): set lora.init=default, or train with DDP"
        )
    if fsdp and settings.loraplus_ratio is not None:
        raise MrtuneError(
            "train.loraplus_ratio is not available under FSDP (its flat parameters hide which adapter "
            "tensor is A and which B): unset it, or train with DDP"
        )
    if resume:
        _refuse_unresumable(RunDir.open(output_dir))

    # 1. Data first, so that bad data fails in a second, before any model is loaded: the problems of every split
    #    (train, validation and test) in one error; then what this machine cannot run.
    splits = load_splits(
        {"train": config.data.train, "validation": config.data.validation, "test": config.data.test},
        config.data.input_field,
        config.data.output_field,
    )
    train_examples = spread_sample(splits["train"], config.data.train_limit)
    train_examples = substitute_names(train_examples, config.data.name_substitution, settings.seed)
    validation_examples = spread_sample(splits["validation"], settings.eval_rows)
    data_warnings = find_duplicates({**splits, "train": train_examples})
    if is_main:
        for warning in data_warnings:
            tqdm.write(f"warning: {warning}")
    template(config.data.prompt_style)  # unknown style: fail now
    check_hardware(config)

    # 2. Tokenizer and tokenized rows (the run directory is still untouched if the model cannot be had).
    model_path = resolve_model_path(config.model.name) if is_main else None
    accelerator.wait_for_everyone()
    model_path = model_path or resolve_model_path(config.model.name)  # other ranks reuse the main rank's cache
    tokenizer = load_tokenizer(model_path)
    limit = min(config.data.max_length, getattr(tokenizer, "model_max_length", 10**9) or 10**9)
    tokenize = dict(completion_only=config.data.completion_only, max_length=limit, too_long=config.data.too_long)
    train_rows, report = tokenize_examples(train_examples, tokenizer, config.data.prompt_style, **tokenize)
    validation_rows, validation_report = tokenize_examples(
        validation_examples, tokenizer, config.data.prompt_style, **tokenize
    )
    for split, split_report in (("training", report), ("validation", validation_report)):
        if split_report.too_long:
            verb = "skipped" if split_report.action == "skip" else "truncated"
            data_warnings.append(
                f"{split_report.too_long} {split} row(s) longer than {limit} tokens were {verb} "
                f"(data.too_long={split_report.action})"
            )
            if is_main:
                tqdm.write(f"warning: {data_warnings[-1]}")
    if not train_rows or not validation_rows:
        split = "training" if not train_rows else "validation"
        raise MrtuneError(f"no {split} rows left after data.too_long={report.action}: raise data.max_length")

    # 3. The run directory: a new one, or the stopped run to resume (its checkpoint checked before any model
    #    is loaded, against the data it was trained on).
    fingerprint = data_fingerprint(train_rows)
    if resume:
        run = RunDir.open(output_dir)
        checkpoint = _checkpoint_to_resume(run, progress_state, accelerator)
        sharded = checkpoint.get("fsdp", False)  # checkpoints of mrtune before FSDP's have no such key
        if checkpoint["data_fingerprint"] != fingerprint or checkpoint["processes"] != world or sharded != fsdp:
            if checkpoint["data_fingerprint"] != fingerprint:
                changed = "the training data or tokenizer changed"
            elif checkpoint["processes"] != world:
                changed = f"it ran on {checkpoint['processes']} process(es), this resume on {world}"
            else:  # the optimizer state is saved keyed by parameter name under FSDP, by position elsewhere
                changed = (
                    "it ran with FSDP, this resume without" if sharded else "it ran without FSDP, this resume with it"
                )
            raise MrtuneError(
                f"cannot resume {run.path} exactly: {changed} since its checkpoint (step {checkpoint['step']}); "
                "restore the original set-up, or start a new run"
            )
        progress_state.checkpoint_step = checkpoint["step"]
    else:
        checkpoint = None
        run = RunDir.create(output_dir, overwrite) if is_main else RunDir(output_dir)
        if is_main:
            run.lock()
            progress_state.locked = run
    progress_state.run = run
    accelerator.wait_for_everyone()

    # 4. Model: frozen base + fp32 LoRA adapters.
    set_seed(settings.seed)
    device = accelerator.device
    # Under FSDP the model is loaded with no device map: 4-bit weights go to this rank's GPU (bitsandbytes' default),
    # others stay where accelerate's cpu_ram_efficient_loading puts them (rank 0: CPU, others: meta), and FSDP
    # moves its shards to the GPU (or keeps them in CPU memory with offload) and broadcasts rank 0's values.
    model = load_base_model(config.model, None if fsdp else device, model_path)
    model = attach_lora(model, config.lora, config.model)
    saved_keys = None  # under FSDP, where the saved adapter's tensors are in the gathered state dict
    if fsdp:
        wrap_adapters_separately(model, accelerator)
        saved_keys = adapter_keys(model)
    if settings.compile:
        model.compile()  # in place: the module keeps its type, so peft's and accelerate's APIs still apply
    initial = None
    if config.lora.init != "default":  # what saved adapters are converted against (see save_adapter)
        initial = run.initial_adapter
        if is_main:  # a resumed run rebuilds the same init (an exact decomposition), and saves it again
            with warnings.catch_warnings():  # peft's advice to convert the adapter: save_adapter does, every time
                warnings.filterwarnings("ignore", message=".*(PiSSA|OLoRA) changes the base weights")
                write_dir_atomic(
                    initial, lambda directory: model.save_pretrained(directory, save_embedding_layers=False)
                )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_parameters = sum(p.numel() for p in model.parameters())

    # 5. Steps: an optimizer step consumes gradient_accumulation micro-batches on each rank.
    lengths = [len(r) for r in train_rows]
    plan = dict(
        batch_size=settings.batch_size,
        batch_tokens=settings.batch_tokens,
        packing=settings.packing,
        group_by_length=settings.group_by_length,
        seed=settings.seed,
    )
    micro_per_step = settings.gradient_accumulation * world
    steps_per_epoch = max(1, len(plan_batches(lengths, epoch=0, **plan)) // micro_per_step)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    # The model first: FSDP replaces its parameters by flat shards, and the optimizer must be built on those.
    model = accelerator.prepare(model)
    optimizer = make_optimizer(model, config)
    clock = {"elapsed": 0.0}  # training seconds so far, for a schedule on a time budget
    scheduler = make_scheduler(optimizer, config, total_steps, clock)
    optimizer = accelerator.prepare(optimizer)
    start_step = 0
    if checkpoint is not None:
        if checkpoint["total_steps"] != total_steps:
            raise MrtuneError(
                f"cannot resume {run.path}: {run.config_file} now gives {total_steps} steps, its checkpoint "
                f"{checkpoint['total_steps']}; restore the original config.yaml"
            )
        load_checkpoint(run, accelerator, model, optimizer, scheduler, saved_keys)
        start_step = checkpoint["step"]

    # 6. The run directory describes itself before the first step.
    if is_main and checkpoint is not None:
        run.truncate_history(start_step)  # the steps after the checkpoint are replayed and logged again
        run.update_info(status="running", resumed_at_steps=run.info().get("resumed_at_steps", []) + [start_step])
    elif is_main:
        run.save_config(config)
        write_text_atomic(run.path / "prompt.txt", template(config.data.prompt_style))
        tokenizer.save_pretrained(run.tokenizer)
        vocabulary = Vocabulary.from_mrs(e.meaning_representation for e in train_examples)
        write_json(run.vocabulary, vocabulary.to_dict())
        run.update_info(
            mrtune_version=__version__,
            status="running",
            model_path=str(model_path),
            device=str(device),
            processes=world,
            train_rows=len(train_rows),
            validation_rows=len(validation_rows),
            rows_too_long=report.too_long,
            trainable_parameters=trainable,
            total_parameters=total_parameters,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            data_warnings=data_warnings,
        )
    writer = _tensorboard(run, purge_step=start_step + 1 if checkpoint else None) if is_main else None
    wandb_run = _wandb(config, run) if is_main and settings.wandb_project else None

    def micro_batches():
        """(epoch, micro-batch row indices) forever, in the deterministic order of each epoch's plan."""
        epoch = 0
        while True:
            for indices in plan_batches(lengths, epoch=epoch, **plan):
                yield epoch, indices
            epoch += 1

    def evaluate_and_keep_best(step: int, best: float) -> float:
        nonlocal eval_seconds
        eval_started = time.perf_counter()
        loss = validation_loss(model, validation_rows, tokenizer.pad_token_id, settings.batch_size, device, accelerator)
        record = {"step": step, "validation_loss": loss}
        improved = loss < best  # the same on every rank: the loss is summed over ranks
        best = min(best, loss)
        tensors = adapter_state_dict(accelerator, model, saved_keys) if improved else None  # FSDP: every rank gathers
        if is_main:
            run.append_history(record)
            if writer:
                writer.add_scalar("loss/validation", loss, step)
            if wandb_run:
                wandb_run.log(record, step=step)
            if improved:
                write_dir_atomic(
                    run.adapter, lambda directory: save_adapter(accelerator, model, directory, tensors, initial)
                )
                run.update_info(best_step=step, best_validation_loss=loss)
            sample = validation_examples[0]
            if fsdp:  # rank 0 alone cannot run the model: its weights are sharded over the ranks
                output = "(no sample under FSDP; `mrtune evaluate` the run)"
            else:
                model.eval()
                with compute_autocast(accelerator.unwrap_model(model)):
                    output = generate(
                        accelerator.unwrap_model(model),
                        tokenizer,
                        [build_prompt(config.data.prompt_style, sample.sentence)],
                        max_new_tokens=config.eval.max_new_tokens,
                        progress=False,
                    )[0]
                model.train()
            tqdm.write(
                f"step {step}: validation loss {loss:.4f}{' (best)' if loss == best else ''}\n"
                f"  sentence:  {sample.sentence}\n  expected:  {sample.meaning_representation}\n"
                f"  generated: {output}"
            )
        accelerator.wait_for_everyone()
        eval_seconds += time.perf_counter() - eval_started
        return best

    def checkpoint_and_maybe_stop(done: int, signum: int | None) -> None:
        """Save RUN/checkpoint/ after `done` steps; then, if a signal asked for it, stop with a way to resume."""
        state = {
            "step": done,
            "total_steps": total_steps,
            "processes": world,
            "data_fingerprint": fingerprint,
            "best_validation_loss": None if math.isinf(best) else best,
            "bad_in_a_row": bad_in_a_row,
            "skipped_steps": skipped,
            "useful_tokens": useful_tokens,
            "padded_tokens": padded_tokens,
            "train_seconds": time.perf_counter() - started - eval_seconds,
            "eval_seconds": eval_seconds,
            "fsdp": fsdp,
            "mrtune_version": __version__,
        }
        save_checkpoint(run, accelerator, model, optimizer, scheduler, state, saved_keys)
        progress_state.checkpoint_step = done
        if writer:
            writer.flush()  # its events up to the checkpoint must survive a kill (it flushes every 2 min otherwise)
        if signum is None:
            return
        bar.close()
        if is_main:
            run.update_info(status="interrupted", interrupted_at_step=done)
            if writer:
                writer.close()
            if wandb_run:
                wandb_run.finish()
        raise TrainingInterrupted(
            f"interrupted at step {done} of {total_steps} ({signal.Signals(signum).name}): "
            f"resume with `mrtune train --resume {run.path}`",
            signum,
        )

    # 7. The loop.
    stream = micro_batches()
    best, bad_in_a_row, skipped = math.inf, 0, 0
    useful_tokens = padded_tokens = 0
    eval_seconds = train_seconds_before = 0.0  # evaluation is kept out of the training throughput
    if checkpoint is not None:  # the counters as they were at the checkpoint, the data stream at its position
        best = checkpoint["best_validation_loss"] if checkpoint["best_validation_loss"] is not None else math.inf
        bad_in_a_row, skipped = checkpoint["bad_in_a_row"], checkpoint["skipped_steps"]
        useful_tokens, padded_tokens = checkpoint["useful_tokens"], checkpoint["padded_tokens"]
        eval_seconds, train_seconds_before = checkpoint["eval_seconds"], checkpoint["train_seconds"]
        for _ in range(start_step * micro_per_step):
            next(stream)
    started = time.perf_counter() - train_seconds_before - eval_seconds
    stopped_early = None  # the step at which train.time_budget_s ran out
    # With a time budget the bar's total is the step count's upper bound; its postfix says the time left.
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        disable=not (progress and is_main),
        desc="training" if settings.time_budget_s is None else f"training ({settings.time_budget_s:.0f} s budget)",
    )
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        # Between two steps, the only moment the adapter, optimizer and data position agree: the periodic
        # checkpoint, and the clean stop that SIGINT/SIGTERM asked for.
        signum = stop.requested(accelerator)
        if signum or (step - 1 > start_step and (step - 1) % settings.checkpoint_every == 0):
            checkpoint_and_maybe_stop(step - 1, signum)
        group = [next(stream) for _ in range(micro_per_step)]
        epoch = group[-1][0]
        # A packed micro-batch is padded to the token budget (one padding row, < one row's worth): one shape for
        # every step, so flex attention and torch.compile compile once; varying lengths cost a recompilation
        # (~0.5 s) per step, measured as a fixed 0.6 s step on the Mistral-7B shape.
        pad_to = settings.batch_tokens if settings.packing else None
        batches = [
            collate([train_rows[i] for i in indices], tokenizer.pad_token_id, settings.packing, pad_to)
            for _, indices in group
        ]
        row_tokens = [sum(len(train_rows[i]) for i in indices) for _, indices in group]
        step_targets = sum(count_targets(b) for b in batches)  # over all ranks: every rank divides by the same
        mine = batches[accelerator.process_index :: world]
        step_loss = torch.zeros((), device=device)
        useful_tokens += sum(row_tokens)  # the whole step's, all ranks': each rank knows the step's micro-batches
        padded_tokens += sum(b["input_ids"].numel() for b in batches)
        for i, batch in enumerate(mine):
            keep = target_positions(batch["labels"]).to(device, non_blocking=True)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = accelerator.no_sync(model) if i < len(mine) - 1 else contextlib.nullcontext()
            with sync:
                # Divide by the whole step's target count, so the step's gradient is the mean over all of its
                # target tokens whatever their split into micro-batches (DDP averages over ranks: x world).
                loss = target_loss(model, batch, keep) / step_targets
                accelerator.backward(loss * world)
            step_loss += loss.detach()
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        clock["elapsed"] = time.perf_counter() - started - eval_seconds
        out_of_time = settings.time_budget_s is not None and _any_rank(
            accelerator, clock["elapsed"] >= settings.time_budget_s, device
        )
        # One host sync for both checks (each `bool(tensor)` waits for the device).
        health = torch.stack([step_loss.float(), torch.as_tensor(grad_norm, device=device).float()])
        if not bool(torch.isfinite(health).all()):
            # A non-finite loss or gradient would poison the adapter: drop this step's update.
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            skipped += 1
            bad_in_a_row += 1
            if bad_in_a_row >= settings.max_skipped_in_a_row:
                if is_main:
                    run.update_info(status="diverged", diverged_at_step=step, skipped_steps=skipped)
                raise MrtuneError(
                    f"training diverged: {bad_in_a_row} steps in a row had a non-finite loss or gradient (step "
                    f"{step}): lower train.learning_rate or use model.dtype=float32; the best adapter so far "
                    f"is kept in {run.adapter}"
                )
            continue
        bad_in_a_row = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        elapsed = time.perf_counter() - started - eval_seconds
        last = step == total_steps or out_of_time
        if is_main and (step % settings.log_every == 0 or last):
            record = {
                "step": step,
                "epoch": round(epoch + 0.0, 3),
                "train_loss": step_loss.item(),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "useful_tokens": useful_tokens,
                "padded_tokens": padded_tokens,
                "useful_tokens_per_s": round(useful_tokens / elapsed, 1),
                "elapsed_s": round(elapsed, 3),
            }
            run.append_history(record)
            bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                tok_s=f"{record['useful_tokens_per_s']:.0f}",
                **(
                    {"left": f"{max(0.0, settings.time_budget_s - elapsed):.0f}s"}
                    if settings.time_budget_s is not None
                    else {}
                ),
            )
            if writer:
                for key in ("train_loss", "learning_rate", "grad_norm", "useful_tokens_per_s"):
                    writer.add_scalar(key.replace("train_loss", "loss/train"), record[key], step)
            if wandb_run:
                wandb_run.log(record, step=step)
        if step % settings.eval_every == 0 or last:
            best = evaluate_and_keep_best(step, best)
        if out_of_time:
            stopped_early = step
            break
    bar.close()
    train_seconds = time.perf_counter() - started - eval_seconds
    if is_main:
        run.update_info(
            status="finished",
            finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            train_seconds=round(train_seconds, 1),
            eval_seconds=round(eval_seconds, 1),
            useful_tokens=useful_tokens,
            padded_tokens=padded_tokens,
            skipped_steps=skipped,
            useful_tokens_per_s=round(useful_tokens / train_seconds, 1),
            **({"stopped_by_time_budget_at_step": stopped_early} if stopped_early else {}),
            peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        )
        if writer:
            writer.close()
        if wandb_run:
            wandb_run.finish()
        # A finished run cannot be resumed: its checkpoint (adapter + 2x its size of optimizer state) would be
        # dead weight.
        shutil.rmtree(run.checkpoint, ignore_errors=True)
        shutil.rmtree(run.initial_adapter, ignore_errors=True)  # the saved adapter is converted already
        from mrtune.run.report import write_report

        write_report(run)
    accelerator.wait_for_everyone()
    return run


def _any_rank(accelerator, flag: bool, device) -> bool:
    """True on every rank when it is true on any: all ranks must stop at the same step (their clocks differ)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=device), reduction="sum") > 0)


def _tensorboard(run: RunDir, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an install dependency; tolerate a trimmed environment
        return None
    # purge_step: on resume, TensorBoard drops the events logged after the checkpoint, which are replayed.
    return SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=purge_step)


def _wandb(config: Config, run: RunDir):
    try:
        import wandb
    except ImportError:
        raise MrtuneError("train.wandb_project is set but wandb is not installed: pip install wandb") from None
    return wandb.init(
        project=config.train.wandb_project, config=config.to_dict(), dir=str(run.path), name=run.path.name
    )
