"""Parse ViGGO meaning representations (MRs) and score predicted MRs against references.

An MR is a dialogue act applied to a list of attribute/value slots, for example::

    verify_attribute(name[Little Big Adventure], rating[average], has_multiplayer[no], platforms[PlayStation])

This module is deliberately pure (standard library only) so that evaluation, data
checks and constrained decoding can all share one definition of "a valid MR"
without importing torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MRParseError",
    "MeaningRepresentation",
    "Vocabulary",
    "value_items",
    "dialogue_act_confusion",
    "parse_mr",
    "score",
    "slot_errors",
    "try_parse_mr",
]

# Dialogue acts and attribute names share one lexical rule in ViGGO.
_NAME = re.compile(r"[a-z_]+")

# Long model outputs (e.g. a generation that never stopped) would make error
# messages unreadable, so only a window around the problem is quoted.
_MAX_QUOTED = 200
_CONTEXT = 60

# The predicted-act label for rows whose prediction does not parse; the angle
# brackets keep it from colliding with a real act, which is [a-z_]+.
INVALID_ACT = "<invalid>"


class MRParseError(ValueError):
    """A string is not a well-formed MR.

    The message names what is wrong and where, e.g.
    ``expected '[' after attribute 'rating' at position 13 in 'inform(rating average)'``.
    ``position`` is a 0-based offset into the whitespace-stripped text (``None``
    when the error is not about one place, e.g. a bad reference row in `score`).
    """

    def __init__(self, message: str, *, text: str | None = None, position: int | None = None):
        super().__init__(message)
        self.text = text
        self.position = position


@dataclass(frozen=True)
class MeaningRepresentation:
    """A parsed MR, e.g. ``inform(name[Dirt: Showdown], release_year[2012])``.

    ``slots`` keeps the written order because it is part of the canonical string
    (and so of `exact_match`); order-insensitive comparisons use ``set(slots)``.
    A value may be empty, as in ``request_attribute(esrb[])``.
    """

    dialogue_act: str
    slots: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        inner = ", ".join(f"{attribute}[{value}]" for attribute, value in self.slots)
        return f"{self.dialogue_act}({inner})"

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attribute names in written order, e.g. ``('name', 'release_year')``."""
        return tuple(attribute for attribute, _ in self.slots)


def _describe(text: str, position: int) -> str:
    where = f"at position {position}"
    if position >= len(text):
        where += " (end of text)"
    if len(text) <= _MAX_QUOTED:
        return f"{where} in {text!r}"
    start = max(0, position - _CONTEXT)
    window = text[start : position + _CONTEXT]
    prefix = "..." if start > 0 else ""
    suffix = "..." if position + _CONTEXT < len(text) else ""
    return f"{where} near {prefix}{window!r}{suffix}"


