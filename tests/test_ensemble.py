"""Ensembles: several runs decode, and each sentence gets the MR most of them wrote (evaluate and predict's
`--ensemble`), equal to the vote over what each run decodes alone."""

from __future__ import annotations

import json

import pytest
from conftest import snapshot, train_tiny_run

from mrtune.cli import main
from mrtune.task.mr import majority_vote


def test_the_vote_takes_the_most_common_mr_and_the_earliest_model_on_a_tie():
    runs = [["a(x[1])", "b()", "c()"], ["a(x[1]) ", "c()", "d()"], ["b()", "c()", "e()"]]
    assert majority_vote(runs) == ["a(x[1])", "c()", "c()"]  # 2 of 3; 2 of 3; no majority: the first model's
    assert majority_vote([["b()"], ["a()"], ["a()"], ["b()"]]) == ["b()"]  # 2 against 2: the first model is in
    with pytest.raises(ValueError, match="same rows"):  # predictions of different rows are a bug, not a vote
        majority_vote([["a()"], ["a()", "b()"], ["a()"]])


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_model_dir):
    """The same tiny recipe trained with three seeds, enough steps at a high rate that their predictions differ."""
    rows = {"train": 32, "validation": 4, "test": 12}
    extra = ["train.max_steps=6", "train.eval_every=6", "train.learning_rate=3e-2", "train.warmup_ratio=0.0"]
    return [
        train_tiny_run(tmp_path_factory.mktemp(f"seed{seed}"), tiny_model_dir, rows, [*extra, f"train.seed={seed}"])
        for seed in range(3)
    ]


def _predictions(folder) -> list[str]:
    return [json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_an_ensemble_evaluates_to_the_vote_of_its_runs_alone(three_runs, tmp_path, monkeypatch, capsys):
    from mrtune.infer.evaluate import evaluate

    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path))
    alone = []
    for run in three_runs:
        evaluate(run.path, progress=False)
        alone.append(_predictions(run.eval_dir("test")))
    assert any(len(set(row)) > 1 for row in zip(*alone)), "the runs agree everywhere: the vote is not tested"
    first = three_runs[0]
    kept = (first.eval_dir("test") / "predictions.jsonl").read_bytes()
    assert main(["evaluate", str(first.path), "--ensemble", *(str(r.path) for r in three_runs[1:])]) == 0
    assert "ensemble of 3" in capsys.readouterr().out
    together = first.eval_dir("test-ensemble")
    assert _predictions(together) == majority_vote(alone)
    metrics = json.loads((together / "metrics.json").read_text())
    singles = [json.loads((r.eval_dir("test") / "metrics.json").read_text())["exact_match"] for r in three_runs]
    assert metrics["ensemble"]["members_exact_match"] == singles
    assert metrics["ensemble"]["members"] == [str(r.path.resolve()) for r in three_runs]
    assert (first.eval_dir("test") / "predictions.jsonl").read_bytes() == kept  # the single run's results stay
    assert main(["compare", str(first.path), "test", "test-ensemble"]) == 0
    assert "test-ensemble" in capsys.readouterr().out

    sentences = [json.loads(line)["target"] for line in (together / "predictions.jsonl").read_text().splitlines()][:4]
    from mrtune.infer.predict import predict

    voted = predict(first.path, sentences=sentences, ensemble=[str(r.path) for r in three_runs[1:]], progress=False)
    assert voted == majority_vote(alone)[:4]


def test_ensemble_mistakes_are_one_line_errors_before_anything_is_loaded(three_runs, tmp_path, capsys):
    first, second, third = (str(r.path) for r in three_runs)
    cases = [
        (["evaluate", first, "--ensemble", second], "at least two more runs"),
        (["evaluate", first, "--ensemble", second, first], "in the ensemble twice"),
        (["evaluate", first, "--ensemble", second, str(tmp_path / "none")], "does not exist"),
        (["evaluate", first, "--base", "--ensemble", second, third], "drop --ensemble"),
        (["predict", first, "a sentence", "--ensemble", second], "at least two more runs"),
        (["predict", first, "a", "--output", f"{third}/o.jsonl", "--ensemble", second, third], "inside the ensemble"),
    ]
    before = snapshot(*(r.path for r in three_runs))
    for argv, expected in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
    assert snapshot(*(r.path for r in three_runs)) == before


def test_a_served_ensemble_answers_with_the_vote_of_its_runs(three_runs):
    from mrtune.serve.engine import Engine
    from mrtune.task.data import load_split

    first, *others = three_runs
    config = first.config()
    sentences = [e.sentence for e in load_split(config.data.test, config.data.input_field, config.data.output_field)]
    prompts = [Engine.load(first.path).prompt(s) for s in sentences]
    alone = [Engine.load(run.path).complete(prompts) for run in three_runs]
    assert any(len(set(row)) > 1 for row in zip(*alone)), "the runs agree everywhere: the vote is not tested"
    served = Engine.load(first.path, ensemble=[str(r.path) for r in others])
    assert served.name == f"{first.path.resolve().name}+2"
    assert served.complete(prompts) == majority_vote(alone)


