"""Data-parallel scaling: `mrtune train` throughput on 1 GPU and on 2 GPUs (DDP), from the two runs' histories.

    python -m bench.scaling --one RUN_1GPU --two RUN_2GPU --out scaling.json     # bench/scaling.sh runs it

Both runs train with the same per-GPU micro-batch (the same train.batch_tokens and gradient_accumulation), so the
2-GPU run's optimizer step holds twice the tokens; `scaling_2gpu_7b` is the ratio of useful (non-padding) tokens
per second, 2.0 for perfect scaling. Tokens/s are steady-state rates, measured as bench/run.py measures them:
from the end of step `--warm` to the last step (the first steps pay for flex_attention's compilation and the
allocator's growth). The model is a random-init Mistral-7B shape in 4-bit NF4: speed does not depend on the
weights' values.

With `--fsdp RUN`, a third run, sharded (configs/accelerate/fsdp-qlora.yaml) on the same 2 GPUs, adds its tokens/s
and peak memory, and whether its adapter is a PEFT adapter of the same tensors as the DDP run's (and if not, how
they differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.run import MISTRAL_SHAPE_LABEL, steady_rate


def summarise_run(run_dir: Path, warm: int, processes: int) -> dict:
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


def compare_adapters(run_a: Path, run_b: Path) -> dict:
    """Whether both adapters are PEFT LoRA adapters with the same tensor names, shapes and dtypes, and if not, how
    they differ (a few names each way, a few mismatched tensors), so that a failed check says why."""
    from safetensors.torch import load_file

    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (run_a, run_b))
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (run_a, run_b)]
    differ = [
        f"{k}: {tuple(a[k].shape)} {a[k].dtype} vs {tuple(b[k].shape)} {b[k].dtype}"
        for k in sorted(a.keys() & b.keys())
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
    return {
        "same": not (differ or only_a or only_b or config_differ) and configs[0]["peft_type"] == "LORA",
        "tensors": [len(a), len(b)],
        "only_in_first": only_a[:5],
        "only_in_second": only_b[:5],
        "different": differ[:5],
        "config_differs": config_differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", type=Path, required=True, help="run directory trained on 1 GPU")
    parser.add_argument("--two", type=Path, required=True, help="run directory trained on 2 GPUs (DDP)")
    parser.add_argument("--fsdp", type=Path, help="run directory trained on 2 GPUs with FSDP")
    parser.add_argument("--warm", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    one = summarise_run(args.one, args.warm, processes=1)
    two = summarise_run(args.two, args.warm, processes=2)
    result = {
        "tokens_per_s_1gpu": one["useful_tokens_per_s"],
        "tokens_per_s_2gpu": two["useful_tokens_per_s"],
        "scaling_2gpu_7b": two["useful_tokens_per_s"] / one["useful_tokens_per_s"],
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": MISTRAL_SHAPE_LABEL,
        "runs": {"1gpu": one, "2gpu_ddp": two},
    }
    if args.fsdp:
        fsdp = summarise_run(args.fsdp, args.warm, processes=2)
        result["tokens_per_s_2gpu_fsdp"] = fsdp["useful_tokens_per_s"]
        comparison = compare_adapters(args.fsdp, args.two)
        result["fsdp_adapter_same_tensors_as_ddp"] = comparison["same"]
        result["fsdp_vs_ddp_adapter"] = comparison
        result["runs"]["2gpu_fsdp"] = fsdp
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
