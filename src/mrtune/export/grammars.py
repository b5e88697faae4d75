"""The MR grammar of a run for other engines: GBNF (llama.cpp) and Lark (llguidance: vLLM, SGLang, outlines).

Both state the grammar of `mrtune.task.grammar` with one narrowing: attributes come in ViGGO's canonical order.
Every MR of the corpus (train, validation and test) lists its attributes in that one order, so the narrowing costs
nothing on this data, and it is what lets a plain context-free grammar exclude an attribute written twice: a chain
of optional slots in a fixed order (one rule per attribute) instead of one nonterminal per subset of attributes.
A closed attribute's value (vocabulary.json's closed_values) is made of its items, as in mrtune; one widening: a
list may repeat an item (at most as many items as the attribute has), which mrtune refuses, since excluding it
would take a rule per subset of items.

What neither format can state is our decoder's token-budget rule (a token is allowed only if the MR can still be
closed within the tokens left); an engine with a grammar may run out of tokens inside an MR. `mrtune evaluate`
keeps its own automaton for that rule and for its speed (a mask per automaton state, computed once and cached).
"""

from __future__ import annotations

import functools
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
    closed: Callable[[str], str]  # the rule (GBNF) or terminal (Lark) name of a closed value's part


_DIALECTS = {
    # llama.cpp: rule names are letters, digits and "-"; the value is an optional rule
    "gbnf": _Dialect(
        "#",
        " ::= ",
        "root",
        lambda name: name.replace("_", "-"),
        "value",
        f'value ::= ({_WORD} (" " {_WORD}){{0,{MAX_WORDS - 1}}})?',
        lambda name: name.replace("_", "-"),
    ),
    # llguidance's Lark: the value is one regex terminal (upper case), optional, since a lexeme cannot be empty
    # a closed value is one terminal too, built from its items' literals
    "lark": _Dialect(
        "//",
        ": ",
        "start",
        lambda name: name,
        "VALUE?",
        f"VALUE: /{_WORD}( {_WORD}){{0,{MAX_WORDS - 1}}}/",
        str.upper,
    ),
}


def _closed_value(style: _Dialect, vocabulary: Vocabulary, attribute: str) -> tuple[str, list[str]]:
    """What stands between "[" and "]" for a closed attribute, and the definitions it needs."""
    items = vocabulary.items_of(attribute) or ()
    full = [item for item in items if item]
    if not full:  # training only ever had the empty value
        return '""', []
    literal = functools.partial(json.dumps, ensure_ascii=False)
    order = vocabulary.order_of(attribute)
    if order and len(order) > 1:
        # The items in training's order, each optional after the first written: no item twice, by construction.
        # One alternative per first item: n(n + 1) / 2 literals (325 for ViGGO's 25 genres), flat for Lark terminals.
        value = style.closed(f"value_{attribute}")
        firsts = [
            " ".join([literal(first), *(f'(", " {literal(later)})?' for later in order[i + 1 :])])
            for i, first in enumerate(order)
        ]
        lines = [f"{value}{style.define}" + " | ".join(f"({alternative})" for alternative in firsts)]
        return value + ("?" if "" in items else ""), lines
    value = item = style.closed(f"item_{attribute}")
    lines = [f"{item}{style.define}" + " | ".join(map(literal, full))]
    if attribute in vocabulary.list_attributes and len(full) > 1:
        # No one order in training: any order, each item at most as often as there are items (not "once").
        value = style.closed(f"value_{attribute}")
        lines.append(f'{value}{style.define}{item} (", " {item}){{0,{len(full) - 1}}}')
    return value + ("?" if "" in items else ""), lines


def grammar(vocabulary: Vocabulary, dialect: str) -> str:
    """The grammar in llama.cpp's GBNF (`dialect="gbnf"`: `--grammar-file`, `LlamaGrammar`) or in llguidance's Lark
    (`"lark"`: vLLM `guided_decoding_backend=guidance`, SGLang, outlines)."""
    style = _DIALECTS[dialect]
    attributes = ordered_attributes(vocabulary)
    define, rule = style.define, style.rule
    lines = [
        f"{style.comment} ViGGO meaning representation, e.g. inform(name[Portal 2], rating[excellent]); written by "
        "mrtune export.",
        f"{style.comment} Attributes in canonical order, each at most once; closed attributes take training items.",
        f'{style.start}{define}" "? act "(" {rule("slots_0")} ")"',
        f"act{define}" + " | ".join(json.dumps(act) for act in vocabulary.dialogue_acts),
    ]
    for i, attribute in enumerate(attributes):
        # slots_i: a non-empty, in-order selection of attributes i, i+1, ...
        rest = rule(f"slots_{i + 1}")
        tail = f' (", " {rest})? | {rest}' if i + 1 < len(attributes) else ""
        lines.append(f"{rule(f'slots_{i}')}{define}{rule(f'slot_{attribute}')}{tail}")
    closed_lines = []
    for attribute in attributes:
        value = style.value
        if vocabulary.items_of(attribute) is not None:
            value, definitions = _closed_value(style, vocabulary, attribute)
            closed_lines += definitions
        lines.append(f'{rule(f"slot_{attribute}")}{define}{json.dumps(attribute + "[")} {value} "]"')
    lines.append(style.value_rule)
    lines += closed_lines
    return "\n".join(lines) + "\n"
