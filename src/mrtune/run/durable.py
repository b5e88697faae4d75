"""Durable files: everything mrtune writes goes through here, so a kill, a full disk or a second process never
leaves half a file, a half directory or two writers on one run.

The contracts:
- a file written by `write_text_atomic` / `write_bytes_atomic` / `write_json` / `atomic_file` is either the old
  version or the new one, whole: the new bytes go to a temporary name in the same folder (hidden and unique to the
  process, `.NAME.PID.RANDOM.tmp`, so no `*.json` / `*.png` pattern picks it up), are fsynced and renamed over
  `NAME`, and the folder is fsynced;
- a directory written by `write_dir_atomic` (or swapped in by `replace_dir`) is built as `NAME.tmp`, fsynced, and
  swapped in by two renames through `NAME.old`; `recover_dir` undoes a kill between them;
- new files get the usual modes (0666 less the umask: 0644 for the common umask 022), whatever library wrote them:
  `tempfile.mkstemp` and safetensors would leave them 0600, unreadable to a serving process of another user;
- `file_lock` is an exclusive flock that the kernel drops when its process dies (SIGKILL included), so a stale
  lock never blocks anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: nothing is locked there
    fcntl = None

TEMP_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


# -- modes -----------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask (read from /proc where it can be, since setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def make_readable(tree: Path) -> None:
    """Give `tree` and everything under it the modes a plain `open` / `mkdir` would have (0666 / 0777 less the
    umask), undoing the 0600 of libraries that write through private temporary files."""
    umask = current_umask()
    for path in [tree, *tree.rglob("*")] if tree.is_dir() else [tree]:
        if not path.is_symlink():
            with contextlib.suppress(OSError):
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# -- fsync -----------------------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(tree: Path) -> None:
    """fsync every file and directory under `tree`, `tree` included."""
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    for directory in [tree, *(d for d in tree.rglob("*") if d.is_dir() and not d.is_symlink())]:
        fsync_dir(directory)


# -- files -----------------------------------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """Whether `path` is a temporary name of `atomic_file` (a leftover, if no write is in progress)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` for a library that writes to a path (GGUF, safetensors); on a clean exit the
    file written there is fsynced and renamed over `path`, with the usual mode (the umask decides, not the library).

    On any exception (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on a clean exit it is fsynced and renamed over `path`.

    On any exception (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        # O_EXCL: never write through someone else's file; 0o666: the umask decides, as for a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    """`data` as indented UTF-8 JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The objects of a JSONL file, and how many non-blank lines were left out: a line torn by a kill in the middle
    of an append, or one that holds something other than an object. A missing file has no records."""
    if not Path(path).is_file():
        return [], 0
    records, skipped = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a kill can tear only this last line, which `read_jsonl` leaves out."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# -- directories -----------------------------------------------------------------------------------------------
def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written directory into place; the previous version stays whole until the swap.

    POSIX has no atomic swap of two directories, so there is a moment between the two renames when only
    `final.old` exists; `recover_dir` puts it back after a kill in that moment.
    """
    make_readable(tmp_dir)
    fsync_tree(tmp_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        if not (final_dir.exists() or final_dir.is_symlink()):  # a kill left only the previous version
            os.replace(old, final_dir)
        else:
            remove_path(old)
    if final_dir.exists() or final_dir.is_symlink():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    with contextlib.suppress(OSError):
        remove_path(old)


def write_dir_atomic(final_dir: Path, write: Callable[[Path], None]) -> None:
    """Build a directory as `final.tmp` with `write(tmp_dir)`, then swap it in with `replace_dir`.

    On any failure (a full disk, an exception, Ctrl-C) the temporary directory is removed and the previous
    version of `final_dir` is left as it was.
    """
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(final_dir: Path) -> None:
    """Undo what a kill in the middle of `replace_dir` or `write_dir_atomic` left behind.

    A half-written `final.tmp` is dropped; if the kill came between the two renames, `final.old` (the previous,
    complete version) is put back as `final`.
    """
    old = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and old.is_dir():
        os.replace(old, final_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final_dir.with_name(final_dir.name + ".tmp"), ignore_errors=True)


# -- locks -----------------------------------------------------------------------------------------------------
class LockHeld(OSError):
    """Another process holds the lock (raised by a non-blocking `file_lock`)."""


class FileLock:
    """An exclusive flock on `path`: a directory (locked itself, so no lock file is left behind) or a lock file
    (created if missing). The kernel releases it when the descriptor closes or the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> FileLock:
        if fcntl is None or self._fd is not None:
            return self
        if self.path.is_dir():
            fd = os.open(self.path, os.O_RDONLY)
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as error:
            os.close(fd)
            raise LockHeld(error.errno, f"{self.path} is locked by another process") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def file_lock(path: Path, *, blocking: bool = True) -> FileLock:
    """Take an exclusive lock on `path` and return it held (`with file_lock(p): ...` releases it at the end);
    without `blocking`, raise `LockHeld` at once if another process holds it."""
    return FileLock(path).acquire(blocking)


def is_locked(path: Path) -> bool:
    """Whether another process holds a `file_lock` on `path` right now (a probe that takes and drops it)."""
    if fcntl is None or not Path(path).exists():
        return False
    try:
        file_lock(path, blocking=False).release()
    except LockHeld:
        return True
    return False
