"""The benchmark's results into the repository: headline figures (bench/results/latest.json), the raw merged results
and the GPU section of BENCHMARKS.md, from the results.json of one or more calls (`python -m bench.run publish`)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from bench.run import (
    H200_BF16_PEAK_TFLOPS,
    H200_FP8_PEAK_TFLOPS,
    MISTRAL_SHAPE_LABEL,
    PLANS,
    ROOT,
    peak_tflops,
    validation_means,
)


def ok(result: dict | None) -> bool:
    return bool(result) and not result.get("failed")


def _seed_rate(r: dict, seed: dict) -> float | None:
    """The seed's useful tokens/s measured in the same call as `r` (publish records it), else this run's seed."""
    if "seed_useful_tokens_per_s" in r:
        return r["seed_useful_tokens_per_s"]
    return seed["useful_tokens_per_s"] if ok(seed) else None


def summarise(results: dict) -> dict:
    """The headline figures of bench/results/latest.json (project / seed ratios, each within one call)."""
    summary = {"card": results["card"], "date": results["date"]}
    summary.update(_summary_7b(results.get("mistral7b_shape", {})))
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
    summary.update(_summary_smollm2(results.get("smollm2", {})))
    summary.update(_summary_accuracy(results.get("accuracy", {})))
    summary.update(_summary_memory_plan(results.get("mistral7b_shape", {})))
    summary.update(_summary_accuracy_final(results.get("accuracy_final", {})))
    summary.update(_summary_accuracy_winner(results.get("accuracy_winner", {})))
    summary.update(_summary_ensemble(results.get("ensemble", {})))
    summary.update(_summary_averages(results))
    return summary


def _summary_ensemble(part: dict) -> dict:
    """The headline accuracy when an ensemble run is there (`mrtune evaluate --ensemble` over the seeds of one
    recipe), beside the mean of its members alone on the test split."""
    vote = part.get("vote", {})
    if not ok(vote.get("test")):
        return {}
    members = vote["test"]["ensemble"]["members_exact_match"]
    variant = f"majority vote of {len(members)} seeds of {part['config']} (mrtune evaluate --ensemble)"
    return {**_best_scores(variant, vote), "smollm2_single_model_test_exact_match_mean": sum(members) / len(members)}


def _averages(results: dict) -> list[tuple[list[str], dict]]:
    """Every averaged model of the run (`mrtune average`): (its members, its scores by data), from the ensemble
    part (its seeds averaged) and from bench/soup.sh."""
    found = []
    ensemble = results.get("ensemble", {})
    if ensemble.get("average"):
        found.append((sorted(ensemble.get("runs", {})), ensemble["average"]))
    soup = results.get("soup", {})
    for name, members in soup.get("members", {}).items():
        scores = {key.split("/", 1)[1]: v for key, v in soup["scores"].items() if key.startswith(f"{name}/")}
        found.append((members, {"unseen_names" if "unseen" in k else k: v for k, v in scores.items()}))
    return found


def _summary_averages(results: dict) -> dict:
    """Averaged models of the fewest runs (five seeds, say): each one's test exact match and their mean (one model
    each, one decode); the largest average's scores beside them when it holds more runs."""
    summary: dict = {}
    averages = [(members, scores) for members, scores in _averages(results) if ok(scores.get("test"))]
    fewest = min((len(members) for members, _ in averages), default=0)
    smallest = [scores for members, scores in averages if len(members) == fewest]
    if smallest:
        tests = [scores["test"]["exact_match"] for scores in smallest]
        summary.update(
            smollm2_averaged_test_exact_match=sum(tests) / len(tests),
            smollm2_averaged_test_exact_match_runs=tests,
            smollm2_averaged_test_slot_f1=sum(s["test"]["slot_f1"] for s in smallest) / len(smallest),
        )
        unseen = [s["unseen_names"]["exact_match"] for s in smallest if ok(s.get("unseen_names"))]
        if unseen:
            summary["smollm2_averaged_unseen_names_exact_match"] = sum(unseen) / len(unseen)
    larger = [(m, s) for m, s in averages if len(m) > fewest]
    if larger:
        members, scores = max(larger, key=lambda item: len(item[0]))
        summary[f"smollm2_averaged_{len(members)}_test_exact_match"] = scores["test"]["exact_match"]
        if ok(scores.get("unseen_names")):
            summary[f"smollm2_averaged_{len(members)}_unseen_names_exact_match"] = scores["unseen_names"]["exact_match"]
    return summary


