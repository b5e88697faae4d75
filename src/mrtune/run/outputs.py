"""The one rule for every command that writes a file or directory the user names (merge, predict, export, ...).

1. Nothing is removed or overwritten that the command did not create, unless `--overwrite` names that very output;
   even then a directory is only replaced if it looks like one the command writes (`looks_ours`).
2. An output that is a protected path (the run, an input file), lies inside one, or contains one is refused.
3. The output is built under a temporary name unique to the process, beside the final name, and moved into place
   only when complete; the previous version is kept under a backup name unique to the process until then. A
   failure, Ctrl-C or SIGTERM leaves no partial output under the final name and the previous version in place.

    check_output(path, protected={"the run": run.path}, overwrite=args.overwrite, kind="dir", looks_ours=...)
    with building_dir(path) as tmp:
        ...write into tmp...
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from mrtune.errors import MrtuneError
from mrtune.run.durable import fsync_dir, fsync_tree, remove_path, write_text_atomic


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    path: str | Path,
    *,
    protected: Mapping[str, Path],
    overwrite: bool,
    kind: Literal["file", "dir"],
    option: str = "--output",
    looks_ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Refuse an output the rule above forbids, before any work is done; returns it as a Path."""
    output = Path(path)
    where = output.resolve()
    for name, guarded in protected.items():
        guarded = Path(guarded).resolve()
        if where == guarded or _inside(where, guarded) or _inside(guarded, where):
            relation = "is" if where == guarded else "is inside" if _inside(where, guarded) else "contains"
            raise MrtuneError(
                f"{option} {output} {relation} {name} ({guarded}): choose a path outside it (nothing was touched)"
            )
    if not (output.exists() or output.is_symlink()):
        return output
    if kind == "file" and not output.is_file():
        raise MrtuneError(f"{option} {output} exists and is not a regular file: choose a new file name")
    if kind == "dir" and not output.is_dir():
        raise MrtuneError(f"{option} {output} exists and is not a directory: choose a new directory name")
    if kind == "dir" and not any(output.iterdir()):
        return output  # an empty directory holds nothing to lose
    if not overwrite:
        raise MrtuneError(f"{option} {output} already exists: pass --overwrite to replace it, or choose another path")
    if kind == "dir" and looks_ours is not None and not looks_ours(output):
        raise MrtuneError(
            f"{option} {output} holds something this command did not write, so --overwrite does not replace it: "
            "choose another path (nothing was touched)"
        )
    return output


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so the cleanup below runs as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def publish(tmp: Path, final: Path) -> None:
    """Move the complete `tmp` to `final`; a previous `final` is set aside under a name unique to this process
    and removed only once the new one is in place (put back if the move fails)."""
    backup = None
    if final.exists() or final.is_symlink():
        backup = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{os.getpid()}-"))
        backup.rmdir()  # mkdtemp reserved a unique name; the rename below takes it
        os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        if backup is not None and not final.exists():
            os.replace(backup, final)
        raise
    fsync_dir(final.parent)
    if backup is not None:
        remove_path(backup)


@contextlib.contextmanager
def building_dir(final: str | Path) -> Iterator[Path]:
    """A fresh directory beside `final`, under a name unique to this process; moved to `final` when the block
    ends normally, removed (and `final` left as it was) when it raises, Ctrl-C and SIGTERM included."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); an output is as public as an ordinary directory
    try:
        with _sigterm_raises():
            yield tmp
            fsync_tree(tmp)
            publish(tmp, final)
    finally:
        if tmp.exists():
            remove_path(tmp)


def write_output_text(final: str | Path, text: str) -> None:
    """Write a text output atomically (a unique temporary file, fsync, rename), SIGTERM included."""
    with _sigterm_raises():
        write_text_atomic(Path(final), text)
