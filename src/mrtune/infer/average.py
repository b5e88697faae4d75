"""`mrtune average`: several runs' fine-tuned weights averaged into one new run (a uniform "model soup").

Runs fine-tuned from the same base (the same recipe with other seeds, say) can be averaged weight by weight: the
average decodes at one model's cost, where an ensemble (`--ensemble`) pays one decode per model. For LoRA runs the
average of the updates, mean_i(s_i B_i A_i), is itself a LoRA update of rank sum_i(r_i): A stacks every A_i, B every
B_i times s_i / n, and the scaling is 1. So the averaged run is exact (no SVD truncation) and is an ordinary run
directory: evaluate, predict, serve, merge and export read it like any other. Whole modules (train.method=full, or
modules saved beside the adapters) are averaged as they are.

Weight-decomposed LoRA (DoRA) is refused: its magnitude vectors rescale each weight's norm, so the average of DoRA
models is not a DoRA model of the averaged updates.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from mrtune import __version__
from mrtune.config import Config, to_yaml
from mrtune.errors import MrtuneError
from mrtune.run.outputs import building_dir, check_output
from mrtune.run.rundir import RunDir, refuse_repeats

WEIGHTS = "adapter_model.safetensors"


def looks_averaged(directory: Path) -> bool:
    """Whether `directory` holds a run this command wrote (so `--overwrite` may replace it, and nothing else)."""
    try:
        return "averaged_from" in json.loads((directory / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def is_lora_a(name: str) -> bool:
    """A LoRA down-projection (rank x in): the tensors stacked along the rank."""
    return ".lora_A." in name or ".lora_embedding_A." in name


def is_lora_b(name: str) -> bool:
    """A LoRA up-projection (out x rank): the tensors put side by side."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def lora_scaling(adapter_config: dict) -> float:
    """The factor peft multiplies B A by: alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    rank, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / (rank**0.5 if adapter_config.get("use_rslora") else rank)


def average_tensors(members: list[tuple[dict, float]]) -> dict:
    """The averaged adapter's tensors from each member's (tensors, LoRA scaling): lora_A (and lora_embedding_A)
    stacked along the rank, lora_B (lora_embedding_B) side by side times scaling / n, anything else (a whole module)
    averaged. Every member must hold the same tensor names with the same shapes outside the rank."""
    import torch

    n = len(members)
    out = {}
    for name in members[0][0]:
        tensors = [tensors[name] for tensors, _ in members]
        if is_lora_a(name):
            out[name] = torch.cat(tensors, dim=0)
        elif is_lora_b(name):
            out[name] = torch.cat([t * (scaling / n) for t, (_, scaling) in zip(tensors, members)], dim=1)
        else:
            out[name] = (torch.stack([t.float() for t in tensors]).mean(dim=0)).to(tensors[0].dtype)
    return out


def _check_members(runs: list[RunDir]) -> list[tuple[RunDir, Config, dict]]:
    """Each run checked whole, then checked against the first: one base model, one prompt, one vocabulary, one
    set of adapted modules. Returns (run, config, adapter_config) for each."""
    refuse_repeats(runs, "listed", "each run counts once in the average")
    members = []
    for run in runs:
        config = run.config()
        run.check_intact(config)
        if run.status() != "finished":
            raise MrtuneError(
                f"run {run.path} has not finished (status: {run.status()}): average finished runs only (resume it "
                f"with `mrtune train --resume {run.path}`)"
            )
        adapter_config = run.read_json(run.adapter / "adapter_config.json")
        if adapter_config.get("use_dora"):
            raise MrtuneError(
                f"run {run.path} trained DoRA adapters (lora.dora), whose magnitudes do not average into one model: "
                "average LoRA or full fine-tuning runs, or combine DoRA runs with `--ensemble`"
            )
        if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
            raise MrtuneError(f"run {run.path}'s adapter has per-module ranks, which `mrtune average` does not handle")
        members.append((run, config, adapter_config))
    first, first_config, _ = members[0]
    for run, config, _ in members[1:]:
        differences = [
            what
            for what, same in (
                ("model.name", config.model.name == first_config.model.name),
                ("train.method", config.train.method == first_config.train.method),
                ("prompt.txt", run.read_prompt() == first.read_prompt()),
                ("vocabulary.json", _vocabulary(run) == _vocabulary(first)),
            )
            if not same
        ]
        if differences:
            raise MrtuneError(
                f"runs {first.path} and {run.path} differ in {', '.join(differences)}: average runs of one base model "
                "trained with one prompt on the same data (other seeds or settings)"
            )
    return members


def _vocabulary(run: RunDir) -> dict | None:
    return run.read_vocabulary() if run.vocabulary.is_file() else None


def _load_weights(members: list[tuple[RunDir, Config, dict]]) -> list[tuple[dict, float]]:
    from safetensors.torch import load_file

    loaded = []
    shapes = None
    for run, config, adapter_config in members:
        tensors = load_file(str(run.adapter / WEIGHTS))
        scaling = 1.0 if config.train.method == "full" else lora_scaling(adapter_config)
        # Shapes with the rank left out (A's rows, B's columns), which must agree for the stacking to be an average.
        mine = {name: _shape_without_rank(name, t.shape) for name, t in tensors.items()}
        if shapes is None:
            shapes = mine
        elif mine != shapes:
            names = sorted(set(mine) ^ set(shapes)) or sorted(k for k in mine if mine[k] != shapes[k])
            raise MrtuneError(
                f"run {run.path} adapts other modules than {members[0][0].path} (first difference: {names[0]}): "
                "average runs with the same lora.target_modules and lora.top_layers"
            )
        loaded.append((tensors, scaling))
    return loaded


def _shape_without_rank(name: str, shape) -> tuple:
    if is_lora_a(name):
        return tuple(shape[1:])
    if is_lora_b(name):
        return tuple(shape[:1]) + tuple(shape[2:])
    return tuple(shape)


def average(run_dirs: list[str | Path], output_dir: str | Path, *, overwrite: bool = False) -> RunDir:
    """Write a new run at `output_dir` whose model is the weight average of `run_dirs`' models (see the module
    docstring). Every run and the output are checked before anything is written; the output follows
    mrtune.run.outputs (built aside, moved into place whole; --overwrite replaces only a run this command wrote)."""
    if len(run_dirs) < 2:
        raise MrtuneError("`mrtune average` needs at least two runs: give the runs to average, then --output-dir")
    runs = [RunDir.open(path) for path in run_dirs]
    protected = {f"the run {run.path}": run.path for run in runs}
    output_dir = check_output(
        output_dir,
        protected=protected,
        overwrite=overwrite,
        kind="dir",
        option="--output-dir",
        looks_ours=looks_averaged,
    )
    members = _check_members(runs)
    from safetensors.torch import save_file

    weights = average_tensors(_load_weights(members))
    first, first_config, first_adapter = members[0]
    config = _averaged_config(first_config, weights)
    adapter_config = dict(first_adapter)
    if config.train.method == "lora":
        adapter_config.update(r=config.lora.r, lora_alpha=config.lora.alpha, use_rslora=False, init_lora_weights=True)
    with building_dir(output_dir) as tmp:
        shutil.copytree(first.tokenizer, tmp / "tokenizer")
        shutil.copyfile(first.path / "prompt.txt", tmp / "prompt.txt")
        if first.vocabulary.is_file():
            shutil.copyfile(first.vocabulary, tmp / "vocabulary.json")
        (tmp / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(weights, str(tmp / "adapter" / WEIGHTS), metadata={"format": "pt"})
        info = {
            "mrtune_version": __version__,
            "status": "finished",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model_path": first.info().get("model_path", config.model.name),
            "averaged_from": [str(run.path.resolve()) for run, _, _ in members],
        }
        (tmp / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    run = RunDir(output_dir)
    from mrtune.export.portable import make_portable

    make_portable(run)  # the adapter's model card and tokenizer, as `mrtune train` leaves a finished run
    return run


def _averaged_config(config: Config, weights: dict) -> Config:
    """The first run's config, with the LoRA section describing the averaged adapter: its stacked rank, scaling 1
    (alpha = r), a plain update (no rsLoRA; PiSSA/OLoRA adapters are saved converted to plain LoRA already)."""
    if config.train.method != "lora":
        return config
    rank = next(t.shape[0] for name, t in weights.items() if is_lora_a(name))
    lora = dataclasses.replace(config.lora, r=rank, alpha=rank, rslora=False, init="default")
    return dataclasses.replace(config, lora=lora)
