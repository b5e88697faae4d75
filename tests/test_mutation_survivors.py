"""Tests written for the mutants that survived `make mutation` (see BENCHMARKS.md, "Mutation testing")."""

from __future__ import annotations

import json

import pytest

from mrtune.task.mr import MRParseError, parse_mr

PARSED = "inform(name[A])"


def _message(text: str) -> tuple[int, str]:
    with pytest.raises(MRParseError) as info:
        parse_mr(text)
    return info.value.position, str(info.value)


@pytest.mark.parametrize(
    "text,position,tail",
    [
        # Up to 200 characters the whole text is quoted.
        (PARSED + " " + "x" * 184, 16, lambda t: f"at position 16 in {t!r}"),
        # Longer: a window of 60 characters either side, with "..." where it cuts the text.
        (PARSED + " " + "x" * 185, 16, lambda t: f"at position 16 near {t[:76]!r}..."),
        (PARSED + " " * 45 + "x" * 200, 60, lambda t: f"at position 60 near {t[:120]!r}..."),
        (PARSED + " " * 46 + "x" * 200, 61, lambda t: f"at position 61 near ...{t[1:121]!r}..."),
        (PARSED + " " * 126 + "x" * 60, 141, lambda t: f"at position 141 near ...{t[81:]!r}"),
        (PARSED + " " * 126 + "x" * 61, 141, lambda t: f"at position 141 near ...{t[81:201]!r}..."),
        ("inform(name[" + "a" * 300 + "]", 313, lambda t: f"at position 313 (end of text) near ...{t[253:]!r}"),
    ],
)
def test_parse_errors_quote_the_text_or_a_window_around_the_problem(text, position, tail):
    found, message = _message(text)
    assert found == position
    assert message.endswith(tail(text)), message


# -- mr.py: input checks and their messages, exactly --------------------------------------------------------------
def test_score_input_errors_say_which_row_and_why():
    from mrtune.task.mr import score

    with pytest.raises(ValueError, match=r"^no predictions to score: both lists are empty$"):
        score([], [])
    with pytest.raises(TypeError, match=r"^prediction 1 is a int, expected a str$"):
        score(["inform(name[A])", 3], ["inform(name[A])", "inform(name[B])"])
    with pytest.raises(TypeError, match=r"^reference 0 is a NoneType, expected a str$"):
        score(["inform(name[A])"], [None])


def test_a_bad_reference_or_training_mr_keeps_its_text_and_position():
    from mrtune.task.mr import Vocabulary, score

    with pytest.raises(MRParseError, match=r"^reference 1 is not a valid MR: ") as info:
        score(["x", "y"], ["inform(name[A])", "inform(name[A]"])
    assert info.value.text == "inform(name[A]"
    with pytest.raises(MRParseError, match=r"^MR 0 is not valid: ") as info:
        Vocabulary.from_mrs(["inform(name A)"])
    assert info.value.text == "inform(name A)"


def test_dialogue_act_confusion_counts_every_pair():
    from mrtune.task.mr import dialogue_act_confusion

    predictions = ["inform(name[A])", "inform(name[B])", "request(name[C])", "garbage"]
    references = ["inform(name[A])", "inform(name[B])", "inform(name[C])", "inform(name[D])"]
    assert dialogue_act_confusion(predictions, references) == {"inform": {"<invalid>": 1, "inform": 2, "request": 1}}


def test_vocabulary_errors_name_the_field():
    from mrtune.task.mr import Vocabulary

    with pytest.raises(TypeError, match=r"^Vocabulary.dialogue_acts must be a collection of names, not a single str$"):
        Vocabulary("inform", ("name",))
    with pytest.raises(TypeError, match=r"^Vocabulary.attributes must be a collection of names, not a single str$"):
        Vocabulary(("inform",), "name")
    with pytest.raises(ValueError, match=r"^Vocabulary.dialogue_acts contains 'Inform', which is not a name"):
        Vocabulary(("Inform",), ("name",))
    with pytest.raises(ValueError, match=r"^Vocabulary.attributes contains 'na-me', which is not a name"):
        Vocabulary(("inform",), ("na-me",))
    with pytest.raises(ValueError, match=r"^vocabulary is missing dialogue_acts, attributes; expected keys"):
        Vocabulary.from_dict({})


# -- data.py: reading files ----------------------------------------------------------------------------------------
MR_A, MR_B = "inform(name[A])", "request(name[B])"


def _load(tmp_path, name, content, **fields):
    from mrtune.task.data import load_split

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return load_split(str(path), **fields)


