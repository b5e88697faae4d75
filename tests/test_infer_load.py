"""The start-up of evaluate, predict and serve: the fast paths compute exactly what the plain ones do, the cache
of constrained-decoding masks is used only where it applies, and mistakes are refused before torch is imported."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import viggo_rows

from mrtune.config import ModelSettings
from mrtune.infer import constrained
from mrtune.infer.constrained import MRConstraint, load_cached_constraint, save_cached_constraint
from mrtune.infer.predict import CONSTRAINT_CACHE
from mrtune.model.build import load_trained_model
from mrtune.model.resolve import load_tokenizer
from mrtune.task.mr import Vocabulary

SOURCE = Path(__file__).resolve().parents[1] / "src"

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["linears", "linears+lm_head"])
def tied_model_with_adapter(request, tmp_path_factory, tiny_model_dir):
    """The tiny Mistral with tied input and output embeddings (as SmolLM2's), and a random LoRA adapter on every
    linear layer of the decoder, and with the second param on the tied output head too (peft's merge then moves the
    input embeddings with it): B is random too, so every adapted weight moves when merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path_factory.mktemp("tied")
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base / "model")
    model = AutoModelForCausalLM.from_pretrained(base / "model", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / "model" / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.manual_seed(1)
    head = request.param.endswith("lm_head")
    targets = LINEARS + (["lm_head"] if head else [])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(base / "adapter")
    return base / "model", base / "adapter", head


def test_merged_model_equals_peft_merge_on_weights_in_memory(tied_model_with_adapter):
    """load_trained_model's merge (into weights copied out of the mmapped checkpoint first) gives bit for bit the
    weights of peft's merge into a base read wholly into memory, and ties the embeddings exactly when it does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir, head_adapted = tied_model_with_adapter
    settings = ModelSettings(name=str(model_dir), dtype="float32")
    merged = load_trained_model(settings, adapter_dir, torch.device("cpu"))

    reference_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, disable_mmap=True)
    reference = PeftModel.from_pretrained(reference_base, str(adapter_dir)).merge_and_unload()

    def tied(model) -> bool:
        return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    assert tied(merged) == tied(reference) == (merged.lm_head.weight is merged.model.embed_tokens.weight)

    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[query], plain[query])
    assert torch.equal(ours["lm_head.weight"], plain["lm_head.weight"]) != head_adapted


# ---- the constrained decoder's disk cache --------------------------------------------------------------------

VOCABULARY = Vocabulary.from_mrs(row["meaning_representation"] for row in viggo_rows("train", 10**6))
REFERENCES = [row["meaning_representation"] for row in viggo_rows("test", 40)]


def _walk(constraint: MRConstraint, tokenizer, texts: list[str], budget: int = 64) -> list[list[int]]:
    """Feed tokenized MRs (+ EOS) through the constraint as a decode would, all rows at once; the bank rows of every
    step. Budgets run out for the longer ones, so budget masks are computed too."""
    rows = [ids + [constraint.eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    steps = max(map(len, rows))
    rows = [row + [constraint.eos] * (steps - len(row)) for row in rows]
    state_ids = [constraint._state_id(constraint.grammar.start)] * len(rows)
    seen = []
    for step in range(steps):
        if step:
            state_ids = constraint.step_ids(state_ids, [row[step - 1] for row in rows])
        seen.append(constraint.rows_for(state_ids, budget - step))
    return seen


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_a_cached_constraint_allows_what_a_new_one_does(tiny_tokenizer, tmp_path):
    """What one process computed is read back by the next, and every mask and transition in it equals a fresh
    constraint's, for the states it met and with the budgets it saw."""
    first = load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path)
    assert first.learned == (0, 0)
    _walk(first, tiny_tokenizer, REFERENCES, budget=40)
    save_cached_constraint(first)
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.cache_key}.pkl"]
    assert (tmp_path / f"{first.cache_key}.pkl").stat().st_mode & 0o777 == 0o600

    cached = load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path)
    assert cached.learned == first.learned and cached.learned[0] > 50 and cached.learned[1] > 0
    assert _walk(cached, tiny_tokenizer, REFERENCES, budget=40) == _walk(first, tiny_tokenizer, REFERENCES, budget=40)
    assert cached.learned == cached.saved  # the same decode again has nothing new to compute, nor to save
    fresh = MRConstraint(tiny_tokenizer, VOCABULARY)
    for state in first._entries:
        for left in (2, 5, 12, 10**6):
            assert torch.equal(cached.allowed_tokens(state, left), fresh.allowed_tokens(state, left)), (state, left)
        for token in torch.nonzero(fresh.allowed_tokens(state, 10**6)).flatten().tolist():
            assert cached.next_state(state, token) == fresh.next_state(state, token)
    # And the masks on the model's device, which the cache does not keep, are rebuilt from it.
    scores = torch.zeros((2, len(tiny_tokenizer) + 3))
    assert torch.equal(cached.refused([0, 1], scores.device, scores.shape[1]), first.refused([0, 1], "cpu", 603))


def test_a_cache_of_another_tokenizer_vocabulary_or_code_is_not_used(tiny_tokenizer, tmp_path, monkeypatch):
    first = load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path)
    _walk(first, tiny_tokenizer, REFERENCES[:5])
    save_cached_constraint(first)
    assert load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path).learned == first.learned

    others = {"vocabulary without values": (tiny_tokenizer, VOCABULARY.without_values())}
    other_eos = copy.deepcopy(tiny_tokenizer)
    other_eos.eos_token = "<pad>"
    others["another EOS"] = (other_eos, VOCABULARY)
    more_tokens = copy.deepcopy(tiny_tokenizer)
    more_tokens.add_tokens(["inform(name["])
    others["one more token"] = (more_tokens, VOCABULARY)
    for what, (tokenizer, vocabulary) in others.items():
        constraint = load_cached_constraint(tokenizer, vocabulary, tmp_path)
        assert constraint.learned == (0, 0) and constraint.cache_key != first.cache_key, what

    monkeypatch.setattr(constrained, "CACHE_FORMAT", constrained.CACHE_FORMAT + 1)  # as for a change of the code
    assert load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path).learned == (0, 0)


