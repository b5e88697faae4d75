"""The GPU benchmark: the seed recipe and the project's, side by side, in one run on one card.

    python -m bench.run bench --out DIR                     # SmolLM2-135M and the Mistral-7B shape
    python -m bench.run bench --out DIR --only smollm2      # parts: see --help
    python -m bench.run measure project --result R.json --config C.yaml --set k=v ...   # one measurement
    python -m bench.run publish A/results.json B/results.json   # merge calls into BENCHMARKS.md + bench/results/

What is measured is data (bench/plans.yaml). Every measurement runs in its own process (`measure`: a clean CUDA
context, so peak memory is that measurement's own) and writes one JSON file; a failed measurement (out of memory,
say) is recorded as such and the rest go on. OUT/results.json is rewritten after every measurement, so a call cut
off at its time limit keeps what it measured.

No Mistral-7B weights can be had here: the 7B figures come from a random-init model of Mistral-7B's shape
(`MistralConfig()` defaults, but SmolLM2's 49,152-token vocabulary so that real ViGGO text can be tokenized),
loaded in 4-bit NF4. Speed and memory do not depend on the weights' values; accuracy does, so none is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLANS = yaml.safe_load((ROOT / "bench" / "plans.yaml").read_text(encoding="utf-8"))
NOVEL_PHRASING = ROOT / "tests" / "data" / "novel_phrasing.jsonl"
H200_BF16_PEAK_TFLOPS = 989.0
"""The H200's dense bf16 tensor-core peak (NVIDIA's datasheet), the denominator of MFU."""
H200_FP8_PEAK_TFLOPS = 1979.0
"""Its dense fp8 peak: MFU's denominator for settings whose base matmuls run in fp8 (model.fp8_base)."""


def peak_tflops(setting: str) -> float:
    """The peak a 7B setting's MFU is measured against: fp8 settings (named `-fp8`) run their GEMMs on fp8 cores."""
    return H200_FP8_PEAK_TFLOPS if "fp8" in setting.split("-") else H200_BF16_PEAK_TFLOPS


def scratch_dir() -> Path:
    """Where run directories and child logs go ($BENCH_TMP): the device tool brings back only 8 files from OUT."""
    return Path(os.environ.get("BENCH_TMP", "/tmp"))


# --------------------------------------------------------------------------------------------------------------
# Measurements (each runs in a child process: `python -m bench.run measure ...`)
# --------------------------------------------------------------------------------------------------------------


def steady_rate(history: list[dict], warm: int) -> dict:
    """Throughput between the end of step `warm` and the last step (first steps pay for compilation, allocator)."""
    steps = [r for r in history if "train_loss" in r]
    zero = {"elapsed_s": 0.0, "useful_tokens": 0, "padded_tokens": 0, "step": 0}
    first = steps[warm - 1] if 0 < warm < len(steps) else zero
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
    run_dir = scratch_dir() / f"bench-run-{os.getpid()}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run = train(config, run_dir, overwrite=True, progress=False)
    info = run.info()
    result = steady_rate(run.read_history(), warm)
    result.update(
        peak_memory_gb=(info.get("peak_memory_bytes") or 0) / 1e9,
        # what the caching allocator held at most: the figure a memory cap (set_per_process_memory_fraction) bounds
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if torch.cuda.is_available() else None,
        memory_plan=info.get("memory_plan"),
        train_seconds=info["train_seconds"],
        wall_seconds=time.perf_counter() - started,
        total_steps=info["total_steps"],
        run_dir=str(run.path),
    )
    return result


def measure_evaluate(args: argparse.Namespace) -> dict:
    from mrtune.infer.evaluate import evaluate

    started = time.perf_counter()
    metrics = evaluate(
        args.run_dir,
        split=args.split,
        data=args.data,
        limit=args.limit,
        overrides=args.set,
        ensemble=args.ensemble,
        progress=False,
    )
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def measure_seed(model_dir: str, steps: int) -> dict:
    from bench.seed_recipe import run_seed

    data = ROOT / "src" / "mrtune" / "data" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()][: steps * 8 + 16]
    return run_seed(model_dir, model_dir, rows, steps)