def _error(text: str, position: int, problem: str) -> MRParseError:
    return MRParseError(f"{problem} {_describe(text, position)}", text=text, position=position)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def parse_mr(text: str) -> MeaningRepresentation:
    """Parse one MR strictly, e.g. ``parse_mr("give_opinion(name[SpellForce 3], rating[poor])")``.

    Grammar: ``act(attr[value], attr[value], ...)`` with ``act`` and ``attr``
    matching ``[a-z_]+``. Surrounding whitespace is ignored, as is whitespace
    after ``(``, around ``,`` and before ``)``; names must touch their
    bracket/parenthesis. A value is everything up to the next ``]`` (commas,
    parentheses, colons, slashes and ``+`` are ordinary characters) with runs
    of whitespace collapsed and the ends stripped. Raises `MRParseError` for
    anything else: brackets inside a value, a missing separator, a duplicate
    attribute, or text after the closing ``)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_mr expects a str, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise MRParseError("empty meaning representation: expected 'act(attr[value], ...)'", text=s, position=0)

    match = _NAME.match(s)
    if match is None:
        raise _error(s, 0, "expected a dialogue act name ([a-z_]+)")
    act = match.group()
    pos = match.end()
    if not s.startswith("(", pos):
        raise _error(s, pos, f"expected '(' after dialogue act {act!r}")
    pos = _skip_space(s, pos + 1)

    slots: list[tuple[str, str]] = []
    first_seen: dict[str, int] = {}
    if s.startswith(")", pos):
        pos += 1
    else:
        while True:
            match = _NAME.match(s, pos)
            if match is None:
                expected = "an attribute name ([a-z_]+) after ','" if slots else "an attribute name ([a-z_]+) or ')'"
                raise _error(s, pos, f"expected {expected}")
            attribute = match.group()
            if attribute in first_seen:
                # Silently keeping one value would make scoring depend on which
                # copy wins, so a repeated attribute is rejected outright.
                raise _error(
                    s,
                    match.start(),
                    f"duplicate attribute {attribute!r} (first at position {first_seen[attribute]})",
                )
            first_seen[attribute] = match.start()
            pos = match.end()
            if not s.startswith("[", pos):
                raise _error(s, pos, f"expected '[' after attribute {attribute!r}")
            opened = pos
            # str.find rather than a per-character loop: the whole training
            # split is parsed on every evaluation and vocabulary build.
            end = s.find("]", opened + 1)
            nested = s.find("[", opened + 1, len(s) if end == -1 else end)
            if nested != -1:
                # ViGGO values never contain brackets; accepting one here would
                # hide a model that forgot to close the previous value.
                raise _error(s, nested, f"unexpected '[' inside the value of attribute {attribute!r}")
            if end == -1:
                raise _error(s, opened, f"missing ']' to close the value of attribute {attribute!r} opened")
            value = " ".join(s[opened + 1 : end].split())
            slots.append((attribute, value))
            pos = _skip_space(s, end + 1)
            if s.startswith(",", pos):
                pos = _skip_space(s, pos + 1)
                continue
            if s.startswith(")", pos):
                pos += 1
                break
            raise _error(s, pos, f"expected ',' or ')' after the value of attribute {attribute!r}")

    pos = _skip_space(s, pos)
    if pos != len(s):
        trailing = s[pos:]
        if len(trailing) > 40:
            # The full text is quoted (or windowed) anyway; this is just a hint.
            trailing = trailing[:40] + "..."
        raise _error(s, pos, f"unexpected text {trailing!r} after the closing ')'")
    return MeaningRepresentation(act, tuple(slots))


def try_parse_mr(text: str) -> MeaningRepresentation | None:
    """`parse_mr`, but ``None`` instead of `MRParseError` (for model outputs, which may be garbage).

    ``try_parse_mr("inform(name[Portal 2])")`` gives an MR; ``try_parse_mr("inform(name[")`` gives ``None``.
    """
    try:
        return parse_mr(text)
    except MRParseError:
        return None


def _check_pair(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score: both lists are empty")
    for kind, rows in (("prediction", predictions), ("reference", references)):
        for index, row in enumerate(rows):
            if not isinstance(row, str):
                raise TypeError(f"{kind} {index} is a {type(row).__name__}, expected a str")


def _parse_pairs(
    predictions: Iterable[str], references: Iterable[str]
) -> list[tuple[MeaningRepresentation | None, MeaningRepresentation]]:
    """Pair each prediction (None when it does not parse) with its parsed reference."""
    predictions, references = list(predictions), list(references)
    _check_pair(predictions, references)
    pairs = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        try:
            parsed_reference = parse_mr(reference)
        except MRParseError as exc:
            # A broken reference is a data bug, not a model error: fail loudly
            # rather than let it quietly lower every metric.
            raise MRParseError(f"reference {index} is not a valid MR: {exc}", text=exc.text) from exc
        pairs.append((try_parse_mr(prediction), parsed_reference))
    return pairs


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class _Tally:
    """Running counts for one group of rows (all rows, or one reference act)."""

    def __init__(self) -> None:
        self.n = self.exact = self.unordered = self.act = self.valid = 0
        self.true_positive = self.predicted = self.gold = 0

    def add(self, prediction_text: str, reference_text: str, prediction, reference) -> None:
        self.n += 1
        self.exact += prediction_text.strip() == reference_text.strip()
        reference_slots = set(reference.slots)
        # An unparseable prediction still counts against recall: its reference
        # slots were missed, it just contributes nothing predicted.
        self.gold += len(reference_slots)
        if prediction is None:
            return
        self.valid += 1
        prediction_slots = set(prediction.slots)
        same_act = prediction.dialogue_act == reference.dialogue_act
        self.act += same_act
        self.unordered += same_act and prediction_slots == reference_slots
        self.predicted += len(prediction_slots)
        self.true_positive += len(prediction_slots & reference_slots)

    def precision(self) -> float:
        return _ratio(self.true_positive, self.predicted)

    def recall(self) -> float:
        return _ratio(self.true_positive, self.gold)


# The metrics of an evaluation as tables show them (report.md, `mrtune evaluate` and `compare`), in display order:
# (label, metrics.json key, kind). `score` gives the rates; evaluate adds n and decode_seconds.
METRIC_ROWS = (
    ("Rows (n)", "n", "count"),
    ("Exact match", "exact_match", "percent"),
    ("Exact match (any slot order)", "exact_match_unordered", "percent"),
    ("Dialogue-act accuracy", "dialogue_act_accuracy", "percent"),
    ("Slot precision", "slot_precision", "percent"),
    ("Slot recall", "slot_recall", "percent"),
    ("Slot F1", "slot_f1", "percent"),
    ("Valid MR rate", "valid_mr_rate", "percent"),
    ("Decode time", "decode_seconds", "seconds"),
)


def score(predictions: list[str], references: list[str]) -> dict:
    """Compare predicted MR strings with reference MR strings, row by row.

    E.g. predicting ``inform(name[Tetris], rating[good])`` for the reference
    ``inform(rating[good], name[Tetris])`` is not an `exact_match` but is an
    `exact_match_unordered`, with slot precision and recall of 1.0.

    Returns ``n``, ``exact_match`` (strings equal after stripping),
    ``exact_match_unordered`` (same act and same set of slots),
    ``dialogue_act_accuracy``, micro-averaged ``slot_precision`` /
    ``slot_recall`` / ``slot_f1`` over (attribute, value) pairs,
    ``valid_mr_rate`` and ``per_dialogue_act`` (keyed by reference act, sorted,
    each with ``n``, ``exact_match``, ``dialogue_act_accuracy``, ``slot_f1``).
    Rates are floats in [0, 1]; a rate whose denominator is 0 is 0.0.

    Raises ValueError when the lists differ in length or are empty, and
    MRParseError (naming the row) when a reference does not parse.
    """
    predictions, references = list(predictions), list(references)
    pairs = _parse_pairs(predictions, references)

    overall = _Tally()
    by_act: dict[str, _Tally] = {}
    for prediction_text, reference_text, (prediction, reference) in zip(predictions, references, pairs):
        overall.add(prediction_text, reference_text, prediction, reference)
        by_act.setdefault(reference.dialogue_act, _Tally()).add(prediction_text, reference_text, prediction, reference)

    precision, recall = overall.precision(), overall.recall()
    return {
        "n": overall.n,
        "exact_match": _ratio(overall.exact, overall.n),
        "exact_match_unordered": _ratio(overall.unordered, overall.n),
        "dialogue_act_accuracy": _ratio(overall.act, overall.n),
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": _f1(precision, recall),
        "valid_mr_rate": _ratio(overall.valid, overall.n),
        "per_dialogue_act": {
            act: {
                "n": tally.n,
                "exact_match": _ratio(tally.exact, tally.n),
                "dialogue_act_accuracy": _ratio(tally.act, tally.n),
                "slot_f1": _f1(tally.precision(), tally.recall()),
            }
            for act, tally in sorted(by_act.items())
        },
    }


def majority_vote(predictions: Sequence[Sequence[str]]) -> list[str]:
    """Row by row, the meaning representation most of the models wrote (an ensemble's answer); a tie goes to the
    earliest model among the tied, so with no majority at all the first model's prediction stands.

    Votes are on the whole MR, compared as written: models trained alike write the same slots in the same order,
    and a vote over slots could assemble an MR no model wrote.

    >>> majority_vote([["a(x[1])", "b()"], ["a(x[1])", "c()"], ["d()", "e()"]])
    ['a(x[1])', 'b()']
    """
    if len({len(p) for p in predictions}) > 1:
        raise ValueError(f"every model must predict the same rows: {[len(p) for p in predictions]} predictions")
    voted = []
    for row in zip(*predictions):
        counts = Counter(p.strip() for p in row)
        top = max(counts.values())
        voted.append(next(p.strip() for p in row if counts[p.strip()] == top))
    return voted


def dialogue_act_confusion(predictions: list[str], references: list[str]) -> dict[str, dict[str, int]]:
    """Count reference act -> predicted act, e.g. ``{"inform": {"inform": 40, "<invalid>": 2}}``.

    A prediction that does not parse is counted under ``"<invalid>"``. Both
    levels are sorted by act name. Same input checks as `score`.
    """
    counts: dict[str, Counter[str]] = {}
    for prediction, reference in _parse_pairs(predictions, references):
        predicted_act = prediction.dialogue_act if prediction is not None else INVALID_ACT
        counts.setdefault(reference.dialogue_act, Counter())[predicted_act] += 1
    return {act: dict(sorted(row.items())) for act, row in sorted(counts.items())}


def _by_count_then_name(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def slot_errors(predictions: list[str], references: list[str]) -> dict:
    """Which attributes the model drops or makes up, counted per attribute.

    For the reference ``inform(name[Tetris], rating[good])`` and prediction
    ``inform(name[Tetris], rating[poor], genres[puzzle])``: ``missed`` is
    ``{"rating": 1}`` and ``invented`` is ``{"genres": 1, "rating": 1}`` (a
    wrong value is both). An unparseable prediction misses every reference
    slot and invents nothing. Each dict is sorted by count (descending), then
    attribute name. Same input checks as `score`.
    """
    missed: Counter[str] = Counter()
    invented: Counter[str] = Counter()
    for prediction, reference in _parse_pairs(predictions, references):
        reference_slots = set(reference.slots)
        prediction_slots = set(prediction.slots) if prediction is not None else set()
        missed.update(attribute for attribute, _ in reference_slots - prediction_slots)
        invented.update(attribute for attribute, _ in prediction_slots - reference_slots)
    return {"missed": _by_count_then_name(missed), "invented": _by_count_then_name(invented)}


def _names(field: str, names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        # A bare string would otherwise be split into single characters.
        raise TypeError(f"Vocabulary.{field} must be a collection of names, not a single str")
    result = tuple(sorted(set(names)))
    for name in result:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"Vocabulary.{field} contains {name!r}, which is not a name matching [a-z_]+")
    return result


# List values join their items with ", " (genres[action, adventure]); a closed attribute's value is such a list of
# its items, or empty (`esrb[]`) where training had the empty value.
ITEM_SEPARATOR = ", "
# One item of a closed value: canonical text (single spaces inside, none at the ends) with no bracket, comma or
# control character, so that items joined by ", " are always read back as the same items.
_ITEM = re.compile(r"[^\s\x00-\x1f\x7f\[\],]+(?: [^\s\x00-\x1f\x7f\[\],]+)*")

# The rule for a closed attribute, from ViGGO's training split: at most 40 distinct items, used on average at least
# 20 times each. ViGGO's categorical attributes (rating, esrb, the yes/no ones, platforms, genres,
# player_perspective) have 3 to 26 items and 64 or more uses per item. Its free-text ones stay open, as
# a new game, studio, adjective or date must stay writable: name, developer and specifier have 78 items or more,
# exp_release_date 11 dates in 108 uses. The uses-per-item bound also keeps a small training sample (a few dozen
# rows, each name seen a few times) from closing an attribute on too little evidence. Numbers stay open whatever
# their counts (release_year has 25 years in training): a user asks about next year's games, and a year missing
# from the training split is not a wrong year.
MAX_CLOSED_ITEMS = 40
MIN_USES_PER_ITEM = 20


def value_items(value: str) -> list[str]:
    """The items of a value: ``"PC, Xbox"`` gives ``["PC", "Xbox"]``, the empty value ``[""]``."""
    return value.split(ITEM_SEPARATOR) if value else [""]


def _list_order(follows: dict[str, set[str]]) -> tuple[str, ...] | None:
    """The one order of a list attribute's items that every training value keeps (`follows[b]`: the items seen
    before b in some value), or None when two values disagree. Items no value orders between them go in
    case-insensitive alphabetical order (as ViGGO lists genres), so the order is the same on every machine.
    Kahn's algorithm written out rather than graphlib's: that hands out ready items in batches, and the tie-break
    must pick one item at a time."""
    waiting = {item: set(before) for item, before in follows.items()}
    order: list[str] = []
    while waiting:
        ready = sorted((item for item, before in waiting.items() if not before), key=lambda i: (i.casefold(), i))
        if not ready:
            return None  # a cycle: some value lists a before b, another b before a
        order.append(ready[0])
        del waiting[ready[0]]
        for before in waiting.values():
            before.discard(ready[0])
    return tuple(order)


def _closed_values(closed_values) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`Vocabulary.closed_values` normalised: pairs sorted by attribute, items sorted and de-duplicated."""
    pairs = closed_values.items() if isinstance(closed_values, Mapping) else closed_values
    result = {}
    for attribute, items in pairs:
        where = f"Vocabulary.closed_values[{attribute!r}]"
        if isinstance(items, str) or not all(isinstance(item, str) for item in items):
            raise TypeError(f"{where} must be a collection of str items")
        if not items:
            raise ValueError(f"{where} has no items; leave the attribute out to allow any value")
        for item in items:
            if item and not _ITEM.fullmatch(item):
                raise ValueError(f"{where} has {item!r}, which is not text without brackets, commas or outer spaces")
        result[attribute] = tuple(sorted(set(items)))
    return tuple(sorted(result.items()))


