"""Name substitution: training rows whose game name is replaced by an invented one. Pure module: no torch.

A model trained on ViGGO's ~200 game names partly memorises them and drops a few points on names it never saw
(`mrtune.task.generalization`). Swapping the `name[...]` slot, and every verbatim mention of it in the sentence, for
an invented title teaches it to copy the name from the sentence instead:

    inform(name[Little Big Adventure], ...) "Little Big Adventure is ..."
 -> inform(name[Brovadel Chronicles], ...)  "Brovadel Chronicles is ..."

Invented names are built from syllables and title words that share no word with the generalization set's names,
so that set stays unseen.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from mrtune.task.data import Example
from mrtune.task.generalization import UNSEEN_NAMES, with_name
from mrtune.task.mr import try_parse_mr

_ONSETS = ("Br", "K", "Z", "V", "Th", "Gr", "M", "D", "S", "Pl", "R", "Tr", "F", "N", "Sk", "L")
_VOWELS = ("a", "o", "e", "i", "u", "ai", "ae")
_CODAS = ("r", "n", "l", "th", "x", "nd", "m", "v", "sk", "rd")
_TITLE_WORDS = (
    "Chronicles",
    "Legends",
    "Rising",
    "Frontier",
    "Protocol",
    "Dynasty",
    "Outpost",
    "Requiem",
    "Rally",
    "Tactics",
    "Empire",
    "Arena",
    "Quest",
    "Online",
    "Heroes",
    "Warfare",
)
_RESERVED_WORDS = frozenset(word.lower() for name in UNSEEN_NAMES for word in re.findall(r"\w+", name))


def _invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(part) for part in (_ONSETS, _VOWELS, _CODAS, _VOWELS, _CODAS)).capitalize()


def invented_name(rng: random.Random) -> str:
    """A game title in ViGGO's shapes: one invented word, with a title word, a number or a subtitle."""
    while True:
        word = _invented_word(rng)
        shape = rng.randrange(5)
        if shape == 0:
            name = word
        elif shape == 1:
            name = f"{word} {rng.choice(_TITLE_WORDS)}"
        elif shape == 2:
            name = f"{word} {rng.randint(2, 5)}"
        elif shape == 3:
            name = f"{word}: {rng.choice(_TITLE_WORDS)} of {_invented_word(rng)}"
        else:
            name = f"The {word} {rng.choice(_TITLE_WORDS)}"
        if not {w.lower() for w in re.findall(r"\w+", name)} & _RESERVED_WORDS:
            return name


def substitute_names(examples: list[Example], fraction: float, seed: int) -> list[Example]:
    """The rows, with the game name of about `fraction` of them swapped for an invented one (deterministic in
    `seed`). Only rows with a `name` slot whose value appears verbatim in the sentence can be swapped; the others
    are returned unchanged, as is the list's order and length."""
    if fraction <= 0:
        return list(examples)
    rng = random.Random(f"name-substitution-{seed}")
    out = []
    for example in examples:
        mr = try_parse_mr(example.meaning_representation or "")
        old = dict(mr.slots).get("name") if mr is not None else None
        if not old or old not in example.sentence or rng.random() >= fraction:
            out.append(example)
            continue
        new = invented_name(rng)
        out.append(
            replace(
                example,
                sentence=example.sentence.replace(old, new),
                meaning_representation=str(with_name(mr, new)),
            )
        )
    return out