def test_averaged_runs_are_one_run_whose_weights_are_the_members_mean(three_runs, tmp_path, monkeypatch, capsys):
    """`mrtune average`: the new run's merged weights equal the mean of the members' merged weights (the stacked
    LoRA update is exact), and every command reads it as a run."""
    import torch

    from mrtune.infer.predict import load_run_model
    from mrtune.run.rundir import RunDir

    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "soup"
    before = snapshot(*(r.path for r in three_runs))
    assert main(["average", *(str(r.path) for r in three_runs), "--output-dir", str(out)]) == 0
    assert "LoRA adapter of rank" in capsys.readouterr().out
    assert snapshot(*(r.path for r in three_runs)) == before  # the members are only read
    soup = RunDir.open(out)
    config = soup.config()
    ranks = [r.config().lora.r for r in three_runs]
    assert config.lora.r == config.lora.alpha == sum(ranks)
    assert soup.info()["averaged_from"] == [str(r.path.resolve()) for r in three_runs]

    def merged(run):
        return load_run_model(run, run.config().model, run.require_adapter(run.config())).state_dict()

    members = [merged(r) for r in three_runs]
    mean = {name: sum(m[name].float() for m in members) / 3 for name in members[0]}
    averaged = merged(soup)
    assert any(not torch.equal(members[0][n], members[1][n]) for n in mean), "the members are equal: nothing tested"
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor.float(), mean[name], rtol=1e-5, atol=1e-6, msg=name)

    again = ["average", *(str(r.path) for r in three_runs[:2]), "--output-dir", str(out)]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err  # an average is replaced only when asked
    assert main([*again, "--overwrite"]) == 0 and len(RunDir.open(out).info()["averaged_from"]) == 2
    assert main(["average", *(str(r.path) for r in three_runs), "--output-dir", str(out), "--overwrite"]) == 0

    assert main(["evaluate", str(out), "--limit", "4"]) == 0
    assert (out / "eval" / "test" / "metrics.json").is_file()
    assert "weight average of 3" in (out / "adapter" / "README.md").read_text()
    assert main(["predict", str(out), "Is Portal 2 on Mac?"]) == 0


def test_average_mistakes_are_one_line_errors_before_anything_is_written(three_runs, tmp_path, capsys):
    first, second, third = (str(r.path) for r in three_runs)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    cases = [
        (["average", first, "--output-dir", str(tmp_path / "a")], "at least two runs"),
        (["average", first, second, first, "--output-dir", str(tmp_path / "b")], "listed twice"),
        (["average", first, str(tmp_path / "none"), "--output-dir", str(tmp_path / "c")], "does not exist"),
        (["average", first, second, "--output-dir", f"{second}/soup"], "inside the run"),
        (["average", first, second, "--output-dir", str(occupied)], "already exists"),
        (["average", first, second, "--output-dir", str(occupied), "--overwrite"], "did not write"),
        (["average", first, second, "--output-dir", first, "--overwrite"], "is the run"),
        (["average", first, second, "--output-dir", third, "--overwrite"], "did not write"),  # a trained run
    ]
    # Copies of the second run made unfit one way each: another prompt, an adapter of other modules, unfinished.
    import shutil

    from safetensors.torch import load_file, save_file

    def unfit(name: str) -> str:
        copy = tmp_path / name
        shutil.copytree(second, copy)
        return str(copy)

    prompt = unfit("other-prompt")
    (tmp_path / "other-prompt" / "prompt.txt").write_text("Sentence: {sentence}\nMR:")
    modules = unfit("other-modules")
    weights = tmp_path / "other-modules" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "q_proj" not in k}, str(weights))
    running = unfit("running")
    info = json.loads((tmp_path / "running" / "run.json").read_text())
    (tmp_path / "running" / "run.json").write_text(json.dumps({**info, "status": "running"}))
    cases += [
        (["average", first, prompt, "--output-dir", str(tmp_path / "d")], "differ in prompt.txt"),
        (["average", first, modules, "--output-dir", str(tmp_path / "e")], "adapts other modules"),
        (["average", first, running, "--output-dir", str(tmp_path / "f")], "has not finished"),
    ]
    before = snapshot(*(r.path for r in three_runs), occupied)
    for argv, expected in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
    assert snapshot(*(r.path for r in three_runs), occupied) == before
    assert not any((tmp_path / name).exists() for name in "abcdef")


def test_the_average_of_lora_updates_with_different_scalings_and_whole_modules_is_exact():
    import torch

    from mrtune.infer.average import average_tensors, lora_scaling

    torch.manual_seed(0)
    names = ("m.lora_A.weight", "m.lora_B.weight", "head.modules_to_save.weight")
    members = []
    for rank, config in ((2, {"r": 2, "lora_alpha": 4}), (3, {"r": 3, "lora_alpha": 6, "use_rslora": True})):
        tensors = dict(zip(names, (torch.randn(rank, 5), torch.randn(4, rank), torch.randn(4, 5))))
        members.append((tensors, lora_scaling(config)))
    assert members[1][1] == 6 / 3**0.5
    out = average_tensors(members)
    update = out["m.lora_B.weight"] @ out["m.lora_A.weight"]  # scaling 1, rank 5
    expected = sum(s * t["m.lora_B.weight"] @ t["m.lora_A.weight"] for t, s in members) / 2
    torch.testing.assert_close(update, expected)
    torch.testing.assert_close(out[names[2]], (members[0][0][names[2]] + members[1][0][names[2]]) / 2)


def test_a_served_ensemble_takes_only_prompts_every_member_can():
    """Each member decodes every prompt, so the server's prompt limit is the smallest of the members'."""
    import dataclasses
    from types import SimpleNamespace

    from mrtune.config import Config
    from mrtune.serve.engine import Engine

    def model(positions: int):
        return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions))

    config = Config()
    short = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=300))
    run = SimpleNamespace(path="runs/a")
    alone = Engine(run, config, None, model(8192), None, None)
    assert alone.max_prompt_tokens == config.data.max_length - config.eval.max_new_tokens
    others = [(run, short, None, model(8192), None), (run, config, None, model(256), None)]
    together = Engine(run, config, None, model(8192), None, None, others)
    assert together.max_prompt_tokens == 256 - config.eval.max_new_tokens