def epoch_tokens(tokenizer_dir: str, prompt_style: str) -> tuple[int, int]:
    """Tokens (prompt + MR + EOS) and rows in one epoch of ViGGO's training split, as the project tokenizes it."""
    from mrtune.model.resolve import load_tokenizer
    from mrtune.task.data import load_split
    from mrtune.train.batching import tokenize_examples

    rows, _ = tokenize_examples(load_split("viggo:train"), load_tokenizer(tokenizer_dir), prompt_style)
    return sum(len(r) for r in rows), len(rows)


def mistral_shape_config(vocab_size: int):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size)


def model_flops_per_token(config, mean_row_tokens: float) -> dict:
    """Model FLOPs per trained token of LoRA training on a frozen base (recomputation not counted, as MFU has it).

    4 P + 12 L d c: each weight of the P in the decoder's linear layers and the output head does a multiply-add
    forward (2 P) and one backward for the input's gradient (2 P); frozen weights need no weight-gradient GEMM, and
    the adapters' own FLOPs (rank 8: ~0.3% of P) are left out. Attention: QK^T and AV forward are 4 d c per layer,
    for a token attending on average to c = (n + 1) / 2 positions of its n-token row (causal, packed rows attend
    within themselves), and the backward twice that.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size
    weights = layers * per_layer + d * config.vocab_size
    context = (mean_row_tokens + 1) / 2
    attention = 12 * layers * d * context
    return {
        "weights_in_matmuls": weights,
        "mean_row_tokens": mean_row_tokens,
        "flops_per_token": 4 * weights + attention,
        "formula": "4 P + 12 L d c (P: linear + lm_head weights; c = (mean row tokens + 1) / 2)",
    }


def make_mistral_shape(path: Path, tokenizer_dir: str) -> None:
    """Save a random-init Mistral-7B-shaped model (bf16) with SmolLM2's tokenizer beside it."""
    import torch
    from transformers import MistralForCausalLM

    from mrtune.model.resolve import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = mistral_shape_config(len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------
# A run of the benchmark: its results, saved as they come, and its child measurements
# --------------------------------------------------------------------------------------------------------------


class Recorder:
    """This run's results (a dict the parts fill in), written to OUT/results.json after every measurement."""

    def __init__(self, out: Path, results: dict):
        self.out, self.results = out, results
        self._lock = threading.Lock()  # parts that run children in threads save from several threads

    def save(self) -> None:
        with self._lock:
            text = json.dumps(self.results, indent=2)
            (self.out / "results.json").write_text(text)

    def store(self, container: dict, key: str, value) -> None:
        """`container[key] = value` from a worker thread (never while another thread serializes), then save."""
        with self._lock:
            container[key] = value
        self.save()

    def child(self, name: str, args: list[str], timeout: int) -> dict:
        """Run one measurement in a fresh process (logs in $BENCH_TMP); its JSON result, or why it failed."""
        scratch = scratch_dir() / "bench-children"
        scratch.mkdir(parents=True, exist_ok=True)
        out, log = scratch / f"{name}.json", scratch / f"{name}.log"
        command = [sys.executable, "-m", "bench.run", "measure", *args[:1], "--result", str(out), *args[1:]]
        self.save()
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
        brief = {k: v for k, v in result.items() if not isinstance(v, dict)}
        print(f"    -> {name}: {json.dumps(brief)[:400]}", flush=True)
        return result


def ok(result: dict | None) -> bool:
    return bool(result) and not result.get("failed")


def unseen_names_file() -> Path:
    path = scratch_dir() / "unseen-names.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "mrtune.task.generalization", "--out", str(path)], check=True, cwd=ROOT)
    return path


def score_everywhere(rec: Recorder, name: str, run_dir: str) -> dict:
    """Test split, unseen game names and the hand-written novel phrasings, each scored in its own process."""
    jobs = {
        "test": ["evaluate", run_dir],
        "unseen_names": ["evaluate", run_dir, "--data", str(unseen_names_file())],
        "novel_phrasing": ["evaluate", run_dir, "--data", str(NOVEL_PHRASING)],
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(rec.child, f"{name}-{key}", args, 300) for key, args in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# --------------------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------------------


def bench_smollm2(rec: Recorder, tokenizer_dir: str) -> None:
    """The shipped GPU recipe timed alone, its test, unseen-name and novel-phrasing scores, and the seed recipe."""
    plan = PLANS["smollm2"]
    part = rec.results.setdefault("smollm2", {})
    part["project"] = rec.child("smollm2-project", ["project", "--config", plan["config"], "--warm", "3"], 400)
    if ok(part["project"]):
        run_dir = part["project"]["run_dir"]
        part["evaluate"] = rec.child("smollm2-evaluate", ["evaluate", run_dir], 300)
        # The same decode with a growing (dynamic) KV cache: the static cache's gain.
        part["evaluate_dynamic_cache"] = rec.child(
            "smollm2-evaluate-dynamic", ["evaluate", run_dir, "--set", "eval.kv_cache=dynamic"], 300
        )
        part["unseen_names"] = rec.child(
            "smollm2-unseen-names", ["evaluate", run_dir, "--data", str(unseen_names_file())], 300
        )
    two = ["project", "--config", plan["config"], "--warm", "3", "--set", *plan["two_epochs"]]
    part["two_epochs"] = rec.child("smollm2-two-epochs", two, 300)
    if ok(part["two_epochs"]):
        part["two_epochs_evaluate"] = rec.child(
            "smollm2-two-epochs-evaluate", ["evaluate", part["two_epochs"]["run_dir"]], 300
        )
    part["seed"] = rec.child("smollm2-seed", ["seed", str(tokenizer_dir), "--steps", "8"], 300)
    part["epoch_tokens_seed_prompt"] = epoch_tokens(tokenizer_dir, "seed")[0]
    part["epoch_tokens_compact_prompt"] = epoch_tokens(tokenizer_dir, "compact")[0]


def bench_smollm2_fast(rec: Recorder, names: set[str] | None) -> None:
    """The fast SmolLM2 variants (plans.yaml smollm2.fast), each trained alone and scored on the test split."""
    plan = PLANS["smollm2"]
    part = rec.results.setdefault("smollm2", {}).setdefault("fast", {})
    for name, overrides in plan["fast"].items():
        if names is not None and name not in names:
            continue
        entry = {"overrides": overrides}
        part[name] = entry
        entry["train"] = rec.child(
            f"smollm2-fast-{name}", ["project", "--config", plan["config"], "--warm", "3", "--set", *overrides], 300
        )
        if ok(entry["train"]):
            entry["test"] = rec.child(f"smollm2-fast-{name}-test", ["evaluate", entry["train"]["run_dir"]], 300)
        rec.save()


def bench_accuracy(rec: Recorder, parallel: int, names: set[str] | None) -> None:
    """Issue 16's levers: every variant with every seed, scored on validation; the best by mean validation exact
    match is then scored once on the test split, unseen names and novel phrasings, as is the base recipe (as soon
    as its first seed is trained: the error analysis needs it even if the call is cut short)."""
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    plan = PLANS["accuracy"]
    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    unseen_names_file()
    part = rec.results.setdefault("accuracy", {"config": plan["config"]})
    variants = [name for name in plan["variants"] if names is None or name in names]
    part["variants"] = {name: {} for name in variants}  # filled from the worker threads
    part["scored"] = {}
    first = plan["seeds"][0]

    def one(job: tuple[str, int]) -> None:
        name, seed = job
        overrides = [*plan["variants"][name], f"train.seed={seed}"]
        args = ["project", "--config", plan["config"], "--warm", "3", "--set", "train.eval_rows=100", *overrides]
        entry = {"overrides": overrides, "train": rec.child(f"accuracy-{name}-seed{seed}", args, 560)}
        if ok(entry["train"]):
            entry["validation"] = rec.child(
                f"accuracy-{name}-seed{seed}-validation",
                ["evaluate", entry["train"]["run_dir"], "--split", "validation"],
                200,
            )
        rec.store(part["variants"][name], f"seed{seed}", entry)
        if name == "base" and seed == first and ok(entry["train"]):
            rec.store(part["scored"], name, score_everywhere(rec, f"accuracy-{name}", entry["train"]["run_dir"]))

    jobs = [(name, seed) for name in variants for seed in plan["seeds"]]
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))
    means = part["validation_exact_match_mean"] = validation_means(part["variants"], len(plan["seeds"]))
    if means:
        winner = part["winner"] = max(means, key=means.get)
        if winner not in part["scored"] and plan.get("score_winner", True):
            run_dir = part["variants"][winner][f"seed{first}"]["train"]["run_dir"]
            rec.store(part["scored"], winner, score_everywhere(rec, f"accuracy-{winner}", run_dir))


