"""Constrained decoding: the grammar on hand-made strings, the cached masks against a brute-force check of every
token, and decoding with the tiny random model (garbage unless constrained), a SentencePiece-style tokenizer,
the CLI, and (marked `embedded`) the real SmolLM2 tokenizer and model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import viggo_rows
from transformers import AutoModelForCausalLM, LogitsProcessorList

from mrtune.errors import MrtuneError
from mrtune.infer.constrained import MRConstraint, token_bytes
from mrtune.infer.generation import generate
from mrtune.model.resolve import load_tokenizer
from mrtune.task.grammar import DONE, FINISHED, VALUE, MRGrammar
from mrtune.task.mr import Vocabulary, parse_mr, try_parse_mr, value_items
from mrtune.task.prompts import build_prompt

TRAIN_MRS = [row["meaning_representation"] for row in viggo_rows("train", 10**6)]
VOCABULARY = Vocabulary.from_mrs(TRAIN_MRS)
TEST_ROWS = viggo_rows("test", 8)
PROMPTS = [build_prompt("compact", row["target"]) for row in TEST_ROWS]


def assert_valid_mrs(outputs: list[str], vocabulary: Vocabulary = VOCABULARY) -> None:
    for text in outputs:
        mr = parse_mr(text)  # raises on a duplicate attribute, a bracket in a value, text after ')'
        assert str(mr) == text, f"not canonical (or not ending at ')'): {text!r}"
        assert mr.dialogue_act in vocabulary.dialogue_acts, text
        assert set(mr.attributes) <= set(vocabulary.attributes), text
        for attribute, value in mr.slots:
            items = vocabulary.items_of(attribute)
            assert items is None or set(value_items(value)) <= set(items), text


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tokenizer, model, MRConstraint(tokenizer, VOCABULARY)


# ---- the grammar ---------------------------------------------------------------------------------------------

ACCEPTED = [
    "inform(name[Tetris])",
    "request_attribute(esrb[])",
    "inform(name[Tetris], release_year[2031])",  # numbers stay open: a year not in training
    "verify_attribute(name[Little Big Adventure], rating[average], has_multiplayer[no], platforms[PlayStation])",
    "inform(name[Tomb Raider: Legend], developer[Eidos Montréal], genres[action-adventure, shooter])",
    " inform(name[Tetris])",  # SentencePiece tokenizers write the first word as "▁inform"
]
REJECTED = {
    "inform(name[Tetris], name[Doom])": "attribute twice",
    "inform(name[Tetris]": "not closed",
    "inform(title[Tetris])": "attribute not in the vocabulary",
    "tell(name[Tetris])": "act not in the vocabulary",
    "Inform(name[Tetris])": "act not in the vocabulary",
    "inform()": "no slot",
    "inform(name[ Tetris])": "space at the start of a value",
    "inform(name[Tetris ])": "space at the end of a value",
    "inform(name[Tet  ris])": "doubled space",
    "inform(name[Tet\nris])": "control character",
    "inform(name[a[b]])": "bracket in a value",
    "inform(name[Tetris],rating[good])": "separator is ', '",
    "inform(name[Tetris]) ": "text after ')'",
    "inform(name[Tetris]))": "text after ')'",
    "  inform(name[Tetris])": "two leading spaces",
}


def test_grammar_accepts_valid_and_rejects_invalid_strings():
    grammar = MRGrammar(VOCABULARY)
    for text in ACCEPTED:
        assert grammar.accepts(text), text
        assert str(parse_mr(text)) == text.strip()
    for text, why in REJECTED.items():
        assert not grammar.accepts(text), f"accepted {text!r} ({why})"
    # Well-formed UTF-8 only: a cut character, an overlong form, a surrogate.
    for data in (b"inform(name[Tet\xc3])", b"inform(name[\xe0\x80\x80])", b"inform(name[\xed\xa0\x80])"):
        state = grammar.advance(grammar.start, data)
        assert state is None or state.phase != DONE, data
    assert grammar.advance(grammar.start, "inform(name[é])".encode()).phase == DONE


def test_grammar_accepts_every_training_mr_and_no_comma_after_the_last_attribute():
    assert len(VOCABULARY.closed_values) == 9  # values constrained (tests/test_mr.py checks which)
    grammar = MRGrammar(VOCABULARY)
    assert all(grammar.accepts(text) for text in TRAIN_MRS)
    every = "inform(" + ", ".join(f"{a}[{(VOCABULARY.items_of(a) or ('x',))[-1]}]" for a in VOCABULARY.attributes)
    assert grammar.advance(grammar.start, (every + ")").encode()).phase == DONE
    assert grammar.advance(grammar.start, (every + ",").encode()) is None  # nothing left to write after it


# Values of closed attributes outside their training items (the first five were predictions of a trained model).
OUTSIDE_CLOSED_VALUES = {
    "inform(name[Tetris], esrb[Tarsier Studios])": "a developer as an esrb",
    "inform(name[Tetris], esrb[E 10 (for Everyone 10 and Older)])": "an esrb item cut short",
    "inform(name[Tetris], platforms[Steam])": "not a platform of training",
    "inform(name[Tetris], genres[vehicle/racing, combat])": "genre items not in training",
    "inform(name[Tetris], player_perspective[top down])": "not a perspective of training",
    "inform(name[Tetris], rating[great])": "not a rating of training",
    "inform(name[Tetris], rating[])": "rating is never empty in training",
    "inform(name[Tetris], rating[goo])": "a prefix of an item",
    "inform(name[Tetris], rating[goodd])": "an item continued",
    "inform(name[Tetris], genres[action, ])": "an empty item in a list",
    "inform(name[Tetris], genres[, action])": "an empty item in a list",
    "inform(name[Tetris], genres[action,adventure])": "items joined without the space",
    "inform(name[Tetris], genres[action , adventure])": "items joined by ' , '",
    "inform(name[Tetris], genres[action,, adventure])": "a doubled comma",
    "inform(name[Tetris], platforms[Nintendo Switch 2])": "an item continued past the longest",
    "inform(name[Tetris], rating[good, poor])": "rating is one item in training, not a list",
    "inform(name[Tetris], platforms[PC, Xbox, PC])": "an item twice",
    "inform(name[Tetris], platforms[Nintendo, Nintendo Switch, PC, PlayStation, Xbox, PC])": "more items than it has",
}
WITHIN_CLOSED_VALUES = [
    "inform(name[Tetris], platforms[Nintendo])",
    "inform(name[Tetris], platforms[Nintendo Switch])",  # an item that extends another
    "inform(name[Tetris], platforms[Nintendo, Nintendo Switch, PC, PlayStation, Xbox])",
    "inform(name[Tetris], platforms[Xbox, PC])",  # items in any order
    "inform(name[Tetris], genres[trivia/board game, MMORPG])",
    "request_attribute(esrb[])",
    "inform(name[Tetris], release_year[2031])",  # numbers stay open: a year not in training
    # open attributes still take any value
    "inform(name[Quillmoor Saga], exp_release_date[May 5, 2031], developer[Glasswing Works, Inc.], "
    "specifier[exceptstia])",
]


def test_closed_attributes_take_only_their_training_items():
    grammar = MRGrammar(VOCABULARY)
    for text in WITHIN_CLOSED_VALUES:
        assert grammar.accepts(text), text
        assert str(parse_mr(text)) == text
    for text, why in OUTSIDE_CLOSED_VALUES.items():
        assert parse_mr(text) and not grammar.accepts(text), f"accepted {text!r} ({why})"
    # eval.constrain_values=false: the same acts and attributes, any value
    free = MRGrammar(VOCABULARY.without_values())
    spaced_at_an_end = ("inform(name[Tetris], genres[action, ])", "inform(name[Tetris], genres[, action])")
    assert all(free.accepts(text) for text in OUTSIDE_CLOSED_VALUES if text not in spaced_at_an_end)


def test_every_closing_of_a_closed_value_takes_it_to_the_end():
    """`closings(state)` is what finish_cost measures: each string must close the MR from that state, including
    inside a closed value, between its items, and before an attribute whose value cannot be empty."""
    grammar = MRGrammar(VOCABULARY)
    for text in WITHIN_CLOSED_VALUES[:5] + ["give_opinion(rating[excellent], genres[action])"]:
        prefixes = [text.encode()[:cut] for cut in range(len(text.encode()))]
        states = {prefix: grammar.advance(grammar.start, prefix) for prefix in prefixes}
        assert all(grammar.closings(state) for state in states.values()), text
        unfinished = [
            (prefix, closing)
            for prefix, state in states.items()
            for closing in grammar.closings(state)
            if getattr(grammar.advance(state, closing), "phase", None) != DONE
        ]
        assert unfinished == [], text
    after_rating = grammar.advance(grammar.start, b"inform(rating")
    assert grammar.closings(after_rating) == [b"[good])", b"[poor])"]  # the shortest items: rating[] is refused


# ---- tokens and masks ----------------------------------------------------------------------------------------


def test_token_bytes_spell_the_text(tiny):
    tokenizer, _, _ = tiny
    tokens = token_bytes(tokenizer)
    assert tokens[tokenizer.eos_token_id] is None and tokens[tokenizer.pad_token_id] is None
    for text in TRAIN_MRS[:50] + [row["target"] for row in TEST_ROWS] + ["Eidos Montréal ★"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(tokens[i] for i in ids) == text.encode()


def _states_along(constraint: MRConstraint, texts: list[str]):
    """Every state the automaton passes through while reading `texts`, byte by byte."""
    seen = {}
    for text in texts:
        state = constraint.grammar.start
        for byte in text.encode():
            seen[state] = None
            state = constraint.grammar.step(state, byte)
        seen[state] = None
    return list(seen)


def test_masks_match_a_check_of_every_token(tiny):
    """The trie walk and the plain-value shortcut allow exactly the tokens the automaton accepts, and the budget
    rule keeps a way to close within every budget the cost says is enough."""
    _, _, constraint = tiny
    grammar = constraint.grammar
    states = _states_along(constraint, TRAIN_MRS[:40] + ["inform(name[Eidos Montréal])"] + WITHIN_CLOSED_VALUES)
    assert len(states) > 300
    for state in states:
        reached = [grammar.advance(state, data) if data else None for data in constraint.tokens]
        expected = torch.tensor([s is not None for s in reached])
        if state.phase == DONE:
            expected[constraint.eos] = True
        assert torch.equal(constraint.allowed_tokens(state, 10**6), expected), state
        for token_id in expected.nonzero().flatten().tolist():
            if token_id != constraint.eos:
                assert constraint.next_state(state, token_id) == reached[token_id]
        need = constraint.finish_cost(state)
        for left in range(int(need), int(need) + 6):
            fits = torch.tensor([s is not None and constraint.finish_cost(s) <= left - 1 for s in reached])
            if state.phase == DONE:
                fits[constraint.eos] = True
            got = constraint.allowed_tokens(state, left)
            assert torch.equal(got, fits), (state, left)
            assert got.any(), (state, left)  # never stuck: the cost is achievable


# ---- decoding with the tiny random model ---------------------------------------------------------------------


def test_random_model_writes_garbage_unless_constrained(tiny):
    tokenizer, model, constraint = tiny
    free = generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=40, progress=False)
    assert not any(try_parse_mr(text) for text in free)
    constrained = generate(
        model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=40, constraint=constraint, progress=False
    )
    assert len(constrained) == 8
    assert_valid_mrs(constrained)


@pytest.mark.parametrize("constrained", [False, True])
def test_static_kv_cache_decodes_the_same_tokens_as_the_dynamic_one(tiny, constrained):
    tokenizer, model, constraint = tiny
    outputs = {
        cache: generate(
            model,
            tokenizer,
            PROMPTS,
            batch_size=4,
            max_new_tokens=24,
            kv_cache=cache,
            constraint=constraint if constrained else None,
            progress=False,
        )
        for cache in ("dynamic", "static")
    }
    assert outputs["static"] == outputs["dynamic"] and any(outputs["static"])


def test_eos_comes_right_after_the_closing_parenthesis(tiny):
    tokenizer, model, constraint = tiny
    batch = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    prompt_length = batch["input_ids"].shape[1]
    processor = constraint.logits_processor(prompt_length, 40)
    generated = model.generate(
        **batch,
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=constraint.eos,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([processor]),
    )
    # At the last step every row had closed its MR (DONE: EOS is its only token) or had written EOS already.
    assert {state.phase for state in processor.states} <= {DONE, FINISHED}
    for row in generated[:, prompt_length:].tolist():
        assert constraint.eos in row
        text = b"".join(constraint.tokens[i] for i in row[: row.index(constraint.eos)])
        assert text.endswith(b")") and constraint.grammar.accepts(text.decode())


@pytest.mark.parametrize("budget", [12, "minimum"])
def test_a_short_budget_still_closes_the_mr(tiny, budget):
    tokenizer, model, constraint = tiny
    budget = constraint.min_new_tokens if budget == "minimum" else budget
    outputs = generate(
        model, tokenizer, PROMPTS, batch_size=8, max_new_tokens=budget, constraint=constraint, progress=False
    )
    assert_valid_mrs(outputs)
    with pytest.raises(MrtuneError, match="too small for any meaning representation"):
        constraint.logits_processor(prompt_length=10, max_new_tokens=constraint.min_new_tokens - 1)


def test_sentencepiece_style_tokenizer(tmp_path):
    """Mistral's kind of tokenizer: '▁' for spaces, <0xNN> byte tokens for characters outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.train_from_iterator(
        TRAIN_MRS[:1000], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    spec = json.loads(backend.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokens = token_bytes(tokenizer)
    text = "inform(name[Eidos Montréal ★])"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # é and ★ fall back to bytes
    assert b"".join(tokens[i] for i in ids) == (" " + text).encode()  # the leading ▁ is a space to the grammar

    torch.manual_seed(0)
    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    outputs = generate(
        model,
        tokenizer,
        PROMPTS[:4],
        batch_size=4,
        max_new_tokens=30,
        constraint=MRConstraint(tokenizer, VOCABULARY),
        progress=False,
    )
    assert_valid_mrs(outputs)


# ---- evaluate, predict and the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    from conftest import train_tiny_run

    base = tmp_path_factory.mktemp("constrained-run")
    return train_tiny_run(base, tiny_model_dir, {"train": 16, "validation": 4, "test": 4})


def test_evaluate_and_predict_are_constrained_unless_told_not_to(tiny_run, capsys):
    from mrtune.cli import main
    from mrtune.infer.evaluate import evaluate
    from mrtune.infer.predict import predict

    metrics = evaluate(tiny_run.path, progress=False)
    assert metrics["constrained"] is True and metrics["valid_mr_rate"] == 1.0 and metrics["generated_tokens"] > 0
    saved = json.loads((tiny_run.eval_dir("test") / "metrics.json").read_text())
    assert saved["constrained"] is True
    predictions = [
        json.loads(line)["prediction"]
        for line in (tiny_run.eval_dir("test") / "predictions.jsonl").read_text().splitlines()
    ]
    assert_valid_mrs(predictions, Vocabulary.from_mrs(r["meaning_representation"] for r in viggo_rows("train", 16)))

    assert main(["evaluate", str(tiny_run.path), "--no-constrained"]) == 0
    saved = json.loads((tiny_run.eval_dir("test") / "metrics.json").read_text())
    assert saved["constrained"] is False and saved["valid_mr_rate"] < 1.0

    # Decoding settings change for one command with --set; the run's config stays as trained.
    assert main(["evaluate", str(tiny_run.path), "--set", "eval.kv_cache=static", "--set", "eval.batch_size=3"]) == 0
    assert tiny_run.config().eval.kv_cache == "auto"
    assert main(["evaluate", str(tiny_run.path), "--set", "train.epochs=3"]) == 2
    assert "only eval.* settings can change after training" in capsys.readouterr().err

    sentence = TEST_ROWS[0]["target"]
    assert try_parse_mr(predict(tiny_run.path, sentences=[sentence], progress=False)[0]) is not None
    assert main(["predict", str(tiny_run.path), sentence, "--no-constrained"]) == 0
    assert try_parse_mr(capsys.readouterr().out.strip().splitlines()[-1]) is None


def test_closed_values_bind_decoding_unless_constrain_values_is_false(tiny_run, tmp_path):
    from mrtune.infer.evaluate import evaluate
    from mrtune.run.rundir import RunDir

    run = RunDir(shutil.copytree(tiny_run.path, tmp_path / "run"))
    vocabulary = Vocabulary.from_dict(json.loads(run.vocabulary.read_text()))
    # A vocabulary.json from before closed values (no closed_values key) loads and allows every value.
    assert vocabulary.closed_values == ()  # 16 training rows: too few uses to close anything
    old = vocabulary.to_dict()
    del old["closed_values"]
    run.vocabulary.write_text(json.dumps(old))
    metrics = evaluate(run.path, progress=False)
    assert metrics["valid_mr_rate"] == 1.0 and metrics["constrained"] and not metrics["constrained_values"]
    # Every attribute closed to one item: the random model can write nothing else, unless told not to.
    closed = Vocabulary(vocabulary.dialogue_acts, vocabulary.attributes, {a: ["x y"] for a in vocabulary.attributes})
    run.vocabulary.write_text(json.dumps(closed.to_dict()))

    def values(metrics) -> set[str]:
        rows = (run.eval_dir("test") / "predictions.jsonl").read_text().splitlines()
        return {v for row in rows for _, v in parse_mr(json.loads(row)["prediction"]).slots}

    metrics = evaluate(run.path, progress=False)
    assert metrics["constrained_values"] is True and values(metrics) == {"x y"}
    metrics = evaluate(run.path, progress=False, overrides=["eval.constrain_values=false"])
    assert metrics["constrained_values"] is False and metrics["valid_mr_rate"] == 1.0 and values(metrics) - {"x y"}
    assert run.config().eval.constrain_values is True  # --set changes one command only


# ---- the real embedded model ---------------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_constrained_outputs_are_valid():
    from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

    path = resolve_model_path(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(path)
    tokens = token_bytes(tokenizer)
    for text in TRAIN_MRS[:50] + ["Eidos Montréal ★"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(tokens[i] for i in ids) == text.encode()
    constraint = MRConstraint(tokenizer, VOCABULARY)
    # Inside a value, where the masks come from a regex shortcut: the same tokens as the automaton allows.
    for state in _states_along(constraint, ["inform(name[Eidos Montr\u00e9al ★], rating[good])"]):
        if state.phase == VALUE:
            expected = torch.tensor(
                [bool(data) and constraint.grammar.advance(state, data) is not None for data in constraint.tokens]
            )
            assert torch.equal(constraint.allowed_tokens(state, 10**6), expected), state
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = generate(
        model, tokenizer, PROMPTS[:5], batch_size=5, max_new_tokens=32, constraint=constraint, progress=False
    )
    assert_valid_mrs(outputs)


def test_a_flex_attention_model_decodes_with_sdpa(tiny_model_dir):
    """Flex attention's decoding kernel failed to compile on an H200 (short prompts): decoding switches to SDPA."""
    from mrtune.infer.generation import sdpa_for_decoding

    tokenizer = load_tokenizer(str(tiny_model_dir))
    flex = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention")
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    seen = []
    original = type(flex).forward

    def spy(self, *args, **kwargs):
        seen.append(self.config._attn_implementation)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(flex), "forward", spy)
        outputs = generate(flex, tokenizer, PROMPTS[:2], max_new_tokens=6, progress=False)
    assert set(seen) == {"sdpa"} and flex.config._attn_implementation == "flex_attention"
    assert outputs == generate(sdpa, tokenizer, PROMPTS[:2], max_new_tokens=6, progress=False)
    with sdpa_for_decoding(sdpa):
        assert sdpa.config._attn_implementation == "sdpa"
