"""`mrtune export RUN --format gguf|gguf-lora|gbnf|lark --output FILE`: a finished run's model or grammar as one
file for other engines. Every problem is reported before anything is written; the file is written under a
temporary name beside the output and renamed into place, so a kill or a full disk never leaves half a file there.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mrtune.errors import MrtuneError
from mrtune.export.gguf_export import QUANTS, write_lora_gguf, write_merged_gguf
from mrtune.export.grammars import grammar
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


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise MrtuneError(f"--output {output} is a directory: name a file")
    if output.exists() and not overwrite:
        raise MrtuneError(f"--output {output} exists: pass --overwrite to replace it, or name another file")
    if not output.parent.is_dir():
        raise MrtuneError(f"the directory of --output {output} does not exist: create {output.parent} first")


def write_file_atomic(output: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` then fsync and rename onto `output` (mode 0644); on any failure the temporary file is
    removed and `output` is left as it was. A full disk becomes a one-line MrtuneError."""
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MrtuneError(
                f"the disk of {output.parent} is full: free space and export again ({output} was not written)"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    _check_output(output, overwrite)
    config = run.config()
    if fmt in ("gbnf", "lark"):
        if not run.vocabulary.is_file():
            raise MrtuneError(f"{run.vocabulary} is missing: the run's grammar cannot be written")
        vocabulary = Vocabulary.from_dict(json.loads(run.vocabulary.read_text(encoding="utf-8")))
        text = grammar(vocabulary, fmt)
        write_file_atomic(output, lambda path: path.write_text(text, encoding="utf-8"))
    else:
        write = write_merged_gguf if fmt == "gguf" else write_lora_gguf
        write_file_atomic(output, lambda path: write(run.path.name, config, run.adapter, path, quant))
    return output
