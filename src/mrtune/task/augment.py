"""Name and specifier substitution: training rows whose game name, or whose `specifier[...]` word, is replaced by
another one. Pure module: no torch.

A model trained on ViGGO's ~200 game names partly memorises them and drops a few points on names it never saw
(`mrtune.task.generalization`). Swapping the `name[...]` slot, and every verbatim mention of it in the sentence, for
an invented title teaches it to copy the name from the sentence instead:

    inform(name[Little Big Adventure], ...) "Little Big Adventure is ..."
 -> inform(name[Brovadel Chronicles], ...)  "Brovadel Chronicles is ..."

Invented names are built from syllables and title words that share no word with the generalization set's names,
so that set stays unseen.

Specifiers (`give_opinion`/`request` rows: "the most *exceptional* game") are the same problem for adjectives: the
training split has 78 of them, and 23 of the test split's 37 never occur in training (45 of its 75 specifier rows).
A model that has only seen those 78 paraphrases a new one (`exceptional` -> `exceptstia`) instead of copying it.
Swapping the word for another adjective, in the sentence and the MR together, teaches copying. The replacement
words share none of the validation or test splits' specifiers (a test checks it), so their scores stay honest.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from mrtune.task.data import Example
from mrtune.task.generalization import UNSEEN_NAMES, with_name, with_value
from mrtune.task.mr import MeaningRepresentation, try_parse_mr

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

    def swap(example: Example, mr: MeaningRepresentation, old: str, rng: random.Random) -> Example:
        new = invented_name(rng)
        return replace(
            example, sentence=example.sentence.replace(old, new), meaning_representation=str(with_name(mr, new))
        )

    return _substitute(examples, fraction, f"name-substitution-{seed}", "name", lambda text, old: old in text, swap)


def _substitute(examples, fraction, stream, attribute, swappable, swap) -> list[Example]:
    """Each row whose `attribute` slot is `swappable(sentence, value)` is swapped, with probability `fraction`, by
    `swap(example, mr, value, rng)`; one random stream (`stream`) for the whole list makes it deterministic."""
    if fraction <= 0:
        return list(examples)
    rng = random.Random(stream)
    out = []
    for example in examples:
        mr = try_parse_mr(example.meaning_representation or "")
        old = dict(mr.slots).get(attribute) if mr is not None else None
        if not old or not swappable(example.sentence, old) or rng.random() >= fraction:
            out.append(example)
        else:
            out.append(swap(example, mr, old, rng))
    return out


# Adjectives as ViGGO's specifiers use them: plain, superlative and two-word forms. None is a specifier of the
# validation or test split (tests/test_levers.py checks it against the bundled data).
SPECIFIER_WORDS = tuple(
    word.strip()
    for word in """
    amazing, awful, bland, bleak, bold, bouncy, brutal, calm, charming, chaotic, clever, clunky, jolly,
    cozy, creative, creepy, cute, dark, delightful, dreary, elegant, soulful, exhausting, fancy, fresh, friendly,
    gentle, gloomy, gorgeous, grim, hilarious, intense, lively, lonely, lovely, memorable, messy, mysterious,
    odd, original, peaceful, pleasant, polished, pricey, spooky, repetitive, rough, silly, sleek, slow,
    sluggish, splendid, stylish, tedious, tense, tiresome, ugly, uplifting, violent, weird, wholesome,
    wonderful, addicting, cheesy, clumsy, deep, grand, heartwarming, moody, refreshing, tricky, zany,
    glitchy, most relaxing, least polished, cleverest, darkest, prettiest, pixelated, tensest, strangest,
    calmest, wildest, oddest, cutest, grimmest, slowest, smoothest, loudest, badly written,
    beautifully animated, richly detailed, well written, over the top, hand drawn
""".replace("\n", " ").split(",")
)


def substitute_specifiers(examples: list[Example], fraction: float, seed: int) -> list[Example]:
    """The rows, with the `specifier[...]` word of about `fraction` of the rows that have one swapped for another
    adjective (deterministic in `seed`). Only a specifier written once in the sentence, as whole words, is swapped
    (a capital first letter kept); the other rows are returned unchanged, as is the list's order and length."""

    def mentions(text: str, word: str) -> list[re.Match]:
        return list(re.finditer(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))

    def swap(example: Example, mr: MeaningRepresentation, old: str, rng: random.Random) -> Example:
        new = rng.choice([word for word in SPECIFIER_WORDS if word != old.lower()])
        start, end = mentions(example.sentence, old)[0].span()
        written = new.capitalize() if example.sentence[start].isupper() else new
        sentence = example.sentence[:start] + written + example.sentence[end:]
        return replace(example, sentence=sentence, meaning_representation=str(with_value(mr, "specifier", new)))

    stream = f"specifier-substitution-{seed}"
    return _substitute(examples, fraction, stream, "specifier", lambda text, old: len(mentions(text, old)) == 1, swap)
