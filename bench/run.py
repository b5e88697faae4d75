"""The GPU benchmark: the seed recipe and the project's, side by side, in one run on one card.

    python -m bench.run --out DIR                 # everything: SmolLM2-135M and the Mistral-7B shape
    python -m bench.run --out DIR --only smollm2  # one part
    python -m bench.run --publish A/results.json B/results.json   # merge runs into BENCHMARKS.md + bench/results/

Every measurement runs in its own process (a clean CUDA context, so peak memory is that measurement's own) and
writes one JSON file; a failed measurement (out of memory, say) is recorded as such and the rest go on.

No Mistral-7B weights can be had here: the 7B figures come from a random-init model of Mistral-7B's shape
(`MistralConfig()` defaults, but SmolLM2's 49,152-token vocabulary so that real ViGGO text can be tokenized),
loaded in 4-bit NF4. Speed and memory do not depend on the weights' values; accuracy does, so none is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
MISTRAL_SHAPE_LABEL = "random-init Mistral-7B shape (4-bit NF4)"


# --------------------------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `python -m bench.run measure ...`)
# --------------------------------------------------------------------------------------------------------------


def steady_rate(history: list[dict], warm: int) -> dict:
    """Throughput between the end of step `warm` and the last step (first steps pay for compilation, allocator)."""
    steps = [r for r in history if "train_loss" in r]
    if len(steps) <= warm:
        warm = 0
        first = {"elapsed_s": 0.0, "useful_tokens": 0, "padded_tokens": 0, "step": 0}
    else:
        first = steps[warm - 1] if warm else {"elapsed_s": 0.0, "useful_tokens": 0, "padded_tokens": 0, "step": 0}
    last = steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    n = last["step"] - first["step"]
    return {
        "step_s": seconds / n,
        "useful_tokens_per_s": (last["useful_tokens"] - first["useful_tokens"]) / seconds,
        "padded_tokens_per_s": (last["padded_tokens"] - first["padded_tokens"]) / seconds,
        "steps_timed": n,
    }


def measure_project(config_path: str | None, overrides: list[str], warm: int) -> dict:
    import torch

    from mrtune.config import load_config
    from mrtune.train.recipe import train

    config = load_config(config_path, overrides)
    run_dir = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"bench-run-{os.getpid()}"
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run = train(config, run_dir, overwrite=True, progress=False)
    info = run.info()
    result = steady_rate(run.read_history(), warm)
    result.update(
        peak_memory_gb=info["peak_memory_bytes"] / 1e9,
        train_seconds=info["train_seconds"],
        wall_seconds=time.perf_counter() - started,
        total_steps=info["total_steps"],
        run_dir=str(run.path),
    )
    return result


def measure_evaluate(
    run_dir: str, limit: int | None, split: str = "test", data: str | None = None, overrides: list[str] = ()
) -> dict:
    from mrtune.infer.evaluate import evaluate

    started = time.perf_counter()
    metrics = evaluate(run_dir, split=split, data=data, limit=limit, overrides=overrides, progress=False)
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def epoch_tokens(tokenizer_dir: str, prompt_style: str) -> int:
    """Tokens in one epoch of ViGGO's training split (prompt + MR + EOS), as the project tokenizes it."""
    from mrtune.model.resolve import load_tokenizer
    from mrtune.task.data import load_split
    from mrtune.train.batching import tokenize_examples

    rows, _ = tokenize_examples(load_split("viggo:train"), load_tokenizer(tokenizer_dir), prompt_style)
    return sum(len(r) for r in rows)