def _problems(tmp_path, name, content, **fields) -> str:
    from mrtune.errors import MrtuneError

    with pytest.raises(MrtuneError) as info:
        _load(tmp_path, name, content, **fields)
    return str(info.value).replace(f"{tmp_path}/", "")


def test_bundled_split_names_are_exact():
    from mrtune.errors import MrtuneError
    from mrtune.task.data import load_split

    message = "unknown bundled split 'viggo:test:train': use viggo:train, viggo:validation or viggo:test"
    with pytest.raises(MrtuneError, match=f"^{message}$"):
        load_split("viggo:test:train")


def test_hub_specs_go_to_the_hub_and_bad_ones_are_named():
    from mrtune.errors import MrtuneError
    from mrtune.task.data import load_split

    with pytest.raises(MrtuneError, match=r"^bad hub spec 'hf:viggo': use hf:<dataset id>:<split>"):
        load_split("hf:viggo")
    with pytest.raises(MrtuneError, match=r"^cannot load dataset '\./no/such/dataset' split 'train' from the hub"):
        load_split("hf:./no/such/dataset:train")


def test_a_csv_with_a_bom_blank_lines_and_crlf_inside_a_quoted_field(tmp_path):
    content = (
        b"\xef\xbb\xbftarget,meaning_representation\r\n"
        b'"first\r\nsentence",' + MR_A.encode() + b"\r\n"
        b"\r\n"
        b"second," + MR_B.replace(",", "").encode() + b"\r\n"
    )
    examples = _load(tmp_path, "d.csv", content)
    assert [(e.sentence, e.meaning_representation, e.source) for e in examples] == [
        ("first\r\nsentence", MR_A, "d.csv:2"),
        ("second", MR_B, "d.csv:5"),
    ]


def test_a_csv_row_with_bytes_that_are_not_utf8_is_reported_once_and_the_rest_read(tmp_path):
    content = b"target,meaning_representation\nok," + MR_A.encode() + b"\nbad \xff," + MR_A.encode() + b"\n"
    content += b"fine," + MR_B.encode() + b"\n"
    message = _problems(tmp_path, "d.csv", content)
    assert message.startswith("d.csv: 1 bad row(s): d.csv:3: the line is not UTF-8 (its byte 5)")
    # The rows after a line that is not UTF-8 are still read and checked.
    content = b"target,meaning_representation\nbad \xff," + MR_A.encode() + b"\nnext,oops\n"
    message = _problems(tmp_path, "e.csv", content)
    assert message.startswith(
        "e.csv: 2 bad row(s): e.csv:2: the line is not UTF-8 (its byte 5): re-save the file as UTF-8; e.csv:3: "
    )


def test_csv_fields_over_the_size_limit_are_named_with_their_line(tmp_path):
    import csv

    huge = "x" * (csv.field_size_limit() + 10)
    message = _problems(tmp_path, "h.csv", f'"{huge}",meaning_representation\nok,{MR_A}\n')
    assert message.startswith("h.csv: 1 bad row(s): h.csv:1: bad CSV header (field larger than field limit")
    content = f'target,meaning_representation\n"{huge}",{MR_A}\nalso,oops\nok,{MR_A}\n'
    message = _problems(tmp_path, "r.csv", content)
    assert message.startswith("r.csv: 2 bad row(s): r.csv:2: bad CSV (field larger than field limit")
    assert "; r.csv:3: 'meaning_representation' is not a meaning representation" in message  # the next line


def test_json_arrays_may_start_with_whitespace_and_their_errors_are_located(tmp_path):
    examples = _load(tmp_path, "a.json", f'\n  [{{"target": "s", "meaning_representation": "{MR_A}"}}]\n')
    assert [(e.sentence, e.source) for e in examples] == [("s", "a.json[0]")]
    message = _problems(tmp_path, "b.json", '[{"target": "s",\n "meaning_representation": }]')
    assert message.startswith("b.json: 1 bad row(s): b.json:2: not valid JSON (Expecting value, column 28)")


