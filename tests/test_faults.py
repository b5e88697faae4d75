"""The fault suite: bad inputs and faults during training, each met with a clear error and no data lost.

Every test asserts the error text (what went wrong, where, and what to do) and that nothing already on disk
changed: the input files, an existing run, the last checkpoint, the best adapter (compared byte for byte).
Faults that stop a run are then survived: the run resumes and ends exactly where an uninterrupted one ends.
BENCHMARKS.md ("Reliability") counts these tests.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import snapshot
from safetensors.torch import load_file

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.errors import MrtuneError
from mrtune.run.durable import write_dir_atomic
from mrtune.run.rundir import RunDir
from mrtune.task.data import Example, find_duplicates, load_split
from mrtune.train.batching import tokenize_examples
from mrtune.train.checkpoint import STATE_FILE, recover_run

GOOD = {"target": "Portal 2 is a great game.", "meaning_representation": "inform(name[Portal 2], rating[excellent])"}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# -- 1. bad data: every problem of a file at once, with file, line and field ----------------------------------
BAD_FILES = {
    "not-utf8": (
        "d.jsonl",
        jsonl(GOOD).encode()
        + '{"target": "caf\xe9"}\n'.encode("latin-1")
        + jsonl(GOOD).encode()
        + b'{"target": "\xff\xfe"}\n',
        [
            "d.jsonl:2: the line is not UTF-8 (its byte 16)",
            "d.jsonl:4: the line is not UTF-8",
            "2 bad row(s)",
            "re-save the file as UTF-8",
        ],
    ),
    "bad-json-lines": (
        "d.jsonl",
        jsonl(GOOD, "{not json", GOOD, '{"target": "x",}'),
        [
            "d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
            "d.jsonl:4: not valid JSON",
            "2 bad row(s)",
        ],
    ),
    "not-an-object": (
        "d.jsonl",
        jsonl("[1, 2]", '"text"', GOOD),
        ["d.jsonl:1: expected a JSON object, got list", "d.jsonl:2: expected a JSON object, got str"],
    ),
    "missing-fields": (
        "d.jsonl",
        jsonl({"target": "x"}, GOOD, {"meaning_representation": "inform(name[A])"}),
        ["d.jsonl:1: missing field 'meaning_representation'", "d.jsonl:3: missing field 'target'"],
    ),
    "empty-fields": (
        "d.jsonl",
        jsonl({**GOOD, "target": "  "}, {**GOOD, "meaning_representation": 7}),
        [
            "d.jsonl:1: field 'target' is empty or not text",
            "d.jsonl:2: field 'meaning_representation' is empty or not text",
        ],
    ),
    "mr-does-not-parse": (
        "d.jsonl",
        jsonl(
            GOOD,
            {**GOOD, "meaning_representation": "inform(name Portal 2)"},
            {**GOOD, "meaning_representation": "inform(name[Portal 2]"},
        ),
        [
            "d.jsonl:2: 'meaning_representation' is not a meaning representation",
            "d.jsonl:3: 'meaning_representation' is not a meaning representation",
        ],
    ),
    "wrong-field-names": (
        "d.jsonl",
        jsonl({"text": "a", "mr": "inform(name[A])"}, {"text": "b", "mr": "x()"}),
        ["no row has the field 'target' (fields found: mr, text)", "no row has the field 'meaning_representation'"],
    ),
    "csv-field-counts": (
        "d.csv",
        'meaning_representation,target\n"inform(name[A, B])",A B.\ninform(name[C]),C,extra\ninform(name[D])\n',
        ["d.csv:3: 3 fields where the header names 2", "d.csv:4: 1 fields where the header names 2"],
    ),
    "csv-quoted-newline": (
        "d.csv",
        'meaning_representation,target\n"inform(name[A])","A is\non two lines."\ninform(name B),B.\n',
        ["d.csv:4: 'meaning_representation' is not a meaning representation", "1 bad row(s)"],
    ),
    "json-array-item": ("d.json", json.dumps([GOOD, 3, GOOD]), ["d.json[1]: expected a JSON object, got int"]),
    "many-problems": ("d.jsonl", jsonl(*["{bad"] * 12), ["12 bad row(s)", "d.jsonl:5: not valid JSON", "(and 7 more)"]),
    "empty-file": ("d.jsonl", "\n\n", ["the split is empty"]),
    "unknown-format": ("d.txt", "hello\n", ["has an unknown format: use .jsonl"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_reports_every_problem_and_changes_nothing(tmp_path, case):
    name, content, fragments = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    before = snapshot(tmp_path)
    with pytest.raises(MrtuneError) as error:
        load_split(str(path))
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert snapshot(tmp_path) == before


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(MrtuneError, match=r"data file .*nope.jsonl does not exist: check the path"):
        load_split(str(tmp_path / "nope.jsonl"))
    locked = tmp_path / "locked.jsonl"
    locked.write_text(jsonl(GOOD), encoding="utf-8")
    before = snapshot(tmp_path)
    real_read_bytes = Path.read_bytes

    def read_bytes(self):  # chmod 000 does not stop root, who runs CI containers: refuse the read itself
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(MrtuneError, match=r"locked.jsonl cannot be read \(Permission denied\): check its perm"):
        load_split(str(locked))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    """U+2028 is legal inside a JSON string; str.splitlines() would cut the row in two there."""
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl({**GOOD, "target": "Portal 2\u2028is great."}, GOOD), encoding="utf-8")
    assert [e.source for e in load_split(str(path))] == ["d.jsonl:1", "d.jsonl:2"]


def test_duplicates_across_splits_are_a_warning_that_names_them():
    def split(name, sentences):
        return [Example(s, "inform(name[A])", f"{name}.jsonl:{i}") for i, s in enumerate(sentences, 1)]

    splits = {
        "train": split("train", ["A is good.", "B is bad.", "C is fine."]),
        "validation": split("validation", ["D?"]),
        "test": split("test", ["Z.", "b  IS bad.", "C is fine.", "Y."]),
    }
    assert find_duplicates(splits) == [
        "2 of 4 test sentence(s) also occur in train (first: test.jsonl:2 = train.jsonl:2): they inflate the test "
        "score; remove them from one of the splits"
    ]


def test_rows_over_max_length_are_counted_never_silent(tiny_model_dir):
    from mrtune.model.resolve import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = load_split("viggo:validation")[:20]
    rows, _ = tokenize_examples(examples, tokenizer, "compact", max_length=10_000)
    limit = sorted(len(r) for r in rows)[14]  # 5 of the 20 rows are longer
    with pytest.raises(MrtuneError) as error:
        tokenize_examples(examples, tokenizer, "compact", max_length=limit)
    assert str(error.value).startswith(f"5 row(s) are longer than data.max_length={limit} tokens (first: ")
    assert "set data.too_long=skip or truncate" in str(error.value)
    skipped, report = tokenize_examples(examples, tokenizer, "compact", max_length=limit, too_long="skip")
    assert (len(skipped), report.too_long, report.action) == (15, 5, "skip")
    truncated, report = tokenize_examples(examples, tokenizer, "compact", max_length=limit, too_long="truncate")
    assert (len(truncated), report.too_long, report.longest) == (20, 5, limit)


# -- 2. whole-run checks before anything is loaded or written -------------------------------------------------
def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def test_problems_of_all_splits_are_reported_at_once_before_any_model(tmp_path, capsys, monkeypatch, tiny_overrides):
    bad = {split: tmp_path / f"bad-{split}.jsonl" for split in ("train", "validation", "test")}
    bad["train"].write_text(jsonl(GOOD, "{oops"), encoding="utf-8")
    bad["validation"].write_text(jsonl({"target": "x"}), encoding="utf-8")
    bad["test"].write_text(jsonl({**GOOD, "meaning_representation": "nope"}), encoding="utf-8")
    before = snapshot(tmp_path)
    monkeypatch.setattr("mrtune.train.recipe.load_tokenizer", lambda *a, **k: pytest.fail("loaded before data checks"))
    overrides = tiny_overrides + [f"data.{split}={path}" for split, path in bad.items()]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *_sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 data splits have problems: [data.train] ")
    assert "bad-train.jsonl:2: not valid JSON" in err
    assert "[data.validation] " in err and "bad-validation.jsonl:1: missing field 'meaning_representation'" in err
    assert "[data.test] " in err and "bad-test.jsonl:1: 'meaning_representation' is not a meaning" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_no_gpu_for_4bit_says_what_to_change(tmp_path, capsys, monkeypatch, tiny_overrides):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = snapshot(tmp_path)
    overrides = tiny_overrides + [
        "model.quantization=nf4",
        "train.optimizer=paged_adamw_8bit",
        "model.attn_implementation=flex_attention",
        "model.liger_kernel=true",
    ]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *_sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert "flex_attention cannot train on this machine" in err and "--set model.attn_implementation=sdpa" in err
    assert "model.liger_kernel=true needs a CUDA GPU" in err
    assert (
        "model.quantization=nf4 needs a CUDA GPU (bitsandbytes 4-bit): on this machine set --set "
        "model.quantization=none" in err
    )
    assert (
        "train.optimizer=paged_adamw_8bit needs a CUDA GPU (bitsandbytes): on this machine set --set "
        "train.optimizer=adamw" in err
    )
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_model_out_of_reach_offline(tmp_path, capsys, monkeypatch, tiny_overrides):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(tmp_path)
    overrides = tiny_overrides + ["model.name=mrtune-tests/no-such-model"]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *_sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert (
        "cannot load model 'mrtune-tests/no-such-model': HF_HUB_OFFLINE is set and it is not in the local "
        "cache; pass a local directory with --set model.name=/path/to/model" in err
    )
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


# -- 3. faults during a run, on the tiny model ------------------------------------------------------------------
def assert_same_result(run: RunDir, reference: RunDir) -> None:
    expected = load_file(reference.adapter / "adapter_model.safetensors")
    actual = load_file(run.adapter / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    def curve(r):
        return [(x["step"], x.get("train_loss"), x.get("validation_loss")) for x in r.read_history()]

    assert curve(run) == curve(reference)
    assert run.info()["status"] == "finished" and not run.checkpoint.exists()


def fail_backward_at(monkeypatch, call: int, watch: list[Path] = ()) -> dict:
    """Make the `call`-th backward pass (one per step here) run out of GPU memory; the returned dict gets the
    snapshot of `watch` taken at that moment, to compare with what is on disk after the failure."""
    from accelerate import Accelerator

    real = Accelerator.backward
    seen = {"calls": 0}

    def backward(self, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == call:
            seen["before"] = snapshot(*[p for p in watch if p.exists()])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)
    return seen


def test_existing_run_is_refused_without_overwrite(finished_run, tmp_path, capsys, fault_overrides):
    before = snapshot(finished_run.path)
    assert main(["train", "--output-dir", str(finished_run.path), *_sets(fault_overrides)]) == 2
    assert (
        f"error: output directory {finished_run.path} already holds a run (status: finished): pass "
        "--overwrite to replace it, or choose another --output-dir (nothing there was touched)"
        in capsys.readouterr().err
    )
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"\xff\xd8")
    before_stranger = snapshot(stranger)
    assert main(["train", "--output-dir", str(stranger), "--overwrite", *_sets(fault_overrides)]) == 2
    assert f"output directory {stranger} is not empty and holds no mrtune run" in capsys.readouterr().err
    assert snapshot(finished_run.path) == before and snapshot(stranger) == before_stranger


def test_overwrite_replaces_the_old_run_only_after_the_model_is_built(finished_run, tmp_path, capsys, fault_overrides):
    """A setting that only the model can refuse (more top layers than it has) leaves the old run whole (issue 13)."""
    import shutil

    old = RunDir(tmp_path / "old")
    shutil.copytree(finished_run.path, old.path)
    before = snapshot(old.path)
    argv = [
        "train",
        "--output-dir",
        str(old.path),
        "--overwrite",
        *_sets(fault_overrides),
        "--set",
        "lora.top_layers=9",
    ]
    assert main(argv) == 2
    assert "lora.top_layers=9 but the model has 2 layers" in capsys.readouterr().err
    assert snapshot(old.path) == before


def test_out_of_gpu_memory_while_decoding_names_the_setting(finished_run, monkeypatch):
    from mrtune.infer.evaluate import evaluate

    def generate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr("mrtune.infer.generation.generate", generate)
    before = snapshot(finished_run.path)
    with pytest.raises(MrtuneError) as error:
        evaluate(finished_run.path, progress=False)
    assert str(error.value) == (
        f"out of GPU memory decoding 4 rows at a time: lower eval.batch_size (or eval.max_new_tokens) in "
        f"{finished_run.config_file}"
    )
    assert snapshot(finished_run.path) == before


def test_finished_run_is_not_resumed(finished_run, capsys):
    before = snapshot(finished_run.path)
    assert main(["train", "--resume", str(finished_run.path)]) == 2
    assert f"run {finished_run.path} already finished (6 steps): there is nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(finished_run.path), "--set", "train.max_steps=9"]) == 2
    assert (
        "--resume RUN continues RUN with its own config.yaml: drop --config, --set, --output-dir and "
        "--overwrite" in capsys.readouterr().err
    )
    assert snapshot(finished_run.path) == before


def test_run_in_training_elsewhere_is_neither_replaced_nor_resumed(finished_run, tmp_path, capsys, fault_overrides):
    import shutil

    live = RunDir(tmp_path / "live")
    shutil.copytree(finished_run.path, live.path)
    live.update_info(status="running")
    before = snapshot(live.path)
    other_process = RunDir(live.path)
    other_process.lock()  # another open file description: to flock, the same as another process
    try:
        assert main(["train", "--output-dir", str(live.path), "--overwrite", *_sets(fault_overrides)]) == 2
        assert "holds a run that another process is training right now" in capsys.readouterr().err
        assert main(["train", "--resume", str(live.path)]) == 2
        assert f"run {live.path} is being trained by another process right now" in capsys.readouterr().err
    finally:
        other_process.unlock()
    assert snapshot(live.path) == before


def test_out_of_gpu_memory_names_the_settings_and_keeps_the_checkpoint(tmp_path, monkeypatch, fault_overrides):
    from mrtune.train.recipe import train

    run = RunDir(tmp_path / "run")
    oom = fail_backward_at(monkeypatch, call=4, watch=[run.checkpoint, run.adapter])
    with pytest.raises(MrtuneError) as error:
        train(load_config(None, fault_overrides), run.path, progress=False)
    assert str(error.value) == (
        "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB): start the run again with lower memory "
        "settings: lower train.batch_size (now 8; raise train.gradient_accumulation to keep the step size) or set "
        "train.batch_tokens to cap the tokens of a micro-batch; set model.gradient_checkpointing=true (~1/3 more "
        "compute, a fraction of the activations); set model.quantization=nf4 (4-bit base weights, CUDA)"
    )
    assert oom["before"] and snapshot(run.checkpoint, run.adapter) == oom["before"]
    info = run.info()
    assert info["status"] == "failed" and info["error"].startswith("out of GPU memory")
    assert json.loads((run.checkpoint / STATE_FILE).read_text())["step"] == 2


def test_a_resumed_pissa_run_converts_against_its_initial_adapter(tmp_path, monkeypatch, fault_overrides):
    """lora.init=pissa: the resume saves the rebuilt initial adapter before the checkpoint's replaces it, so the
    saved (converted) adapters match the uninterrupted run's exactly."""
    from mrtune.train.recipe import train

    config = load_config(None, [*fault_overrides, "lora.init=pissa"])
    reference = train(config, tmp_path / "reference", progress=False)
    run = RunDir(tmp_path / "run")
    fail_backward_at(monkeypatch, call=4)  # the process dies in step 4, after the checkpoint of step 2
    with pytest.raises(MrtuneError):
        train(config, run.path, progress=False)
    monkeypatch.undo()
    initial = snapshot(run.initial_adapter)
    train(config, run.path, progress=False, resume=True)
    assert_same_result(run, reference)
    assert initial and not run.initial_adapter.exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes(
    tmp_path, monkeypatch, fault_overrides, finished_run
):
    from mrtune.train.recipe import train

    run = RunDir(tmp_path / "run")
    real_save = torch.save
    seen = {"calls": 0}

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 4:  # each checkpoint torch.saves 3 files: this is the second one's (step 4) first
            seen["before"] = snapshot(run.checkpoint, run.adapter)
            Path(path).write_bytes(b"\x80\x02half a file")  # what a full disk leaves: a partial write
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(MrtuneError) as error:
        train(load_config(None, fault_overrides), run.path, progress=False)
    assert str(error.value) == (
        f"the disk filled up while writing to {run.path}: the files saved before are intact (a save in progress "
        f"was dropped); free some space, then `mrtune train --resume {run.path}` continues from the checkpoint of "
        "step 2"
    )
    assert seen["before"] and snapshot(run.checkpoint, run.adapter) == seen["before"]
    assert not (run.path / "checkpoint.tmp").exists()
    assert run.info()["status"] == "failed"
    monkeypatch.undo()  # space freed
    assert main(["train", "--resume", str(run.path)]) == 0
    assert_same_result(run, finished_run)


