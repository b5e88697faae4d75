"""The unseen-name rows: every name swapped consistently in sentence and MR, never one seen in training."""

import json

import pytest

from mrtune.task.generalization import UNSEEN_NAMES, main, unseen_name_rows
from mrtune.task.mr import parse_mr

ROWS = [
    {
        "target": "Is Portal 2 on Mac? I loved Portal 2.",
        "meaning_representation": "verify_attribute(name[Portal 2], rating[excellent], has_mac_release[yes])",
    },
    {"target": "What do you think of puzzle games?", "meaning_representation": "request_attribute(genres[])"},
    {
        "target": "Dirt: Showdown is a racing game.",
        "meaning_representation": "inform(name[Dirt: Showdown], genres[driving/racing])",
    },
]


def test_names_are_swapped_in_sentence_and_mr():
    swapped = unseen_name_rows(ROWS, training_text="nothing relevant")
    assert [r["original_name"] for r in swapped] == ["Portal 2", "Dirt: Showdown"]  # the row without a name is skipped
    first = swapped[0]
    assert first["target"] == f"Is {UNSEEN_NAMES[0]} on Mac? I loved {UNSEEN_NAMES[0]}."
    assert (
        first["meaning_representation"]
        == f"verify_attribute(name[{UNSEEN_NAMES[0]}], rating[excellent], has_mac_release[yes])"
    )
    assert dict(parse_mr(swapped[1]["meaning_representation"]).slots)["name"] == UNSEEN_NAMES[1]


def test_a_name_seen_in_training_is_refused():
    with pytest.raises(ValueError, match="Kestrel Run"):
        unseen_name_rows(ROWS, training_text="... the new Kestrel Run game ...")


def test_the_bundled_test_split_yields_rows_with_unseen_names(tmp_path):
    out = tmp_path / "unseen.jsonl"
    main(["--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 800  # most ViGGO test rows name their game verbatim
    names = {dict(parse_mr(r["meaning_representation"]).slots)["name"] for r in rows}
    assert names == set(UNSEEN_NAMES)
    assert all(r["original_name"] not in r["target"] for r in rows)
