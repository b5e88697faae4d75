"""`mrtune merge`: fold a run's adapter into the base weights and save a standalone model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from mrtune.errors import MrtuneError
from mrtune.model.build import default_device, load_trained_model
from mrtune.model.resolve import load_tokenizer
from mrtune.run.durable import replace_dir
from mrtune.run.rundir import RunDir


def merge(run_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Save base + adapter as one model that `AutoModelForCausalLM.from_pretrained(output_dir)` loads.

    A 4-bit run is merged into the base in its compute dtype (bf16): merging into 4-bit weights would round the
    adapter's update away.
    """
    run = RunDir.open(run_dir)
    config = run.config()
    adapter = run.require_adapter()
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise MrtuneError(f"{output_dir} is not empty: choose another --output or pass --overwrite")
    settings = dataclasses.replace(config.model, quantization="none")
    model = load_trained_model(settings, adapter, default_device(), merge=True)
    model.to("cpu")
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(str(run.tokenizer)).save_pretrained(tmp)
    shutil.copy(run.path / "prompt.txt", tmp / "prompt.txt")  # the prompt the merged model expects
    replace_dir(tmp, output_dir)
    return output_dir