def validation_means(variants: dict, seeds: int) -> dict[str, float]:
    """Mean validation exact match of each variant that was scored with every seed."""
    means = {}
    for name, runs in variants.items():
        scores = [e["validation"]["exact_match"] for e in runs.values() if ok(e.get("validation"))]
        if len(scores) == seeds:
            means[name] = statistics.mean(scores)
    return means


def bench_accuracy_winner(rec: Recorder, sources: list[Path]) -> None:
    """The accuracy part's winner over earlier results files (a sweep split between GPUs or calls), chosen by mean
    validation exact match, trained on train + validation with each seed (at once) and scored on the test split,
    unseen names and the novel phrasings."""
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    plan = PLANS["accuracy"]
    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    unseen_names_file()
    variants = {}
    for source in sources:
        variants.update(json.loads(source.read_text()).get("accuracy", {}).get("variants", {}))
    means = validation_means(variants, len(plan["seeds"]))
    if not means:
        raise SystemExit(f"accuracy-winner: no variant scored with every seed in {', '.join(map(str, sources))}")
    winner = max(means, key=means.get)
    part = rec.results["accuracy_winner"] = {"validation_exact_match_mean": means, "winner": winner, "runs": {}}
    part["overrides"] = [*plan["variants"][winner], *plan["winner_set"]]

    def one(seed: int) -> None:
        overrides = [*part["overrides"], f"train.seed={seed}"]
        args = ["project", "--config", plan["config"], "--warm", "3", "--set", "train.eval_rows=100", *overrides]
        entry = {"train": rec.child(f"winner-{winner}-seed{seed}", args, 560)}
        rec.store(part["runs"], f"seed{seed}", entry)
        if ok(entry["train"]):
            rec.store(entry, "scored", score_everywhere(rec, f"winner-seed{seed}", entry["train"]["run_dir"]))

    with ThreadPoolExecutor(len(plan["seeds"])) as pool:
        list(pool.map(one, plan["seeds"]))


