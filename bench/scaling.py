"""Scale-out on the GPUs of one machine: DDP and FSDP2 tokens/s of the 7B recipe, and a 70B shape under FSDP2.

    python -m bench.scaling summarise --runs RUNS --warm 3 --out scaling.json      # bench/scaling.sh runs both
    torchrun --nproc_per_node N -m bench.scaling big --shape 70b --out big.json

`summarise` reads the run directories bench/scaling.sh trains (RUNS/1gpu, RUNS/{N}gpu_ddp, RUNS/{N}gpu_fsdp2,
RUNS/{N}gpu_fsdp1): every run trains with the same micro-batch per GPU, so an N-GPU step holds N times the tokens,
and `scaling_{N}gpu_7b` is the ratio of useful (non-padding) tokens/s to one GPU's (N for perfect scaling;
efficiency = ratio / N). Tokens/s are steady-state rates, measured as bench/run.py measures them: from the end of
step `--warm` to the last step (the first steps pay for flex_attention's compilation and the allocator's growth).
The model is a random-init Mistral-7B shape in 4-bit NF4: speed does not depend on the weights' values. Peak
memory per rank is what nvidia-smi saw each GPU hold during the run (RUNS/{name}.memory.csv, sampled every 0.5 s:
the caching allocator's reserve and the CUDA context included); rank 0's torch peak is in run.json.

`big` trains LoRA adapters on a random-init model of Llama-2-70B's shape (68.7B parameters, 137 GB in bf16: more
than one H200's 141 GB can hold with activations and adapters) with FSDP2 over the processes torchrun starts. The
full model never exists anywhere: every rank builds it on the meta device (no memory), attaches peft's LoRA there,
shards it with torch's `fully_shard` (one unit per decoder layer, then the root), and only then allocates its own
shards (`to_empty`) and fills them with random values; each GPU holds 1/N of the weights. It reports useful tokens/s
(random token rows, no padding) and every rank's peak memory. `--shape tiny` is the same code on a 2-layer model,
which tests/test_scaling.py runs in 2 CPU processes (gloo).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import time
from pathlib import Path

MISTRAL_SHAPE_LABEL = "random-init Mistral-7B shape (4-bit NF4)"
# Llama-2-70B's dimensions: 80 layers of 8,192 hidden, 28,672 MLP, 64 query heads over 8 key/value heads.
SHAPES = {
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    ),
}
SHAPE_LABELS = {"70b": "Llama-2-70B shape", "tiny": "2-layer Llama (the CPU test's)"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- summarise: the 7B runs of bench/scaling.sh ------------------------------------------------------------------
def summarise_run(run_dir: Path, warm: int, processes: int) -> dict:
    from bench.run import steady_rate
    from mrtune.run.rundir import RunDir

    run = RunDir.open(run_dir)
    info = run.info()
    if info.get("status") != "finished" or info.get("processes") != processes:
        raise SystemExit(
            f"{run_dir}: expected a finished run of {processes} process(es), run.json says status "
            f"{info.get('status')!r}, processes {info.get('processes')!r}"
        )
    rate = steady_rate(run.read_history(), warm)
    config = run.config()
    return {
        "processes": processes,
        "useful_tokens_per_s": rate["useful_tokens_per_s"],
        "padded_tokens_per_s": rate["padded_tokens_per_s"],
        "step_s": rate["step_s"],
        "steps_timed": rate["steps_timed"],
        "batch_tokens_per_gpu": config.train.batch_tokens,
        "prompt_style": config.data.prompt_style,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "gradient_accumulation": config.train.gradient_accumulation,
        "peak_memory_gb_rank0": (info.get("peak_memory_bytes") or 0) / 1e9,
    }


def peak_memory_per_gpu(samples: Path) -> list[float]:
    """The most memory (GB) each GPU held in an nvidia-smi log of `index, memory.used [MiB]` lines."""
    peaks: dict[int, float] = {}
    for line in samples.read_text().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            index, used = int(fields[0]), int(fields[1]) * 2**20 / 1e9
            peaks[index] = max(peaks.get(index, 0.0), used)
    return [peaks[index] for index in sorted(peaks)]


def compare_adapters(run_a: Path, run_b: Path) -> dict:
    """Whether both adapters are PEFT LoRA adapters with the same tensor names, shapes and dtypes, and if not, how
    they differ (a few names each way, a few mismatched tensors), so that a failed check says why; and how far
    their values are apart (‖a - b‖ / ‖b‖ over all tensors)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (run_a, run_b))
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (run_a, run_b)]
    common = sorted(a.keys() & b.keys())
    differ = [
        f"{k}: {tuple(a[k].shape)} {a[k].dtype} vs {tuple(b[k].shape)} {b[k].dtype}"
        for k in common
        if (a[k].shape, a[k].dtype) != (b[k].shape, b[k].dtype)
    ]
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    for config in configs:  # a set in peft, written as a list in the writing process's hash order
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
    config_keys = ("peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform")
    config_differ = {
        k: [c.get(k) for c in configs]
        for k in config_keys
        if json.dumps(configs[0].get(k), sort_keys=True) != json.dumps(configs[1].get(k), sort_keys=True)
    }
    same_shapes = [k for k in common if a[k].shape == b[k].shape]
    difference = sum(float((a[k].double() - b[k].double()).square().sum()) for k in same_shapes)
    size = sum(float(b[k].double().square().sum()) for k in same_shapes)
    return {
        "same": not (differ or only_a or only_b or config_differ) and configs[0]["peft_type"] == "LORA",
        "tensors": [len(a), len(b)],
        "only_in_first": only_a[:5],
        "only_in_second": only_b[:5],
        "different": differ[:5],
        "config_differs": config_differ,
        "relative_difference": math.sqrt(difference / size) if size else None,
        "all_finite": all(bool(torch.isfinite(t).all()) for t in (*a.values(), *b.values())),
    }


