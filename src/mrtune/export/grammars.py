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


def ordered_attributes(vocabulary: Vocabulary) -> list[str]:
    """The vocabulary's attributes in canonical order; attributes ViGGO does not have follow, sorted."""
    known = [a for a in CANONICAL_ATTRIBUTES if a in vocabulary.attributes]
    return known + sorted(set(vocabulary.attributes) - set(CANONICAL_ATTRIBUTES))


def _literal(text: str) -> str:
    return json.dumps(text)


def gbnf(vocabulary: Vocabulary) -> str:
    """The grammar in llama.cpp's GBNF (`--grammar-file`, `LlamaGrammar`)."""
    attributes = ordered_attributes(vocabulary)
    rule = {a: a.replace("_", "-") for a in attributes}  # GBNF rule names: letters, digits and "-"
    lines = [
        "# ViGGO meaning representation, e.g. inform(name[Portal 2], rating[excellent]); written by mrtune export.",
        "# Attributes in canonical order, each at most once; generation ends after the closing parenthesis.",
        'root ::= " "? act "(" slots-0 ")"',
        "act ::= " + " | ".join(_literal(act) for act in vocabulary.dialogue_acts),
    ]
    for i, attribute in enumerate(attributes):
        # slots-i: a non-empty, in-order selection of attributes i, i+1, ...
        later = f' (", " slots-{i + 1})?' if i + 1 < len(attributes) else ""
        skip = f" | slots-{i + 1}" if i + 1 < len(attributes) else ""
        lines.append(f"slots-{i} ::= {rule[attribute]}{later}{skip}")
    for attribute in attributes:
        lines.append(f'{rule[attribute]} ::= {_literal(attribute + "[")} value "]"')
    lines.append(f'value ::= ({_VALUE_CHAR}+ (" " {_VALUE_CHAR}+)*)?')
    return "\n".join(lines) + "\n"


def lark(vocabulary: Vocabulary) -> str:
    """The grammar in llguidance's Lark dialect (vLLM `guided_decoding_backend=guidance`, SGLang, outlines)."""
    attributes = ordered_attributes(vocabulary)
    lines = [
        "// ViGGO meaning representation, e.g. inform(name[Portal 2], rating[excellent]); written by mrtune export.",
        "// Attributes in canonical order, each at most once.",
        'start: " "? act "(" slots_0 ")"',
        "act: " + " | ".join(_literal(act) for act in vocabulary.dialogue_acts),
    ]
    for i, attribute in enumerate(attributes):
        later = f' (", " slots_{i + 1})?' if i + 1 < len(attributes) else ""
        skip = f" | slots_{i + 1}" if i + 1 < len(attributes) else ""
        lines.append(f"slots_{i}: slot_{attribute}{later}{skip}")
    for attribute in attributes:
        lines.append(f'slot_{attribute}: {_literal(attribute + "[")} VALUE? "]"')
    lines.append(f"VALUE: /{_VALUE_CHAR}+( {_VALUE_CHAR}+)*/")
    return "\n".join(lines) + "\n"
