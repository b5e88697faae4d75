"""Prompt styles: how a sentence is shown to the model, and what it must write back.

A training row is `prompt(sentence) + meaning_representation + EOS`. The EOS is part of the completion and
is trained, so that generation stops by itself (the seed recipe's collator masked it away, so its model never
learned to stop). Pure module: no torch, no tokenizer.
"""

from __future__ import annotations

from typing import Literal

from mrtune.errors import MrtuneError

# The seed recipe's instruction prompt, verbatim (including its attribute list, which lacks `has_multiplayer`).
SEED_TEMPLATE = (
    "Given a target sentence construct the underlying meaning representation of the input sentence as a "
    "single function with attributes and attribute values.\n"
    "This function should describe the target string accurately and the function must be one of the following "
    "['inform', 'request', 'give_opinion', 'confirm', 'verify_attribute', 'suggest', 'request_explanation', "
    "'recommend', 'request_attribute'].\n"
    "The attributes must be one of the following: ['name', 'exp_release_date', 'release_year', 'developer', "
    "'esrb', 'rating', 'genres', 'player_perspective', 'platforms', 'available_on_steam', 'has_linux_release', "
    "'has_mac_release', 'specifier']\n"
    "\n"
    "### Target sentence:\n"
    "{sentence}\n"
    "\n"
    "### Meaning representation:\n"
)

# ~10 tokens of scaffolding instead of ~170: a fine-tuned model learns the task from the data, not the prose.
COMPACT_TEMPLATE = "### Sentence:\n{sentence}\n### Meaning representation:\n"

TEMPLATES = {"seed": SEED_TEMPLATE, "compact": COMPACT_TEMPLATE}
"""The prompt styles: the one list of them (`data.prompt_style` takes its choices from these keys)."""

PromptStyle = Literal[tuple(TEMPLATES)]


def template(style: str) -> str:
    if style not in TEMPLATES:
        raise MrtuneError(f"unknown prompt style {style!r}: use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[style]


def build_prompt(style: str, sentence: str) -> str:
    """The text the model sees before it writes the meaning representation.

    >>> build_prompt("compact", "Is Portal 2 on Mac?")
    '### Sentence:\\nIs Portal 2 on Mac?\\n### Meaning representation:\\n'
    """
    return template(style).format(sentence=sentence.strip())