def bench_accuracy_final(rec: Recorder, parallel: int) -> None:
    """plans.yaml accuracy_final: each run trained (`parallel` at a time: their times are not speed figures), then
    scored on validation and test with closed values on and off, one after the other on the same run directory."""
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    plan = PLANS["accuracy_final"]
    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    unseen = str(unseen_names_file())
    part = rec.results.setdefault("accuracy_final", {})

    def one(item: tuple[str, dict]) -> None:
        name, run = item
        args = ["project", "--config", run["config"], "--warm", "3", "--set", "train.eval_rows=100", *run["set"]]
        entry = {"config": run["config"], "overrides": run["set"], "train": rec.child(f"final-{name}", args, 560)}
        rec.store(part, name, entry)
        if not ok(entry["train"]):
            return
        run_dir = entry["train"]["run_dir"]
        splits = ["test"] if run.get("test_only") else ["validation", "test"]
        for split in splits:
            for values, extra in (("on", []), ("off", ["--set", *plan["values_off"]])):
                key = f"{split}_values_{values}"
                job = ["evaluate", run_dir, "--split", split, *extra]
                rec.store(entry, key, rec.child(f"final-{name}-{key}", job, 200))
        names = rec.child(f"final-{name}-unseen", ["evaluate", run_dir, "--data", unseen], 200)
        rec.store(entry, "unseen_names", names)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, plan["runs"].items()))


