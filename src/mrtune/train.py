"""`mrtune train`: LoRA / QLoRA fine-tuning, one readable loop from data to the best adapter.

Runs on one CPU, one GPU, or several GPUs through Accelerate (`accelerate launch -m mrtune train ...`): each rank
takes its share of every optimizer step's micro-batches, and only the main rank writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mrtune import __version__
from mrtune.batching import IGNORE_INDEX, collate, count_targets, plan_batches, tokenize_examples
from mrtune.config import Config
from mrtune.data import load_split, spread_sample
from mrtune.errors import MrtuneError
from mrtune.generation import generate
from mrtune.models import load_tokenizer, resolve_model_path
from mrtune.modeling import attach_lora, load_base_model
from mrtune.mr import Vocabulary
from mrtune.prompts import build_prompt, template
from mrtune.rundir import RunDir, replace_dir, write_json, write_text_atomic

MAX_BAD_STEPS_IN_A_ROW = 10  # non-finite losses tolerated in a row before the run is stopped as diverged


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    settings = config.train
    if settings.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # fused=True: one kernel for all adapter tensors instead of several per tensor (CUDA only).
    fused = all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=fused or None
    )


def make_scheduler(optimizer, config: Config, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.train.schedule]
    warmup = int(config.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def target_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and their count.

    Logits are computed only at positions whose next token is a target (`logits_to_keep`): with the loss on the
    completion only, that skips the prompt's positions, which saves the largest activation of the step
    (positions x vocabulary in fp32, ~0.8 GB per 4,096 tokens with a 49k vocabulary) and its matmul.
    """
    next_labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (next_labels != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # (K,) positions, shared by the rows
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, vocab)
    targets = next_labels[:, keep]
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_loss(model, rows, pad_token_id, batch_size, device, accelerator) -> float:
    """Mean loss per target token over the validation rows (gathered across ranks)."""
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of token losses, token count)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    mine.sort(key=lambda i: len(rows[i]))  # similar lengths together: little padding
    for start in range(0, len(mine), batch_size):
        batch = collate([rows[i] for i in mine[start:start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = target_loss(model, batch)
        total += torch.stack([loss.float(), torch.tensor(float(n), device=device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def train(config: Config, output_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> RunDir:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    settings = config.train

    # 1. Data first, so that bad data fails in a second, before any model is loaded.
    train_examples = spread_sample(
        load_split(config.data.train, config.data.input_field, config.data.output_field), config.data.train_limit
    )
    validation_examples = spread_sample(
        load_split(config.data.validation, config.data.input_field, config.data.output_field), settings.eval_rows
    )
    template(config.data.prompt_style)  # unknown style: fail now
    run = RunDir.create(output_dir, overwrite) if is_main else RunDir(Path(output_dir))
    accelerator.wait_for_everyone()

    # 2. Tokenizer and tokenized rows.
    model_path = resolve_model_path(config.model.name) if is_main else None
    accelerator.wait_for_everyone()
    model_path = model_path or resolve_model_path(config.model.name)  # other ranks reuse the main rank's cache
    tokenizer = load_tokenizer(model_path)
    limit = min(config.data.max_length, getattr(tokenizer, "model_max_length", 10**9) or 10**9)
    tokenize = dict(completion_only=config.data.completion_only, max_length=limit, too_long=config.data.too_long)
    train_rows, report = tokenize_examples(train_examples, tokenizer, config.data.prompt_style, **tokenize)
    validation_rows, _ = tokenize_examples(validation_examples, tokenizer, config.data.prompt_style, **tokenize)
    if report.too_long and is_main:
        verb = "skipped" if report.action == "skip" else "truncated"
        tqdm.write(f"{report.too_long} training row(s) longer than {limit} tokens were {verb}")
    if not train_rows:
        raise MrtuneError(f"no training rows left after data.too_long={report.action}: raise data.max_length")

    # 3. Model: frozen base + fp32 LoRA adapters.
    set_seed(settings.seed)
    device = accelerator.device
    model = load_base_model(config.model, device, model_path)
    model = attach_lora(model, config.lora, config.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_parameters = sum(p.numel() for p in model.parameters())

    # 4. Steps: an optimizer step consumes gradient_accumulation micro-batches on each rank.
    lengths = [len(r) for r in train_rows]
    plan = dict(batch_size=settings.batch_size, batch_tokens=settings.batch_tokens, packing=settings.packing,
                group_by_length=settings.group_by_length, seed=settings.seed)
    micro_per_step = settings.gradient_accumulation * world
    steps_per_epoch = max(1, len(plan_batches(lengths, epoch=0, **plan)) // micro_per_step)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # 5. The run directory describes itself before the first step.
    if is_main:
        run.save_config(config)
        write_text_atomic(run.path / "prompt.txt", template(config.data.prompt_style))
        tokenizer.save_pretrained(run.tokenizer)
        vocabulary = Vocabulary.from_mrs(e.meaning_representation for e in train_examples)
        write_json(run.vocabulary, vocabulary.to_dict())
        run.update_info(
            mrtune_version=__version__, status="running", model_path=str(model_path), device=str(device),
            processes=world, train_rows=len(train_rows), validation_rows=len(validation_rows),
            rows_too_long=report.too_long, trainable_parameters=trainable, total_parameters=total_parameters,
            total_steps=total_steps, steps_per_epoch=steps_per_epoch, started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
    writer = _tensorboard(run) if is_main else None
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
        loss = validation_loss(model, validation_rows, tokenizer.pad_token_id, settings.batch_size, device,
                               accelerator)
        record = {"step": step, "validation_loss": loss}
        if is_main:
            run.append_history(record)
            if writer:
                writer.add_scalar("loss/validation", loss, step)
            if wandb_run:
                wandb_run.log(record, step=step)
            if loss < best:
                best = loss
                tmp = run.path / "adapter.tmp"
                # save_embedding_layers=False: with lm_head adapted, peft would also save the frozen head
                # (262 MB for Mistral-7B); the base model already has it.
                accelerator.unwrap_model(model).save_pretrained(tmp, save_embedding_layers=False)
                replace_dir(tmp, run.adapter)
                run.update_info(best_step=step, best_validation_loss=loss)
            sample = validation_examples[0]
            model.eval()
            output = generate(accelerator.unwrap_model(model), tokenizer,
                              [build_prompt(config.data.prompt_style, sample.sentence)],
                              max_new_tokens=config.eval.max_new_tokens, progress=False)[0]
            model.train()
            tqdm.write(f"step {step}: validation loss {loss:.4f}{' (best)' if loss == best else ''}\n"
                       f"  sentence:  {sample.sentence}\n  expected:  {sample.meaning_representation}\n"
                       f"  generated: {output}")
        accelerator.wait_for_everyone()
        eval_seconds += time.perf_counter() - eval_started
        return best

    # 6. The loop.
    stream = micro_batches()
    best, bad_in_a_row, skipped = math.inf, 0, 0
    useful_tokens = padded_tokens = 0
    eval_seconds = 0.0  # kept out of the training throughput
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not (progress and is_main))
    model.train()
    for step in range(1, total_steps + 1):
        group = [next(stream) for _ in range(micro_per_step)]
        epoch = group[-1][0]
        batches = [collate([train_rows[i] for i in indices], tokenizer.pad_token_id, settings.packing)
                   for _, indices in group]
        step_targets = sum(count_targets(b) for b in batches)  # over all ranks: every rank divides by the same
        mine = batches[accelerator.process_index::world]
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(mine):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = accelerator.no_sync(model) if i < len(mine) - 1 else contextlib.nullcontext()
            with sync:
                # Divide by the whole step's target count, so the step's gradient is the mean over all of its
                # target tokens whatever their split into micro-batches (DDP averages over ranks: x world).
                loss = target_loss(model, batch)[0] / step_targets
                accelerator.backward(loss * world)
            step_loss += loss.detach()
            useful_tokens += int(batch["labels"].numel() if settings.packing else batch["attention_mask"].sum())
            padded_tokens += batch["input_ids"].numel()
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        if not (torch.isfinite(step_loss) and torch.isfinite(grad_norm)):
            # A non-finite loss or gradient would poison the adapter: drop this step's update.
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            skipped += 1
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
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
        if is_main and (step % settings.log_every == 0 or step == total_steps):
            record = {"step": step, "epoch": round(epoch + 0.0, 3), "train_loss": step_loss.item(),
                      "learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "useful_tokens": useful_tokens * world, "padded_tokens": padded_tokens * world,
                      "useful_tokens_per_s": round(useful_tokens * world / elapsed, 1), "elapsed_s": round(elapsed, 3)}
            run.append_history(record)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['useful_tokens_per_s']:.0f}")
            if writer:
                for key in ("train_loss", "learning_rate", "grad_norm", "useful_tokens_per_s"):
                    writer.add_scalar(key.replace("train_loss", "loss/train"), record[key], step)
            if wandb_run:
                wandb_run.log(record, step=step)
        if step % settings.eval_every == 0 or step == total_steps:
            best = evaluate_and_keep_best(step, best)
    bar.close()
    train_seconds = time.perf_counter() - started - eval_seconds
    if is_main:
        run.update_info(
            status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"), train_seconds=round(train_seconds, 1),
            eval_seconds=round(eval_seconds, 1),
            useful_tokens=useful_tokens * world, padded_tokens=padded_tokens * world, skipped_steps=skipped,
            useful_tokens_per_s=round(useful_tokens * world / train_seconds, 1),
            peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        )
        if writer:
            writer.close()
        if wandb_run:
            wandb_run.finish()
        from mrtune.report import write_report

        write_report(run)
    accelerator.wait_for_everyone()
    return run


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an install dependency; tolerate a trimmed environment
        return None
    return SummaryWriter(log_dir=str(run.path / "tensorboard"))


def _wandb(config: Config, run: RunDir):
    try:
        import wandb
    except ImportError:
        raise MrtuneError("train.wandb_project is set but wandb is not installed: pip install wandb") from None
    return wandb.init(project=config.train.wandb_project, config=config.to_dict(), dir=str(run.path),
                      name=run.path.name)