def make_mistral_shape(path: Path, tokenizer_dir: str) -> None:
    """Save a random-init Mistral-7B-shaped model (bf16) with SmolLM2's tokenizer beside it."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mrtune.model.resolve import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def child(name: str, out_dir: Path, args: list[str], timeout: int) -> dict:
    """Run one measurement in a fresh process; its JSON result, or the reason it failed.

    Its files go to $BENCH_TMP (the device tool brings back only 8 files from $OUT)."""
    scratch = Path(os.environ.get("BENCH_TMP", "/tmp")) / "bench-children"
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"{name}.json"
    log = scratch / f"{name}.log"
    command = [sys.executable, "-m", "bench.run", "measure", "--result", str(out), *args]
    if SAVE is not None:  # what the callers stored so far (a child's result is stored after it returns)
        SAVE()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(args)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and out.is_file():
        result = json.loads(out.read_text())
    else:
        lines = log.read_text(errors="replace").strip().splitlines()
        # The exception's own line(s), not only the hints torch prints after them.
        errors = [line for line in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b", line)][-3:]
        result = {"failed": True, "exit": code, "reason": " | ".join(errors + lines[-3:])[-1200:]}
    result["child_seconds"] = round(time.perf_counter() - started, 1)
    print(f"    -> {json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)})[:400]}", flush=True)
    return result


SAVE = None  # set by main(): writes results.json after every measurement, so a cut-off run keeps what it measured


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


def bench_smollm2(out_dir: Path, results: dict, tokenizer_dir: str) -> None:
    part = results.setdefault("smollm2", {})
    part["project"] = child(
        "smollm2-project", out_dir, ["project", "--config", "configs/smollm2-gpu.yaml", "--warm", "3"], timeout=400
    )
    if not part["project"].get("failed"):
        run_dir = part["project"]["run_dir"]
        part["evaluate"] = child("smollm2-evaluate", out_dir, ["evaluate", run_dir], timeout=300)
        # The same decode with a growing (dynamic) KV cache, the default before eval.kv_cache: the lever's gain.
        part["evaluate_dynamic_cache"] = child(
            "smollm2-evaluate-dynamic", out_dir, ["evaluate", run_dir, "--set", "eval.kv_cache=dynamic"], timeout=300
        )
        unseen = Path(os.environ.get("BENCH_TMP", "/tmp")) / "unseen-names.jsonl"
        subprocess.run([sys.executable, "-m", "mrtune.task.generalization", "--out", str(unseen)], check=True, cwd=ROOT)
        part["unseen_names"] = child(
            "smollm2-unseen-names", out_dir, ["evaluate", run_dir, "--data", str(unseen)], timeout=300
        )
    # Issue target: two epochs of ViGGO in under a minute; the recipe's fast variant (fewer, larger steps).
    part["two_epochs"] = child(
        "smollm2-two-epochs",
        out_dir,
        ["project", "--config", "configs/smollm2-gpu.yaml", "--warm", "3", "--set", *SMOLLM2_TWO_EPOCHS],
        timeout=300,
    )
    if not part["two_epochs"].get("failed"):
        part["two_epochs_evaluate"] = child(
            "smollm2-two-epochs-evaluate", out_dir, ["evaluate", part["two_epochs"]["run_dir"]], timeout=300
        )
    seed_model = str(Path(tokenizer_dir))
    part["seed"] = child("smollm2-seed", out_dir, ["seed", seed_model, "--steps", "8"], timeout=300)
    part["epoch_tokens_seed_prompt"] = epoch_tokens(tokenizer_dir, "seed")
    part["epoch_tokens_compact_prompt"] = epoch_tokens(tokenizer_dir, "compact")


SMOLLM2_TWO_EPOCHS = ["train.epochs=2", "train.batch_tokens=4096", "train.learning_rate=2e-3"]
SEVEN_B_COMMON = [
    "model.quantization=nf4",
    "data.prompt_style=seed",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.05",
    f"lora.target_modules={SEED_TARGETS}",
    "train.eval_every=100000",
    "train.eval_rows=8",
    "train.log_every=1",
    "eval.max_new_tokens=8",
    "data.train_limit=1200",
]
FLEX_PACKED = ["train.packing=true", "model.attn_implementation=flex_attention"]
LIGER = ["model.liger_kernel=true"]
SEVEN_B_SETTINGS = {
    # name: (overrides, steps). Same prompt (seed) and adapters as the seed recipe; the memory/speed dial.
    "packed-2048-ckpt": ([*FLEX_PACKED, "train.batch_tokens=2048", "model.gradient_checkpointing=true"], 14),
    "packed-3072-ckpt": ([*FLEX_PACKED, "train.batch_tokens=3072", "model.gradient_checkpointing=true"], 12),
    "packed-4096-ckpt": ([*FLEX_PACKED, "train.batch_tokens=4096", "model.gradient_checkpointing=true"], 10),
    "packed-4096-ckpt-liger": (
        [*FLEX_PACKED, *LIGER, "train.batch_tokens=4096", "model.gradient_checkpointing=true"],
        10,
    ),
    "packed-8192-ckpt": ([*FLEX_PACKED, "train.batch_tokens=8192", "model.gradient_checkpointing=true"], 8),
    "packed-8192": ([*FLEX_PACKED, "train.batch_tokens=8192"], 8),
    "packed-8192-liger": ([*FLEX_PACKED, *LIGER, "train.batch_tokens=8192"], 8),
}
# Each speed lever on its own, against a baseline that is the seed's recipe in mrtune's loop: 8 rows a step padded
# to the longest, loss on the prompt too, SDPA, checkpointing on, batches in random order.
LEVER_BASE = [
    "train.batch_size=8",
    "data.completion_only=false",
    "train.group_by_length=false",
    "model.gradient_checkpointing=true",
    "model.attn_implementation=sdpa",
]
# What each lever should give, reasoned before measuring (rows average 244 tokens, padded to the longest of 8 rows).
PREDICTED = {
    "+ completion-only loss": "1.1-1.3x: logits for ~15% of positions (the lm_head and its backward, ~5% of a step)",
    "+ length-grouped batches": "~1.4x: padding of 8 random rows to the longest is ~30%",
    "+ packing (2,048 tokens, no padding)": "~1.5x: no padding at all, and 2,048 instead of ~2,000 tokens a step",
    "+ packing + flex attention": "~1.6x: packing, and attention only within each row",
    "+ no gradient checkpointing": "~1.3x: no recomputed forward (a third of the compute), more memory",
    "+ compact prompt": "~1x in tokens/s (3x fewer tokens a row, so ~3x rows/s)",
}
LEVERS = {
    "baseline (8 rows padded to the longest, prompt loss, sdpa, ckpt)": ([], 8),
    "+ completion-only loss": (["data.completion_only=true"], 8),
    "+ length-grouped batches": (["train.group_by_length=true"], 8),
    "+ packing (2,048 tokens, no padding)": (["train.packing=true", "train.batch_tokens=2048"], 8),
    "+ packing + flex attention": (
        ["train.packing=true", "train.batch_tokens=2048", "model.attn_implementation=flex_attention"],
        8,
    ),
    "+ no gradient checkpointing": (["model.gradient_checkpointing=false"], 8),
    "+ compact prompt": (["data.prompt_style=compact"], 8),
}


def bench_mistral(out_dir: Path, results: dict, tokenizer_dir: str, model_dir: Path, only: set[str] | None) -> None:
    """The seed recipe, then the settings named in `only` (all of SEVEN_B_SETTINGS and `default` when None)."""
    part = results.setdefault("mistral7b_shape", {"label": MISTRAL_SHAPE_LABEL})
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        make_mistral_shape(model_dir, tokenizer_dir)
        part["make_model_seconds"] = round(time.perf_counter() - started, 1)
    part["epoch_tokens_seed_prompt"] = epoch_tokens(tokenizer_dir, "seed")
    part["epoch_tokens_compact_prompt"] = epoch_tokens(tokenizer_dir, "compact")
    part["seed"] = child("mistral-seed", out_dir, ["seed", str(model_dir), "--steps", "6"], timeout=400)
    common = [f"model.name={model_dir}", *SEVEN_B_COMMON]
    settings = part.setdefault("settings", {})
    for name, (overrides, steps) in SEVEN_B_SETTINGS.items():
        if only is not None and name not in only:
            continue
        settings[name] = child(
            f"mistral-{name}",
            out_dir,
            ["project", "--warm", "2", "--set", *common, *overrides, f"train.max_steps={steps}"],
            timeout=400,
        )
    if only is not None and not only & {"default", "default-liger"}:
        return
    # The project's default 7B recipe (configs/mistral-7b-qlora.yaml) on the same model, for the epoch time.
    default = [
        "project",
        "--config",
        "configs/mistral-7b-qlora.yaml",
        "--warm",
        "2",
        "--set",
        f"model.name={model_dir}",
        "train.max_steps=10",
        "train.eval_every=100000",
        "train.eval_rows=8",
        "eval.max_new_tokens=8",
        "data.train_limit=1200",
        "train.log_every=1",
    ]
    part["default_recipe"] = child("mistral-default", out_dir, default, timeout=400)
    if only is not None and "default-liger" in only:  # the same with Liger's kernels
        part["default_recipe_liger"] = child("mistral-default-liger", out_dir, [*default, *LIGER], timeout=400)


def bench_levers(out_dir: Path, results: dict, model_dir: Path, tokenizer_dir: str) -> None:
    part = results.setdefault("mistral7b_shape", {"label": MISTRAL_SHAPE_LABEL})
    if not (model_dir / "config.json").is_file():
        make_mistral_shape(model_dir, tokenizer_dir)
    common = [f"model.name={model_dir}", *SEVEN_B_COMMON]
    levers = part.setdefault("levers", {})
    for index, (name, (overrides, steps)) in enumerate(LEVERS.items()):
        levers[name] = child(
            f"mistral-lever-{index}",
            out_dir,
            ["project", "--warm", "2", "--set", *common, *LEVER_BASE, *overrides, f"train.max_steps={steps}"],
            timeout=400,
        )


SEARCH = {
    # name: overrides of configs/smollm2-gpu.yaml. Chosen by validation exact match; test is scored once, after.
    "tokens4096-lr1e-3-ep2": ["train.batch_tokens=4096", "train.learning_rate=1e-3", "train.epochs=2"],
    "tokens4096-lr2e-3-ep3": ["train.batch_tokens=4096", "train.learning_rate=2e-3", "train.epochs=3"],
    "tokens2048-lr1e-3-ep2": ["train.batch_tokens=2048", "train.learning_rate=1e-3", "train.epochs=2"],
    "tokens2048-lr1e-3-ep3": ["train.batch_tokens=2048", "train.learning_rate=1e-3", "train.epochs=3"],
    "tokens2048-lr2e-3-ep3": ["train.batch_tokens=2048", "train.learning_rate=2e-3", "train.epochs=3"],
    "tokens1024-lr5e-4-ep2": ["train.batch_tokens=1024", "train.learning_rate=5e-4", "train.epochs=2"],
    "tokens1024-lr1e-3-ep2": ["train.batch_tokens=1024", "train.learning_rate=1e-3", "train.epochs=2"],
    "tokens2048-lr1e-3-ep3-r64": [
        "train.batch_tokens=2048",
        "train.learning_rate=1e-3",
        "train.epochs=3",
        "lora.r=64",
        "lora.alpha=128",
    ],
}


# The CPU demo's recipe (configs/smollm2-cpu.yaml) searched on the GPU, where a variant takes seconds instead of
# the CPU's 10 minutes: the same fp32 model, prompt and rows, for a fixed number of steps instead of the time budget
# (the 2-core demo machine does ~130-170 steps of 8 rows in its 600 s). Variants that change the CPU cost of a row
# (batch size, rank) are marked as such in BENCHMARKS.md; their CPU time is measured on the CPU.
DEMO_BASE = ["train.time_budget_s=null", "train.max_steps=150", "train.eval_every=100000"]
DEMO_SEARCH = {
    "lr3e-3 (the demo)": [],
    "lr3e-3 seed1": ["train.seed=1"],
    "lr3e-3 seed2": ["train.seed=2"],
    "lr1e-3": ["train.learning_rate=1e-3"],
    "lr2e-3": ["train.learning_rate=2e-3"],
    "lr5e-3": ["train.learning_rate=5e-3"],
    "steps100": ["train.max_steps=100"],
    "steps200": ["train.max_steps=200"],
    "steps300": ["train.max_steps=300"],
    "warmup0.1": ["train.warmup_ratio=0.1"],
    "linear": ["train.schedule=linear"],
    "loraplus16 lr2e-4": ["train.loraplus_ratio=16", "train.learning_rate=2e-4"],
    "loraplus16 lr5e-4": ["train.loraplus_ratio=16", "train.learning_rate=5e-4"],
    "loraplus16 lr1e-3": ["train.loraplus_ratio=16", "train.learning_rate=1e-3"],
    "loraplus8 lr1e-3": ["train.loraplus_ratio=8", "train.learning_rate=1e-3"],
    "loraplus16 lr5e-4 seed1": ["train.loraplus_ratio=16", "train.learning_rate=5e-4", "train.seed=1"],
    "rslora r64 a16 lr1e-3": ["lora.rslora=true", "lora.r=64", "lora.alpha=16", "train.learning_rate=1e-3"],
    "rslora r64 a16 lr2e-3": ["lora.rslora=true", "lora.r=64", "lora.alpha=16", "train.learning_rate=2e-3"],
    "r32 a64 lr3e-3": ["lora.r=32", "lora.alpha=64"],
    "r8 a16 lr3e-3": ["lora.r=8", "lora.alpha=16"],
    "pissa a16 lr3e-4": ["lora.init=pissa", "lora.alpha=16", "train.learning_rate=3e-4"],
    "pissa a16 lr1e-3": ["lora.init=pissa", "lora.alpha=16", "train.learning_rate=1e-3"],
    "pissa a16 lr3e-3": ["lora.init=pissa", "lora.alpha=16", "train.learning_rate=3e-3"],
    "pissa a32 lr1e-3": ["lora.init=pissa", "train.learning_rate=1e-3"],
    "olora a16 lr1e-3": ["lora.init=olora", "lora.alpha=16", "train.learning_rate=1e-3"],
    "olora a16 lr3e-3": ["lora.init=olora", "lora.alpha=16", "train.learning_rate=3e-3"],
    "batch16 steps75 lr4e-3 (CPU cost differs)": [
        "train.batch_size=16",
        "train.max_steps=75",
        "train.learning_rate=4e-3",
    ],
    "batch4 steps300 lr2e-3 (CPU cost differs)": [
        "train.batch_size=4",
        "train.max_steps=300",
        "train.learning_rate=2e-3",
    ],
    "clip0.3": ["train.max_grad_norm=0.3"],
    "attention+mlp no o_proj": ["lora.target_modules=q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"],
}

# Round 2, after round 1 showed the learning curve still steep at 150 steps (100: 30%, 150: 47%, 200: 61%, 300: 82%)
# and the linear schedule and LoRA+ ahead of the demo's recipe: those two combined, and the inits round 1 left out.
LINEAR = ["train.schedule=linear"]
PLUS8 = [*LINEAR, "train.loraplus_ratio=8", "train.learning_rate=1e-3"]
DEMO_SEARCH_2 = {
    "linear seed1": [*LINEAR, "train.seed=1"],
    "linear seed2": [*LINEAR, "train.seed=2"],
    "linear loraplus8 lr1e-3": PLUS8,
    "linear loraplus8 lr1e-3 seed1": [*PLUS8, "train.seed=1"],
    "linear loraplus8 lr1e-3 steps130": [*PLUS8, "train.max_steps=130"],
    "linear loraplus8 lr1e-3 steps170": [*PLUS8, "train.max_steps=170"],
    "linear loraplus8 lr1.5e-3": [*PLUS8, "train.learning_rate=1.5e-3"],
    "linear loraplus8 lr1e-3 r32 a64": [*PLUS8, "lora.r=32", "lora.alpha=64"],
    "linear loraplus16 lr5e-4": [*LINEAR, "train.loraplus_ratio=16", "train.learning_rate=5e-4"],
    "linear loraplus4 lr2e-3": [*LINEAR, "train.loraplus_ratio=4", "train.learning_rate=2e-3"],
    "linear lr4e-3": [*LINEAR, "train.learning_rate=4e-3"],
    "linear pissa a16 lr3e-4": [*LINEAR, "lora.init=pissa", "lora.alpha=16", "train.learning_rate=3e-4"],
    "linear pissa a16 lr1e-3": [*LINEAR, "lora.init=pissa", "lora.alpha=16", "train.learning_rate=1e-3"],
    "linear olora a16 lr1e-3": [*LINEAR, "lora.init=olora", "lora.alpha=16", "train.learning_rate=1e-3"],
    "linear rslora r64 a16 lr2e-3": [
        *LINEAR,
        "lora.rslora=true",
        "lora.r=64",
        "lora.alpha=16",
        "train.learning_rate=2e-3",
    ],
    "linear batch16 steps75 lr4e-3 (CPU cost differs)": [
        *LINEAR,
        "train.batch_size=16",
        "train.max_steps=75",
        "train.learning_rate=4e-3",
    ],
}

# Round 3: round 1 found fewer, bigger steps worse at the same rows (16 x 75: 36%); so smaller steps, more of them.
DEMO_SEARCH_3 = {
    "linear loraplus8 lr1e-3 batch4 steps260 (CPU cost differs)": [*PLUS8, "train.batch_size=4", "train.max_steps=260"],
    "linear loraplus8 lr1e-3 batch4 steps300 (CPU cost differs)": [*PLUS8, "train.batch_size=4", "train.max_steps=300"],
    "linear loraplus8 lr7e-4 batch4 steps260 (CPU cost differs)": [
        *PLUS8,
        "train.batch_size=4",
        "train.max_steps=260",
        "train.learning_rate=7e-4",
    ],
    "linear loraplus8 lr1e-3 batch6 steps200 (CPU cost differs)": [*PLUS8, "train.batch_size=6", "train.max_steps=200"],
}

# --only NAME: (variants, validation rows scored; None for all 714). Round 3 scored 400: its call had little device
# time left.
DEMO_SEARCHES = {
    "demo-search": (DEMO_SEARCH, None),
    "demo-search-2": (DEMO_SEARCH_2, None),
    "demo-search-3": (DEMO_SEARCH_3, 400),
}


def bench_search(
    out_dir: Path,
    results: dict,
    variants: dict[str, list[str]],
    parallel: int,
    config: str = "configs/smollm2-gpu.yaml",
    part_name: str = "search",
    common: list[str] = (),
    eval_limit: int | None = None,
) -> None:
    """Recipe search for the embedded model: train each variant, score it on the validation split.

    Variants run `parallel` at a time on the one GPU: a 135M model leaves it mostly idle, so this buys search
    breadth; the timings of this part are therefore not speed figures (the other parts are, run alone).
    """
    from concurrent.futures import ThreadPoolExecutor

    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    part = results.setdefault(part_name, {})

    def one(item):
        index, (name, overrides) = item
        trained = child(
            f"{part_name}-{index}",
            out_dir,
            ["project", "--config", config, "--warm", "3", "--set", "train.eval_rows=100", *common, *overrides],
            timeout=560,
        )
        entry = {"overrides": overrides, "train": trained}
        if not trained.get("failed"):
            entry["validation"] = child(
                f"{part_name}-{index}-eval",
                out_dir,
                [
                    "evaluate",
                    trained["run_dir"],
                    "--split",
                    "validation",
                    *(["--limit", str(eval_limit)] if eval_limit else []),
                ],
                timeout=200,
            )
        part[name] = entry
        SAVE()

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, enumerate(variants.items())))


def _seed_rate(r: dict, seed: dict) -> float | None:
    """The seed's useful tokens/s measured in the same call as `r` (publish records it), else this run's seed."""
    if "seed_useful_tokens_per_s" in r:
        return r["seed_useful_tokens_per_s"]
    return seed["useful_tokens_per_s"] if seed and not seed.get("failed") else None


def summarise(results: dict) -> dict:
    """The headline figures of bench/results/latest.json (project / seed ratios, each within one call)."""
    summary = {"card": results["card"], "date": results["date"]}
    seven = results.get("mistral7b_shape", {})
    seed = seven.get("seed", {})
    ok = {k: v for k, v in seven.get("settings", {}).items() if not v.get("failed") and _seed_rate(v, seed)}
    if seed and not seed.get("failed") and ok:
        ratio = {k: v["useful_tokens_per_s"] / _seed_rate(v, seed) for k, v in ok.items()}
        within_seed = {k: v for k, v in ok.items() if v["peak_memory_gb"] <= seed["peak_memory_gb"]}
        saving = max(within_seed, key=ratio.get) if within_seed else min(ok, key=lambda k: ok[k]["peak_memory_gb"])
        fastest = max((k for k, v in ok.items() if v["peak_memory_gb"] <= 80), key=ratio.get)
        summary.update(
            memory_saving_setting_7b=saving,
            speedup_useful_tokens_per_s_7b=ratio[saving],
            peak_memory_ratio_7b=ok[saving]["peak_memory_gb"] / seed["peak_memory_gb"],
            fastest_setting_7b=fastest,
            speedup_max_useful_tokens_per_s_7b=ratio[fastest],
        )
        default = seven.get("default_recipe", {})
        if default and not default.get("failed"):
            rate, seed_step = default["useful_tokens_per_s"], default.get("seed_step_s", seed["step_s"])
            basis = "measured: configs/mistral-7b-qlora.yaml"
        elif "packed-8192" in ok:  # the default recipe's settings (8,192 tokens, no checkpointing), seed prompt
            rate, seed_step = (
                ok["packed-8192"]["useful_tokens_per_s"],
                ok["packed-8192"].get("seed_step_s", seed["step_s"]),
            )
            basis = (
                "estimated: one epoch's compact-prompt tokens / the tokens/s of packed-8192 on the seed prompt "
                "(the default recipe's settings); the default recipe itself was not timed"
            )
        else:
            rate = None
        if rate:
            seed_epoch = 5103 / 8 * seed_step  # the seed trains 8 rows per optimizer step
            project_epoch = seven["epoch_tokens_compact_prompt"] / rate
            summary.update(
                seed_epoch_s_7b=seed_epoch,
                project_epoch_s_7b=project_epoch,
                speedup_epoch_time_7b=seed_epoch / project_epoch,
                epoch_time_7b_basis=basis,
            )
    scaling = results.get("scaling", {})
    if scaling.get("scaling_2gpu_7b"):
        summary.update(scaling_2gpu_7b=scaling["scaling_2gpu_7b"], scaling_card=scaling.get("card"))
        # bench/scaling.sh on 4 or 8 GPUs: DDP's ratios over 1 GPU, whether FSDP2 in 4-bit trained what DDP did
        summary.update({k: v for k, v in scaling.items() if re.fullmatch(r"scaling_[48]gpu_7b", k)})
        if "fsdp2_qlora_matches_ddp" in scaling:
            summary["fsdp2_qlora_matches_ddp"] = scaling["fsdp2_qlora_matches_ddp"]
    big = scaling.get("fsdp2_70b")
    if big:
        summary.update(
            fsdp2_70b_gpus=big["gpus"],
            fsdp2_70b_useful_tokens_per_s=big["useful_tokens_per_s"],
            fsdp2_70b_peak_memory_gb_max_rank=max(big["peak_memory_gb_per_rank"]),
        )
    small = results.get("smollm2", {})
    if small.get("project") and not small["project"].get("failed"):
        summary["smollm2_train_s"] = small["project"]["train_seconds"]
    two = small.get("two_epochs_evaluate", {})
    if two and not two.get("failed"):
        summary.update(
            smollm2_two_epochs_train_s=small["two_epochs"]["train_seconds"],
            smollm2_two_epochs_test_exact_match=two["exact_match"],
        )
    evaluation = small.get("evaluate", {})
    if evaluation and not evaluation.get("failed"):
        summary.update(
            smollm2_test_exact_match=evaluation["exact_match"],
            smollm2_eval_s=evaluation["decode_seconds"],
            smollm2_test_slot_f1=evaluation["slot_f1"],
            smollm2_valid_mr_rate=evaluation["valid_mr_rate"],
        )
    dynamic = small.get("evaluate_dynamic_cache", {})
    if dynamic and not dynamic.get("failed"):
        summary["smollm2_eval_s_dynamic_cache"] = dynamic["decode_seconds"]
    unseen = small.get("unseen_names", {})
    if unseen and not unseen.get("failed"):
        summary["smollm2_unseen_names_exact_match"] = unseen["exact_match"]
    return summary


# --------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md
# --------------------------------------------------------------------------------------------------------------

START, END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"


def _row(name: str, r: dict, seed: dict | None) -> str:
    if r.get("failed"):
        return f"| {name} | failed: {r.get('reason', '')[:120]} | | | | |"
    base = _seed_rate(r, seed) if seed is not None else None
    ratio = f"{r['useful_tokens_per_s'] / base:.1f}x" if base else ""
    return (
        f"| {name} | {r['step_s']:.3f} | {r['useful_tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} | "
        f"{r['peak_memory_gb']:.1f} | {ratio} |"
    )


def markdown(results: dict) -> str:
    summary = summarise(results)
    calls = results.get("calls") or ["one call"]
    lines = [
        START,
        f"## GPU benchmark ({results['card']}, {results['date']})",
        "",
        f"`python -m bench.run` on one {results['card']}, {len(calls)} call(s) of the device tool, merged with "
        "`python -m bench.run --publish`. Every ratio compares figures measured in the same call, beside that "
        "call's own run of the seed recipe. Useful tokens exclude padding; peak memory is "
        "`torch.cuda.max_memory_allocated`.",
        "",
    ]
    if results.get("notes"):
        lines += [f"- {note}" for note in results["notes"]] + [""]
    header = [
        "| setting | s / optimizer step | useful tokens/s | padded tokens/s | peak GB | vs seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    seven = results.get("mistral7b_shape")
    if seven:
        seed = seven.get("seed", {})
        lines += [f"### {MISTRAL_SHAPE_LABEL}: seed prompt, seed adapters (r=8 on all linear + lm_head)", ""]
        seeds = results.get("seed_runs") or [seed]
        lines += header + [
            _row(
                f"seed recipe (HF Trainer, padded to 512, batch 2 x GA 4)"
                f"{', call ' + str(r['call']) if 'call' in r else ''}",
                r,
                None,
            )
            for r in seeds
        ]

        def label(name: str, r: dict) -> str:
            return f"mrtune {name}" + (f" (call {r['call']})" if "call" in r else "")

        lines += [_row(label(k, v), v, seed) for k, v in seven.get("settings", {}).items()]
        for key, name in (
            ("default_recipe", "default recipe (configs/mistral-7b-qlora.yaml, compact prompt)"),
            ("default_recipe_liger", "default recipe + Liger kernels"),
        ):
            if seven.get(key):
                lines.append(_row(label(name, seven[key]), seven[key], seed))
        lines.append("")
    scaling = results.get("scaling")
    if scaling:
        runs = scaling.get("runs", {})
        one = runs.get("1gpu", {})
        lines += [
            f"### Several GPUs: {scaling.get('model', MISTRAL_SHAPE_LABEL)}, {scaling.get('card')} "
            f"x{scaling.get('gpus', 2)} "
            "(bench/scaling.sh)",
            "",
            f"The 7B recipe's settings ({one.get('batch_tokens_per_gpu')} tokens per GPU per step, "
            f"checkpointing {'on' if one.get('gradient_checkpointing') else 'off'}, flex attention) on the "
            f"{one.get('prompt_style')} prompt; the same micro-batch per GPU, so a 2-GPU step holds twice the "
            "tokens.",
            "",
            "| run | s / step | useful tokens/s | peak GB (rank 0) | vs 1 GPU |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in runs.items():
            gain = r["useful_tokens_per_s"] / one["useful_tokens_per_s"] if one else float("nan")
            lines.append(
                f"| {name} | {r['step_s']:.3f} | {r['useful_tokens_per_s']:,.0f} | "
                f"{r['peak_memory_gb_rank0']:.1f} | {gain:.2f}x |"
            )
        if "fsdp_adapter_same_tensors_as_ddp" in scaling:
            lines += [
                "",
                "FSDP adapter has the same tensor names, shapes and dtypes as the DDP run's: "
                f"{scaling['fsdp_adapter_same_tensors_as_ddp']}.",
            ]
        lines.append("")
    small = results.get("smollm2")
    if small:
        seed = small.get("seed", {})
        lines += ["### SmolLM2-135M-Instruct (the embedded model)", ""]
        lines += header + [_row("seed recipe", seed, None)]
        if small.get("project"):
            lines.append(_row("mrtune configs/smollm2-gpu.yaml (3 epochs, 2,048-token steps)", small["project"], seed))
        if small.get("two_epochs"):
            lines.append(
                _row(f"mrtune two-epoch variant (`{' '.join(SMOLLM2_TWO_EPOCHS)}`)", small["two_epochs"], seed)
            )
        two = small.get("two_epochs_evaluate", {})
        if two and not two.get("failed"):
            lines += [
                "",
                f"Two-epoch variant: {small['two_epochs']['train_seconds']:.0f} s of training, test exact "
                f"match {100 * two['exact_match']:.1f}%, slot F1 {100 * two['slot_f1']:.1f}%.",
            ]
        ev = small.get("evaluate", {})
        if ev and not ev.get("failed"):
            lines += [
                "",
                f"Test split ({ev['n']} rows), after {small['project']['train_seconds']:.0f} s of training: "
                f"exact match {100 * ev['exact_match']:.1f}%, slot F1 {100 * ev['slot_f1']:.1f}%, dialogue-act "
                f"accuracy {100 * ev['dialogue_act_accuracy']:.1f}%, valid MR {100 * ev['valid_mr_rate']:.1f}%; "
                f"`mrtune evaluate` decoded it in {ev['decode_seconds']:.1f} s (static KV cache).",
            ]
            dynamic = small.get("evaluate_dynamic_cache", {})
            if dynamic and not dynamic.get("failed"):
                lines += [
                    "",
                    f"The same decode with a growing (dynamic) KV cache: {dynamic['decode_seconds']:.1f} s "
                    f"(exact match {100 * dynamic['exact_match']:.1f}%).",
                ]
        unseen = small.get("unseen_names", {})
        if unseen and not unseen.get("failed"):
            lines += [
                "",
                f"Game names never seen in training (`python -m mrtune.task.generalization`, {unseen['n']} test "
                f"rows with invented names): exact match {100 * unseen['exact_match']:.1f}%, slot F1 "
                f"{100 * unseen['slot_f1']:.1f}%.",
            ]
        lines.append("")
    if seven and seven.get("levers"):
        levers = seven["levers"]
        base = next(iter(levers.values()))
        lines += [
            "### Speed levers, each alone (random-init Mistral-7B shape, 4-bit, seed prompt and adapters)",
            "",
            "| lever | s / step | useful tokens/s | peak GB | predicted gain | measured gain |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in levers.items():
            if r.get("failed"):
                lines.append(f"| {name} | failed: {r.get('reason', '')[:100]} | | | {PREDICTED.get(name, '')} | |")
                continue
            gain = "" if base.get("failed") else f"{r['useful_tokens_per_s'] / base['useful_tokens_per_s']:.2f}x"
            lines.append(
                f"| {name} | {r['step_s']:.3f} | {r['useful_tokens_per_s']:,.0f} | "
                f"{r['peak_memory_gb']:.1f} | {PREDICTED.get(name, '')} | {gain} |"
            )
        missing = [name for name in LEVERS if name not in levers]
        if missing:
            lines.append(
                f"| {', '.join(missing)} | not measured | | | {'; '.join(PREDICTED.get(n, '') for n in missing)} | |"
            )
        lines.append("")
    search = results.get("search")
    if search:
        lines += [
            "### Recipe search, SmolLM2-135M (variants of configs/smollm2-gpu.yaml, chosen on validation)",
            "",
            "Variants ran 8 at a time on the one GPU, so their times are not speed figures.",
            "",
            *_search_table(search, "valid MR", "valid_mr_rate"),
        ]
    demo = results.get("demo_search")
    if demo:
        lines += [
            "### The CPU demo's recipe, searched on the GPU (SmolLM2-135M in fp32, chosen on validation)",
            "",
            "Variants of the demo's recipe (configs/smollm2-cpu.yaml: LoRA r=16 in fp32, compact prompt; "
            "the overrides are on its earlier settings, cosine decay at lr 3e-3, which the first rows use) "
            f"for a fixed number of steps instead of its 600 s (`{' '.join(DEMO_BASE)}`), 8 at a time on "
            "the one GPU; scored on all 714 validation rows with constrained decoding (one standard error: "
            "~1.9 points; seeds moved a result by up to 6), the batch-4/6 rows on the first 400 of them. "
            "The 2-core demo machine does ~130-170 steps of 8 rows in 600 s.",
            "",
            *_search_table(demo, "dialogue act", "dialogue_act_accuracy"),
        ]
    lines += ["### Headline figures (bench/results/latest.json)", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", END]
    return "\n".join(lines)


def _search_table(entries: dict, last_header: str, last_key: str) -> list[str]:
    """A search's rows: each variant, its overrides, steps and validation metrics."""
    lines = [
        f"| variant | overrides | steps | validation exact match | slot F1 | {last_header} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in entries.items():
        v, t = entry.get("validation", {}), entry.get("train", {})
        overrides = " ".join(entry["overrides"]) or "(none)"
        if t.get("failed") or not v or v.get("failed"):
            lines.append(f"| {name} | `{overrides}` | failed | | | |")
            continue
        lines.append(
            f"| {name} | `{overrides}` | {t['total_steps']} | {100 * v['exact_match']:.1f}% | "
            f"{100 * v['slot_f1']:.1f}% | {100 * v[last_key]:.1f}% |"
        )
    return [*lines, ""]


def publish(results_paths: list[Path]) -> None:
    """Merge the results.json of several calls on the same card and day, and write them into the repo.

    Later files win, key by key (the 7B settings one by one). Each 7B measurement keeps the useful tokens/s and step
    time of the seed recipe run in its own call, so that every ratio compares figures of one call. A scaling.json
    (bench/scaling.sh) goes in as `scaling`.
    """
    results: dict = {"calls": [], "seed_runs": []}
    index = 0
    for path in results_paths:
        data = json.loads(path.read_text())
        index += any(isinstance(v, dict) for v in data.values())  # a file of notes alone is not a call
        if "scaling_2gpu_7b" in data:
            results["scaling"] = data
            results["calls"].append(f"{path.name}: bench/scaling.sh on {data.get('card')} x{data.get('gpus', 2)}")
            continue
        seven = data.get("mistral7b_shape", {})
        seed = seven.get("seed", {})
        if seed and not seed.get("failed"):
            results["seed_runs"].append({"call": index, **seed})
            for entry in [
                *seven.get("settings", {}).values(),
                *(seven.get(k) or {} for k in ("default_recipe", "default_recipe_liger")),
                *seven.get("levers", {}).values(),
            ]:
                if entry:
                    entry.update(
                        seed_useful_tokens_per_s=seed["useful_tokens_per_s"], seed_step_s=seed["step_s"], call=index
                    )
        if any(isinstance(v, dict) for v in data.values()):
            results["calls"].append(f"{path.name}: " + ", ".join(k for k in data if isinstance(data[k], dict)))
        for key, value in data.items():
            if key in ("calls", "seed_runs"):
                continue
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                for inner, item in value.items():  # one level deeper: settings and levers merge by name
                    if (
                        isinstance(item, dict)
                        and isinstance(results[key].get(inner), dict)
                        and inner in ("settings", "levers")
                    ):
                        results[key][inner].update(item)
                    else:
                        results[key][inner] = item
            else:
                results[key] = value
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "latest.json").write_text(json.dumps(summarise(results), indent=2) + "\n")
    (ROOT / "bench" / "results" / f"raw-{results['date']}.json").write_text(json.dumps(results, indent=2) + "\n")
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = markdown(results)
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", choices=["smollm2", "mistral", "levers", "search", *DEMO_SEARCHES])
    parser.add_argument("--parallel", type=int, default=8, help="search variants run at once")
    parser.add_argument(
        "--settings",
        help="comma-separated 7B settings to run after the seed recipe (names of "
        "SEVEN_B_SETTINGS, and `default` for configs/mistral-7b-qlora.yaml); all by default",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        nargs="+",
        help="results.json files of finished runs to merge and write into the repo (BENCHMARKS.md, bench/results/)",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/mistral-7b-shape"))
    parser.add_argument(
        "--tokenizer-dir",
        help="tokenizer for the 7B shape (default: the embedded model's, which "
        "needs its GGUF); any directory with SmolLM2's tokenizer files will do",
    )
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        return measure_main(sys.argv[2:])
    args = parser.parse_args()
    if args.publish:
        return publish(args.publish)
    import torch

    from mrtune.model.resolve import resolve_model_path

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    tokenizer_dir = args.tokenizer_dir or resolve_model_path("embedded:smollm2-135m-instruct")
    global SAVE
    SAVE = lambda: (args.out / "results.json").write_text(json.dumps(results, indent=2))  # noqa: E731
    save = SAVE
    if args.only == "search":
        bench_search(args.out, results, SEARCH, args.parallel)
        save()
    if args.only in DEMO_SEARCHES:
        variants, eval_limit = DEMO_SEARCHES[args.only]
        bench_search(
            args.out, results, variants, args.parallel, "configs/smollm2-cpu.yaml", "demo_search", DEMO_BASE, eval_limit
        )
        save()
    if args.only in (None, "smollm2"):
        bench_smollm2(args.out, results, tokenizer_dir)
        save()
    if args.only in (None, "mistral"):
        bench_mistral(
            args.out, results, tokenizer_dir, args.model_dir, set(args.settings.split(",")) if args.settings else None
        )
        save()
    if args.only in (None, "levers"):
        bench_levers(args.out, results, args.model_dir, tokenizer_dir)
        save()
    (args.out / "BENCHMARKS-gpu.md").write_text(markdown(results))
    print(markdown(results))


def measure_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("project")
    p.add_argument("--config")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--warm", type=int, default=2)
    p = sub.add_parser("evaluate")
    p.add_argument("run_dir")
    p.add_argument("--limit", type=int)
    p.add_argument("--split", default="test")
    p.add_argument("--data")
    p.add_argument("--set", nargs="*", default=[])
    p = sub.add_parser("seed")
    p.add_argument("model_dir")
    p.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.kind == "project":
        result = measure_project(args.config, args.set, args.warm)
    elif args.kind == "evaluate":
        result = measure_evaluate(args.run_dir, args.limit, args.split, args.data, args.set)
    else:
        from bench.seed_recipe import run_seed

        data = ROOT / "src" / "mrtune" / "data" / "train.jsonl"
        rows = [json.loads(line) for line in data.read_text().splitlines()][: args.steps * 8 + 16]
        result = run_seed(args.model_dir, args.model_dir, rows, args.steps)
    args.result.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