def loss_difference(run_a: Path, run_b: Path) -> float:
    """The largest relative difference of two runs' training losses, step by step."""
    from mrtune.run.rundir import RunDir

    losses = [[r["train_loss"] for r in RunDir.open(run).read_history() if "train_loss" in r] for run in (run_a, run_b)]
    return max(abs(x - y) / abs(y) for x, y in zip(*losses, strict=True))


def summarise(runs: Path, warm: int, big: Path | None = None) -> dict:
    """scaling.json from the runs under `runs` (1gpu, {N}gpu_ddp, {N}gpu_fsdp2, {N}gpu_fsdp1, each with an
    nvidia-smi log {name}.memory.csv beside it), and `big`'s 70B result as `fsdp2_70b`."""
    import torch

    found = {}
    for path in sorted(runs.iterdir()):
        match = re.fullmatch(r"(\d+)gpu(?:_(ddp|fsdp1|fsdp2))?", path.name)
        if path.is_dir() and match:
            found[path.name] = (int(match.group(1)), path)
    if "1gpu" not in found:
        raise SystemExit(f"{runs}: no 1gpu run to compare with")
    result_runs = {}
    for name, (gpus, path) in sorted(found.items(), key=lambda item: (item[1][0], item[0])):
        result_runs[name] = summarise_run(path, warm, processes=gpus)
        memory = runs / f"{name}.memory.csv"
        if memory.is_file():
            result_runs[name]["peak_memory_gb_per_gpu"] = peak_memory_per_gpu(memory)
    one = result_runs["1gpu"]["useful_tokens_per_s"]
    result = {
        "tokens_per_s_1gpu": one,
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": MISTRAL_SHAPE_LABEL,
        "gpus": max(gpus for gpus, _ in found.values()),
    }
    for name, run in result_runs.items():
        gpus, kind = found[name][0], name.partition("_")[2]
        if gpus == 1:
            continue
        suffix = "" if kind == "ddp" else f"_{kind}"
        result[f"tokens_per_s_{gpus}gpu{suffix}"] = run["useful_tokens_per_s"]
        result[f"scaling_{gpus}gpu_7b{suffix}"] = run["useful_tokens_per_s"] / one
        result[f"efficiency_{gpus}gpu_7b{suffix}"] = run["useful_tokens_per_s"] / one / gpus
        if kind in ("fsdp1", "fsdp2") and f"{gpus}gpu_ddp" in found:
            ddp = found[f"{gpus}gpu_ddp"][1]
            comparison = compare_adapters(found[name][1], ddp)
            comparison["loss_relative_difference"] = loss_difference(found[name][1], ddp)
            result[f"{kind}_vs_ddp_{gpus}gpu"] = comparison
    result.update(_fsdp2_qlora_verdict(result))
    if big is not None:
        result["fsdp2_70b"] = json.loads(big.read_text())
    result["runs"] = result_runs
    return result


def _fsdp2_qlora_verdict(result: dict) -> dict:
    """Whether FSDP2's 4-bit run trained what DDP trained, as closely as FSDP1's (the path known to be right) did.

    A random-init model's loss hardly depends on a few altered weights, but its adapters' gradients do: FSDP2 is
    taken to match when its adapter is as close to DDP's as FSDP1's is (within twice FSDP1's distance, or 1e-3),
    with the same tensors and every value finite (bitsandbytes issue 1945: packed NF4 bytes altered under FSDP2)."""
    pairs = [
        (result[f"fsdp2_vs_ddp_{n}gpu"], result[f"fsdp1_vs_ddp_{n}gpu"])
        for n in (2, 4, 8)
        if f"fsdp2_vs_ddp_{n}gpu" in result and f"fsdp1_vs_ddp_{n}gpu" in result
    ]
    if not pairs:
        return {}
    fsdp2, fsdp1 = pairs[-1]
    distance = fsdp2["relative_difference"]
    bound = max(2 * (fsdp1["relative_difference"] or 0.0), 1e-3)
    return {"fsdp2_qlora_matches_ddp": bool(fsdp2["same"] and fsdp2["all_finite"] and distance <= bound)}