def test_jsonl_blank_lines_and_bad_rows_do_not_stop_the_reading(tmp_path):
    rows = [
        json.dumps({"target": "one", "meaning_representation": MR_A}),
        "",
        "{not json",
        json.dumps({"target": "", "meaning_representation": MR_A}),
        json.dumps({"meaning_representation": MR_A}),
        '{"target": "six", "meaning_representation": "nope"}',
        '{"target": "seven", "meaning_representation": ""}',
        '{"target": "eight"}',
        json.dumps({"target": "nine", "meaning_representation": MR_B}),
    ]
    message = _problems(tmp_path, "d.jsonl", "\n".join(rows) + "\n")
    assert message == (
        "d.jsonl: 6 bad row(s): d.jsonl:3: not valid JSON (Expecting property name enclosed in double quotes, "
        "column 2); d.jsonl:4: field 'target' is empty or not text; d.jsonl:5: missing field 'target'; "
        "d.jsonl:6: 'meaning_representation' is not a meaning representation act(attr[value], ...); "
        "d.jsonl:7: field 'meaning_representation' is empty or not text (and 1 more). Fix them, or point "
        "data.input_field/data.output_field at the right fields (expected 'target' and 'meaning_representation')"
    )
    good = [rows[0], "", rows[-1]]
    assert [e.sentence for e in _load(tmp_path, "g.jsonl", "\n".join(good) + "\n")] == ["one", "nine"]


def test_exactly_five_problems_are_all_shown_with_nothing_more(tmp_path):
    rows = [json.dumps({"target": f"s{i}", "meaning_representation": "nope"}) for i in range(5)]
    message = _problems(tmp_path, "five.jsonl", "\n".join(rows))
    assert "(and" not in message and message.count("is not a meaning representation") == 5
    assert (
        "five.jsonl:5: 'meaning_representation' is not a meaning representation act(attr[value], ...). Fix" in message
    )
    inputs = ['{"target": ""}', '{"target": "ok"}']
    message = _problems(tmp_path, "inputs.jsonl", "\n".join(inputs), output_field=None)
    assert message.endswith("(expected 'target')")


def test_prediction_inputs_have_no_meaning_representation(tmp_path):
    examples = _load(tmp_path, "in.jsonl", '{"target": "a"}\n{"target": "b"}\n', output_field=None)
    assert [(e.sentence, e.meaning_representation) for e in examples] == [("a", None), ("b", None)]


def test_a_field_no_row_has_lists_up_to_eight_fields_found_after_the_earlier_problems(tmp_path):
    fields = {f"f{i}": "v" for i in range(10)}
    content = "{broken\n" + "\n".join(json.dumps(fields) for _ in range(2))
    message = _problems(tmp_path, "w.jsonl", content)
    assert message.startswith(
        "w.jsonl: 3 bad row(s): no row has the field 'target' (fields found: f0, f1, f2, f3, f4, f5, f6, f7); "
        "no row has the field 'meaning_representation' (fields found: f0, f1, f2, f3, f4, f5, f6, f7); "
        "w.jsonl:1: not valid JSON"
    )


def test_duplicates_need_no_reference_split_and_spread_sample_limits():
    from mrtune.errors import MrtuneError
    from mrtune.task.data import Example, find_duplicates, spread_sample

    assert find_duplicates({"test": [Example("a", MR_A, "t:1")]}) == []
    assert spread_sample(["a", "b", "c"], 1) == ["a"]
    assert spread_sample(["a", "b", "c"], 3) == ["a", "b", "c"]
    for limit in (0, -2):
        with pytest.raises(MrtuneError, match=f"^the row limit must be at least 1, got {limit}$"):
            spread_sample(["a", "b"], limit)


