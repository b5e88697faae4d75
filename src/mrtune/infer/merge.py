"""`mrtune merge`: fold a run's adapter into the base weights and save a standalone model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mrtune.infer.predict import load_run_model
from mrtune.model.resolve import load_tokenizer
from mrtune.run.outputs import building_dir, check_output
from mrtune.run.rundir import RunDir


def looks_merged(directory: Path) -> bool:
    """Whether `directory` holds what merge writes (so `--overwrite` may replace it): a model config and a prompt."""
    return (directory / "config.json").is_file() and (directory / "prompt.txt").is_file()


def merge(run_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Save base + adapter as one model that `AutoModelForCausalLM.from_pretrained(output_dir)` loads.

    A 4-bit run is merged into the base in its compute dtype (bf16): merging into 4-bit weights would round the
    adapter's update away. Every run file merge reads is checked first; the output follows mrtune.run.outputs.
    """
    run = RunDir.open(run_dir)
    config = run.config()
    output_dir = check_output(
        output_dir, protected={"the run": run.path}, overwrite=overwrite, kind="dir", looks_ours=looks_merged
    )
    run.check_intact(config)
    adapter = run.require_adapter(config)
    prompt = run.read_prompt()
    tokenizer = load_tokenizer(run.require_tokenizer())
    settings = dataclasses.replace(config.model, quantization="none")
    model = load_run_model(run, settings, adapter)
    model.to("cpu")
    with building_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prompt.txt").write_text(prompt, encoding="utf-8")  # the prompt the merged model expects
    return output_dir