@dataclass(frozen=True)
class Vocabulary:
    """The dialogue acts, attribute names and closed attribute values that constrained decoding may emit.

    Learned from training MRs such as ``request(specifier[short])`` (act ``request``, attribute ``specifier``).
    Every field is kept sorted and de-duplicated whatever order it is given in, so equal vocabularies compare and
    serialise equally.
    """

    dialogue_acts: tuple[str, ...]
    attributes: tuple[str, ...]
    closed_values: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """The items each closed attribute's value is made of, e.g. ``(("rating", ("average", "good", ...)), ...)``
    (a mapping is accepted too); ``""`` among them allows the empty value. Other attributes take any value."""
    list_attributes: tuple[str, ...] = ()
    """The closed attributes whose value may list several items, as some training value did (genres, platforms);
    another closed attribute's value is one item (rating[good], never rating[good, poor])."""
    item_order: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """For a list attribute whose training values all list their items in one order (ViGGO's: platforms[PlayStation,
    Xbox, PC], genres alphabetical): every non-empty item, in that order. The exported grammars write lists in it
    (a grammar cannot say "no item twice" in fewer rules than there are subsets; "in this order" says it in one
    line per item). mrtune's own decoding takes the items in any order, each once."""

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ so that the
        # "sorted" promise holds for direct construction too.
        object.__setattr__(self, "dialogue_acts", _names("dialogue_acts", self.dialogue_acts))
        object.__setattr__(self, "attributes", _names("attributes", self.attributes))
        object.__setattr__(self, "closed_values", _closed_values(self.closed_values))
        unknown = [attribute for attribute, _ in self.closed_values if attribute not in self.attributes]
        if unknown:
            raise ValueError(f"Vocabulary.closed_values names {unknown[0]!r}, which is not one of its attributes")
        object.__setattr__(self, "list_attributes", _names("list_attributes", self.list_attributes))
        unknown = [attribute for attribute in self.list_attributes if self.items_of(attribute) is None]
        if unknown:
            raise ValueError(f"Vocabulary.list_attributes names {unknown[0]!r}, which is not a closed attribute")
        pairs = self.item_order.items() if isinstance(self.item_order, Mapping) else self.item_order
        order = tuple(sorted((attribute, tuple(items)) for attribute, items in pairs))
        for attribute, items in order:
            full = {item for item in self.items_of(attribute) or () if item}
            if attribute not in self.list_attributes or set(items) != full or len(items) != len(full):
                raise ValueError(f"Vocabulary.item_order[{attribute!r}] must list each item of a list attribute once")
        object.__setattr__(self, "item_order", order)

    def items_of(self, attribute: str) -> tuple[str, ...] | None:
        """The items a value of `attribute` is made of, or None when the attribute is open."""
        return dict(self.closed_values).get(attribute)

    def order_of(self, attribute: str) -> tuple[str, ...] | None:
        """A list attribute's items in the order training lists them, or None (see `item_order`)."""
        return dict(self.item_order).get(attribute)

    def without_values(self) -> Vocabulary:
        """The same acts and attributes, with every value allowed (`eval.constrain_values=false`)."""
        return Vocabulary(self.dialogue_acts, self.attributes)

    @classmethod
    def from_mrs(cls, mrs: Iterable[str]) -> Vocabulary:
        """Collect every act and attribute used in ``mrs`` (normally the training split), and the items of each
        attribute that is closed by the rule above (`MAX_CLOSED_ITEMS`, `MIN_USES_PER_ITEM`).

        Raises MRParseError naming the row when one does not parse: the
        training data should be clean, and a typo there would become
        something the model is allowed to emit.
        """
        acts: set[str] = set()
        uses: Counter[str] = Counter()
        items: dict[str, set[str]] = {}
        lists: set[str] = set()  # attributes with a value of several items
        follows: dict[str, dict[str, set[str]]] = {}  # attribute -> item -> the items listed before it
        # Attributes with a value that is not a plain list of distinct items (an empty or repeated item, a comma
        # inside one): never closed, as the grammar of closed values could not write that value back.
        irregular: set[str] = set()
        for index, text in enumerate(mrs):
            try:
                mr = parse_mr(text)
            except MRParseError as exc:
                raise MRParseError(f"MR {index} is not valid: {exc}", text=exc.text) from exc
            acts.add(mr.dialogue_act)
            for attribute, value in mr.slots:
                pieces = value_items(value)
                uses[attribute] += 1
                items.setdefault(attribute, set()).update(pieces)
                if len(pieces) > 1:
                    lists.add(attribute)
                order = follows.setdefault(attribute, {})
                for i, piece in enumerate(pieces):
                    order.setdefault(piece, set()).update(pieces[:i])
                if value and (len(set(pieces)) < len(pieces) or not all(map(_ITEM.fullmatch, pieces))):
                    irregular.add(attribute)
        closed = {
            attribute: found
            for attribute, found in items.items()
            if attribute not in irregular
            and len(found) <= MAX_CLOSED_ITEMS
            and uses[attribute] >= MIN_USES_PER_ITEM * len(found)
            and not all(item.isdigit() for item in found if item)
        }
        listed = lists & set(closed)
        orders = {a: _list_order({i: b - {""} for i, b in follows[a].items() if i}) for a in listed}
        return cls(tuple(acts), tuple(items), closed, tuple(listed), {a: order for a, order in orders.items() if order})

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"dialogue_acts": [...], "attributes": [...], "closed_values": {attribute: [...]},
        "list_attributes": [...]}``."""
        return {
            "dialogue_acts": list(self.dialogue_acts),
            "attributes": list(self.attributes),
            "closed_values": {attribute: list(items) for attribute, items in self.closed_values},
            "list_attributes": list(self.list_attributes),
            "item_order": {attribute: list(items) for attribute, items in self.item_order},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Vocabulary:
        """Inverse of `to_dict`; raises ValueError when a key is missing. A vocabulary written before closed values
        existed (no ``closed_values`` key) allows every value, as it did then."""
        missing = [key for key in ("dialogue_acts", "attributes") if key not in d]
        if missing:
            raise ValueError(
                f"vocabulary is missing {', '.join(missing)}; expected keys 'dialogue_acts' and 'attributes'"
            )
        closed_values = d.get("closed_values", {})
        if not isinstance(closed_values, Mapping):
            raise TypeError(f"vocabulary's closed_values is a {type(closed_values).__name__}, expected an object")
        item_order = d.get("item_order", {})
        if not isinstance(item_order, Mapping):
            raise TypeError(f"vocabulary's item_order is a {type(item_order).__name__}, expected an object")
        lists = tuple(d.get("list_attributes", ()))
        return cls(tuple(d["dialogue_acts"]), tuple(d["attributes"]), closed_values, lists, item_order)