def _best_scores(variant: str, scored: dict) -> dict:
    """The smollm2_best_* headline keys of one model's (or ensemble's) scores on the test split, unseen names and
    the novel phrasings (those it has)."""
    if not ok(scored.get("test")):
        return {}
    summary = dict(
        smollm2_best_variant=variant,
        smollm2_best_test_exact_match=scored["test"]["exact_match"],
        smollm2_best_test_slot_f1=scored["test"]["slot_f1"],
        smollm2_best_valid_mr_rate=scored["test"]["valid_mr_rate"],
    )
    if ok(scored.get("unseen_names")):
        summary["smollm2_best_unseen_names_exact_match"] = scored["unseen_names"]["exact_match"]
    if ok(scored.get("novel_phrasing")):
        summary.update(
            smollm2_best_novel_slot_f1=scored["novel_phrasing"]["slot_f1"],
            smollm2_best_novel_act_accuracy=scored["novel_phrasing"]["dialogue_act_accuracy"],
        )
    return summary


def _summary_accuracy_winner(part: dict) -> dict:
    """The headline accuracy when an accuracy-winner run is there: the mean over its seeds (each trained on train +
    validation with the recipe chosen on validation), with the seeds' count."""
    scored = [run["scored"] for run in part.get("runs", {}).values() if ok(run.get("scored", {}).get("test"))]
    if not scored:
        return {}

    keys = {
        "smollm2_best_test_exact_match": ("test", "exact_match"),
        "smollm2_best_test_slot_f1": ("test", "slot_f1"),
        "smollm2_best_valid_mr_rate": ("test", "valid_mr_rate"),
        "smollm2_best_unseen_names_exact_match": ("unseen_names", "exact_match"),
        "smollm2_best_novel_slot_f1": ("novel_phrasing", "slot_f1"),
        "smollm2_best_novel_act_accuracy": ("novel_phrasing", "dialogue_act_accuracy"),
    }
    summary = {"smollm2_best_variant": f"configs/smollm2-best.yaml + {' '.join(part['overrides'])} (mean of seeds)"}
    for key, (split, metric) in keys.items():
        values = [s[split][metric] for s in scored if ok(s.get(split))]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def _accuracy_winner(results: dict) -> list[str]:
    part = results.get("accuracy_winner")
    if not part:
        return []
    lines = [
        "### The validation winner, trained on train + validation (SmolLM2-135M)",
        "",
        f"Chosen by mean validation exact match over the accuracy sweep: **{part['winner']}**; trained with each seed "
        f"on train + validation (`{' '.join(part['overrides'])}`), then scored once.",
        "",
    ]
    for seed, run in part.get("runs", {}).items():
        scored = run.get("scored") or {}
        if not ok(run.get("train")):
            lines.append(f"- {seed}: training failed: {run['train'].get('reason', '')[:200]}")
        else:
            lines.append(f"- {seed}: " + "; ".join(_scores(k.replace("_", " "), v) for k, v in scored.items()))
    return [*lines, ""]


def _plan_name(plan: dict) -> str:
    return f"{plan['batch_tokens']} tokens, checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}"


def _summary_memory_plan(seven: dict) -> dict:
    """`memory_plan_7b` (and `memory_plan_7b_compiled`, the layers compiled): for each cap, what the planner chose
    for the default 7B recipe and how fast it ran."""
    summary = {}
    for key, name in (("memory_caps", "memory_plan_7b"), ("memory_caps_compiled", "memory_plan_7b_compiled")):
        plans = _caps_summary(seven.get(key, {}), seven.get("seed", {}))
        if plans:
            summary[name] = plans
    return summary


def _caps_summary(caps: dict, seed: dict) -> dict:
    plans = {}
    for cap, r in caps.items():
        base = _seed_rate(r, seed)
        if ok(r) and r.get("memory_plan") and base:
            plans[cap] = dict(
                setting=_plan_name(r["memory_plan"]),
                useful_tokens_per_s=r["useful_tokens_per_s"],
                peak_gb=r["peak_memory_gb"],
                peak_reserved_gb=r.get("peak_reserved_gb"),
                vs_seed=r["useful_tokens_per_s"] / base,
            )
    return plans


FINAL_RUN = "best-train+validation-seed0"
"""The accuracy_final run whose scores are the headline: the chosen recipe trained on train + validation."""


def _summary_accuracy_final(part: dict) -> dict:
    final = part.get(FINAL_RUN, {})
    test, names = final.get("test_values_on"), final.get("unseen_names")
    if not ok(test):
        return {}
    summary = dict(
        smollm2_best_variant="configs/smollm2-final.yaml (smollm2-best on train + validation, closed values)",
        smollm2_best_test_exact_match=test["exact_match"],
        smollm2_best_test_slot_f1=test["slot_f1"],
        smollm2_best_valid_mr_rate=test["valid_mr_rate"],
    )
    if ok(names):
        summary["smollm2_best_unseen_names_exact_match"] = names["exact_match"]
    return summary


