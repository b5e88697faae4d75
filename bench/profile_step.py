"""Profile optimizer steps of `mrtune train`'s loop body on the GPU: where a step's time goes (host vs device).

    python -m bench.profile_step --set model.name=/tmp/mistral-7b-shape ... [--steps 2] [--warm 3]

Builds the model and micro-batches as `mrtune train` does, runs `--warm` steps, then profiles `--steps` steps with
torch.profiler and prints: wall time per step, the device's busy time per step (sum of kernel times), and the ops
that take the most host and device time. A step whose wall time far exceeds its kernel time is bound by the host
(Python and kernel launches), not by the GPU.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from mrtune.config import load_config
    from mrtune.model.build import attach_lora, compile_decoder_layers, load_base_model
    from mrtune.model.fp8 import resolve_fp8_base
    from mrtune.model.resolve import load_tokenizer, resolve_model_path
    from mrtune.task.data import load_split
    from mrtune.train.batching import collate, plan_batches, tokenize_examples
    from mrtune.train.recipe import target_loss, target_positions

    config = load_config(args.config, args.set)
    device = torch.device("cuda")
    if config.model.fp8_base == "auto":  # as `mrtune train` resolves it (Recipe._resolve_fp8), said
        on, why = resolve_fp8_base(
            "auto", device, lora=config.train.method == "lora", fsdp=False, dora=config.lora.dora
        )
        config.model.fp8_base = on
        print(f"model.fp8_base=auto: fp8 base matmuls {why}", flush=True)
    path = resolve_model_path(config.model.name)
    tokenizer = load_tokenizer(path)
    rows, _ = tokenize_examples(
        load_split(config.data.train)[:2000],
        tokenizer,
        config.data.prompt_style,
        completion_only=config.data.completion_only,
    )
    settings = config.train
    plan = plan_batches(
        [len(r) for r in rows],
        batch_size=settings.batch_size,
        batch_tokens=settings.batch_tokens,
        packing=settings.packing,
    )
    model = attach_lora(load_base_model(config.model, device, path), config.lora, config.model)
    if config.model.compile_layers:
        compile_decoder_layers(model, config.model.compile_mode)
    if settings.compile:
        model.compile(mode=config.model.compile_mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    pad_to = settings.batch_tokens if settings.packing else None

    def step(index: int) -> None:
        if config.model.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        batch = collate([rows[i] for i in plan[index % len(plan)]], tokenizer.pad_token_id, settings.packing, pad_to)
        keep = target_positions(batch["labels"]).to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        target_loss(model, batch, keep).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warm):
        started = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        print(f"warm step {i}: {time.perf_counter() - started:.3f} s", flush=True)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            step(args.warm + i)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / args.steps
    print(
        f"wall {wall:.3f} s/step (profiled); kernels {device_us / 1e6:.3f} s/step; "
        f"peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB",
        flush=True,
    )
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
