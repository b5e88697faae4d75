"""mrtune.run.durable: atomic files and directories, modes, locks and the JSONL reader."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mrtune.run import durable
from mrtune.run.durable import (
    LockHeld,
    atomic_file,
    file_lock,
    is_locked,
    is_temp,
    read_jsonl,
    recover_dir,
    replace_dir,
    write_bytes_atomic,
    write_dir_atomic,
    write_json,
    write_text_atomic,
)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Killed(BaseException):
    """A stand-in for the process dying: not an Exception, like KeyboardInterrupt."""


def test_a_write_killed_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_json(target, {"status": "running"})

    def killed(src, dst):
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        write_json(target, {"status": "finished"})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # the temporary file is removed


def test_a_full_disk_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "picture.png"
    write_bytes_atomic(target, b"old")
    with pytest.raises(OSError), atomic_file(target, "wb") as handle:
        handle.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_a_stale_temporary_is_hidden_and_not_read_as_output(tmp_path):
    """A SIGKILL between write and rename leaves the temporary file: it is hidden, marked, and never picked up."""
    target = tmp_path / "metrics.json"
    write_json(target, {"exact_match": 0.5})
    stale = durable.temp_path(target)
    stale.write_text('{"exact_match": 0.9')  # what a killed writer left
    assert is_temp(stale) and not is_temp(target) and stale.name.startswith(".metrics.json.")
    assert str(os.getpid()) in stale.name
    assert list(tmp_path.glob("*.json")) == [target]
    write_json(target, {"exact_match": 0.6})  # a new write does not reuse or trip over it
    assert json.loads(target.read_text()) == {"exact_match": 0.6} and stale.exists()
    assert durable.temp_path(target) != durable.temp_path(target)  # unique per call


def test_files_are_0644_under_umask_022(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.txt", "text")
    write_bytes_atomic(tmp_path / "b.bin", b"\0")
    write_json(tmp_path / "c.json", [])
    assert [mode(tmp_path / n) for n in ("a.txt", "b.bin", "c.json")] == [0o644] * 3


def test_files_follow_a_stricter_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "private.txt", "text")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "private.txt") == 0o600


def test_a_directory_swap_makes_private_files_readable(tmp_path, umask_022):
    """safetensors and mkstemp write 0600 files; the swapped-in directory has the usual modes."""

    def write(directory: Path) -> None:
        (directory / "sub").mkdir()
        for path in (directory / "adapter_model.safetensors", directory / "sub" / "x"):
            path.write_bytes(b"w")
            os.chmod(path, 0o600)
        os.chmod(directory / "sub", 0o700)

    write_dir_atomic(tmp_path / "adapter", write)
    final = tmp_path / "adapter"
    assert mode(final / "adapter_model.safetensors") == 0o644 and mode(final / "sub" / "x") == 0o644
    assert mode(final / "sub") == 0o755 and mode(final) == 0o755


def test_a_failed_directory_write_keeps_the_previous_version(tmp_path):
    final = tmp_path / "checkpoint"
    write_dir_atomic(final, lambda d: (d / "state.json").write_text("1"))

    def killed_midway(directory: Path) -> None:
        (directory / "state.json").write_text("2")
        raise Killed

    with pytest.raises(Killed):
        write_dir_atomic(final, killed_midway)
    assert (final / "state.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    write_dir_atomic(final, lambda d: (d / "weights").write_text("v1"))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == "adapter.tmp":
            raise Killed  # after adapter/ became adapter.old
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        write_dir_atomic(final, lambda d: (d / "weights").write_text("v2"))
    monkeypatch.undo()
    assert not final.exists() and (tmp_path / "adapter.old" / "weights").read_text() == "v1"
    recover_dir(final)
    assert (final / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # and a swap that finds only the previous version puts it back before replacing it
    os.replace(final, tmp_path / "adapter.old")
    built = tmp_path / "built"
    built.mkdir()
    (built / "weights").write_text("v3")
    replace_dir(built, final)
    assert (final / "weights").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_jsonl_reader_skips_a_torn_last_line_and_non_objects(tmp_path):
    path = tmp_path / "history.jsonl"
    assert read_jsonl(path) == ([], 0)
    durable.append_jsonl(path, {"step": 1})
    durable.append_jsonl(path, {"step": 2})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("[1, 2]\n\n")
        handle.write('{"step": 3, "train_lo')  # a kill in the middle of an append
    assert read_jsonl(path) == ([{"step": 1}, {"step": 2}], 2)


LOCK_HOLDER = """
import sys, time
from mrtune.run.durable import file_lock
lock = file_lock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_the_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    for path in (tmp_path / "run", tmp_path / ".cache.lock"):  # a directory, and a lock file created on demand
        if path.name == "run":
            path.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            assert is_locked(path)
            with pytest.raises(LockHeld):
                file_lock(path, blocking=False)
        finally:
            holder.kill()  # SIGKILL: the kernel drops the lock
            holder.wait()
        assert not is_locked(path)
        with file_lock(path, blocking=False) as lock:
            assert lock.held
        assert not lock.held


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    first = file_lock(tmp_path, blocking=False)
    with pytest.raises(LockHeld):
        file_lock(tmp_path, blocking=False)
    first.release()
    file_lock(tmp_path, blocking=False).release()