def test_disk_full_while_saving_the_best_adapter_keeps_the_previous_one(tmp_path, monkeypatch, fault_overrides):
    from peft import PeftModel

    from mrtune.train.recipe import train

    run = RunDir(tmp_path / "run")
    real = PeftModel.save_pretrained
    state = {"adapter_saves": 0, "before": None}

    def save_pretrained(self, directory, *args, **kwargs):
        if Path(directory).name == "adapter.tmp":
            state["adapter_saves"] += 1
            if state["adapter_saves"] == 2:  # the second best adapter, at step 4
                state["before"] = snapshot(run.adapter, run.checkpoint)
                Path(directory).mkdir(parents=True, exist_ok=True)
                (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained)
    with pytest.raises(
        MrtuneError, match="the disk filled up while writing to .*continues from the checkpoint of step 2"
    ):
        train(load_config(None, fault_overrides), run.path, progress=False)
    assert state["before"] and snapshot(run.adapter, run.checkpoint) == state["before"]
    assert not (run.path / "adapter.tmp").exists() and run.info()["best_step"] == 2


def test_kill_between_the_renames_of_a_checkpoint_save_loses_nothing(
    tmp_path, monkeypatch, fault_overrides, finished_run
):
    """No POSIX call swaps two directories: a kill can land after checkpoint/ became checkpoint.old and before
    checkpoint.tmp became checkpoint/. The resume puts checkpoint.old back and continues from it."""
    from mrtune.train.recipe import train

    class Killed(BaseException):
        pass

    run = RunDir(tmp_path / "run")
    real_replace = os.replace
    seen = {}

    def replace(src, dst):
        if Path(src).name == "checkpoint.tmp" and (run.path / "checkpoint.old").exists():
            seen["before"] = snapshot(run.path / "checkpoint.old")
            raise Killed  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train(load_config(None, fault_overrides), run.path, progress=False)
    monkeypatch.undo()
    assert not run.checkpoint.exists() and (run.path / "checkpoint.old" / STATE_FILE).is_file()
    with open(run.history, "a", encoding="utf-8") as handle:  # and a history line torn by the kill
        handle.write('{"step": 5, "train_lo')
    old = {path.replace("checkpoint.old", "checkpoint"): digest for path, digest in seen["before"].items()}
    recover_run(run)
    assert snapshot(run.checkpoint) == old
    assert main(["train", "--resume", str(run.path)]) == 0
    assert_same_result(run, finished_run)


