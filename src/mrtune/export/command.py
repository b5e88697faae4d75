"""`mrtune export RUN --format gguf|gguf-lora|gbnf|lark --output FILE`: a finished run's model or grammar as one
file for other engines. Every problem is reported before anything is written; the file is written under a
temporary name beside the output and renamed into place, so a kill or a full disk never leaves half a file there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mrtune.errors import MrtuneError
from mrtune.export.gguf_export import QUANTS, write_lora_gguf, write_merged_gguf
from mrtune.export.grammars import grammar
from mrtune.run.durable import atomic_path, is_disk_full
from mrtune.run.outputs import check_output
from mrtune.run.rundir import RunDir
from mrtune.task.mr import Vocabulary

FORMATS = ("gguf", "gguf-lora", "gbnf", "lark")


def _check_run(run: RunDir) -> None:
    info = run.info()
    status = info.get("status")
    if status == "diverged":
        raise MrtuneError(
            f"run {run.path} diverged at step {info.get('diverged_at_step')}: there is no trustworthy model to "
            "export; train it again with a lower train.learning_rate"
        )
    if status != "finished":
        raise MrtuneError(
            f"run {run.path} is not finished (status: {status}): let `mrtune train` finish it "
            f"(`mrtune train --resume {run.path}` continues a stopped run), then export"
        )
    run.require_adapter()


def _write(output: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` under a temporary name, renamed onto `output` when complete (`durable.atomic_path`); a
    full disk becomes a one-line error and leaves `output` as it was."""
    try:
        with atomic_path(output) as tmp:
            write(tmp)
    except OSError as error:
        if is_disk_full(error):
            raise MrtuneError(
                f"the disk of {output.parent} is full: free space and export again ({output} was not written)"
            ) from None
        raise


def export(
    run_dir: str | Path, fmt: str, output: str | Path, quant: str | None = None, overwrite: bool = False
) -> Path:
    """Write `run_dir`'s model (gguf: merged; gguf-lora: the adapter alone) or MR grammar (gbnf, lark) to
    `output`; `quant` (f16 by default, q8_0, f32) applies to the GGUF formats."""
    if fmt not in FORMATS:
        raise MrtuneError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if quant is not None and fmt not in ("gguf", "gguf-lora"):
        raise MrtuneError(f"--quant applies to --format gguf and gguf-lora, not {fmt}: drop it")
    quant = quant or "f16"
    if quant not in QUANTS:
        raise MrtuneError(f"unknown quantization {quant!r}: use one of {', '.join(QUANTS)}")
    output = Path(output)
    run = RunDir.open(run_dir)
    _check_run(run)
    output = check_output(output, protected={"the run": run.path}, overwrite=overwrite, kind="file")
    if not output.parent.is_dir():
        raise MrtuneError(f"the directory of --output {output} does not exist: create {output.parent} first")
    config = run.config()
    run.check_intact(config)  # a damaged run is named in one line (`run damaged: FILE: what`), nothing written
    if fmt in ("gbnf", "lark"):
        vocabulary = Vocabulary.from_dict(run.read_vocabulary())
        # The run's own decoding: without value constraints when its config turned them off.
        text = grammar(vocabulary if config.eval.constrain_values else vocabulary.without_values(), fmt)
        _write(output, lambda path: path.write_text(text, encoding="utf-8"))
    else:
        write = write_merged_gguf if fmt == "gguf" else write_lora_gguf
        _write(output, lambda path: write(run.path.name, config, run.adapter, path, quant))
    return output