def bench_accuracy_ensemble(rec: Recorder, parallel: int, seeds: set[str] | None) -> None:
    """plans.yaml ensemble: one recipe trained with each seed (`parallel` at a time; `seeds`, from --settings,
    replaces the plan's), each run scored on the test split, then the seeds together two ways, each scored on the
    test split, unseen names and the novel phrasings: voting (`mrtune evaluate RUN --ensemble OTHERS`: each row gets
    the MR most of them wrote) and averaged (`mrtune average`: one model, the mean of their weights)."""
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    plan = PLANS["ensemble"]
    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    part = rec.results.setdefault("ensemble", {"config": plan["config"], "overrides": plan["set"], "runs": {}})

    def one(seed: int) -> None:
        args = ["project", "--config", plan["config"], "--warm", "3", "--set", *plan["set"], f"train.seed={seed}"]
        entry = {"train": rec.child(f"ensemble-seed{seed}", args, 560)}
        rec.store(part["runs"], f"seed{seed}", entry)
        if ok(entry["train"]):
            test = rec.child(f"ensemble-seed{seed}-test", ["evaluate", entry["train"]["run_dir"]], 300)
            rec.store(entry, "test", test)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, sorted(int(s) for s in seeds) if seeds else plan["seeds"]))
    runs = [e["train"]["run_dir"] for e in part["runs"].values() if ok(e["train"])]
    if len(runs) < 3:
        return
    soup = str(scratch_dir() / "ensemble-average")
    part["average_run"] = rec.child("ensemble-average", ["average", *runs, "--output", soup], 300)
    data = {
        "test": [],
        "unseen_names": ["--data", str(unseen_names_file())],
        "novel_phrasing": ["--data", str(NOVEL_PHRASING)],
    }
    jobs = {("vote", key): ["evaluate", runs[0], *extra, "--ensemble", *runs[1:]] for key, extra in data.items()}
    if ok(part["average_run"]):
        jobs.update({("average", key): ["evaluate", soup, *extra] for key, extra in data.items()})
    for way in {way for way, _ in jobs}:
        rec.store(part, way, {})
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {job: pool.submit(rec.child, f"ensemble-{job[0]}-{job[1]}", args, 400) for job, args in jobs.items()}
        for (way, key), future in futures.items():
            rec.store(part[way], key, future.result())


def measure_average(runs: list[str], output: str) -> dict:
    from mrtune.infer.average import average

    started = time.perf_counter()
    run = average(runs, output, overwrite=True)
    return {"run_dir": str(run.path), "rank": run.config().lora.r, "seconds": time.perf_counter() - started}


def bench_mistral(rec: Recorder, tokenizer_dir: str, model_dir: Path, only: set[str] | None, seed_runs: int) -> None:
    """The seed recipe `seed_runs` times (its median is the ratios' denominator), then the 7B settings in `only`
    (all of plans.yaml seven_b.settings and `default` when None)."""
    plan = PLANS["seven_b"]
    part = rec.results.setdefault("mistral7b_shape", {"label": MISTRAL_SHAPE_LABEL})
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        make_mistral_shape(model_dir, tokenizer_dir)
        part["make_model_seconds"] = round(time.perf_counter() - started, 1)
    seed_tokens, seed_rows = epoch_tokens(tokenizer_dir, "seed")
    part["epoch_tokens_seed_prompt"] = seed_tokens
    part["epoch_tokens_compact_prompt"] = epoch_tokens(tokenizer_dir, "compact")[0]
    from mrtune.model.resolve import load_tokenizer

    config = mistral_shape_config(len(load_tokenizer(tokenizer_dir)))
    part["flops"] = model_flops_per_token(config, seed_tokens / seed_rows)
    ensure_seed(rec, part, model_dir, seed_runs)
    common = [f"model.name={model_dir}", *plan["common"]]
    settings = part.setdefault("settings", {})
    for name, setting in plan["settings"].items():
        if only is None or name in only:
            args = ["project", "--warm", "2", "--set", *common, *setting["set"], f"train.max_steps={setting['steps']}"]
            settings[name] = rec.child(f"mistral-{name}", args, 400)
    default = ["project", "--config", "configs/mistral-7b-qlora.yaml", "--warm", "2", "--set"]
    default += [f"model.name={model_dir}", *plan["default_recipe"]]
    if only is None or "default" in only:
        part["default_recipe"] = rec.child("mistral-default", default, 400)
    for name, overrides in plan["default_variants"].items():
        if only is not None and name in only:
            settings[name] = rec.child(f"mistral-{name}", [*default, *overrides], 400)