# -- batching.py -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mrtune.model.resolve import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_a_completion_never_gets_the_tokenizers_special_tokens(tiny_model_dir):
    """A tokenizer that adds a BOS (Mistral, Llama) adds it to the prompt only, never inside the completion."""
    from tokenizers.processors import TemplateProcessing

    from mrtune.model.resolve import load_tokenizer
    from mrtune.task.data import Example
    from mrtune.train.batching import tokenize_examples

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pad = tokenizer.pad_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", pad)])
    assert tokenizer("x")["input_ids"][0] == pad  # the stand-in BOS is added by default
    (row,), _ = tokenize_examples([Example("Is Portal 2 on Mac?", MR_A)], tokenizer, "compact")
    completion = tokenizer(MR_A, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row.input_ids[0] == pad and row.input_ids.count(pad) == 1
    assert row.labels[-len(completion) :] == completion


def test_tokenize_reports_what_it_kept_and_the_first_row_too_long(tokenizer):
    from mrtune.errors import MrtuneError
    from mrtune.task.data import Example
    from mrtune.train.batching import tokenize_examples

    examples = [Example("short", MR_A, "d.jsonl:1"), Example("a much longer sentence " * 30, MR_B, "d.jsonl:2")]
    rows, report = tokenize_examples(examples, tokenizer, "compact", max_length=60, too_long="skip")
    assert (report.rows, report.too_long, report.longest) == (1, 1, len(rows[0]))
    rows, report = tokenize_examples(examples[1:], tokenizer, "compact", max_length=60, too_long="skip")
    assert (rows, report.rows, report.too_long, report.longest) == ([], 0, 1, 0)
    with pytest.raises(
        MrtuneError, match=r"^1 row\(s\) are longer than data.max_length=60 tokens \(first: d.jsonl:2, "
    ):
        tokenize_examples(examples, tokenizer, "compact", max_length=60)
    # The default limit is 512 tokens: a row of exactly 512 passes, one of 513 does not.
    candidates = [Example("word " * words + "a " * extra, MR_A) for words in range(140, 190) for extra in range(6)]
    rows, _ = tokenize_examples(candidates, tokenizer, "compact", max_length=10**6)
    sizes = {}
    for example, row in zip(candidates, rows):
        sizes.setdefault(len(row), example)
    assert {512, 513} <= set(sizes), sorted(sizes)
    (row,), _ = tokenize_examples([sizes[512]], tokenizer, "compact")
    assert len(row) == 512
    with pytest.raises(MrtuneError, match=r"data.max_length=512 tokens"):
        tokenize_examples([sizes[513]], tokenizer, "compact")


def test_default_plans_group_rows_of_similar_length_with_seed_zero():
    from mrtune.train.batching import plan_batches

    lengths = [5, 50, 12, 33, 41, 7, 29, 18, 60, 2, 24]  # 11 distinct lengths, batches of 3: one batch of 2
    plan = plan_batches(lengths, batch_size=3)
    assert plan == plan_batches(lengths, batch_size=3, seed=0, group_by_length=True, packing=False)
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks = [by_length[i : i + 3] for i in range(0, len(lengths), 3)]
    assert sorted(plan) == sorted(chunks)  # the 2-row batch holds the two shortest rows
    assert plan != plan_batches(lengths, batch_size=3, seed=1)
    budget = dict(batch_size=1, batch_tokens=120)  # padded unless told to pack: rows x longest <= 120
    assert plan_batches(lengths, **budget) != plan_batches(lengths, packing=True, **budget)
    assert plan_batches(lengths, **budget) == plan_batches(lengths, packing=False, **budget)


def test_load_splits_reports_the_problems_of_every_split_at_once(tmp_path):
    from mrtune.errors import MrtuneError
    from mrtune.task.data import load_splits

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"target": "s", "meaning_representation": MR_A}) + "\n")
    splits = load_splits({"train": str(good), "test": "viggo:test"})
    assert list(splits) == ["train", "test"] and len(splits["test"]) == 1083
    assert (splits["train"][0].sentence, splits["train"][0].meaning_representation) == ("s", MR_A)
    with pytest.raises(MrtuneError, match=r"^\[data.test\] unknown bundled split 'viggo:nope'"):
        load_splits({"train": str(good), "test": "viggo:nope"})
    with pytest.raises(MrtuneError) as info:
        load_splits({"train": "viggo:bad", "validation": str(good), "test": "viggo:nope"})
    assert str(info.value).startswith(
        "2 data splits have problems: [data.train] unknown bundled split 'viggo:bad': use viggo:train, "
        "viggo:validation or viggo:test [data.test] unknown bundled split 'viggo:nope'"
    )
    with pytest.raises(MrtuneError, match=r"^\[data.train\] .*good.jsonl:1: missing field 'sentence'\. "):
        load_splits({"train": str(good)}, input_field="sentence", output_field="meaning_representation")


def test_a_hub_spec_loads_through_datasets_and_its_failures_are_one_line(tmp_path, monkeypatch):
    import datasets

    from mrtune.errors import MrtuneError
    from mrtune.task.data import load_split, load_splits

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's cache
    local = tmp_path / "local"
    local.mkdir()
    (local / "train.jsonl").write_text(
        json.dumps({"target": "s", "mr": MR_A}) + "\n" + json.dumps({"target": "t", "mr": MR_B}) + "\n"
    )
    examples = load_split(f"hf:{local}:train", output_field="mr")
    assert [(e.sentence, e.meaning_representation, e.source) for e in examples] == [
        ("s", MR_A, f"{local}[train]:0"),
        ("t", MR_B, f"{local}[train]:1"),
    ]
    assert load_splits({"train": f"hf:{local}:train"}, output_field="mr")["train"] == examples

    missing = str(tmp_path / ("x" * 200) / "no:such")  # a colon inside the name: the split is after the last one
    with pytest.raises(Exception) as direct:
        datasets.load_dataset(missing, split="train")
    reason = str(direct.value).strip().splitlines()[0][:160]
    assert len(str(direct.value).strip().splitlines()[0]) > 160
    with pytest.raises(MrtuneError) as info:
        load_split(f"hf:{missing}:train")
    assert str(info.value) == (
        f"cannot load dataset {missing!r} split 'train' from the hub ({reason}): use the bundled copy "
        "(viggo:train) or a local file"
    )

    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(MrtuneError, match=r"from the hub \(RuntimeError\): use the bundled copy"):
        load_split("hf:some/dataset:test")


