"""The MR grammar as a byte automaton: what constrained decoding allows, torch-free.

The grammar, stated once here and implemented once, byte by byte, in `MRGrammar.step`::

    output := " "? act "(" slot (", " slot)* ")" EOS
    act    := a dialogue act of the vocabulary                  e.g. verify_attribute
    slot   := attribute "[" value "]"                           an attribute of the vocabulary not used
                                                                before in this MR
    value  := "" | word (" " word)*                             an open attribute: e.g. name[Eidos Montréal]
            | closed                                            a closed attribute (Vocabulary.closed_values)
    word   := char+
    char   := a UTF-8 character other than "[", "]", " " and control characters
    closed := item (", " item)*                                 e.g. genres[action, adventure], rating[good]
            | ""                                                where training had the empty value: esrb[]
    item   := one of the attribute's items not used before in this value; one item only, unless the attribute
              is a list attribute

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
    "ITEM",
    "ITEM_COMMA",
]

# Phases of the automaton. ACT with an empty prefix is the start. ITEM is inside a closed value, ITEM_COMMA
# between its "," and " ".
ACT, ATTR, VALUE, AFTER_VALUE, COMMA, DONE, FINISHED, ITEM, ITEM_COMMA = range(9)

SPACE, _OPEN, _CLOSE, _LBRACKET, RBRACKET, _COMMA = b" ()[],"


class State(NamedTuple):
    """Where the automaton is. Hashable: it keys the mask cache."""

    phase: int
    prefix: str = ""  # ACT/ATTR: the name written so far; ITEM/ITEM_COMMA: the closed attribute of the value
    used: int = 0  # attributes written so far, one bit per attribute (MRGrammar.attributes order)
    empty: bool = True  # VALUE/ITEM: nothing written yet
    item: bytes = b""  # ITEM: the current item so far (UTF-8, possibly ending inside a character)
    items_used: int = 0  # ITEM/ITEM_COMMA: items of this value written so far, one bit per item (MRGrammar.item_bits)
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
        # Closed attributes: a bit per item (UTF-8), and every prefix of an item -> the bits of the items that
        # start with it and the bytes that may follow it (the trie the automaton walks).
        self.item_bits: dict[str, dict[bytes, int]] = {}
        self.item_prefixes: dict[str, dict[bytes, int]] = {}
        self.item_next: dict[str, dict[bytes, bytes]] = {}
        self.empty_allowed = {attribute for attribute, items in vocabulary.closed_values if "" in items}
        self.lists = set(vocabulary.list_attributes)
        # The shortest value of each attribute in bytes, which closings write: any value closes, a short one soonest.
        self.shortest_values: dict[str, list[str]] = {attribute: [""] for attribute in self.attributes}
        for attribute, items in vocabulary.closed_values:
            full = [item for item in items if item]
            bits = self.item_bits[attribute] = {item.encode(): 1 << i for i, item in enumerate(full)}
            prefixes: dict[bytes, int] = {}
            following: dict[bytes, set[int]] = {}
            for item, bit in bits.items():
                for i in range(len(item) + 1):
                    prefixes[item[:i]] = prefixes.get(item[:i], 0) | bit
                    if i < len(item):
                        following.setdefault(item[:i], set()).add(item[i])
            self.item_prefixes[attribute] = prefixes
            self.item_next[attribute] = {prefix: bytes(sorted(after)) for prefix, after in following.items()}
            if attribute not in self.empty_allowed:
                shortest = min(map(len, full))
                self.shortest_values[attribute] = [item for item in full if len(item) == shortest]
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
        ITEM_COMMA: b" ",
    }

    def candidate_bytes(self, state: State) -> bytes:
        """Bytes that `step` may accept in `state` (a superset): it is asked about these only."""
        if state.phase == ITEM:
            return self.item_next[state.prefix].get(state.item, b"") + b",]"
        return self.CANDIDATE_BYTES[state.phase]

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
        if phase == ITEM:
            return self._step_item(state, byte)
        if phase == ATTR:
            if byte == _LBRACKET:
                bit = self.bit.get(state.prefix, 0)
                if not bit or bit & state.used:
                    return None
                if state.prefix in self.item_bits:
                    return State(ITEM, prefix=state.prefix, used=state.used | bit)
                return State(VALUE, used=state.used | bit)
            prefix = state.prefix + chr(byte)
            return state._replace(prefix=prefix) if self.attribute_prefixes.get(prefix, 0) & ~state.used else None
        if phase == AFTER_VALUE:
            if byte == _CLOSE:
                return State(DONE, used=state.used)
            # A comma only while an attribute is left to write after it.
            return State(COMMA, used=state.used) if byte == _COMMA and state.used != self.all_used else None
        if phase == COMMA:
            return State(ATTR, used=state.used) if byte == SPACE else None
        if phase == ITEM_COMMA:
            return state._replace(phase=ITEM) if byte == SPACE else None
        return None  # DONE, FINISHED: only EOS

    def _step_item(self, state: State, byte: int) -> State | None:
        """One byte inside a closed value. Items hold no "," or "]", so either byte ends the item deterministically;
        an item already in the value is refused, as no training value repeats one."""
        attribute = state.prefix
        bit = self.item_bits[attribute].get(state.item, 0)
        complete = bool(bit & ~state.items_used)  # a whole item, new to this value
        if byte == RBRACKET:
            closes = complete or (state.empty and attribute in self.empty_allowed)
            return State(AFTER_VALUE, used=state.used) if closes else None
        if byte == _COMMA:
            # A comma only while an item is left to write after it.
            items_used = state.items_used | bit
            if not complete or attribute not in self.lists or items_used == self.item_prefixes[attribute][b""]:
                return None
            return State(ITEM_COMMA, prefix=attribute, used=state.used, empty=False, items_used=items_used)
        item = state.item + bytes([byte])
        if not self.item_prefixes[attribute].get(item, 0) & ~state.items_used:
            return None
        return state._replace(item=item, empty=False)

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
            endings = [
                f"({attribute}[{value}])" for attribute in self.attributes for value in self.shortest_values[attribute]
            ]
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
            return [
                f"{a[len(state.prefix) :]}[{value}])".encode()
                for a in unused
                if a.startswith(state.prefix)
                for value in self.shortest_values[a]
            ]
        if phase in (ITEM, ITEM_COMMA):
            unused = [item for item, bit in self.item_bits[state.prefix].items() if not bit & state.items_used]
            if phase == ITEM_COMMA:
                return [b" " + item + b"])" for item in unused]
            endings = [item[len(state.item) :] + b"])" for item in unused if item.startswith(state.item)]
            return endings + [b"])"] if state.empty and state.prefix in self.empty_allowed else endings
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
            return [f" {a}[{value}])".encode() for a in unused for value in self.shortest_values[a]]
        return [b""]