def _summary_7b(seven: dict) -> dict:
    seed = seven.get("seed", {})
    good = {k: v for k, v in seven.get("settings", {}).items() if ok(v) and _seed_rate(v, seed)}
    if not ok(seed) or not good:
        return {}
    # A setting run again (NAME-rerun) is judged on its runs' mean, never on its luckiest run: each run's ratio
    # divides by its own call's seed, and the host-bound settings move by a third between calls.
    runs: dict[str, list[dict]] = {}
    for name, entry in good.items():
        runs.setdefault(re.sub(r"-rerun\d*$", "", name), []).append(entry)
    good = {
        name: {
            "useful_tokens_per_s": statistics.mean(e["useful_tokens_per_s"] for e in entries),
            "vs_seed": statistics.mean(e["useful_tokens_per_s"] / _seed_rate(e, seed) for e in entries),
            "peak_memory_gb": max(e["peak_memory_gb"] for e in entries),
            "runs": len(entries),
            "seed_median_of_runs": min(e.get("seed_median_of_runs", seed.get("median_of_runs", 1)) for e in entries),
        }
        for name, entries in runs.items()
    }
    ratio = {k: v["vs_seed"] for k, v in good.items()}
    within_seed = {k: v for k, v in good.items() if v["peak_memory_gb"] <= seed["peak_memory_gb"]}
    saving = max(within_seed, key=ratio.get) if within_seed else min(good, key=lambda k: good[k]["peak_memory_gb"])
    fastest = max((k for k, v in good.items() if v["peak_memory_gb"] <= 80), key=ratio.get)
    summary = dict(
        memory_saving_setting_7b=saving,
        speedup_useful_tokens_per_s_7b=ratio[saving],
        peak_memory_ratio_7b=good[saving]["peak_memory_gb"] / seed["peak_memory_gb"],
        fastest_setting_7b=fastest,
        speedup_max_useful_tokens_per_s_7b=ratio[fastest],
        fastest_setting_7b_runs=good[fastest]["runs"],
        seed_runs_7b=good[fastest]["seed_median_of_runs"],  # the seed runs behind each of its calls' medians
    )
    flops = seven.get("flops")
    if flops:
        mfu = {k: v["useful_tokens_per_s"] * flops["flops_per_token"] / 1e12 / peak_tflops(k) for k, v in good.items()}
        summary["model_flops_per_token_7b"] = flops["flops_per_token"]
        bf16 = [k for k in mfu if peak_tflops(k) == H200_BF16_PEAK_TFLOPS]
        fp8 = [k for k in mfu if peak_tflops(k) == H200_FP8_PEAK_TFLOPS]
        if bf16:
            best = max(bf16, key=mfu.get)
            summary.update(mfu_max_7b=mfu[best], mfu_max_setting_7b=best)
        if fp8:  # against the fp8 peak, which is twice bf16's: the same rate is half the MFU
            best = max(fp8, key=mfu.get)
            summary.update(mfu_max_7b_fp8=mfu[best], mfu_max_setting_7b_fp8=best)
    default = seven.get("default_recipe", {})
    if ok(default):
        seed_epoch = 5103 / 8 * default.get("seed_step_s", seed["step_s"])  # the seed trains 8 rows per step
        project_epoch = seven["epoch_tokens_compact_prompt"] / default["useful_tokens_per_s"]
        summary.update(
            seed_epoch_s_7b=seed_epoch,
            project_epoch_s_7b=project_epoch,
            speedup_epoch_time_7b=seed_epoch / project_epoch,
            epoch_time_7b_basis="measured: configs/mistral-7b-qlora.yaml",
        )
    return summary


def _summary_smollm2(small: dict) -> dict:
    summary = {}
    if ok(small.get("project")):
        summary["smollm2_train_s"] = small["project"]["train_seconds"]
    if ok(small.get("two_epochs_evaluate")):
        summary.update(
            smollm2_two_epochs_train_s=small["two_epochs"]["train_seconds"],
            smollm2_two_epochs_test_exact_match=small["two_epochs_evaluate"]["exact_match"],
        )
    evaluation = small.get("evaluate")
    if ok(evaluation):
        summary.update(
            smollm2_test_exact_match=evaluation["exact_match"],
            smollm2_eval_s=evaluation["decode_seconds"],
            smollm2_test_slot_f1=evaluation["slot_f1"],
            smollm2_valid_mr_rate=evaluation["valid_mr_rate"],
        )
    if ok(small.get("evaluate_dynamic_cache")):
        summary["smollm2_eval_s_dynamic_cache"] = small["evaluate_dynamic_cache"]["decode_seconds"]
    if ok(small.get("unseen_names")):
        summary["smollm2_unseen_names_exact_match"] = small["unseen_names"]["exact_match"]
    # Variants NAME-seedN are seeds of NAME: a recipe is judged on its seeds' mean, never on its luckiest seed.
    recipes: dict[str, list[dict]] = {}
    for name, entry in small.get("fast", {}).items():
        if ok(entry.get("train")) and ok(entry.get("test")):
            recipes.setdefault(re.sub(r"-seed\d+$", "", name), []).append(entry)
    if recipes:  # the most accurate recipe trained in at most 60 s (median over seeds), else the fastest
        seconds = {k: statistics.median(e["train"]["train_seconds"] for e in v) for k, v in recipes.items()}
        accuracy = {k: statistics.mean(e["test"]["exact_match"] for e in v) for k, v in recipes.items()}
        within = [k for k in recipes if seconds[k] <= 60]
        pick = max(within, key=accuracy.get) if within else min(recipes, key=seconds.get)
        summary.update(
            smollm2_fast_variant=pick,
            smollm2_fast_train_s=seconds[pick],
            smollm2_fast_test_exact_match=accuracy[pick],
            smollm2_fast_seeds=len(recipes[pick]),
        )
    return summary