def test_parse_mr_messages_for_non_text_empty_nested_and_trailing_input():
    with pytest.raises(TypeError, match=r"^parse_mr expects a str, got int$"):
        parse_mr(5)
    with pytest.raises(MRParseError) as info:
        parse_mr("   ")
    assert str(info.value) == "empty meaning representation: expected 'act(attr[value], ...)'"
    assert (info.value.text, info.value.position) == ("", 0)
    # The first '[' inside a value is the one reported, also when the value is never closed.
    assert _message("inform(name[a[b[c]])")[0] == 13
    position, message = _message("inform(name[ab[")
    assert position == 14 and message.startswith("unexpected '[' inside the value of attribute 'name' at position 14")
    # Trailing text is quoted up to 40 characters, then cut with "...".
    _, message = _message(PARSED + " " + "y" * 40)
    assert message.startswith(f"unexpected text {'y' * 40!r} after the closing ')'")
    _, message = _message(PARSED + " " + "y" * 41)
    assert message.startswith(f"unexpected text {'y' * 40 + '...'!r} after the closing ')'")


# -- grammar.py: every UTF-8 lead byte range, at its bounds ------------------------------------------------------------
def test_the_grammar_takes_whole_characters_at_every_utf8_length_bound():
    from mrtune.task.grammar import DONE, MRGrammar
    from mrtune.task.mr import Vocabulary

    grammar = MRGrammar(Vocabulary(("inform",), ("name",)))

    def done(value: bytes) -> bool:
        state = grammar.advance(grammar.start, b"inform(name[" + value + b"])")
        return state is not None and state.phase == DONE

    # The first and last character of each UTF-8 length (lead bytes C2, DF, E0, EF, F0, F4), and the last ASCII one.
    for character in ("~", "\u0080", "\u07ff", "\u0800", "\ufffd", "\U00010000", "\U0010ffff", "a\u00e9b"):
        assert done(character.encode()), repr(character)
    # Bytes that cannot start a character, and characters cut short or overlong.
    for value in (
        b"\x80",
        b"\xbf",
        b"\xc0\x80",
        b"\xc1\xbf",
        b"\xf5\x80\x80\x80",
        b"\xdf",
        b"\xef\xbf",
        b"\xf4\x8f\xbf",
    ):
        assert not done(value), value
    assert not done(b"\xe0\x80\x80") and not done(b"\xf0\x80\x80\x80")  # overlong 3- and 4-byte forms


def test_the_grammar_refuses_del_and_an_empty_vocabulary():
    from mrtune.errors import MrtuneError
    from mrtune.task.grammar import MRGrammar
    from mrtune.task.mr import Vocabulary

    grammar = MRGrammar(Vocabulary(("inform",), ("name",)))
    assert grammar.accepts("inform(name[a~b])") and not grammar.accepts("inform(name[a\x7fb])")
    message = "^constrained decoding needs a vocabulary with at least one dialogue act and attribute$"
    for acts, attributes in ((("inform",), ()), ((), ("name",))):
        with pytest.raises(MrtuneError, match=message):
            MRGrammar(Vocabulary(acts, attributes))


def test_every_closing_takes_every_prefix_of_an_mr_to_the_end():
    """`closings(state)` is what finish_cost measures: each string must close the MR from that state."""
    from mrtune.task.grammar import DONE, MRGrammar
    from mrtune.task.mr import Vocabulary

    grammar = MRGrammar(Vocabulary(("inform", "request"), ("name", "rating")))
    for text in ("inform(name[Tetris], rating[good])", "request(rating[a \u00e4\u20ac\U00010348 x])"):
        data = text.encode()
        assert grammar.accepts(text)
        for cut in range(len(data)):
            state = grammar.advance(grammar.start, data[:cut])
            closings = grammar.closings(state)
            assert closings, (text, cut)
            for closing in closings:
                end = grammar.advance(state, closing)
                assert end is not None and end.phase == DONE, (data[:cut], closing)
