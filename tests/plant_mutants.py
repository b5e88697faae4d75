"""Plant each hand-written mutant of tests/mutants.yaml in a temporary copy of src/ and run only its named tests.

    python tests/plant_mutants.py                 # every mutant; exit 1 unless every one is killed
    python tests/plant_mutants.py --only ID ...   # some of them
    python tests/plant_mutants.py --list          # ids, files and tests, nothing run
    python tests/plant_mutants.py --check         # only check that every snippet is still found

A mutant is one realistic bug (file, an exact `original` snippet, its `replacement`, the tests that must fail).
It is killed when its tests fail (pytest exit status 1). Anything else is reported and fails the run: a
snippet found zero or several times (the source moved on: fix the snippet in mutants.yaml), tests that
error, collect nothing, or time out, and a mutant whose tests pass (it survived).

Each run checks that `mrtune` is imported from the mutated copy (PYTHONPATH puts the copy first; the editable
install of the working tree comes after it), so a kill is the mutant's doing and not a test of the original code.
Before the mutants, the union of their tests runs once on the unmutated copy: a mutant "killed" by tests that fail
anyway kills nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "tests" / "mutants.yaml"
KEYS = {"id", "file", "original", "replacement", "tests", "bug"}


def load_mutants(path: Path = MUTANTS) -> list[dict]:
    mutants = yaml.safe_load(path.read_text(encoding="utf-8"))
    problems = []
    seen = set()
    for index, mutant in enumerate(mutants):
        name = mutant.get("id", f"#{index}")
        if set(mutant) != KEYS:
            problems.append(f"{name}: keys {sorted(mutant)} (expected {sorted(KEYS)})")
        if name in seen:
            problems.append(f"{name}: duplicate id")
        seen.add(name)
        if mutant.get("original") == mutant.get("replacement"):
            problems.append(f"{name}: the replacement equals the original")
    if problems:
        sys.exit(f"{path}: " + "; ".join(problems))
    return mutants


def plant(tree: Path, mutant: dict) -> str:
    """Replace the mutant's snippet in the copy at `tree`; return the file's original text."""
    path = tree / mutant["file"]
    if not path.is_file():
        raise LookupError(f"{mutant['file']} does not exist (moved?)")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant["original"])
    if count != 1:
        raise LookupError(f"`{mutant['original']}` occurs {count} times in {mutant['file']} (expected exactly once)")
    path.write_text(text.replace(mutant["original"], mutant["replacement"]), encoding="utf-8")
    return text


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    """pytest on `tests` (node ids relative to the repository) with `tree/src` imported as mrtune."""
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["MRTUNE_EXPECTED_SOURCE"] = str(tree / "src")
    env.setdefault("OMP_NUM_THREADS", "1")  # mutants run side by side (--jobs): one thread each, no oversubscription
    started = time.perf_counter()
    check = "import mrtune, os, sys; sys.exit(0 if mrtune.__file__.startswith(os.environ['MRTUNE_EXPECTED_SOURCE'])"
    check += " else 'mrtune imported from ' + mrtune.__file__)"
    probe = subprocess.run([sys.executable, "-c", check], env=env, cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        return -1, probe.stderr.strip() or probe.stdout.strip(), 0.0
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -2, f"timed out after {timeout:.0f} s", time.perf_counter() - started
    return result.returncode, result.stdout[-3000:] + result.stderr[-2000:], time.perf_counter() - started


def run_mutant(mutant: dict, workdir: Path, timeout: float) -> tuple[dict, int, str, float]:
    """Copy src/ into `workdir`, plant the mutant there, run its tests."""
    tree = workdir / mutant["id"]
    copy_source(tree)
    plant(tree, mutant)
    code, output, seconds = run_tests(tree, mutant["tests"], timeout)
    shutil.rmtree(tree, ignore_errors=True)
    return mutant, code, output, seconds


def copy_source(tree: Path) -> None:
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet is found, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (each in its own copy)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one mutant's tests")
    args = parser.parse_args(argv)
    mutants = load_mutants()
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutants}
        if unknown:
            sys.exit(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m["id"] in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant['id']:<34} {mutant['file']:<34} {' '.join(mutant['tests'])}")
        return 0
    started = time.perf_counter()
    failures = []
    with tempfile.TemporaryDirectory(prefix="mrtune-mutants-") as tmp:
        workdir = Path(tmp)
        baseline = workdir / "baseline"
        copy_source(baseline)
        missing = []
        for mutant in mutants:  # every snippet is checked before anything runs: a stale list fails at once
            try:
                (baseline / mutant["file"]).write_text(plant(baseline, mutant), encoding="utf-8")
            except LookupError as error:
                missing.append(f"{mutant['id']}: {error}")
        if missing:
            print("mutants whose snippet is not found exactly once (update tests/mutants.yaml):", file=sys.stderr)
            print("\n".join(f"  {line}" for line in missing), file=sys.stderr)
            return 1
        if args.check:
            print(f"every snippet of the {len(mutants)} mutants is found exactly once")
            return 0
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m["tests"]))
            code, output, seconds = run_tests(baseline, tests, args.timeout * 2)
            print(f"baseline: {len(tests)} test node(s) on the unmutated code: exit {code} in {seconds:.0f} s")
            if code != 0:
                print(output, file=sys.stderr)
                print("the named tests fail without any mutant: fix them first", file=sys.stderr)
                return 1
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [pool.submit(run_mutant, mutant, workdir, args.timeout) for mutant in mutants]
            for future in as_completed(runs):
                mutant, code, output, seconds = future.result()
                verdict = {1: "killed", 0: "SURVIVED"}.get(code, f"ERROR (exit {code})")
                print(f"{verdict:<10} {mutant['id']:<34} {seconds:5.0f} s  {mutant['bug']}", flush=True)
                if code != 1:
                    failures.append(mutant["id"])
                    print(output, file=sys.stderr)
    total = time.perf_counter() - started
    print(f"{len(mutants) - len(failures)} of {len(mutants)} mutants killed in {total:.0f} s")
    if failures:
        print(f"not killed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
