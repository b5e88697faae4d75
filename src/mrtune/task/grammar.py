"""The MR grammar as a byte automaton: what constrained decoding allows, torch-free.

The grammar, stated once here and implemented once, byte by byte, in `MRGrammar.step`::

    output := " "? act "(" slot (", " slot)* ")" EOS
    act    := a dialogue act of the vocabulary                  e.g. verify_attribute
    slot   := attribute "[" value "]"                           an attribute of the vocabulary not used
                                                                before in this MR
    value  := "" | word (" " word)*                             e.g. esrb[], name[Eidos Montréal]
    word   := char+
    char   := a UTF-8 character other than "[", "]", " " and control characters

and one rule on length: with `left` tokens left of the generation budget, a token is allowed only if the MR can
still be closed and EOS written in the `left - 1` tokens that remain after it (`MRConstraint.finish_cost`).
Every string the grammar allows is accepted by `mr.parse_mr` and is already in the canonical form the
references are written in (single spaces, no space at either end of a value: exact match compares strings).
The optional leading space is for SentencePiece tokenizers (Mistral), whose completions start with "▁inform";
generation strips it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mrtune.errors import MrtuneError
from mrtune.task.mr import Vocabulary

__all__ = [
    "MRGrammar",
    "State",
    "ORDINARY_TEXT",
    "SPACE",
    "RBRACKET",
    "ACT",
    "ATTR",
    "VALUE",
    "AFTER_VALUE",
    "COMMA",
    "DONE",
    "FINISHED",
]

# Phases of the automaton. ACT with an empty prefix is the start.
ACT, ATTR, VALUE, AFTER_VALUE, COMMA, DONE, FINISHED = range(7)

SPACE, _OPEN, _CLOSE, _LBRACKET, RBRACKET, _COMMA = b" ()[],"


class State(NamedTuple):
    """Where the automaton is. Hashable: it keys the mask cache."""

    phase: int
    prefix: str = ""  # ACT/ATTR: the name written so far
    used: int = 0  # attributes written so far, one bit per attribute (MRGrammar.attributes order)
    empty: bool = True  # VALUE: nothing written yet
    space: bool = False  # VALUE: the last byte was a space; ACT: the optional leading space was written
    pending: int = 0  # VALUE: UTF-8 continuation bytes still owed
    lead: int = 0  # VALUE: the lead byte, when it narrows the range of the next continuation byte (E0 ED F0 F4)


# Lead bytes whose first continuation byte has a narrower range than 80..BF (no overlong forms, no surrogates,
# nothing past U+10FFFF), as in the Unicode standard's table of well-formed UTF-8.
_FIRST_CONTINUATION = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8_continuations(byte: int) -> int | None:
    """How many continuation bytes follow a UTF-8 lead byte; None for a byte that cannot start a character."""
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if 0xE0 <= byte <= 0xEF:
        return 2
    if 0xF0 <= byte <= 0xF4:
        return 3
    return None


# Printable ASCII other than brackets and spaces, single spaces between, and whole multi-byte characters; the
# automaton decides on every other token.
ORDINARY_TEXT = re.compile(
    rb"(?:[\x21-\x5a\x5c\x5e-\x7e]| (?! )|[\xc2-\xdf][\x80-\xbf]"
    rb"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xe0[\xa0-\xbf][\x80-\xbf]"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


def _is_value_byte(byte: int) -> bool:
    """A byte that may stand anywhere in a value (space has rules of its own)."""
    return byte > SPACE and byte not in (_LBRACKET, RBRACKET, 0x7F)


class MRGrammar:
    """The automaton of the module docstring's grammar, over bytes, for one vocabulary."""

    def __init__(self, vocabulary: Vocabulary):
        if not vocabulary.dialogue_acts or not vocabulary.attributes:
            raise MrtuneError("constrained decoding needs a vocabulary with at least one dialogue act and attribute")
        self.dialogue_acts = vocabulary.dialogue_acts
        self.attributes = vocabulary.attributes
        self.bit = {attribute: 1 << i for i, attribute in enumerate(self.attributes)}
        self.all_used = (1 << len(self.attributes)) - 1
        self.act_prefixes = {act[:i] for act in self.dialogue_acts for i in range(len(act) + 1)}
        self.attribute_prefixes: dict[str, int] = {}  # prefix -> bits of the attributes that start with it
        for attribute in self.attributes:
            for i in range(len(attribute) + 1):
                self.attribute_prefixes[attribute[:i]] = (
                    self.attribute_prefixes.get(attribute[:i], 0) | self.bit[attribute]
                )
        self.start = State(ACT)

    # Bytes that `step` can accept in each phase (VALUE: nearly all): it is asked about these only.
    _NAME = b"abcdefghijklmnopqrstuvwxyz_"
    CANDIDATE_BYTES = {
        ACT: _NAME + b"( ",
        ATTR: _NAME + b"[",
        VALUE: bytes(range(256)),
        AFTER_VALUE: b",)",
        COMMA: b" ",
        DONE: b"",
        FINISHED: b"",
    }

    def step(self, state: State, byte: int) -> State | None:
        """The state after one more byte, or None when the grammar does not allow it."""
        phase = state.phase
        if phase == VALUE:
            if state.pending:
                low, high = _FIRST_CONTINUATION.get(state.lead, (0x80, 0xBF))
                return state._replace(pending=state.pending - 1, lead=0) if low <= byte <= high else None
            if byte == RBRACKET:
                return None if state.space else State(AFTER_VALUE, used=state.used)
            if byte == SPACE:
                return None if state.empty or state.space else state._replace(space=True)
            if not _is_value_byte(byte):
                return None
            pending = _utf8_continuations(byte)
            if pending is None:
                return None
            lead = byte if byte in _FIRST_CONTINUATION else 0
            return state._replace(empty=False, space=False, pending=pending, lead=lead)
        if phase == ACT:
            if byte == _OPEN:
                return State(ATTR) if state.prefix in self.dialogue_acts else None
            if byte == SPACE:
                return state._replace(space=True) if not state.prefix and not state.space else None
            prefix = state.prefix + chr(byte)
            return state._replace(prefix=prefix) if prefix in self.act_prefixes else None
        if phase == ATTR:
            if byte == _LBRACKET:
                bit = self.bit.get(state.prefix, 0)
                return State(VALUE, used=state.used | bit) if bit and not bit & state.used else None
            prefix = state.prefix + chr(byte)
            return state._replace(prefix=prefix) if self.attribute_prefixes.get(prefix, 0) & ~state.used else None
        if phase == AFTER_VALUE:
            if byte == _CLOSE:
                return State(DONE, used=state.used)
            # A comma only while an attribute is left to write after it.
            return State(COMMA, used=state.used) if byte == _COMMA and state.used != self.all_used else None
        if phase == COMMA:
            return State(ATTR, used=state.used) if byte == SPACE else None
        return None  # DONE, FINISHED: only EOS

    def advance(self, state: State | None, data: bytes) -> State | None:
        for byte in data:
            if state is None:
                return None
            state = self.step(state, byte)
        return state

    def accepts(self, text: str) -> bool:
        """Whether `text` is a complete output (without the EOS), e.g. ``accepts("inform(name[Tetris])")``."""
        state = self.advance(self.start, text.encode("utf-8"))
        return state is not None and state.phase == DONE

    def closings(self, state: State) -> list[bytes]:
        """Strings that take `state` to DONE, among them the shortest for each way out.

        Every suffix of a returned string that starts at a token boundary is again among the closings of the state
        reached there, which is what makes `MRConstraint.finish_cost` an achievable bound.
        """
        phase = state.phase
        unused = [a for a in self.attributes if not self.bit[a] & state.used]
        if phase == ACT:
            endings = [f"({attribute}[])" for attribute in self.attributes]
            strings = [
                act[len(state.prefix) :] + ending
                for act in self.dialogue_acts
                if act.startswith(state.prefix)
                for ending in endings
            ]
            if not state.prefix and not state.space:
                strings += [" " + s for s in strings]
            return [s.encode() for s in strings]
        if phase == ATTR:
            return [(a[len(state.prefix) :] + "[])").encode() for a in unused if a.startswith(state.prefix)]
        if phase == VALUE:
            if state.pending:
                first = _FIRST_CONTINUATION.get(state.lead, (0x80, 0xBF))[0]
                return [bytes([first]) + b"\x80" * (state.pending - 1) + b"])"]
            if state.space:
                return [bytes([c]) + b"])" for c in b"abcdefghijklmnopqrstuvwxyz0123456789"]
            return [b"])"]
        if phase == AFTER_VALUE:
            return [b")"]
        if phase == COMMA:
            return [f" {a}[])".encode() for a in unused]
        return [b""]