def _summary_accuracy(part: dict) -> dict:
    winner = part.get("winner")
    return _best_scores(winner, part.get("scored", {}).get(winner, {}))


PREDICTED = {name: v.get("predicted", "") for name, v in PLANS["levers"]["variants"].items()}


def markers(label: str) -> tuple[str, str]:
    """The HTML comments around one run's section of BENCHMARKS.md (`label`: the run's date, or a name)."""
    return f"<!-- gpu-bench {label}:start -->", f"<!-- gpu-bench {label}:end -->"


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
    """The GPU section of BENCHMARKS.md for one merged run (its own markers, so earlier runs' sections stay)."""
    start, end = markers(results.get("label") or results["date"])
    calls = results.get("calls") or ["one call"]
    lines = [
        start,
        f"## GPU benchmark ({results['card']}, {results['date']})",
        "",
        f"`python -m bench.run bench` on {results['card']} GPUs, {len(calls)} results file(s) (one per call of the "
        "device tool, or per GPU of a call), merged with `python -m bench.run publish`. Every ratio compares "
        "figures measured in the same call, beside that call's own runs of the seed recipe (their median). Useful "
        "tokens exclude padding; peak memory is `torch.cuda.max_memory_allocated`.",
        "",
    ]
    if results.get("notes"):
        lines += [f"- {note}" for note in results["notes"]] + [""]
    sections = (_seven_b, _memory_plan, _scaling, _smollm2, _accuracy, _accuracy_winner, _accuracy_final, _ensemble)
    sections += (_soup, _levers)
    for section in (*sections, _searches):
        lines += section(results)
    lines += ["### Headline figures (bench/results/latest.json)", "", "| key | value |", "| --- | --- |"]
    summary = {k: v for k, v in summarise(results).items() if k not in results.get("kept", [])}
    lines += [f"| {k} | {_shown(v)} |" for k, v in summary.items()]
    if results.get("kept"):
        lines += [
            "",
            "Not taken into latest.json from this run (they keep their earlier values): " + ", ".join(results["kept"]),
        ]
    return "\n".join([*lines, "", end])