def bench_memory_plan(
    rec: Recorder, tokenizer_dir: str, model_dir: Path, seed_runs: int, compiled: bool, only: set[str] | None
) -> None:
    """The default 7B recipe (batch_tokens and gradient_checkpointing `auto`) under each memory cap of plans.yaml
    `memory_plan`, or the whole-GB caps in `only` (from --settings), with its layers compiled when `compiled`,
    beside the seed recipe of this run (measured here unless the mistral part already did)."""
    plan = PLANS["memory_plan"]
    part = rec.results.setdefault("mistral7b_shape", {"label": MISTRAL_SHAPE_LABEL})
    if not (model_dir / "config.json").is_file():
        make_mistral_shape(model_dir, tokenizer_dir)
    ensure_seed(rec, part, model_dir, seed_runs)
    caps = part.setdefault("memory_caps_compiled" if compiled else "memory_caps", {})
    extra = plan["compiled"] if compiled else plan["uncompiled"]
    chosen = sorted(int(name) for name in only or () if name.isdigit())
    for cap in chosen or plan["caps_gb"]:
        args = ["project", "--config", plan["config"], "--warm", "2", "--set", f"model.name={model_dir}", *extra]
        name = f"mistral-cap-{cap}{'-compiled' if compiled else ''}"
        caps[str(cap)] = rec.child(name, [*args, *plan["set"], f"train.max_memory_gb={cap}"], 400)


def ensure_seed(rec: Recorder, part: dict, model_dir: Path, seed_runs: int) -> None:
    """The 7B seed recipe `seed_runs` times, once per benchmark run: every 7B ratio of the run divides by it."""
    if "seed" not in part:
        part["seed_runs"] = [
            rec.child(f"mistral-seed-{i}", ["seed", str(model_dir), "--steps", "6"], 400) for i in range(seed_runs)
        ]
        part["seed"] = median_seed(part["seed_runs"])


def median_seed(runs: list[dict]) -> dict:
    """The seed recipe's figures over several runs in one call: the median of each (its rate moves ~20% between
    runs of a few steps), with how many runs it is the median of."""
    good = [r for r in runs if ok(r)]
    if not good:
        return runs[0] if runs else {"failed": True, "reason": "not run"}
    keys = ("step_s", "useful_tokens_per_s", "padded_tokens_per_s")
    median = {k: statistics.median(r[k] for r in good) for k in keys}
    median.update(peak_memory_gb=max(r["peak_memory_gb"] for r in good), median_of_runs=len(good))
    return median


def bench_levers(rec: Recorder, model_dir: Path, tokenizer_dir: str) -> None:
    plan = PLANS["levers"]
    part = rec.results.setdefault("mistral7b_shape", {"label": MISTRAL_SHAPE_LABEL})
    if not (model_dir / "config.json").is_file():
        make_mistral_shape(model_dir, tokenizer_dir)
    common = [f"model.name={model_dir}", *PLANS["seven_b"]["common"], *plan["base"]]
    levers = part.setdefault("levers", {})
    for index, (name, lever) in enumerate(plan["variants"].items()):
        args = ["project", "--warm", "2", "--set", *common, *lever["set"], f"train.max_steps={plan['steps']}"]
        levers[name] = rec.child(f"mistral-lever-{index}", args, 400)