# -- big: a 70B shape trained with FSDP2, never materialised -----------------------------------------------------
def build_sharded_lora_model(shape: str, device, rank: int, lora_r: int, checkpointing: bool):
    """The random-init `shape` model with LoRA adapters on every linear layer of its decoder, sharded by FSDP2 over
    all processes, each rank holding only its own shards (see the module's docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # fp32 adapters over bf16 weights, as mrtune trains them (bf16 autocast in the step)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated yet
    decoder = model.base_model.model.model
    for layer in decoder.layers:  # one unit per decoder layer: gathered for its forward and backward only
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, final norm, lm_head
    model.to_empty(device=device)  # each rank allocates its shards alone
    _fill_shards(model, seed=1234 + rank)
    rotary = type(decoder.rotary_emb)(config)  # its inv_freq buffer is not a parameter: built whole, on every rank
    decoder.rotary_emb = rotary.to(device)
    return model, config


def _fill_shards(model, seed: int) -> None:
    """Random values in each rank's own shards: normal(0, 0.02) weights, unit norms, and LoRA's initialisation
    (lora_A uniform in ±1/sqrt(fan_in), as peft's kaiming init gives; lora_B zero, so training starts at the base).
    The shards are split along dim 0, so a shard's dim 1 is the weight's fan_in."""
    import torch
    from torch.distributed.tensor import DTensor

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            if "lora_B" in name:
                local.zero_()
            elif "lora_A" in name:
                bound = 1 / math.sqrt(local.shape[1])
                local.uniform_(-bound, bound, generator=generator)
            elif "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=generator)


def train_big(args) -> dict:
    """Train the sharded LoRA model on random token rows for `args.steps` steps; the rates and memory figures."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, config = build_sharded_lora_model(args.shape, device, rank, args.lora_r, checkpointing=cuda)
    parameters = list(model.parameters())
    held = {
        "local_elements": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters),
        "elements": sum(p.numel() for p in parameters),
        "all_dtensors": all(isinstance(p, DTensor) for p in parameters),
    }
    trainable = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    losses, started = [], None
    for step in range(args.steps):
        if step == args.warm:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        rows = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    timed = args.steps - args.warm
    per_rank = [None] * world
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    dist.all_gather_object(per_rank, {"peak_memory_gb": peak, **held, "losses": losses})
    trainable_count = sum(p.numel() for p in trainable)
    # The sharded tensors go before the process group: freed at interpreter exit instead, with gloo's worker threads
    # still holding work on them, rank 0 sometimes aborted ("terminate called without an active exception") after
    # writing its result (seen once in a CPU test run, 2026-11-30).
    del model, optimizer, parameters, trainable
    gc.collect()
    dist.destroy_process_group()
    tokens = args.batch * args.seq_len * world * timed
    return {
        "model": f"random-init {SHAPE_LABELS[args.shape]}, bf16, LoRA r={args.lora_r} on {len(LORA_TARGETS)} "
        "linear layers a decoder layer, FSDP2",
        "shape": args.shape,
        "parameters": per_rank[0]["elements"],
        "trainable_parameters": trainable_count,
        "gpus" if cuda else "processes": world,
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "rows_per_gpu": args.batch,
        "seq_len": args.seq_len,
        "gradient_checkpointing": cuda,
        "steps_timed": timed,
        "step_s": seconds / timed,
        "useful_tokens_per_s": tokens / seconds,
        "peak_memory_gb_per_rank": [r["peak_memory_gb"] for r in per_rank],
        "local_elements_per_rank": [r["local_elements"] for r in per_rank],
        "all_dtensors": all(r["all_dtensors"] for r in per_rank),
        "losses_rank0": per_rank[0]["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summarise", help="scaling.json from bench/scaling.sh's run directories")
    summary.add_argument("--runs", type=Path, required=True, help="folder of the 1gpu, Ngpu_ddp, ... run directories")
    summary.add_argument("--warm", type=int, default=3, help="steps left out of the rate")
    summary.add_argument("--big", type=Path, help="the 70B result of `big`, added as fsdp2_70b")
    summary.add_argument("--out", type=Path, required=True)
    big = commands.add_parser("big", help="train the 70B shape with FSDP2 (under torchrun)")
    big.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    big.add_argument("--steps", type=int, default=8)
    big.add_argument("--warm", type=int, default=3, help="steps left out of the rate")
    big.add_argument("--batch", type=int, default=1, help="rows per GPU a step")
    big.add_argument("--seq-len", type=int, default=4096)
    big.add_argument("--lora-r", type=int, default=16)
    big.add_argument("--cpu", action="store_true", help="gloo on the CPU even where there are GPUs")
    big.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "summarise":
        result = summarise(args.runs, args.warm, args.big)
    else:
        if args.steps <= args.warm:
            parser.error("--steps must exceed --warm")
        result = train_big(args)
        if int(os.environ.get("RANK", 0)) != 0:
            return
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
