"""Splits joined from several sources with "+" (`data.train: viggo:train+viggo:validation`): rows, problems,
duplicate warnings, and the spec a run records."""

from __future__ import annotations

import json

import pytest
from conftest import viggo_rows, write_jsonl

from mrtune.errors import MrtuneError
from mrtune.task.data import find_duplicates, load_split, load_splits


def test_joined_sources_give_every_row_in_order_with_its_own_location():
    train, validation = load_split("viggo:train"), load_split("viggo:validation")
    joined = load_split("viggo:train+viggo:validation")
    assert joined == train + validation and len(joined) == 5103 + 714
    assert joined[0].source == "train.jsonl:1" and joined[5103].source == "validation.jsonl:1"


def test_rows_seen_in_a_joined_train_split_are_a_duplicate_warning():
    splits = load_splits({"train": "viggo:train+viggo:validation", "validation": "viggo:validation"})
    assert find_duplicates(splits) == [
        "714 of 714 validation sentence(s) also occur in train (first: validation.jsonl:1 = validation.jsonl:1): "
        "they inflate the validation score; remove them from one of the splits"
    ]


def test_problems_of_every_source_are_reported_at_once(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", viggo_rows("train", 2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"target": "A is fine."}\nnot json\n', encoding="utf-8")
    worse = tmp_path / "worse.csv"
    worse.write_text("target,meaning_representation\nB is good.,inform(name[B]\n", encoding="utf-8")
    with pytest.raises(MrtuneError) as error:
        load_split(f"{good}+{bad}+{worse}")
    message = str(error.value)
    assert "3 bad row(s)" in message
    assert "bad.jsonl:1: missing field 'meaning_representation'" in message
    assert "bad.jsonl:2: not valid JSON" in message
    assert "worse.csv:2: 'meaning_representation' is not a meaning representation" in message


@pytest.mark.parametrize("spec", ["viggo:train+", "+viggo:train", "viggo:train++viggo:test"])
def test_an_empty_source_is_an_error(spec):
    with pytest.raises(MrtuneError, match="has an empty source: join sources with a single '\\+'"):
        load_split(spec)


def test_a_file_with_a_plus_in_its_name_is_one_source(tmp_path):
    path = write_jsonl(tmp_path / "train+more.jsonl", viggo_rows("train", 3))
    assert [e.source for e in load_split(str(path))] == [
        "train+more.jsonl:1",
        "train+more.jsonl:2",
        "train+more.jsonl:3",
    ]
    with pytest.raises(MrtuneError, match="does not exist"):
        load_split(str(tmp_path / "train+other.jsonl"))  # neither a file nor two: the missing part is named


def test_a_run_trained_on_joined_sources_records_the_spec(tmp_path, tiny_model_dir):
    from conftest import train_tiny_run

    spec = f"{tmp_path / 'train.jsonl'}+{tmp_path / 'validation.jsonl'}"  # the files train_tiny_run writes
    run = train_tiny_run(tmp_path, tiny_model_dir, {"train": 8, "validation": 8, "test": 4}, [f"data.train={spec}"])
    assert run.config().data.train == spec
    assert any("8 of 8 validation sentence(s) also occur in train" in w for w in run.info()["data_warnings"])
    vocabulary = json.loads(run.vocabulary.read_text())
    acts = {row["meaning_representation"].split("(")[0] for row in viggo_rows("train", 8) + viggo_rows("validation", 8)}
    assert set(vocabulary["dialogue_acts"]) == acts