def bench_search(rec: Recorder, name: str, parallel: int) -> None:
    """A recipe search of plans.yaml `searches`: train each variant, score it on the validation split.

    Variants run `parallel` at a time on the one GPU: a 135M model leaves it mostly idle, so this buys search
    breadth; the timings of this part are therefore not speed figures (the other parts are, run alone).
    """
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    plan = PLANS["searches"][name]
    resolve_model_path(EMBEDDED_MODEL)  # convert the GGUF once, before the children race to do it
    part = rec.results.setdefault("search" if name == "smollm2" else "demo_search", {})
    limit = ["--limit", str(plan["eval_limit"])] if plan.get("eval_limit") else []

    def one(item: tuple[int, tuple[str, list[str]]]) -> None:
        index, (variant, overrides) = item
        args = ["project", "--config", plan["config"], "--warm", "3", "--set", "train.eval_rows=100"]
        trained = rec.child(f"{name}-{index}", [*args, *plan.get("common", []), *overrides], 560)
        entry = {"overrides": overrides, "train": trained}
        if ok(trained):
            entry["validation"] = rec.child(
                f"{name}-{index}-eval", ["evaluate", trained["run_dir"], "--split", "validation", *limit], 200
            )
        rec.store(part, variant, entry)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, enumerate(plan["variants"].items())))


MISTRAL_SHAPE_LABEL = "random-init Mistral-7B shape (4-bit NF4)"
PARTS = (
    "smollm2",
    "smollm2-fast",
    "accuracy",
    "accuracy-winner",
    "accuracy-final",
    "accuracy-ensemble",
    "mistral",
    "memory-plan",
    "levers",
)


