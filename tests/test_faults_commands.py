"""The fault suite, second part: the commands besides train (evaluate, predict, merge, compare) and the config.

As in test_faults.py, every test asserts the one-line error and that no file that existed before changed (sha256
of every file, `snapshot`). Damage is done to a copy of the shared finished run, never to the run itself.
BENCHMARKS.md ("Reliability") counts these tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
import typing
from pathlib import Path

import pytest
import yaml
from conftest import snapshot, viggo_rows, write_jsonl

from mrtune import config as config_module
from mrtune.cli import build_parser, main
from mrtune.config import Config, load_config
from mrtune.errors import MrtuneError
from mrtune.run.outputs import building_dir, check_output
from mrtune.task.data import load_split
from mrtune.task.prompts import TEMPLATES


def one_line_error(capsys) -> str:
    """The error line a command ended with (progress bars and library warnings may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: "), err
    return last


DECODE = ["--set", "eval.max_new_tokens=8"]  # the fault runs' 4 is too few for constrained decoding


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run, to damage."""
    path = tmp_path / "run"
    shutil.copytree(finished_run.path, path)
    return path


# -- the config: every value checked, every problem at once, before anything on disk is touched ------------------
def test_every_numeric_value_out_of_range_is_refused_before_the_old_run_is_touched(finished_run, capsys):
    bad = [
        "train.loraplus_ratio=0",
        "lora.alpha=0",
        "train.max_grad_norm=-1",
        "train.max_steps=-3",
        "train.learning_rate=.nan",
        "train.epochs=.inf",
        "train.seed=1e400",
        "train.warmup_ratio=nan",
        "lora.r=100000",
        "lora.dropout=1.5",
        "eval.max_new_tokens=0",
    ]
    before = snapshot(finished_run.path)
    argv = ["train", "--output-dir", str(finished_run.path), "--overwrite"]
    assert main([*argv, *(a for item in bad for a in ("--set", item))]) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: 11 config problem(s): ")
    for fragment in [
        "train.loraplus_ratio must be greater than 0, got 0 (or none, to turn it off)",
        "lora.alpha must be between 1 and 1,000,000, got 0",
        "train.max_grad_norm must be greater than 0, got -1",
        "train.max_steps must be between 1 and 1,000,000,000, got -3 (or none, to turn it off)",
        "train.learning_rate: expected a finite number, got nan",
        "train.epochs: expected a finite number, got inf",
        "train.seed: expected int, got '1e400'",
        "train.warmup_ratio: expected a finite number, got 'nan'",
        "lora.r must be between 1 and 4,096, got 100,000",
        "lora.dropout must be below 1, got 1.5",
        "eval.max_new_tokens must be between 1 and 1,000,000, got 0",
    ]:
        assert fragment in err
    assert main([*argv, "--set", "train.max_steps=0"]) == 2
    assert "train.max_steps must be between 1 and 1,000,000,000, got 0" in one_line_error(capsys)
    assert snapshot(finished_run.path) == before


def test_choices_are_the_literal_annotations_and_prompt_styles_the_templates():
    assert not hasattr(config_module, "CHOICES") and not hasattr(config_module, "PROMPT_STYLES")
    hints = typing.get_type_hints(config_module.DataSettings)
    assert typing.get_args(hints["prompt_style"]) == tuple(TEMPLATES)
    literal_fields = 0
    for section in Config().__dataclass_fields__:
        for name, annotation in typing.get_type_hints(type(getattr(Config(), section))).items():
            if typing.get_origin(annotation) is not typing.Literal:
                continue
            literal_fields += 1
            choices = typing.get_args(annotation)
            # a compile mode is refused unless something is compiled
            beside = ["model.compile_layers=true"] if name == "compile_mode" else []
            config = load_config(None, [*beside, f"{section}.{name}={choices[-1]}"])
            assert getattr(config, section).__dict__[name] == choices[-1]
            with pytest.raises(MrtuneError) as error:
                load_config(None, [f"{section}.{name}=bogus"])
            assert f"{section}.{name}: 'bogus' is not one of {', '.join(choices)}" in str(error.value)
    assert literal_fields == 11


def test_yaml_duplicate_key_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n  learning_rate: 1e-3\n  epochs: 3\n", encoding="utf-8")
    before = snapshot(tmp_path)
    with pytest.raises(MrtuneError) as error:
        load_config(path)
    assert str(error.value) == f"config file {path} is not valid YAML (duplicate key 'epochs' (line 4)): fix the file"
    with pytest.raises(MrtuneError, match=r"--set 'train.epochs=\{a: 1, a: 2\}': the value is not valid YAML"):
        load_config(None, ["train.epochs={a: 1, a: 2}"])
    assert snapshot(tmp_path) == before


def test_yaml_alias_bomb_and_huge_numbers_give_short_messages_fast(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9^9 strings if expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\ntrain:\n  schedule: *a8\n  epochs: *a8\nlora:\n  target_modules: *a8\n")
    started = time.perf_counter()
    with pytest.raises(MrtuneError) as error:
        load_config(path)
    message = str(error.value)
    assert time.perf_counter() - started < 5 and len(message) < 3000 and "\n" not in message
    assert "train.schedule: [[[...], [...], [...], [...], ...], " in message
    assert "is not one of cosine, linear, constant" in message
    assert "train.epochs: expected a finite number, got [[[" in message
    assert "lora.target_modules: expected a list of names, got [[[" in message
    with pytest.raises(MrtuneError) as error:
        load_config(None, ["train.seed=" + "9" * 5000, "data.train=" + "x" * 100_000])
    message = str(error.value)
    assert len(message) < 1000 and "--set 'train.seed=999" in message and "Exceeds the limit (4300 digits)" in message


def test_every_train_option_survives_into_the_accelerate_launch(tmp_path, monkeypatch, capsys):
    """Each option of `train` (today's and any added later) given a value; the relaunched command parses back to it."""
    import torch

    from mrtune.cli import LAUNCH_OPTIONS

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text("num_processes: 2\n")
    parser = build_parser()
    train_parser = parser.parse_args(["train"]).command_parser
    argv = ["train"]
    for action in train_parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        option = max(action.option_strings, key=len)
        if action.dest == "accelerate_config":
            argv += [option, str(accelerate_config)]
        elif action.nargs == 0:
            argv.append(option)
        elif isinstance(action, argparse._AppendAction):
            argv += [option, f"{action.dest}.first=1", option, f"{action.dest}.second=2"]
        else:
            argv += [option, "2" if action.type is int else f"value-of-{action.dest}"]
    launched = {}

    def execv(path, command):
        launched["command"] = command
        raise SystemExit(0)  # what the real execv does to this process: it is replaced

    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(SystemExit):
        main(argv)
    command = launched["command"]
    assert command[:3] == [command[0], "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    relaunched = parser.parse_args(command[command.index("mrtune") + 1 :])
    original = parser.parse_args(argv)
    for action in train_parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.dest in LAUNCH_OPTIONS:
            assert getattr(relaunched, action.dest, None) == action.default
        else:
            assert getattr(relaunched, action.dest) == getattr(original, action.dest) != action.default
    capsys.readouterr()


# -- data files that break the checks themselves ----------------------------------------------------------------
GOOD = {"target": "Portal 2 is a great game.", "meaning_representation": "inform(name[Portal 2], rating[excellent])"}
MALFORMED_ROWS = {
    "nested-100000-deep": ('{"target": ' + "[" * 100_000 + "]" * 100_000 + "}", "d.jsonl:2: not valid JSON"),
    "5000-digit-number": (
        '{"target": "x", "meaning_representation": "inform(name[A])", "n": ' + "7" * 5000 + "}",
        "d.jsonl:2: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion)",
    ),
    "lone-surrogate": (
        '{"target": "Portal \\ud800 2", "meaning_representation": "inform(name[A])"}',
        "d.jsonl:2: holds a lone surrogate ('\\ud800'), which is not text: fix the escape",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_ROWS))
def test_malformed_json_rows_are_bad_rows_not_tracebacks(tmp_path, case):
    line, fragment = MALFORMED_ROWS[case]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    before = snapshot(tmp_path)
    with pytest.raises(MrtuneError) as error:
        load_split(str(path))
    message = str(error.value)
    assert fragment in message and "1 bad row(s)" in message and len(message) < 1000 and "\n" not in message
    assert snapshot(tmp_path) == before


def test_a_data_path_that_is_not_a_file_is_named_for_what_it_is(tmp_path):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop2.jsonl")
    (tmp_path / "loop2.jsonl").symlink_to(loop)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")
    expected = {
        folder: f"data file {folder} is a directory: give a .jsonl, .json or .csv file inside it",
        fifo: f"data file {fifo} is a FIFO (named pipe): give a regular .jsonl, .json or .csv file",
        loop: f"data file {loop} is a symlink loop: point it at a real file",
        dangling: f"data file {dangling} is a symlink to {tmp_path / 'gone.jsonl'}, which does not exist",
    }
    for path, message in expected.items():
        with pytest.raises(MrtuneError) as error:
            load_split(str(path))  # the FIFO is never opened: the test would block if it were
        assert str(error.value) == message


# -- outputs: nothing destroyed that the command did not create -------------------------------------------------
def test_merge_refuses_the_run_itself_a_path_inside_it_or_around_it(finished_run, tmp_path, capsys):
    before = snapshot(finished_run.path)
    run = finished_run.path
    for output, relation in [(run, "is"), (run / "merged", "is inside"), (run.parent, "contains")]:
        assert main(["merge", str(run), "--output", str(output), "--overwrite"]) == 2
        err = one_line_error(capsys)
        assert f"--output {output} {relation} the run ({run.resolve()}): choose a path outside it" in err
    assert snapshot(finished_run.path) == before


def test_merge_leaves_neighbours_alone_and_replaces_only_its_own_output(finished_run, tmp_path, capsys):
    neighbours = {name: tmp_path / name for name in ("merged.tmp", "merged.old", ".merged.tmp", "photos")}
    for folder in neighbours.values():
        folder.mkdir()
        (folder / "keep.txt").write_text(f"not mrtune's: {folder.name}")
    before = snapshot(tmp_path)
    output = tmp_path / "merged"
    assert main(["merge", str(finished_run.path), "--output", str(output)]) == 0
    assert (output / "prompt.txt").read_text() == (finished_run.path / "prompt.txt").read_text()
    assert snapshot(*neighbours.values()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*neighbours, "merged"])
    capsys.readouterr()
    merged = snapshot(output)
    assert main(["merge", str(finished_run.path), "--output", str(output)]) == 2
    assert f"--output {output} already exists: pass --overwrite to replace it" in one_line_error(capsys)
    assert main(["merge", str(finished_run.path), "--output", str(neighbours["photos"]), "--overwrite"]) == 2
    assert "holds something this command did not write, so --overwrite does not replace it" in one_line_error(capsys)
    assert snapshot(output) == merged and snapshot(*neighbours.values()) == before
    assert main(["merge", str(finished_run.path), "--output", str(output), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*neighbours, "merged"])


def test_merge_stopped_by_sigterm_or_ctrl_c_leaves_the_previous_output_whole(finished_run, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    output = tmp_path / "merged"
    assert main(["merge", str(finished_run.path), "--output", str(output)]) == 0
    before = snapshot(tmp_path)
    real = PreTrainedModel.save_pretrained

    for stop in (lambda: os.kill(os.getpid(), signal.SIGTERM), lambda: (_ for _ in ()).throw(KeyboardInterrupt)):

        def save_then_stop(self, directory, *args, stop=stop, **kwargs):
            real(self, directory, *args, **kwargs)  # half the output is written...
            stop()  # ...when the signal comes

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_stop)
        assert main(["merge", str(finished_run.path), "--output", str(output), "--overwrite"]) == 130
        assert snapshot(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_check_output_for_the_export_and_serve_commands(tmp_path):
    """The rule other commands call: a file output beside an input, and a directory built under a unique name."""
    data = tmp_path / "in.jsonl"
    data.write_text("x\n")
    with pytest.raises(MrtuneError, match=r"--out .*in.jsonl is the input \(.*\): choose a path outside it"):
        check_output(data, protected={"the input": data}, overwrite=True, kind="file", option="--out")
    with pytest.raises(MrtuneError, match="exists and is not a directory"):
        check_output(data, protected={}, overwrite=True, kind="dir")
    with pytest.raises(RuntimeError), building_dir(tmp_path / "built") as tmp:
        (tmp / "half").write_text("h")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_predict_output_is_never_an_existing_file_the_run_or_the_input(run_copy, tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", viggo_rows("test", 2))
    existing = tmp_path / "old.jsonl"
    existing.write_text("mine\n")
    before = snapshot(tmp_path)
    cases = [
        (existing, [], f"--output {existing} already exists: pass --overwrite to replace it"),
        (run_copy / "run.json", ["--overwrite"], "is inside the run"),
        (run_copy / "eval" / "p.jsonl", [], "is inside the run"),
        (inputs, ["--overwrite"], "is the --input file"),
    ]
    for output, extra, message in cases:
        assert main(["predict", str(run_copy), "--input", str(inputs), "--output", str(output), *extra]) == 2
        assert message in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_predict_copies_each_input_row_whole_and_adds_its_field(run_copy, tmp_path, capsys):
    rows = [{"id": 7, "target": r["target"], "extra": {"a": [1, 2]}} for r in viggo_rows("test", 2)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "old.jsonl"
    output.write_text("mine\n")
    argv = ["predict", str(run_copy), "--input", str(inputs), "--output", str(output), "--overwrite", *DECODE]
    assert main(argv) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "meaning_representation"} for r in written] == rows
    assert all(isinstance(r["meaning_representation"], str) for r in written)
    capsys.readouterr()


def test_a_sentence_over_the_models_limit_or_not_utf8_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    assert main(["predict", str(run_copy), "short one", "word " * 3000, *DECODE]) == 2
    err = one_line_error(capsys)
    assert "1 sentence(s) too long for the model (first: sentence 2, " in err
    assert "plus eval.max_new_tokens=8, over the model's limit of 1024 tokens): shorten or split them" in err
    assert main(["predict", str(run_copy), "caf\udce9 au lait", *DECODE]) == 2  # Latin-1 bytes in a UTF-8 argv
    assert "error: sentence 1 is not UTF-8 text: pass it in UTF-8" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_evaluate_data_results_never_take_a_splits_name_or_leave_eval(run_copy, tmp_path, capsys):
    assert main(["evaluate", str(run_copy), *DECODE]) == 0
    split_results = snapshot(run_copy / "eval" / "test")
    named_like_a_split = write_jsonl(tmp_path / "test.jsonl", viggo_rows("validation", 3))
    dotted = write_jsonl(tmp_path / "...jsonl", viggo_rows("validation", 2))  # its stem is `..`
    assert main(["evaluate", str(run_copy), "--data", str(named_like_a_split), *DECODE]) == 0
    assert main(["evaluate", str(run_copy), "--data", str(dotted), *DECODE]) == 0
    assert snapshot(run_copy / "eval" / "test") == split_results
    assert sorted(p.name for p in (run_copy / "eval").iterdir()) == ["data-file", "data-test", "test"]
    metrics = json.loads((run_copy / "eval" / "data-test" / "metrics.json").read_text())
    named_like_a_split = named_like_a_split.resolve()
    assert (metrics["split"], metrics["data_file"], metrics["n"]) == (
        "data file test.jsonl",
        str(named_like_a_split),
        3,
    )
    capsys.readouterr()
    assert main(["compare", str(run_copy), "test", "data-test"]) == 0
    assert f"data-test: the data file {named_like_a_split}, not a split" in capsys.readouterr().out
    assert (
        f"`data-test` scores the data file `{named_like_a_split}`, not a split" in (run_copy / "report.md").read_text()
    )
    other = tmp_path / "other"
    other.mkdir()
    same_name = write_jsonl(other / "test.jsonl", viggo_rows("validation", 2))
    before = snapshot(run_copy)
    assert main(["evaluate", str(run_copy), "--data", str(same_name)]) == 2
    assert f"holds the results of another data file ({named_like_a_split}): rename" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_evaluate_stopped_while_writing_keeps_the_previous_results_whole(run_copy, monkeypatch, capsys):
    assert main(["evaluate", str(run_copy), *DECODE]) == 0
    before = snapshot(run_copy)
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "metrics.json":  # predictions.jsonl is written: Ctrl-C comes before the metrics
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert main(["evaluate", str(run_copy), *DECODE]) == 130
    assert snapshot(run_copy) == before and [p.name for p in (run_copy / "eval").iterdir()] == ["test"]
    capsys.readouterr()


def test_a_row_limit_error_names_its_key(run_copy, capsys):
    before = snapshot(run_copy)
    assert main(["evaluate", str(run_copy), "--limit", "0"]) == 2
    assert "error: --limit must be at least 1, got 0" in one_line_error(capsys)
    assert main(["evaluate", str(run_copy), "--set", "eval.limit=-2"]) == 2
    assert "eval.limit must be between 1 and 1,000,000,000, got -2 (or none, to turn it off)" in one_line_error(capsys)
    assert snapshot(run_copy) == before


# -- damaged run directories: each command says `run damaged: FILE: what` -------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


DAMAGE = {
    "run.json-holds-a-list": (
        lambda run: (run / "run.json").write_text("[]"),
        "run.json: holds a list, not an object",
    ),
    "vocabulary.json-truncated": (
        lambda run: _truncate(run / "vocabulary.json"),
        "vocabulary.json: not valid JSON (",
    ),
    "adapter-weights-truncated": (
        lambda run: _truncate(run / "adapter" / "adapter_model.safetensors"),
        "adapter_model.safetensors: not a whole safetensors file (",
    ),
    "adapter-rank-changed": (
        lambda run: _edit_json(run / "adapter" / "adapter_config.json", r=8),
        "adapter_config.json: rank r=8, but the run's config.yaml trains rank 4",
    ),
    "prompt.txt-missing": (lambda run: (run / "prompt.txt").unlink(), "prompt.txt: missing"),
    "tokenizer-deleted": (lambda run: shutil.rmtree(run / "tokenizer"), "tokenizer: missing (the tokenizer saved by"),
    "tokenizer-config-truncated": (
        lambda run: _truncate(run / "tokenizer" / "tokenizer_config.json"),
        "tokenizer_config.json: not valid JSON (",
    ),
    "config.yaml-bad-value": (
        lambda run: (run / "config.yaml").write_text(
            (run / "config.yaml").read_text().replace("max_grad_norm: 1.0", "max_grad_norm: -1.0")
        ),
        "config.yaml: train.max_grad_norm must be greater than 0, got -1",
    ),
}
COMMANDS = {
    "predict": lambda run, out: ["predict", str(run), "Is Portal 2 on Mac?"],
    "evaluate": lambda run, out: ["evaluate", str(run)],
    "merge": lambda run, out: ["merge", str(run), "--output", str(out)],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_is_named_in_one_line_by_every_command(run_copy, tmp_path, capsys, damage):
    do_damage, fragment = DAMAGE[damage]
    do_damage(run_copy)
    before = snapshot(tmp_path)
    for command, argv in COMMANDS.items():
        assert main(argv(run_copy, tmp_path / "merged")) == 2, command
        err = one_line_error(capsys)
        assert err.startswith("error: run damaged: ") and fragment in err, (command, err)
        assert "hub" not in err
        assert snapshot(tmp_path) == before, command


def test_a_corrupt_metrics_file_is_named_by_compare(run_copy, capsys):
    metrics = run_copy / "eval" / "test" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"n": 3, "exact_match": ')
    before = snapshot(run_copy)
    assert main(["compare", str(run_copy), "test"]) == 2
    assert f"error: run damaged: {metrics}: not valid JSON (Expecting value at line 1)" in one_line_error(capsys)
    metrics.write_text('{"n": 3, "exact_match": "high"}')
    before = snapshot(run_copy)
    assert main(["compare", str(run_copy), "test"]) == 2
    assert f"error: run damaged: {metrics}: no number for exact_match" in one_line_error(capsys)
    assert main(["compare", str(run_copy), "../run"]) == 2
    assert "no evaluation '../run'" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_config_round_trip_keeps_ranges(tmp_path):
    """A run's saved config.yaml is re-read with the same checks (so a hand-edited one is caught, above)."""
    config = load_config(None, ["train.max_steps=5", "train.loraplus_ratio=8"])
    assert config_module.from_dict(yaml.safe_load(config_module.to_yaml(config))) == config
