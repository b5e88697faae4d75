"""The accuracy and speed levers: name and specifier substitution, DoRA, regional compilation of decoder layers."""

import random
import re

import pytest
import torch

from mrtune.config import load_config
from mrtune.errors import MrtuneError
from mrtune.model.build import attach_lora, load_base_model
from mrtune.task.augment import SPECIFIER_WORDS, invented_name, substitute_names, substitute_specifiers
from mrtune.task.data import Example, load_split
from mrtune.task.generalization import UNSEEN_NAMES
from mrtune.task.mr import parse_mr
from mrtune.train.recipe import train

ROWS = [
    Example("Is Portal 2 on Mac? I loved Portal 2.", "verify_attribute(name[Portal 2], has_mac_release[yes])"),
    Example("What do you think of puzzle games?", "request_attribute(genres[])"),
    Example("The racer Dirt: Showdown.", "inform(name[Dirt: Showdown], genres[driving/racing])"),
    Example("It is called dirt showdown.", "inform(name[Dirt: Showdown])"),  # not verbatim: left alone
]


def test_name_substitution_swaps_sentence_and_mr_together():
    out = substitute_names(ROWS, 1.0, seed=0)
    assert len(out) == len(ROWS) and out[1] == ROWS[1] and out[3] == ROWS[3]
    for before, after in ((ROWS[0], out[0]), (ROWS[2], out[2])):
        old = dict(parse_mr(before.meaning_representation).slots)["name"]
        new = dict(parse_mr(after.meaning_representation).slots)["name"]
        assert new != old and old not in after.sentence
        assert after.sentence == before.sentence.replace(old, new)
        assert after.meaning_representation == before.meaning_representation.replace(old, new)
    assert out == substitute_names(ROWS, 1.0, seed=0)  # deterministic
    assert out != substitute_names(ROWS, 1.0, seed=1)
    assert substitute_names(ROWS, 0.0, seed=0) == ROWS


def test_name_substitution_hits_about_the_fraction_asked_for():
    rows = load_split("viggo:train")
    out = substitute_names(rows, 0.5, seed=3)
    swappable = sum(
        1 for r in rows if (name := dict(parse_mr(r.meaning_representation).slots).get("name")) and name in r.sentence
    )
    changed = sum(a != b for a, b in zip(rows, out))
    assert 0.45 * swappable < changed < 0.55 * swappable


def test_invented_names_never_reuse_a_word_of_the_unseen_name_set():
    reserved = {w.lower() for n in UNSEEN_NAMES for w in re.findall(r"\w+", n)}
    rng = random.Random(0)
    names = [invented_name(rng) for _ in range(2000)]
    assert not {w.lower() for n in names for w in re.findall(r"\w+", n)} & reserved
    assert len(set(names)) > 1900
    for name in names[:50]:
        parse_mr(f"inform(name[{name}])")  # no bracket or comma that would break an MR


SPECIFIER_ROWS = [
    Example("What is the most addictive game you have played?", "request(specifier[addictive])"),
    Example("Addictive games like Tetris, do you like them?", "give_opinion(name[Tetris], specifier[addictive])"),
    Example("Is the newest game an addictive or addictive one?", "request(specifier[addictive])"),  # twice: kept
    Example("Which game do you find most hooking?", "request(specifier[addictive])"),  # not written: kept
    Example("Do you like Portal 2?", "request_explanation(name[Portal 2])"),
]


def test_specifier_substitution_swaps_one_whole_word_mention_and_the_slot():
    out = substitute_specifiers(SPECIFIER_ROWS, 1.0, seed=0)
    assert out[2:] == SPECIFIER_ROWS[2:]
    for before, after in zip(SPECIFIER_ROWS[:2], out[:2]):
        new = dict(parse_mr(after.meaning_representation).slots)["specifier"]
        assert new in SPECIFIER_WORDS and new != "addictive"
        assert after.meaning_representation == before.meaning_representation.replace("addictive", new)
        assert after.sentence == re.sub("addictive", new, before.sentence, flags=re.I) or after.sentence == (
            before.sentence.replace("Addictive", new.capitalize())
        )
    assert out[1].sentence[0].isupper()
    assert out == substitute_specifiers(SPECIFIER_ROWS, 1.0, seed=0)
    assert substitute_specifiers(SPECIFIER_ROWS, 0.0, seed=0) == SPECIFIER_ROWS


def test_specifier_words_are_none_of_the_scored_splits_specifiers():
    """Training on a word that validation or test asks for would flatter their scores."""
    scored = {
        dict(parse_mr(r.meaning_representation).slots).get("specifier", "").lower()
        for split in ("viggo:validation", "viggo:test")
        for r in load_split(split)
    }
    assert not scored & set(SPECIFIER_WORDS)
    assert all(word.strip() == word and word for word in SPECIFIER_WORDS)
    for word in SPECIFIER_WORDS:
        parse_mr(f"request(specifier[{word}])")


def test_specifier_substitution_reaches_the_training_rows(tmp_path, tiny_overrides):
    from mrtune.train.recipe import Recipe

    rows = {}
    for fraction in (0.0, 1.0):
        config = load_config(None, [*tiny_overrides, f"data.specifier_substitution={fraction}"])
        recipe = Recipe(config, tmp_path / "run", failure=None, stop=None, progress=False)
        recipe._setup_data()  # the data step alone: the rows the loop will tokenize
        rows[fraction] = recipe.train_examples
    specifiers = [dict(parse_mr(e.meaning_representation).slots).get("specifier") for e in rows[1.0]]
    assert any(word in SPECIFIER_WORDS for word in specifiers)
    assert len(rows[1.0]) == len(rows[0.0]) and rows[1.0] != rows[0.0]


