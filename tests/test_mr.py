"""Tests for mrtune.task.mr: MR parsing, metrics and the decoding vocabulary."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

from mrtune.task.mr import (
    MeaningRepresentation,
    MRParseError,
    Vocabulary,
    dialogue_act_confusion,
    parse_mr,
    score,
    slot_errors,
    try_parse_mr,
    value_items,
)

DATA = Path(__file__).parents[1] / "src/mrtune/data"
SPLITS = ("train", "validation", "test")


@cache
def _mrs(split: str) -> tuple[str, ...]:
    # Cached: the train split is read by two tests and the suite should stay fast.
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as f:
        return tuple(json.loads(line)["meaning_representation"] for line in f if line.strip())


# --- parsing -----------------------------------------------------------------


def test_parse_keeps_act_slots_and_written_order():
    mr = parse_mr(
        "verify_attribute(name[Little Big Adventure], rating[average], has_multiplayer[no], platforms[PlayStation])"
    )
    assert mr == MeaningRepresentation(
        "verify_attribute",
        (
            ("name", "Little Big Adventure"),
            ("rating", "average"),
            ("has_multiplayer", "no"),
            ("platforms", "PlayStation"),
        ),
    )
    assert mr.attributes == ("name", "rating", "has_multiplayer", "platforms")


@pytest.mark.parametrize(
    "text, slots",
    [
        ("inform(genres[driving/racing, sport])", (("genres", "driving/racing, sport"),)),
        (
            "inform(esrb[E 10+ (for Everyone 10 and Older)], platforms[PlayStation, Xbox, PC])",
            (("esrb", "E 10+ (for Everyone 10 and Older)"), ("platforms", "PlayStation, Xbox, PC")),
        ),
        ("inform(name[Dirt: Showdown], release_year[2012])", (("name", "Dirt: Showdown"), ("release_year", "2012"))),
        ("request_attribute(esrb[])", (("esrb", ""),)),
        ("request_attribute(esrb[   ])", (("esrb", ""),)),
        ("inform(name[  Tom   Clancy's\t The\nDivision ])", (("name", "Tom Clancy's The Division"),)),
        (
            "  \n inform( name[A] ,rating[good] ,  genres[puzzle]  ) \n",
            (("name", "A"), ("rating", "good"), ("genres", "puzzle")),
        ),
    ],
)
def test_parse_tricky_values(text, slots):
    assert parse_mr(text).slots == slots


def test_canonical_string_normalises_spacing_and_handles_no_slots():
    assert (
        str(parse_mr(" inform( name[  Dirt:   Showdown ] ,rating[good])  "))
        == "inform(name[Dirt: Showdown], rating[good])"
    )
    assert str(parse_mr("request_attribute(esrb[])")) == "request_attribute(esrb[])"
    assert str(parse_mr("request_explanation( )")) == "request_explanation()"
    assert str(MeaningRepresentation("confirm", ())) == "confirm()"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty meaning representation"),
        ("   ", "empty meaning representation"),
        ("Inform(name[A])", "expected a dialogue act name ([a-z_]+) at position 0"),
        ("(name[A])", "expected a dialogue act name"),
        ("inform name[A])", "expected '(' after dialogue act 'inform' at position 6"),
        ("inform2(name[A])", "expected '(' after dialogue act 'inform' at position 6"),
        ("inform", "expected '(' after dialogue act 'inform' at position 6 (end of text)"),
        (
            "inform(rating average)",
            "expected '[' after attribute 'rating' at position 13 in 'inform(rating average)'",
        ),
        ("inform(name [A])", "expected '[' after attribute 'name' at position 11"),
        ("inform(Name[A])", "expected an attribute name ([a-z_]+) or ')' at position 7"),
        ("inform(name[A], )", "expected an attribute name ([a-z_]+) after ',' at position 16"),
        ("inform(name[A]", "expected ',' or ')' after the value of attribute 'name' at position 14 (end of text)"),
        ("inform(name[A] rating[good])", "expected ',' or ')' after the value of attribute 'name' at position 15"),
        ("inform(name[A)", "missing ']' to close the value of attribute 'name' opened at position 11"),
        ("inform(name[A [B]])", "unexpected '[' inside the value of attribute 'name' at position 14"),
        ("inform(name[A]])", "expected ',' or ')' after the value of attribute 'name' at position 14"),
        ("inform(name[A]) thanks", "unexpected text 'thanks' after the closing ')' at position 16"),
        ("inform(name[A])inform(name[B])", "after the closing ')' at position 15"),
        ("inform(name[A], rating[good], name[B])", "duplicate attribute 'name' (first at position 7) at position 30"),
    ],
)
def test_parse_errors_name_problem_and_position(text, fragment):
    with pytest.raises(MRParseError) as info:
        parse_mr(text)
    assert fragment in str(info.value)


def test_parse_error_is_a_value_error_with_position():
    with pytest.raises(ValueError) as info:
        parse_mr("inform(rating average)")
    assert isinstance(info.value, MRParseError)
    assert info.value.position == 13
    assert info.value.text == "inform(rating average)"


def test_parse_error_quotes_only_a_window_of_long_text():
    text = "inform(name[A]) " + "x" * 1000
    with pytest.raises(MRParseError) as info:
        parse_mr(text)
    message = str(info.value)
    assert "at position 16 near" in message
    assert len(message) < 300


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a str"):
        parse_mr(None)


def test_try_parse_mr():
    assert try_parse_mr("inform(name[A])") == MeaningRepresentation("inform", (("name", "A"),))
    assert try_parse_mr("inform(name[A]") is None
    assert try_parse_mr("") is None


@pytest.mark.parametrize("split", SPLITS)
def test_every_dataset_mr_round_trips(split):
    mrs = _mrs(split)
    assert mrs, f"no MRs loaded from {split}.jsonl"
    broken = [mr for mr in mrs if str(parse_mr(mr)) != mr]
    assert broken == []


# --- vocabulary --------------------------------------------------------------


def test_vocabulary_from_train_matches_ontology():
    ontology = json.loads((DATA / "ontology.json").read_text(encoding="utf-8"))
    vocabulary = Vocabulary.from_mrs(_mrs("train"))
    assert len(vocabulary.dialogue_acts) == 9
    assert vocabulary.dialogue_acts == tuple(sorted(ontology["da"]))
    assert "name" in vocabulary.attributes
    assert set(vocabulary.attributes) <= set(ontology) - {"da"}
    assert list(vocabulary.attributes) == sorted(vocabulary.attributes)


def test_vocabulary_json_round_trip_and_normalisation():
    vocabulary = Vocabulary.from_mrs(["inform(rating[good], name[A])", "request(specifier[short])", "inform(name[B])"])
    assert vocabulary == Vocabulary(("inform", "request"), ("name", "rating", "specifier"))
    assert Vocabulary(("request", "inform", "inform"), ("rating", "name")).dialogue_acts == ("inform", "request")
    restored = Vocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict())))
    assert restored == vocabulary
    assert vocabulary.to_dict() == {
        "dialogue_acts": ["inform", "request"],
        "attributes": ["name", "rating", "specifier"],
        "closed_values": {},
        "list_attributes": [],
        "item_order": {},
    }


def test_closed_values_of_viggo_train_are_its_categorical_attributes():
    vocabulary = Vocabulary.from_mrs(_mrs("train"))
    assert {attribute for attribute, _ in vocabulary.closed_values} == {
        "available_on_steam",
        "esrb",
        "genres",
        "has_linux_release",
        "has_mac_release",
        "has_multiplayer",
        "platforms",
        "player_perspective",
        "rating",
    }
    assert vocabulary.items_of("rating") == ("average", "excellent", "good", "poor")  # never empty in training
    assert vocabulary.items_of("has_multiplayer") == ("", "no", "yes")  # has_multiplayer[] occurs
    assert vocabulary.items_of("platforms") == ("", "Nintendo", "Nintendo Switch", "PC", "PlayStation", "Xbox")
    assert len(vocabulary.items_of("genres")) == 26 and "action-adventure" in vocabulary.items_of("genres")
    assert vocabulary.list_attributes == ("genres", "platforms", "player_perspective")
    for open_attribute in ("name", "developer", "specifier", "exp_release_date", "release_year"):
        assert vocabulary.items_of(open_attribute) is None, open_attribute
    # Every item of validation and test is a training item: closing loses no reference value (specifier is open).
    closed = dict(vocabulary.closed_values)
    for split in ("validation", "test"):
        for text in _mrs(split):
            for attribute, value in parse_mr(text).slots:
                if attribute in closed:
                    assert set(value_items(value)) <= set(closed[attribute]), (split, text)


def _uses(attribute: str, values: list[str], times: int) -> list[str]:
    return [f"inform({attribute}[{value}])" for value in values for _ in range(times)]


def test_closed_rule_few_items_each_used_often_enough():
    # 3 items used 20 times each: closed; the list value gives its items, the empty value "".
    vocabulary = Vocabulary.from_mrs(_uses("rating", ["good", "poor", "good, poor"], 20) + _uses("rating", [""], 20))
    assert vocabulary.items_of("rating") == ("", "good", "poor")
    # 19 uses per item on average: too little evidence, open.
    assert Vocabulary.from_mrs(_uses("rating", ["good", "poor"], 19) + ["inform(rating[good])"]).closed_values == ()
    assert Vocabulary.from_mrs(_uses("rating", ["good", "poor"], 19) + _uses("rating", ["good"], 2)).items_of(
        "rating"
    ) == ("good", "poor")
    # 41 distinct items, however often: open.
    many = [f"v{i}" for i in range(41)]
    assert Vocabulary.from_mrs(_uses("name", many, 30)).items_of("name") is None
    assert Vocabulary.from_mrs(_uses("name", many[:40], 30)).items_of("name") == tuple(sorted(many[:40]))
    # A value that is not a plain list of distinct items (an empty item, a comma inside one, an item twice): open.
    assert Vocabulary.from_mrs(_uses("genres", ["a", "a, , b"], 30)).items_of("genres") is None
    assert Vocabulary.from_mrs(_uses("genres", ["a", "a,b"], 30)).items_of("genres") is None
    assert Vocabulary.from_mrs(_uses("genres", ["a", "b, a, b"], 30)).items_of("genres") is None
    # A list attribute: one whose training values list several items, and which is closed.
    lists = Vocabulary.from_mrs(_uses("genres", ["a", "a, b"], 30) + _uses("rating", ["good", "poor"], 30))
    assert lists.list_attributes == ("genres",) and lists.items_of("rating") == ("good", "poor")
    assert Vocabulary.from_mrs(_uses("name", ["A, B", "C"], 1)).list_attributes == ()  # open: not a list attribute


def test_list_items_keep_the_order_training_lists_them_in():
    viggo = Vocabulary.from_mrs(_mrs("train"))
    assert viggo.order_of("platforms") == ("PlayStation", "Xbox", "Nintendo", "Nintendo Switch", "PC")
    genres = viggo.order_of("genres")
    assert list(genres) == sorted(genres, key=str.casefold)  # ViGGO lists genres alphabetically
    assert viggo.order_of("rating") is None  # not a list attribute
    # Every list of validation and test keeps training's order: the exported grammars lose no reference.
    for split in ("validation", "test"):
        for text in _mrs(split):
            for attribute, value in parse_mr(text).slots:
                order = viggo.order_of(attribute)
                if order and value:
                    ranks = [order.index(item) for item in value_items(value)]
                    assert ranks == sorted(ranks), (split, text)
    # b before c in one value, c before b in another: no one order.
    conflict = Vocabulary.from_mrs(_uses("genres", ["a, b", "b, c", "c, b"], 30))
    assert conflict.list_attributes == ("genres",) and conflict.order_of("genres") is None
    # Items no value orders between them: alphabetical, whatever order training met them in.
    assert Vocabulary.from_mrs(_uses("genres", ["Zed, b", "a"], 30)).order_of("genres") == ("a", "Zed", "b")
    assert Vocabulary.from_dict(json.loads(json.dumps(viggo.to_dict()))) == viggo
    with pytest.raises(ValueError, match=re.escape("item_order['rating'] must list each item of a list attribute")):
        Vocabulary(("inform",), ("rating",), {"rating": ["good", "poor"]}, ("rating",), {"rating": ["good"]})


def test_closed_values_round_trip_and_an_old_vocabulary_allows_every_value():
    vocabulary = Vocabulary(("inform",), ("name", "rating"), {"rating": ["poor", "good", "good"]}, ("rating",))
    assert vocabulary.closed_values == (("rating", ("good", "poor")),)
    assert vocabulary.to_dict()["closed_values"] == {"rating": ["good", "poor"]}
    assert vocabulary.to_dict()["list_attributes"] == ["rating"]
    assert Vocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict()))) == vocabulary
    assert vocabulary.without_values() == Vocabulary(("inform",), ("name", "rating"))
    old = Vocabulary.from_dict({"dialogue_acts": ["inform"], "attributes": ["name", "rating"]})
    assert old.closed_values == () and old.list_attributes == () and old.items_of("rating") is None
    assert old.item_order == () and old.order_of("rating") is None
    hash(vocabulary)  # frozen and hashable, as before


@pytest.mark.parametrize(
    ("closed_values", "error", "fragment"),
    [
        ({"colour": ["red"]}, ValueError, "names 'colour', which is not one of its attributes"),
        ({"rating": []}, ValueError, "has no items"),
        ({"rating": "good"}, TypeError, "must be a collection of str items"),
        ({"rating": [1]}, TypeError, "must be a collection of str items"),
        ({"rating": ["a, b"]}, ValueError, "has 'a, b', which is not text without brackets, commas or outer spaces"),
        ({"rating": [" good"]}, ValueError, "which is not text"),
        ({"rating": ["go]od"]}, ValueError, "which is not text"),
        ({"rating": ["go  od"]}, ValueError, "which is not text"),
    ],
)
def test_closed_values_reject_bad_input(closed_values, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        Vocabulary(("inform",), ("name", "rating"), closed_values)
    with pytest.raises(error, match=re.escape(fragment)):
        Vocabulary.from_dict(
            {"dialogue_acts": ["inform"], "attributes": ["name", "rating"], "closed_values": closed_values}
        )
    with pytest.raises(ValueError, match="list_attributes names 'name', which is not a closed attribute"):
        Vocabulary(("inform",), ("name", "rating"), {"rating": ["good"]}, ("name",))
    with pytest.raises(TypeError, match="list_attributes must be a collection of names, not a single str"):
        Vocabulary(("inform",), ("name", "rating"), {"rating": ["good"]}, "rating")
    with pytest.raises(TypeError, match="closed_values is a list, expected an object"):
        Vocabulary.from_dict({"dialogue_acts": ["inform"], "attributes": ["name"], "closed_values": []})


def test_vocabulary_rejects_bad_input():
    with pytest.raises(MRParseError, match="MR 1 is not valid"):
        Vocabulary.from_mrs(["inform(name[A])", "inform(name[A]"])
    with pytest.raises(ValueError, match="missing attributes"):
        Vocabulary.from_dict({"dialogue_acts": ["inform"]})
    with pytest.raises(ValueError, match="not a name"):
        Vocabulary(("Inform",), ())


# --- metrics -----------------------------------------------------------------

# Four rows whose metrics are worked out by hand below.
REFERENCES = [
    "inform(name[A], rating[good], platforms[PC, Xbox])",  # 3 slots
    "request(specifier[short])",  # 1 slot
    "verify_attribute(name[B], rating[poor])",  # 2 slots
    "inform(name[C], genres[puzzle])",  # 2 slots
]
PREDICTIONS = [
    "inform(rating[good], name[A], platforms[PC, Xbox])",  # reordered: 3/3 slots right, not an exact match
    "  request(specifier[short])\n",  # exact match once stripped
    "confirm(name[B], rating[average], esrb[M])",  # wrong act, 1 of 3 predicted slots right
    "inform(name[C], genres[puzzle]",  # unparseable: no slots, wrong act
]


def test_score_hand_computed():
    result = score(PREDICTIONS, REFERENCES)
    assert list(result) == [
        "n",
        "exact_match",
        "exact_match_unordered",
        "dialogue_act_accuracy",
        "slot_precision",
        "slot_recall",
        "slot_f1",
        "valid_mr_rate",
        "per_dialogue_act",
    ]
    assert result["n"] == 4
    assert result["exact_match"] == pytest.approx(1 / 4)
    assert result["exact_match_unordered"] == pytest.approx(2 / 4)
    assert result["dialogue_act_accuracy"] == pytest.approx(2 / 4)
    # true positives 3+1+1+0 = 5, predicted 3+1+3+0 = 7, reference 3+1+2+2 = 8
    assert result["slot_precision"] == pytest.approx(5 / 7)
    assert result["slot_recall"] == pytest.approx(5 / 8)
    assert result["slot_f1"] == pytest.approx(2 / 3)  # 2 * (5/7) * (5/8) / (5/7 + 5/8)
    assert result["valid_mr_rate"] == pytest.approx(3 / 4)


def test_score_per_dialogue_act():
    per_act = score(PREDICTIONS, REFERENCES)["per_dialogue_act"]
    assert list(per_act) == ["inform", "request", "verify_attribute"]
    # sorted by act name, not by first appearance
    assert list(score(PREDICTIONS[::-1], REFERENCES[::-1])["per_dialogue_act"]) == list(per_act)
    assert per_act["inform"]["n"] == 2
    assert per_act["inform"]["exact_match"] == pytest.approx(0.0)
    assert per_act["inform"]["dialogue_act_accuracy"] == pytest.approx(0.5)
    assert per_act["inform"]["slot_f1"] == pytest.approx(0.75)  # P = 3/3, R = 3/5
    assert per_act["request"] == pytest.approx(
        {"n": 1, "exact_match": 1.0, "dialogue_act_accuracy": 1.0, "slot_f1": 1.0}
    )
    assert per_act["verify_attribute"] == pytest.approx(
        {"n": 1, "exact_match": 0.0, "dialogue_act_accuracy": 0.0, "slot_f1": 0.4}  # P = 1/3, R = 1/2
    )


def test_score_exact_match_is_on_raw_strings_but_unordered_is_on_parsed_values():
    result = score(["inform(name[ A ])"], ["inform(name[A])"])
    assert result["exact_match"] == 0.0
    assert result["exact_match_unordered"] == 1.0
    assert result["slot_f1"] == 1.0


def test_score_unordered_needs_the_same_act():
    result = score(["confirm(name[A])"], ["inform(name[A])"])
    assert result["exact_match_unordered"] == 0.0
    assert result["slot_precision"] == 1.0
    assert result["dialogue_act_accuracy"] == 0.0


def test_score_zero_denominators_give_zero():
    result = score(["garbage", "inform(name[A]"], ["request_explanation()", "inform(name[A])"])
    assert result["valid_mr_rate"] == 0.0
    assert result["slot_precision"] == 0.0  # nothing predicted
    assert result["slot_recall"] == 0.0
    assert result["slot_f1"] == 0.0
    no_slots = score(["request_explanation()"], ["request_explanation()"])
    assert no_slots["slot_recall"] == 0.0 and no_slots["slot_f1"] == 0.0
    assert no_slots["exact_match"] == 1.0 and no_slots["exact_match_unordered"] == 1.0


def test_score_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["inform(name[A])", "inform(name[A])"], ["inform(name[A])"])
    with pytest.raises(ValueError, match="empty"):
        score([], [])
    with pytest.raises(MRParseError, match="reference 1 is not a valid MR"):
        score(["inform(name[A])", "inform(name[A])"], ["inform(name[A])", "inform(name[A]"])


# --- error analysis ----------------------------------------------------------


def test_dialogue_act_confusion():
    assert dialogue_act_confusion(PREDICTIONS, REFERENCES) == {
        "inform": {"<invalid>": 1, "inform": 1},
        "request": {"request": 1},
        "verify_attribute": {"confirm": 1},
    }
    # both levels sorted by name, not by first appearance ("inform" is predicted before "<invalid>")
    assert list(dialogue_act_confusion(PREDICTIONS, REFERENCES)["inform"]) == ["<invalid>", "inform"]
    assert list(dialogue_act_confusion(PREDICTIONS[::-1], REFERENCES[::-1])) == [
        "inform",
        "request",
        "verify_attribute",
    ]
    with pytest.raises(ValueError):
        dialogue_act_confusion(["inform(name[A])"], [])


def test_slot_errors_hand_made():
    errors = slot_errors(PREDICTIONS, REFERENCES)
    # row 2: rating[poor] missed, rating[average] and esrb[M] invented; row 3 (unparseable) misses both slots
    assert errors == {"missed": {"genres": 1, "name": 1, "rating": 1}, "invented": {"esrb": 1, "rating": 1}}


def test_slot_errors_sorted_by_count_then_name():
    # "name" is missed (row 0) before "genres" (row 1), so only sorting puts genres first
    errors = slot_errors(
        ["inform(name[Z], rating[poor])", "inform(name[B], rating[good])"],
        ["inform(name[A], rating[good])", "inform(name[B], rating[poor], genres[x])"],
    )
    assert list(errors["missed"].items()) == [("rating", 2), ("genres", 1), ("name", 1)]
    assert list(errors["invented"].items()) == [("rating", 2), ("name", 1)]