def _shown(value) -> str:
    """A headline value in a table cell: floats to 3 figures, a memory plan one cap after another."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "; ".join(
            f"{cap} GB: {p['setting']}, {p['useful_tokens_per_s']:,.0f} tok/s, {p['vs_seed']:.1f}x, peak "
            f"{p['peak_gb']:.1f} GB"
            for cap, p in value.items()
        )
    return str(value)


HEADER = [
    "| setting | s / optimizer step | useful tokens/s | padded tokens/s | peak GB | vs seed |",
    "| --- | --- | --- | --- | --- | --- |",
]


def _seven_b(results: dict) -> list[str]:
    seven = results.get("mistral7b_shape")
    if not seven or not (seven.get("settings") or seven.get("seed")):
        return []
    seed, flops = seven.get("seed", {}), seven.get("flops")
    lines = [f"### {MISTRAL_SHAPE_LABEL}: seed prompt, seed adapters (r=8 on all linear + lm_head)", ""]
    if flops:
        lines += [
            f"Model FLOPs per token: {flops['formula']} = {flops['flops_per_token'] / 1e9:.1f} GFLOP "
            f"(P = {flops['weights_in_matmuls'] / 1e9:.2f} B, mean row {flops['mean_row_tokens']:.0f} tokens); "
            "recomputation under gradient checkpointing is not counted. MFU = useful tokens/s x FLOPs per token / "
            f"{H200_BF16_PEAK_TFLOPS:.0f} TFLOP/s (the H200's dense bf16 peak), or / {H200_FP8_PEAK_TFLOPS:.0f} "
            "(its dense fp8 peak) for `-fp8` settings, whose base matmuls run on fp8 tensor cores (model.fp8_base).",
            "",
        ]
    lines += [
        "| setting | s / optimizer step | useful tokens/s | padded tokens/s | peak GB | vs seed | TFLOP/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def call(r: dict) -> str:
        return f" (call {r['call']})" if "call" in r else ""

    runs = results.get("seed_runs") or seven.get("seed_runs", [])
    medians = results.get("seed_medians") or [seed]
    rows = [(f"seed recipe, run {i + 1}{call(r)}", r) for i, r in enumerate(runs)]
    rows += [(f"seed recipe, median of its runs{call(r)}", r) for r in medians]
    rows += [(f"mrtune {k}{call(v)}", v) for k, v in seven.get("settings", {}).items()]
    if seven.get("default_recipe"):
        default = seven["default_recipe"]
        rows.append((f"mrtune default recipe (configs/mistral-7b-qlora.yaml, compact prompt){call(default)}", default))
    for name, r in rows:
        line = _row(name, r, None if name.startswith("seed") else seed)
        if not r.get("failed") and flops:
            tflops = r["useful_tokens_per_s"] * flops["flops_per_token"] / 1e12
            peak = H200_BF16_PEAK_TFLOPS if name.startswith("seed") else peak_tflops(name.split()[1])
            line += f" {tflops:.0f} | {100 * tflops / peak:.1f}% |"
        else:
            line += " | |"
        lines.append(line)
    return [*lines, ""]


def _scaling(results: dict) -> list[str]:
    scaling = results.get("scaling")
    if not scaling:
        return []
    runs = scaling.get("runs", {})
    one = runs.get("1gpu", {})
    lines = [
        f"### Several GPUs: {scaling.get('model', MISTRAL_SHAPE_LABEL)}, {scaling.get('card')} "
        f"x{scaling.get('gpus', 2)} (bench/scaling.sh)",
        "",
        f"The 7B recipe's settings ({one.get('batch_tokens_per_gpu')} tokens per GPU per step, "
        f"checkpointing {'on' if one.get('gradient_checkpointing') else 'off'}, flex attention) on the "
        f"{one.get('prompt_style')} prompt; the same micro-batch per GPU, so a 2-GPU step holds twice the tokens.",
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
    return [*lines, ""]


def _scores(name: str, r: dict) -> str:
    if not ok(r):
        return f"{name}: failed ({(r or {}).get('reason', 'not run')[:100]})"
    return (
        f"{name} ({r['n']} rows): exact match {100 * r['exact_match']:.1f}%, slot F1 {100 * r['slot_f1']:.1f}%, "
        f"dialogue-act accuracy {100 * r['dialogue_act_accuracy']:.1f}%, valid MR {100 * r['valid_mr_rate']:.1f}%"
    )


def _smollm2(results: dict) -> list[str]:
    small = results.get("smollm2")
    if not small:
        return []
    seed = small.get("seed", {})
    lines = ["### SmolLM2-135M-Instruct (the embedded model), each timed alone", "", *HEADER]
    if seed:
        lines.append(_row("seed recipe", seed, None))
    if small.get("project"):
        lines.append(_row("mrtune configs/smollm2-gpu.yaml (3 epochs, 2,048-token steps)", small["project"], seed))
    if small.get("two_epochs"):
        two = " ".join(PLANS["smollm2"]["two_epochs"])
        lines.append(_row(f"mrtune two-epoch variant (`{two}`)", small["two_epochs"], seed))
    for name, entry in small.get("fast", {}).items():
        if "train" in entry:  # a variant that a call's time limit stopped before it started has none
            lines.append(_row(f"mrtune fast variant {name} (`{' '.join(entry['overrides'])}`)", entry["train"], seed))
    lines.append("")
    for name, entry in small.get("fast", {}).items():
        if ok(entry.get("train")):
            lines += [
                f"- Fast variant {name}, {entry['train']['train_seconds']:.0f} s of training: "
                + _scores("test split", entry.get("test"))
            ]
    if ok(small.get("two_epochs")):
        lines += [
            f"- Two-epoch variant, {small['two_epochs']['train_seconds']:.0f} s of training: "
            + _scores("test split", small.get("two_epochs_evaluate"))
        ]
    ev = small.get("evaluate")
    if ok(ev):
        lines += [
            f"- configs/smollm2-gpu.yaml, {small['project']['train_seconds']:.0f} s of training: "
            + _scores("test split", ev)
            + f"; `mrtune evaluate` decoded it in {ev['decode_seconds']:.1f} s (static KV cache)"
        ]
        if ok(small.get("evaluate_dynamic_cache")):
            lines += [
                f"- The same decode with a growing (dynamic) KV cache: "
                f"{small['evaluate_dynamic_cache']['decode_seconds']:.1f} s"
            ]
    if ok(small.get("unseen_names")):
        lines += [
            "- "
            + _scores(
                "Game names never seen in training (`python -m mrtune.task.generalization`)", small["unseen_names"]
            )
        ]
    return [*lines, ""]


def _accuracy(results: dict) -> list[str]:
    part = results.get("accuracy")
    if not part:
        return []
    # Over every call's seeds (a sweep split between GPUs), not one call's means.
    means = validation_means(part.get("variants", {}), len(PLANS["accuracy"]["seeds"]))
    if means:
        part["winner"] = max(means, key=means.get)
    lines = [
        f"### Accuracy levers, SmolLM2-135M (variants of {part.get('config', 'configs/smollm2-gpu.yaml')}, "
        "chosen on validation)",
        "",
        "Each variant trained once per seed, all at once on the one GPU (their times are not speed figures), "
        "and scored on all 714 validation rows with constrained decoding.",
        "",
        "| variant | overrides | validation exact match, per seed | mean | slot F1 (mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, seeds in part.get("variants", {}).items():
        overrides = " ".join(PLANS["accuracy"]["variants"].get(name, []))
        if not seeds:
            lines.append(f"| {name} | `{overrides}` | not finished | | |")
            continue
        scores = [e.get("validation") for e in seeds.values()]
        per_seed = ", ".join(f"{100 * v['exact_match']:.1f}%" if ok(v) else "failed" for v in scores)
        f1 = [v["slot_f1"] for v in scores if ok(v)]
        mean = f"{100 * means[name]:.1f}%" if name in means else ""
        f1_text = f"{100 * sum(f1) / len(f1):.1f}%" if f1 else ""
        lines.append(f"| {name} | `{overrides or '(none)'}` | {per_seed} | {mean} | {f1_text} |")
    lines.append("")
    if part.get("winner") and part.get("scored"):
        lines += [f"Chosen on validation: **{part['winner']}**. Scored once, beside the base recipe (seed 0 runs):", ""]
    elif part.get("winner"):
        lines += [f"Chosen on validation: **{part['winner']}** (mean {100 * means[part['winner']]:.1f}%).", ""]
    for name, scored in part.get("scored", {}).items():
        lines += [f"- {name}: " + "; ".join(_scores(k.replace("_", " "), v) for k, v in scored.items())]
    return [*lines, ""]


def _memory_plan(results: dict) -> list[str]:
    seven = results.get("mistral7b_shape", {})
    lines = []
    for key, compiled in (("memory_caps", False), ("memory_caps_compiled", True)):
        if seven.get(key):
            lines += _memory_plan_table(seven[key], seven.get("seed", {}), compiled)
    return lines


def _memory_plan_table(caps: dict, seed: dict, compiled: bool) -> list[str]:
    how = "layers compiled (`model.compile_layers=true`; the planner probes uncompiled)" if compiled else "not compiled"
    lines = [
        f"### Memory planner: configs/mistral-7b-qlora.yaml on the {MISTRAL_SHAPE_LABEL}, under each cap"
        + (", layers compiled" if compiled else ""),
        "",
        "`train.batch_tokens: auto`, `model.gradient_checkpointing: auto`, `train.max_memory_gb` = the cap (the "
        "planner plans within it and holds the process to it with `set_per_process_memory_fraction`). Compact "
        f"prompt, LoRA r=8 on all linear layers and lm_head, dropout 0.05, flex attention, {how}. Peak "
        "allocated is what the probes predict; peak reserved is what the cap bounds.",
        "",
        "| cap GB | chosen | predicted peak GB | peak allocated GB | peak reserved GB | useful tokens/s | vs seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cap, r in caps.items():
        if not ok(r):
            lines.append(f"| {cap} | failed: {r.get('reason', '')[:160]} | | | | | |")
            continue
        plan, base = r["memory_plan"], _seed_rate(r, seed)
        lines.append(
            f"| {cap} | {_plan_name(plan)} | {plan['predicted_peak_gb']:.1f} | {r['peak_memory_gb']:.1f} | "
            f"{r['peak_reserved_gb']:.1f} | {r['useful_tokens_per_s']:,.0f} | "
            f"{r['useful_tokens_per_s'] / base:.1f}x |"
        )
    return [*lines, ""]


def _accuracy_final(results: dict) -> list[str]:
    part = results.get("accuracy_final")
    if not part:
        return []
    lines = [
        "### Accuracy, second round: closed attribute values, and training on train + validation (SmolLM2-135M)",
        "",
        "The runs of plans.yaml `accuracy_final`, trained at once on the one GPU (times are not speed figures); "
        "each model decoded with closed values on (`eval.constrain_values`, the default) and off.",
        "",
        "| run | split | exact match, values on | off | slot F1 on | act accuracy on | valid MR on |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def row(name: str, what: str, on: dict, off: dict | None = None) -> str:
        off_text = f"{100 * off['exact_match']:.2f}%" if ok(off) else ""
        return (
            f"| {name} | {what} | {100 * on['exact_match']:.2f}% | {off_text} | {100 * on['slot_f1']:.2f}% | "
            f"{100 * on['dialogue_act_accuracy']:.2f}% | {100 * on['valid_mr_rate']:.1f}% |"
        )

    for name, entry in part.items():
        for split in ("validation", "test"):
            if ok(entry.get(f"{split}_values_on")):
                lines.append(row(name, split, entry[f"{split}_values_on"], entry.get(f"{split}_values_off")))
        if ok(entry.get("unseen_names")):
            lines.append(row(name, f"unseen names ({entry['unseen_names']['n']} rows)", entry["unseen_names"]))
    return [*lines, ""]


def _ensemble(results: dict) -> list[str]:
    part = results.get("ensemble")
    if not part:
        return []
    lines = [
        "### Seeds together (SmolLM2-135M): voting (`mrtune evaluate RUN --ensemble OTHERS`) and averaged weights "
        "(`mrtune average`)",
        "",
        f"{part['config']} (`{' '.join(part['overrides'])}`) trained with each seed, at once on the one GPU (times "
        "are not speed figures); each run scored alone on the test split, then all of them together: by vote, each "
        "row gets the MR most of the models wrote (a tie goes to the first run; one decode per model); averaged, "
        "one model whose weights are the mean of theirs (one decode).",
        "",
        "| model | data | exact match | slot F1 | act accuracy | valid MR |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def row(name: str, what: str, r: dict) -> str:
        return (
            f"| {name} | {what} | {100 * r['exact_match']:.2f}% | {100 * r['slot_f1']:.2f}% | "
            f"{100 * r['dialogue_act_accuracy']:.2f}% | {100 * r['valid_mr_rate']:.1f}% |"
        )

    for seed, run in sorted(part.get("runs", {}).items()):
        if ok(run.get("test")):
            lines.append(row(seed, "test", run["test"]))
    for what, r in part.get("vote", {}).items():
        if ok(r):
            lines.append(row(f"**vote of {len(r['ensemble']['members'])}**", f"{what.replace('_', ' ')} ({r['n']})", r))
    runs = len(part.get("runs", {}))
    for what, r in part.get("average", {}).items():
        if ok(r):
            lines.append(row(f"**average of {runs}** (one model)", f"{what.replace('_', ' ')} ({r['n']})", r))
    return [*lines, ""]


def _soup(results: dict) -> list[str]:
    soup = results.get("soup")
    if not soup:
        return []
    scores = soup["scores"]
    lines = [
        "### Averaged weights, more seeds (`bench/soup.sh`: `mrtune train`, `mrtune average`, `mrtune evaluate`)",
        "",
        "configs/smollm2-final.yaml trained with each seed, five at once on each GPU; then each GPU's five runs and "
        "all ten averaged into one model each; every run and average scored on the test split.",
        "",
        "| model | its runs alone on test (mean) | data | exact match | slot F1 | act accuracy | valid MR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, members in soup["members"].items():
        alone = [scores[f"{m}/test"]["exact_match"] for m in members if ok(scores.get(f"{m}/test"))]
        mean = f"{100 * sum(alone) / len(alone):.2f}%" if alone else ""
        for key, r in sorted(scores.items(), key=lambda item: not item[0].endswith("/test")):  # test first
            if key.startswith(f"{name}/") and ok(r):
                what = f"{key.split('/', 1)[1].replace('data-', '').replace('-', ' ')} ({r['n']})"
                lines.append(
                    f"| **average of {len(members)}** ({', '.join(members)}) | {mean} | {what} | "
                    f"{100 * r['exact_match']:.2f}% | {100 * r['slot_f1']:.2f}% | "
                    f"{100 * r['dialogue_act_accuracy']:.2f}% | {100 * r['valid_mr_rate']:.1f}% |"
                )
    alone = {k.split("/")[0]: v for k, v in scores.items() if k.endswith("/test") and not k.startswith("avg")}
    if alone:
        lines += [
            "",
            "Each run alone, test exact match: "
            + ", ".join(f"{name} {100 * r['exact_match']:.2f}%" for name, r in sorted(alone.items()) if ok(r))
            + ".",
        ]
    if soup.get("times"):
        lines += ["", f"Times (from the start of the call): {'; '.join(soup['times'])}."]
    return [*lines, ""]


def _levers(results: dict) -> list[str]:
    levers = results.get("mistral7b_shape", {}).get("levers")
    if not levers:
        return []
    base = next(iter(levers.values()))
    lines = [
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
    return [*lines, ""]


def _searches(results: dict) -> list[str]:
    lines = []
    if results.get("search"):
        lines += [
            "### Recipe search, SmolLM2-135M (variants of configs/smollm2-gpu.yaml, chosen on validation)",
            "",
            "Variants ran 8 at a time on the one GPU, so their times are not speed figures.",
            "",
            *_search_table(results["search"], "valid MR", "valid_mr_rate"),
        ]
    if results.get("demo_search"):
        common = " ".join(PLANS["searches"]["demo-search"]["common"])
        lines += [
            "### The CPU demo's recipe, searched on the GPU (SmolLM2-135M in fp32, chosen on validation)",
            "",
            "Variants of the demo's recipe (configs/smollm2-cpu.yaml: LoRA r=16 in fp32, compact prompt) for a "
            f"fixed number of steps instead of its 600 s (`{common}`), 8 at a time on the one GPU; scored on the "
            "validation rows with constrained decoding.",
            "",
            *_search_table(results["demo_search"], "dialogue act", "dialogue_act_accuracy"),
        ]
    return lines


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


def merge(results_paths: list[Path]) -> dict:
    """The results.json of several calls on the same card and day, merged: later files win, key by key (the 7B
    settings and levers one by one). Each 7B measurement keeps the seed recipe's median rate and step time of its
    own call, so that every ratio compares figures of one call. A scaling.json (bench/scaling.sh) goes in as
    `scaling`."""
    results: dict = {"calls": [], "seed_runs": [], "seed_medians": []}
    index = 0
    for path in results_paths:
        data = json.loads(path.read_text())
        index += any(isinstance(v, dict) for v in data.values())  # a file of notes alone is not a call
        if "scaling_2gpu_7b" in data:
            results["scaling"] = data
            results["calls"].append(f"{path.name}: bench/scaling.sh on {data.get('card')} x{data.get('gpus', 2)}")
            continue
        if "members" in data and "scores" in data:  # bench/soup.sh: seeds averaged with `mrtune average`
            results["soup"] = data
            results["calls"].append(f"{path.name}: bench/soup.sh")
            continue
        seven = data.get("mistral7b_shape", {})
        seed = seven.get("seed", {})
        if ok(seed):
            results["seed_runs"] += [{"call": index, **run} for run in seven.get("seed_runs", [seed])]
            results["seed_medians"].append({"call": index, **seed})
            for entry in [
                *seven.get("settings", {}).values(),
                seven.get("default_recipe"),
                *seven.get("levers", {}).values(),
                *seven.get("memory_caps", {}).values(),
                *seven.get("memory_caps_compiled", {}).values(),
            ]:
                if entry:
                    entry.update(
                        seed_useful_tokens_per_s=seed["useful_tokens_per_s"],
                        seed_step_s=seed["step_s"],
                        seed_median_of_runs=seed.get("median_of_runs", 1),
                        call=index,
                    )
        if any(isinstance(v, dict) for v in data.values()):
            results["calls"].append(f"{path.name}: " + ", ".join(k for k in data if isinstance(data[k], dict)))
        for key, value in data.items():
            if key in ("calls", "seed_runs", "seed_medians"):
                continue
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                for inner, item in value.items():  # one level deeper: settings and levers merge by name
                    if isinstance(item, dict) and isinstance(results[key].get(inner), dict) and inner in MERGED_BY_NAME:
                        results[key][inner].update(item)
                    else:
                        results[key][inner] = item
            else:
                results[key] = value
    return results


MERGED_BY_NAME = ("settings", "levers", "fast", "memory_caps", "memory_caps_compiled", "variants", "scored")
"""Parts' entries that several calls (or GPUs of one call) fill in by name: merged, not replaced."""