def test_a_damaged_or_foreign_cache_file_is_rebuilt_and_replaced(tiny_tokenizer, tmp_path):
    first = load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path)
    _walk(first, tiny_tokenizer, REFERENCES[:5])
    save_cached_constraint(first)
    path = tmp_path / f"{first.cache_key}.pkl"
    whole = path.read_bytes()

    path.write_bytes(whole[: len(whole) // 2])  # torn
    constraint = load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path)
    assert constraint.learned == (0, 0)
    _walk(constraint, tiny_tokenizer, REFERENCES[:5])
    save_cached_constraint(constraint)
    assert load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path).learned == first.learned

    path.chmod(0o622)  # others could have written it: pickle would run their code
    assert load_cached_constraint(tiny_tokenizer, VOCABULARY, tmp_path).learned == (0, 0)


def test_the_cache_keeps_the_most_recently_used_files(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(constrained, "CACHE_KEEP", 2)
    names = []
    for number, vocabulary in enumerate((VOCABULARY, VOCABULARY.without_values(), Vocabulary(("inform",), ("name",)))):
        constraint = load_cached_constraint(tiny_tokenizer, vocabulary, tmp_path)
        _walk(constraint, tiny_tokenizer, ["inform(name[Tetris])"])
        save_cached_constraint(constraint)
        os.utime(tmp_path / f"{constraint.cache_key}.pkl", (1000 + number, 1000 + number))
        names.append(f"{constraint.cache_key}.pkl")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    from conftest import train_tiny_run

    rows = {"train": 16, "validation": 4, "test": 6}
    return train_tiny_run(tmp_path_factory.mktemp("load-run"), tiny_model_dir, rows)


def test_evaluate_writes_the_cache_and_decodes_the_same_with_it(tiny_run, tmp_path, monkeypatch):
    from mrtune.infer.evaluate import evaluate

    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path))
    run = tiny_run
    metrics = evaluate(run.path, progress=False)
    assert 0 < metrics["load_seconds"] and 0 < metrics["decode_seconds"]  # load_model's share, apart from decoding's
    predictions = (run.eval_dir("test") / "predictions.jsonl").read_text()
    (cache_file,) = (Path(os.environ["MRTUNE_CACHE"]) / CONSTRAINT_CACHE).iterdir()
    written = cache_file.read_bytes()
    evaluate(run.path, progress=False)
    assert (run.eval_dir("test") / "predictions.jsonl").read_text() == predictions
    assert cache_file.read_bytes() == written  # the second decode found every mask it needed in the cache


def test_mistakes_are_refused_before_torch_is_imported(tiny_run, tmp_path):
    """evaluate and predict check their arguments and the run first: the error comes without torch's imports."""
    commands = [
        ["evaluate", str(tmp_path / "no-run")],
        ["evaluate", str(tiny_run.path), "--data", str(tmp_path / "missing.jsonl")],
        ["predict", str(tiny_run.path)],
        ["predict", str(tiny_run.path), "--input", str(tiny_run.path / "run.json")],
    ]
    script = (
        "import json, sys\n"
        "from mrtune.cli import main\n"
        f"codes = [main(argv) for argv in {commands!r}]\n"
        "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    codes, imported = json.loads(done.stdout.splitlines()[-1])
    assert codes == [2, 2, 2, 2], done.stderr
    assert imported == []
    errors = done.stderr.splitlines()
    assert "does not exist" in errors[0] and "missing.jsonl" in errors[1] and "give a sentence" in errors[2]
    assert "--input needs --output" in errors[3]


def test_evaluate_parses_the_run_tokenizer_once(tiny_run, tmp_path, monkeypatch):
    """check_intact and load_model both require the tokenizer; its JSON (3.5 MB for SmolLM2) is parsed once."""
    from mrtune.infer.evaluate import evaluate
    from mrtune.run.rundir import RunDir

    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path))
    parsed = []
    read_json = RunDir.read_json

    def counting(self, path, kind=dict):
        parsed.append(Path(path).name)
        return read_json(self, path, kind)

    monkeypatch.setattr(RunDir, "read_json", counting)
    evaluate(tiny_run.path, limit=2, progress=False)
    assert parsed.count("tokenizer.json") == 1 and parsed.count("tokenizer_config.json") == 1


def test_the_libraries_are_frozen_and_the_model_stays_collectable(tiny_run):
    """In a fresh process load_model freezes what the imports made (the collector skips it from then on), but not
    the model, whose reference cycles a process that loads several must still collect."""
    script = (
        "import gc, json, sys, weakref\n"
        "from mrtune.infer.predict import load_model\n"
        "from mrtune.run.rundir import RunDir\n"
        f"run = RunDir.open({str(tiny_run.path)!r})\n"
        "tokenizer, model = load_model(run, run.config(), False)\n"
        "frozen = gc.get_freeze_count()\n"
        "refs = [weakref.ref(model), weakref.ref(tokenizer)]\n"
        "del model, tokenizer\n"
        "gc.collect()\n"
        "print(json.dumps([frozen, [ref() is None for ref in refs], gc.isenabled()]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    frozen, collected, enabled = json.loads(done.stdout.splitlines()[-1])
    assert frozen > 100_000  # torch, transformers and peft: a few hundred thousand objects at least
    assert collected == [True, True] and enabled
