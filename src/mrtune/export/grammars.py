"""The MR grammar of a run for other engines: GBNF (llama.cpp) and Lark (llguidance: vLLM, SGLang, outlines).

Both state the grammar of `mrtune.task.grammar` with one narrowing: attributes come in ViGGO's canonical order.
Every MR of the corpus (train, validation and test) lists its attributes in that one order, so the narrowing costs
nothing on this data, and it is what lets a plain context-free grammar exclude an attribute written twice: a chain
of optional slots in a fixed order (one rule per attribute) instead of one nonterminal per subset of attributes.

What neither format can state is our decoder's token-budget rule (a token is allowed only if the MR can still be
closed within the tokens left); an engine with a grammar may run out of tokens inside an MR. `mrtune evaluate`
keeps its own automaton for that rule and for its speed (a mask per automaton state, computed once and cached).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

from mrtune.task.mr import Vocabulary

# ViGGO's attribute order (Juraska et al., 2019), as every MR of the bundled splits follows it
# (tests/test_export.py checks this against the data).
CANONICAL_ATTRIBUTES = (
    "name",
    "exp_release_date",
    "release_year",
    "developer",
    "esrb",
    "rating",
    "genres",
    "player_perspective",
    "has_multiplayer",
    "platforms",
    "available_on_steam",
    "has_linux_release",
    "has_mac_release",
    "specifier",
)

# A value byte: anything but control characters, space, "[", "]" and DEL (as MRGrammar); words are joined by
# single spaces and a value may be empty.
_VALUE_CHAR = r"[^\x00-\x20\x5b\x5d\x7f]"
# Values are bounded (ViGGO's longest has 10 words, its longest word 17 characters), so that a model stuck
# repeating itself inside a value is made to close it: the nearest a grammar comes to the token-budget rule.
MAX_WORDS, MAX_WORD_CHARS = 12, 32
_WORD = f"{_VALUE_CHAR}{{1,{MAX_WORD_CHARS}}}"


def ordered_attributes(vocabulary: Vocabulary) -> list[str]:
    """The vocabulary's attributes in canonical order; attributes ViGGO does not have follow, sorted."""
    known = [a for a in CANONICAL_ATTRIBUTES if a in vocabulary.attributes]
    return known + sorted(set(vocabulary.attributes) - set(CANONICAL_ATTRIBUTES))


class _Dialect(NamedTuple):
    comment: str  # line comment marker
    define: str  # between a rule's name and its body
    start: str  # the start rule's name
    rule: Callable[[str], str]  # a rule name made of words joined by "_"
    value: str  # what stands between "[" and "]"
    value_rule: str  # the definition of the value rule/terminal


_DIALECTS = {
    # llama.cpp: rule names are letters, digits and "-"; the value is an optional rule
    "gbnf": _Dialect(
        "#",
        " ::= ",
        "root",
        lambda name: name.replace("_", "-"),
        "value",
        f'value ::= ({_WORD} (" " {_WORD}){{0,{MAX_WORDS - 1}}})?',
    ),
    # llguidance's Lark: the value is one regex terminal (upper case), optional, since a lexeme cannot be empty
    "lark": _Dialect(
        "//", ": ", "start", lambda name: name, "VALUE?", f"VALUE: /{_WORD}( {_WORD}){{0,{MAX_WORDS - 1}}}/"
    ),
}


def grammar(vocabulary: Vocabulary, dialect: str) -> str:
    """The grammar in llama.cpp's GBNF (`dialect="gbnf"`: `--grammar-file`, `LlamaGrammar`) or in llguidance's Lark
    (`"lark"`: vLLM `guided_decoding_backend=guidance`, SGLang, outlines)."""
    style = _DIALECTS[dialect]
    attributes = ordered_attributes(vocabulary)
    define, rule = style.define, style.rule
    lines = [
        f"{style.comment} ViGGO meaning representation, e.g. inform(name[Portal 2], rating[excellent]); written by "
        "mrtune export.",
        f"{style.comment} Attributes in canonical order, each at most once.",
        f'{style.start}{define}" "? act "(" {rule("slots_0")} ")"',
        f"act{define}" + " | ".join(json.dumps(act) for act in vocabulary.dialogue_acts),
    ]
    for i, attribute in enumerate(attributes):
        # slots_i: a non-empty, in-order selection of attributes i, i+1, ...
        rest = rule(f"slots_{i + 1}")
        tail = f' (", " {rest})? | {rest}' if i + 1 < len(attributes) else ""
        lines.append(f"{rule(f'slots_{i}')}{define}{rule(f'slot_{attribute}')}{tail}")
    for attribute in attributes:
        lines.append(f'{rule(f"slot_{attribute}")}{define}{json.dumps(attribute + "[")} {style.value} "]"')
    lines.append(style.value_rule)
    return "\n".join(lines) + "\n"