def known_setting_names() -> set[str]:
    """What --settings may name besides numbers (memory caps in GB, ensemble seeds): 7B settings, `default`, and
    SmolLM2 fast and accuracy variants."""
    seven_b = PLANS["seven_b"]
    return {*seven_b["settings"], "default", *seven_b["default_variants"], *PLANS["smollm2"]["fast"]} | set(
        PLANS["accuracy"]["variants"]
    )


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def command_bench(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from bench.publish import markdown
    from mrtune.model.resolve import resolve_model_path

    parts = args.only or ["smollm2", "mistral", "levers"]
    names = set(args.settings.split(",")) if args.settings else None
    unknown = sorted(name for name in names or () if not name.isdigit() and name not in known_setting_names())
    if unknown:  # a misspelt or missing name would otherwise be skipped in silence, after minutes of other parts
        raise SystemExit(f"bench: unknown --settings name(s) {', '.join(unknown)}: add them to bench/plans.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    rec = Recorder(args.out, results)
    tokenizer_dir = args.tokenizer_dir or (
        resolve_model_path("embedded:smollm2-135m-instruct")
        if {"smollm2", "smollm2-fast"} & set(parts)
        or any(part.startswith("accuracy") for part in parts)
        or not args.model_dir.is_dir()
        else str(args.model_dir)
    )
    for part in parts:
        if part == "smollm2":
            bench_smollm2(rec, tokenizer_dir)
        elif part == "smollm2-fast":
            bench_smollm2_fast(rec, names)
        elif part == "accuracy":
            bench_accuracy(rec, args.parallel, names)
        elif part == "accuracy-winner":
            bench_accuracy_winner(rec, args.sources)
        elif part == "accuracy-final":
            bench_accuracy_final(rec, args.parallel)
        elif part == "accuracy-ensemble":
            bench_accuracy_ensemble(rec, args.parallel, names)
        elif part == "mistral":
            bench_mistral(rec, tokenizer_dir, args.model_dir, names, args.seed_runs)
        elif part == "memory-plan":
            bench_memory_plan(rec, tokenizer_dir, args.model_dir, args.seed_runs, args.compiled_caps, names)
        elif part == "levers":
            bench_levers(rec, args.model_dir, tokenizer_dir)
        else:
            bench_search(rec, part.removeprefix("search:"), args.parallel)
        rec.save()
    (args.out / "BENCHMARKS-gpu.md").write_text(markdown(results))


def command_measure(args: argparse.Namespace) -> None:
    if os.environ.get("BENCH_TRACEBACK_S"):  # where a measurement that seems stuck spends its time: every N s
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BENCH_TRACEBACK_S"]), repeat=True)
    if args.kind == "project":
        result = measure_project(args.config, args.set, args.warm)
    elif args.kind == "evaluate":
        result = measure_evaluate(args)
    elif args.kind == "average":
        result = measure_average(args.runs, args.output)
    else:
        result = measure_seed(args.model_dir, args.steps)
    args.result.write_text(json.dumps(result, indent=2))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run parts of the benchmark on this machine's GPU")
    bench.add_argument("--out", type=Path, required=True, help="results.json and BENCHMARKS-gpu.md go here")
    searches = [f"search:{name}" for name in PLANS["searches"]]
    bench.add_argument(
        "--only",
        nargs="+",
        choices=[*PARTS, *searches],
        help="parts to run, in order (default: smollm2 mistral levers)",
    )
    bench.add_argument("--parallel", type=int, default=8, help="trainings at once in accuracy and search parts")
    bench.add_argument(
        "--settings",
        help="comma-separated names: 7B settings (plans.yaml seven_b.settings, and `default` for "
        "configs/mistral-7b-qlora.yaml), memory caps in GB, SmolLM2 fast variants or accuracy variants; all by default",
    )
    bench.add_argument("--seed-runs", type=int, default=3, help="runs of the 7B seed recipe (the median is used)")
    bench.add_argument("--compiled-caps", action="store_true", help="memory-plan: the recipe with compiled layers")
    bench.add_argument(
        "--from", dest="sources", type=Path, nargs="*", default=[], help="accuracy-winner: the sweep's results.json"
    )
    bench.add_argument("--model-dir", type=Path, default=Path("/tmp/mistral-7b-shape"))
    bench.add_argument(
        "--tokenizer-dir",
        help="tokenizer for the 7B shape (default: the embedded model's, which needs its GGUF, or the saved 7B "
        "shape's); any directory with SmolLM2's tokenizer files will do",
    )
    measure = commands.add_parser("measure", help="one measurement, in this process (the bench's children)")
    kinds = measure.add_subparsers(dest="kind", required=True)
    for kind in ("project", "evaluate", "average", "seed"):
        sub = kinds.add_parser(kind)
        sub.add_argument("--result", type=Path, required=True, help="the measurement's JSON file")
        if kind == "project":
            sub.add_argument("--config")
            sub.add_argument("--set", nargs="*", default=[])
            sub.add_argument("--warm", type=int, default=2, help="steps not timed")
        elif kind == "evaluate":
            sub.add_argument("run_dir")
            sub.add_argument("--limit", type=int)
            sub.add_argument("--split", default="test")
            sub.add_argument("--data")
            sub.add_argument("--set", nargs="*", default=[])
            sub.add_argument("--ensemble", nargs="*", default=[], help="other runs that vote (last: it takes the rest)")
        elif kind == "average":
            sub.add_argument("runs", nargs="+")
            sub.add_argument("--output", required=True)
        else:
            sub.add_argument("model_dir")
            sub.add_argument("--steps", type=int, default=8)
    publish = commands.add_parser("publish", help="merge results.json files into BENCHMARKS.md and bench/results/")
    publish.add_argument("results", type=Path, nargs="+")
    publish.add_argument("--label", help="name of this run's section and raw file (default: its date)")
    publish.add_argument(
        "--keep",
        type=lambda text: text.split(","),
        default=[],
        help="comma-separated headline keys of latest.json that keep their earlier values (a partial run's)",
    )
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "bench":
        command_bench(args)
    elif args.command == "measure":
        command_measure(args)
    else:
        from bench.publish import publish

        publish(args.results, args.label, args.keep)


if __name__ == "__main__":
    main()
