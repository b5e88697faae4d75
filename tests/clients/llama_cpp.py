"""llama.cpp as an independent client of `mrtune export`: node-llama-cpp (prebuilt llama.cpp for linux-x64, no
compiler), pinned, installed once into the mrtune cache, driven by llama_cpp_decode.mjs.

Used by tests/test_llama_cpp.py and, by hand, for BENCHMARKS.md:
    python tests/clients/llama_cpp.py RUN --rows 200 --workdir DIR
compares llama.cpp's greedy MRs from the exported GGUF (f32, f16, q8_0; without and with the exported GBNF
grammar; and the LoRA GGUF on the Q4_1 base) with mrtune's own on the same test rows, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

NODE_LLAMA_CPP = "node-llama-cpp@3.21.1"  # pinned: prebuilt binaries of one llama.cpp release
SCRIPT = Path(__file__).with_name("llama_cpp_decode.mjs")


def install_dir() -> Path:
    from mrtune.model.resolve import default_cache_dir

    return default_cache_dir() / NODE_LLAMA_CPP.replace("@", "-")


def ensure_node_llama_cpp() -> Path:
    """The directory whose node_modules holds node-llama-cpp (installed on first use, ~700 MB with the prebuilt
    CUDA/Vulkan variants npm fetches beside the CPU one)."""
    directory = install_dir()
    if (directory / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "package.json").write_text('{"private": true, "type": "module"}\n')
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--save-exact", NODE_LLAMA_CPP],
        cwd=directory,
        check=True,
        capture_output=True,
        text=True,
    )
    return directory


def llama_cpp_decode(
    model: Path,
    prompts: list[str],
    workdir: Path,
    *,
    grammar: Path | None = None,
    lora: Path | None = None,
    max_tokens: int = 160,
    threads: int = 2,
) -> tuple[list[str], float]:
    """Greedy completions of `prompts` by llama.cpp, and the seconds they took in all (model load excluded)."""
    node_dir = ensure_node_llama_cpp()
    script = node_dir / SCRIPT.name  # beside node_modules, so that `import "node-llama-cpp"` resolves
    shutil.copyfile(SCRIPT, script)
    tag = f"{model.stem}{'-grammar' if grammar else ''}{'-lora' if lora else ''}"
    prompts_file, out_file = workdir / f"prompts-{tag}.jsonl", workdir / f"llama-cpp-{tag}.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    command = ["node", str(script), str(model), str(prompts_file), str(out_file)]
    command += ["--threads", str(threads), "--max-tokens", str(max_tokens)]
    command += ["--grammar", str(grammar)] if grammar else []
    command += ["--lora", str(lora)] if lora else []
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=node_dir)
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    return [row["text"].strip() for row in rows], sum(row["seconds"] for row in rows)


def agreement(ours: list[str], theirs: list[str]) -> float:
    return sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)


def compare(run_dir: Path, rows: int, workdir: Path, threads: int = 2) -> dict:
    """Export `run_dir` (a finished run of the embedded model) and decode `rows` test rows with mrtune and with
    llama.cpp; return the agreement, exact match, validity, speed and file-size numbers."""
    from mrtune.export.command import export
    from mrtune.infer.evaluate import evaluate
    from mrtune.run.rundir import RunDir
    from mrtune.task.grammar import MRGrammar
    from mrtune.task.mr import Vocabulary, score
    from mrtune.task.prompts import build_prompt

    run = RunDir(run_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "f32": export(run.path, "gguf", workdir / "model-f32.gguf", quant="f32", overwrite=True),
        "f16": export(run.path, "gguf", workdir / "model-f16.gguf", quant="f16", overwrite=True),
        "q8_0": export(run.path, "gguf", workdir / "model-q8_0.gguf", quant="q8_0", overwrite=True),
        "lora": export(run.path, "gguf-lora", workdir / "lora-f16.gguf", overwrite=True),
        "gbnf": export(run.path, "gbnf", workdir / "mr.gbnf", overwrite=True),
    }
    results: dict = {"rows": rows, "file_mb": {k: round(v.stat().st_size / 1e6, 1) for k, v in files.items()}}
    max_tokens = run.config().eval.max_new_tokens
    for constrained in (False, True):
        metrics = evaluate(run.path, limit=rows, constrained=constrained, progress=False)
        predictions = [
            json.loads(line) for line in (run.eval_dir("test") / "predictions.jsonl").read_text().splitlines()
        ]
        key = "mrtune_constrained" if constrained else "mrtune"
        results[key] = {k: metrics[k] for k in ("exact_match", "valid_mr_rate", "rows_per_s")}
        results[key]["predictions"] = [p["prediction"] for p in predictions]
    references = [p["reference"] for p in predictions]
    prompts = [build_prompt(run.config().data.prompt_style, p["target"]) for p in predictions]
    from mrtune.model.resolve import find_embedded_gguf

    grammar = MRGrammar(Vocabulary.from_dict(json.loads(run.vocabulary.read_text())))
    cases = {
        "f32": (files["f32"], None, None),
        "f16": (files["f16"], None, None),
        "q8_0": (files["q8_0"], None, None),
        "f16+gbnf": (files["f16"], files["gbnf"], None),
        "q4_1+lora": (find_embedded_gguf(), None, files["lora"]),
    }
    for name, (model, grammar_file, lora) in cases.items():
        started = time.perf_counter()
        texts, seconds = llama_cpp_decode(
            model, prompts, workdir, grammar=grammar_file, lora=lora, max_tokens=max_tokens, threads=threads
        )
        wall = time.perf_counter() - started
        reference = results["mrtune_constrained" if grammar_file else "mrtune"]["predictions"]
        results[name] = {
            "agreement_with_mrtune": round(agreement(reference, texts), 4),
            "exact_match": round(score(texts, references)["exact_match"], 4),
            "grammar_valid_rate": round(sum(grammar.accepts(t) for t in texts) / len(texts), 4),
            "rows_per_s": round(len(texts) / seconds, 2),
            "wall_s_with_load": round(wall, 1),
            "predictions": texts,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run of the embedded model (a copy: its eval/ is rewritten)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    results = compare(args.run, args.rows, args.workdir, args.threads)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    summary = {
        k: {kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v
        for k, v in results.items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