def publish(results_paths: list[Path], label: str | None = None, keep: list[str] | None = None) -> None:
    """Merge calls (`merge`) and write them into the repository: bench/results/raw-DATE.json, the headline figures
    into bench/results/latest.json (keys not measured again keep their earlier values, and `measured_on` says the
    date of each), and this run's section of BENCHMARKS.md (replaced if the date's section is there, else added
    above the earlier ones)."""
    results = merge(results_paths)
    if label:  # a second run on the same day gets its own section and raw file
        results["label"] = label
    if keep:  # headline keys that a partial run measured less completely than an earlier one
        results["kept"] = keep
    folder = ROOT / "bench" / "results"
    folder.mkdir(exist_ok=True)
    (folder / f"raw-{label or results['date']}.json").write_text(json.dumps(results, indent=2) + "\n")
    latest_path = folder / "latest.json"
    latest = json.loads(latest_path.read_text()) if latest_path.is_file() else {}
    dates = latest.pop("measured_on", {k: latest.get("date") for k in latest if k not in ("card", "date")})
    summary = {k: v for k, v in summarise(results).items() if k not in (keep or [])}
    dates.update({k: results["date"] for k in summary if k not in ("card", "date")})
    latest.update(summary)
    latest["measured_on"] = dates
    latest_path.write_text(json.dumps(latest, indent=2) + "\n")
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start, end = markers(label or results["date"])
    block = markdown(results)
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    elif "<!-- gpu-bench" in text:
        at = text.index("<!-- gpu-bench")
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