def test_name_substitution_out_of_range_is_a_config_error():
    with pytest.raises(MrtuneError, match="data.name_substitution must be between 0 and 1"):
        load_config(None, ["data.name_substitution=1.5"])


def test_dora_run_trains_and_evaluates(tmp_path, tiny_overrides):
    from mrtune.infer.evaluate import evaluate
    from mrtune.train.recipe import train

    overrides = [*tiny_overrides, "lora.dora=true", "train.max_steps=2", "train.eval_every=2"]
    run = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert '"use_dora": true' in (run.adapter / "adapter_config.json").read_text()
    metrics = evaluate(run.path, limit=2, progress=False)
    assert metrics["n"] == 2


@pytest.mark.slow
def test_compiled_layers_match_eager_values_and_gradients(tiny_model_dir):
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=float32", "lora.dropout=0.0", "lora.r=4"]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    eager = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    config.model.compile_layers = True
    torch.manual_seed(0)
    compiled = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    for model in (eager, compiled):  # LoRA B starts at zero: give it values, the same in both
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.1)
    ids = torch.randint(0, 500, (1, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]  # two packed rows
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-4)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-4), name
    assert sum(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl is not None for m in compiled.modules()) == 2


def test_compiling_layers_allows_a_graph_per_layer(tiny_model_dir):
    """Past dynamo's recompile limit a frame silently runs eagerly: the limit must cover every layer."""
    from mrtune.model.build import compile_decoder_layers

    # torch's own patcher: pytest's monkeypatch undoes by delattr here, which hides the key from dynamo for the rest
    # of the session ("torch._dynamo.config.recompile_limit does not exist" in a later test's compile).
    with torch._dynamo.config.patch(recompile_limit=8):
        config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
        model = load_base_model(config.model, torch.device("cpu"))
        model.model.layers.extend(model.model.layers[0].__class__(model.config, i) for i in range(2, 12))
        assert compile_decoder_layers(model) == 12
        assert torch._dynamo.config.recompile_limit >= 24
    assert torch._dynamo.config.recompile_limit >= 8  # still there for the tests after this one


def test_compile_mode_reaches_every_compiled_layer(tiny_model_dir, monkeypatch):
    """model.compile_mode (e.g. CUDA graphs through `reduce-overhead`) is the mode each decoder layer compiles with."""
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: modes.append(kwargs.get("mode")))
    overrides = [f"model.name={tiny_model_dir}", "model.compile_layers=true", "model.compile_mode=reduce-overhead"]
    config = load_config(None, overrides)
    attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    assert modes == ["reduce-overhead"] * config_layers(tiny_model_dir)
    with pytest.raises(MrtuneError, match="model.compile_mode"):
        load_config(None, ["model.compile_mode=fast"])


def test_a_compiled_run_says_its_first_step_compiles(tiny_overrides, tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(kwargs.get("mode")))
    train(load_config(None, [*tiny_overrides, "model.compile_layers=true", "train.max_steps=1"]), tmp_path / "run")
    assert compiled and "the first step compiles" in capsys.readouterr().out
    train(load_config(None, [*tiny_overrides, "train.max_steps=1"]), tmp_path / "plain")
    assert "compiles" not in capsys.readouterr().out


GRAPHS = ["model.compile_layers=true", "model.compile_mode=reduce-overhead"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.compile_mode=reduce-overhead"], "nothing is compiled"),
        ([*GRAPHS, "model.gradient_checkpointing=true"], "50x"),
        ([*GRAPHS, "model.gradient_checkpointing=auto"], "50x"),
    ],
)
def test_a_compile_mode_that_cannot_help_is_refused_in_one_line(overrides, named):
    with pytest.raises(MrtuneError, match=named) as refused:
        load_config(None, overrides)
    assert "\n" not in str(refused.value)
    load_config(None, GRAPHS)  # without checkpointing: accepted


def config_layers(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def test_label_smoothing_mixes_the_uniform_target_into_the_training_loss(tiny_model_dir):
    from mrtune.train.recipe import target_loss, target_positions

    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
    model = load_base_model(config.model, torch.device("cpu")).eval()
    ids = torch.randint(0, 500, (1, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    batch = {"input_ids": ids, "labels": labels}
    keep = target_positions(labels)
    with torch.no_grad():
        plain, smooth = (target_loss(model, batch, keep, eps) for eps in (0.0, 0.1))
        logp = model(input_ids=ids).logits[0, keep].float().log_softmax(-1)
    uniform = -logp.mean(-1).sum()
    assert torch.allclose(smooth, 0.9 * plain + 0.1 * uniform, rtol=1e-4)
    with pytest.raises(MrtuneError, match="train.label_smoothing"):
        load_config(None, ["train.label_smoothing=1"])


@pytest.mark.slow
def test_validation_runs_compiled_layers_eagerly(tiny_model_dir):
    """Validation and samples have other shapes than the training step: they must not compile every layer again."""
    from torch._dynamo.utils import counters

    from mrtune.model.build import eager_for_evaluation

    overrides = [f"model.name={tiny_model_dir}", "model.dtype=float32", "lora.dropout=0.0", "model.compile_layers=true"]
    config = load_config(None, overrides)
    model = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    model(input_ids=torch.randint(0, 500, (1, 16)))  # the training shape: compiles
    compiled = counters["frames"]["ok"]
    assert compiled > 0
    model.eval()
    with torch.no_grad(), eager_for_evaluation():
        for length in (5, 9, 23):
            model(input_ids=torch.randint(0, 500, (2, length)))
    assert counters["frames"]["ok"] == compiled


def test_attaching_adapters_warns_users_of_nothing_they_cannot_fix(tiny_model_dir):
    import warnings

    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
    model = load_base_model(config.model, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's read of transformers' deprecated attribute
        attach_lora(model, config.lora, config.model)