def test_a_directory_swap_killed_midway_is_recovered(tmp_path):
    def write_then_fill_the_disk(directory: Path) -> None:
        (directory / "weights").write_text("v2 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    final = tmp_path / "adapter"
    write_dir_atomic(final, lambda directory: (directory / "weights").write_text("v1"))
    with pytest.raises(OSError):
        write_dir_atomic(final, write_then_fill_the_disk)
    assert (final / "weights").read_text() == "v1" and not (tmp_path / "adapter.tmp").exists()
    os.replace(final, tmp_path / "adapter.old")  # as if killed between the two renames of a swap
    (tmp_path / "adapter.tmp").mkdir()
    (tmp_path / "adapter.tmp" / "weights").write_text("v2 part")
    recover_run(RunDir(tmp_path))
    assert (final / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _poison_training_steps(monkeypatch, poisoned):
    """NaN activations in the training forward passes whose number (from 1; one per step here) is `poisoned`."""
    import mrtune.train.recipe

    real = mrtune.train.recipe.load_base_model
    calls = {"n": 0}

    def load_poisoned(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if not module.training:
                return output  # validation and generation stay clean
            calls["n"] += 1
            return output * float("nan") if poisoned(calls["n"]) else output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(mrtune.train.recipe, "load_base_model", load_poisoned)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, fault_overrides):
    from mrtune.train.recipe import train

    _poison_training_steps(monkeypatch, lambda step: step in (3, 4))
    run = train(load_config(None, fault_overrides), tmp_path / "run", progress=False)
    info = run.info()
    assert info["status"] == "finished" and info["skipped_steps"] == 2
    assert [r["step"] for r in run.read_history() if "train_loss" in r] == [1, 2, 5, 6]
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_divergence_stops_the_run_and_evaluate_says_so(tmp_path, monkeypatch, capsys, fault_overrides):
    from mrtune.infer.evaluate import evaluate
    from mrtune.train.recipe import train

    _poison_training_steps(monkeypatch, lambda step: step >= 3)
    run = RunDir(tmp_path / "run")
    config = load_config(None, fault_overrides + ["train.max_skipped_in_a_row=3"])
    with pytest.raises(MrtuneError) as error:
        train(config, run.path, progress=False)
    assert str(error.value) == (
        "training diverged: 3 steps in a row had a non-finite loss or gradient (step 5): lower "
        f"train.learning_rate or use model.dtype=float32; the best adapter so far is kept in {run.adapter}"
    )
    info = run.info()
    assert info["status"] == "diverged" and info["diverged_at_step"] == 5 and info["best_step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(run.adapter / "adapter_model.safetensors").values())
    before = snapshot(run.path)
    with pytest.raises(MrtuneError) as error:
        evaluate(run.path, progress=False)
    assert str(error.value) == (
        f"run {run.path} diverged at step 5 (a non-finite loss or gradient 3 steps in a row), so it has no "
        "metrics to report: train it again with a lower train.learning_rate (--base still scores the untuned model)"
    )
    assert main(["train", "--resume", str(run.path)]) == 2
    assert f"run {run.path} diverged at step 5: resuming would replay the same steps" in capsys.readouterr().err
    assert snapshot(run.path) == before


def test_resume_refuses_changed_data_and_a_run_without_checkpoint(
    tmp_path, monkeypatch, capsys, fault_overrides, fault_data
):
    import shutil

    from mrtune.train.recipe import train

    run = RunDir(tmp_path / "run")
    fail_backward_at(monkeypatch, call=3)  # the process dies in step 3, after the checkpoint of step 2
    with pytest.raises(MrtuneError, match="out of GPU memory"):
        train(load_config(None, fault_overrides), run.path, progress=False)
    monkeypatch.undo()
    assert json.loads((run.checkpoint / STATE_FILE).read_text())["step"] == 2
    before = snapshot(run.path)
    assert main(["train", "--output-dir", str(run.path), *_sets(fault_overrides)]) == 2
    assert (
        f"output directory {run.path} already holds a run (status: failed): resume it with `mrtune train "
        f"--resume {run.path}`, pass --overwrite to replace it" in capsys.readouterr().err
    )
    assert snapshot(run.path) == before

    changed = tmp_path / "train.jsonl"  # the data file is shared with other tests: point the run at an edited copy
    changed.write_text("".join(fault_data["train"].read_text().splitlines(keepends=True)[:-1]))
    run.config_file.write_text(run.config_file.read_text().replace(str(fault_data["train"]), str(changed)))
    before = snapshot(run.path)
    assert main(["train", "--resume", str(run.path)]) == 2
    assert (
        f"cannot resume {run.path} exactly: the training data or tokenizer changed since its checkpoint (step "
        "2); restore the original set-up, or start a new run" in capsys.readouterr().err
    )
    assert snapshot(run.path) == before

    shutil.rmtree(run.checkpoint)
    before = snapshot(run.path)
    assert main(["train", "--resume", str(run.path)]) == 2
    assert (
        f"run {run.path} has no checkpoint to resume from (it stopped before its first one, written every 2 "
        "steps)" in capsys.readouterr().err
    )
    assert snapshot(run.path) == before


def test_duplicates_and_long_rows_are_reported_by_train(tmp_path, capsys, fault_overrides, fault_data):
    from conftest import viggo_rows, write_jsonl

    from mrtune.train.recipe import train

    test_file = write_jsonl(tmp_path / "test.jsonl", viggo_rows("test", 4) + viggo_rows("train", 48)[10:13])
    config = load_config(
        None,
        fault_overrides + [f"data.test={test_file}", "train.max_steps=1", "data.max_length=140", "data.too_long=skip"],
    )
    run = train(config, tmp_path / "run", progress=False)
    captured = capsys.readouterr()
    info = run.info()
    assert info["data_warnings"] == [
        "3 of 7 test sentence(s) also occur in train (first: test.jsonl:5 = train.jsonl:11): they inflate the test "
        "score; remove them from one of the splits",
        "15 training row(s) longer than 140 tokens were skipped (data.too_long=skip)",
        "2 validation row(s) longer than 140 tokens were skipped (data.too_long=skip)",
    ]
    for warning in info["data_warnings"]:
        assert f"warning: {warning}" in captured.out
    assert (info["rows_too_long"], info["train_rows"], info["validation_rows"]) == (15, 33, 6)
