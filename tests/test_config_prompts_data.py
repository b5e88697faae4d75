"""Fast unit tests of the torch-free modules: config, prompts, data."""

from __future__ import annotations

from pathlib import Path

import pytest

from mrtune.config import Config, from_dict, load_config, to_yaml
from mrtune.errors import MrtuneError
from mrtune.task.data import load_split, spread_sample
from mrtune.task.prompts import build_prompt

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert (
        path.read_text().splitlines()[0] == f"# mrtune train --config configs/{path.name} "
        f"--output-dir {path.read_text().splitlines()[0].split('--output-dir ')[1]}"
    )


def test_shipped_configs_are_the_promised_ones():
    assert {p.name for p in CONFIGS} >= {"smollm2-cpu.yaml", "smollm2-gpu.yaml", "mistral-7b-qlora.yaml"}
    seed = load_config(CONFIGS[[p.name for p in CONFIGS].index("mistral-7b-qlora.yaml")])
    assert (seed.model.quantization, seed.lora.r, seed.lora.alpha, seed.data.completion_only) == ("nf4", 8, 16, True)
    assert "lm_head" in seed.lora.target_modules


def test_overrides_are_typed():
    config = load_config(
        None,
        [
            "train.learning_rate=3e-4",
            "train.max_steps=5",
            "lora.target_modules=q_proj,v_proj",
            "data.completion_only=false",
            "data.train_limit=none",
        ],
    )
    assert config.train.learning_rate == 3e-4 and config.train.max_steps == 5
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.completion_only is False and config.data.train_limit is None


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 1\n  batch_size: many\nmodel:\n  quantization: int3\nfoo: 1\n")
    with pytest.raises(MrtuneError) as error:
        load_config(path)
    message = str(error.value)
    assert "4 config problem(s)" in message and "\n" not in message
    assert "unknown config key 'train.learning_rat'" in message
    assert "train.batch_size: expected int, got 'many'" in message
    assert "model.quantization: 'int3' is not one of none, nf4" in message
    assert "unknown config key 'foo'" in message


def test_config_round_trips_through_yaml():
    import yaml

    config = load_config(None, ["train.epochs=3", "data.prompt_style=seed"])
    assert from_dict(yaml.safe_load(to_yaml(config))) == config


def test_prompts():
    assert (
        build_prompt("compact", " Is Portal 2 on Mac? ")
        == "### Sentence:\nIs Portal 2 on Mac?\n### Meaning representation:\n"
    )
    seed = build_prompt("seed", "Hi")
    assert seed.startswith("Given a target sentence") and seed.endswith(
        "### Target sentence:\nHi\n\n### Meaning representation:\n"
    )
    with pytest.raises(MrtuneError) as error:
        build_prompt("fancy", "Hi")
    assert str(error.value) == "unknown prompt style 'fancy': use one of seed, compact"


def test_bundled_splits_have_their_published_sizes():
    assert [len(load_split(f"viggo:{s}")) for s in ("train", "validation", "test")] == [5103, 714, 1083]


def test_csv_and_custom_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('mr,ref\n"inform(name[A, B], rating[good])",A B is good.\n', encoding="utf-8")
    [example] = load_split(str(path), input_field="ref", output_field="mr")
    assert example.sentence == "A B is good." and example.meaning_representation == "inform(name[A, B], rating[good])"
    assert example.source == "d.csv:2"


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"target": "x"}\n', "d.jsonl:1: missing field 'meaning_representation'"),
        ('{"meaning_representation": "inform(name[A])"}\n', "d.jsonl:1: missing field 'target'"),
        ('{"target": " ", "meaning_representation": "inform(name[A])"}\n', "field 'target' is empty"),
        ('{"target": "x", "meaning_representation": "inform(name A)"}\n', "is not a meaning representation"),
        ("[1, 2]\n", "expected a JSON object"),
        ("", "the split is empty"),
    ],
)
def test_bad_rows_are_named(tmp_path, content, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MrtuneError) as error:
        load_split(str(path))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(MrtuneError, match="does not exist"):
        load_split(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"target": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(MrtuneError, match="is not UTF-8"):
        load_split(str(path))


def test_spread_sample_is_even_and_deterministic():
    assert spread_sample(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread_sample(list(range(3)), 5) == [0, 1, 2]
