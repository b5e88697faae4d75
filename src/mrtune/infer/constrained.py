"""Constrained decoding: every generated meaning representation parses, uses the run's vocabulary, and stops.

The grammar and its length rule are stated in `mrtune.task.grammar` (a byte automaton, torch-free); this module
turns the automaton into token masks.

Why our own automaton, when grammar libraries exist. The grammar itself is within their reach: every ViGGO MR
lists its attributes in one canonical order, so an ordered chain of optional slots states "no attribute twice" as a
plain context-free grammar, and `mrtune export --format gbnf|lark` writes exactly that for llama.cpp and for
llguidance-based engines (vLLM, SGLang, outlines); llguidance 1.9.1 accepts both files with SmolLM2's tokenizer
(tests/test_export.py). Two things keep this module in mrtune's own decoding:
- the token-budget rule (a token is allowed only if the MR can still be closed within the tokens left) needs the
  shortest completion of the current parse state, which no grammar engine is told about; without it a long value
  can run out of tokens inside an MR;
- speed: the automaton's state is small and hashable, so each state's mask is computed once and cached for the
  whole evaluation, with no per-token parser work and no extra dependency (xgrammar needs triton and tvm-ffi).
It also allows any attribute order (the exported grammars only the canonical one), which costs nothing on ViGGO.

How it stays cheap: the grammar is a small deterministic automaton whose state is hashable (`State`), and the
mask of allowed tokens is computed once per state and kept (`MRConstraint` outlives batches and calls). A mask is
found by walking the sorted token strings as a trie, pruned by the automaton (inside a closed attribute's value
too: its items are a small trie), except inside an open value, where almost every token is allowed: there the mask
is a precomputed "plain value token" mask plus the few tokens that contain "]" or continue a UTF-8 character.
Each batch row keeps its own state (as a small int); one gather from a bank of masks on the model's device and one
masked_fill apply them all. For the 1,083 test MRs with SmolLM2's 49,152 tokens in one batch that is 0.44 s of
mask work in all from a cold cache, 0.05 s warm (H200, before closed values; BENCHMARKS.md).

What a decode computed is kept on disk for the next process (`load_cached_constraint`, `save_cached_constraint`),
keyed by everything the masks depend on: the token strings, EOS, the vocabulary and this code.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import LogitsProcessor

from mrtune.errors import MrtuneError
from mrtune.run.durable import write_bytes_atomic
from mrtune.task.grammar import (
    DONE,
    FINISHED,
    ORDINARY_TEXT,
    RBRACKET,
    SPACE,
    VALUE,
    MRGrammar,
    State,
)
from mrtune.task.mr import Vocabulary

__all__ = ["MRConstraint", "MRLogitsProcessor", "load_cached_constraint", "save_cached_constraint", "token_bytes"]

logger = logging.getLogger(__name__)


# GPT-2's byte <-> printable-character table, used by every byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen),
# as a str.translate table from the printable character to the character whose code is the byte.
@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = byte
        else:
            table[256 + extra] = byte
            extra += 1
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(node) -> set[str]:
    if isinstance(node, dict):
        return {node.get("type", "")} | {t for value in node.values() for t in _decoder_types(value)}
    if isinstance(node, list):
        return {t for value in node for t in _decoder_types(value)}
    return set()


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id appends to the text; None for added tokens (EOS, pad, chat markers).

    Byte-level BPE vocabularies spell bytes with GPT-2's printable table; SentencePiece ones (Mistral, Llama 2)
    write spaces as "▁" and unknown bytes as "<0x0A>". Decoding each token alone would lose the partial UTF-8
    characters that byte-level tokens carry.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MrtuneError(
            f"constrained decoding needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}:"
            " pass --no-constrained"
        )
    decoders = _decoder_types(json.loads(backend.decoder.__getstate__())) if backend.decoder else set()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = set(tokenizer.added_tokens_decoder)
    result: list[bytes | None] = []
    if "ByteLevel" in decoders:
        table = _byte_level_table()
        for token_id, piece in enumerate(pieces):
            if piece is None or token_id in added:
                result.append(None)
                continue
            try:
                result.append(piece.translate(table).encode("latin-1"))
            except UnicodeEncodeError:  # a character outside the table: not a byte-level piece
                result.append(None)
    elif decoders & {"Metaspace", "ByteFallback", "Replace"}:
        for token_id, piece in enumerate(pieces):
            if piece is None or token_id in added:
                result.append(None)
            elif match := _BYTE_FALLBACK.fullmatch(piece):
                result.append(bytes([int(match.group(1), 16)]))
            else:
                result.append(piece.replace("\u2581", " ").encode("utf-8"))
    else:
        raise MrtuneError(
            f"constrained decoding supports byte-level BPE and SentencePiece tokenizers; this one "
            f"decodes with {sorted(decoders) or 'no decoder'}: pass --no-constrained"
        )
    return result


class _Entry(NamedTuple):
    """What is known about one automaton state."""

    mask: int  # row of the mask bank
    transitions: dict[int, State]  # allowed token id -> next state (plain value tokens excepted)
    plain: tuple[bool, bool] | None  # VALUE: key of the plain-token mask also allowed (MRConstraint._plain_key)


class MRConstraint:
    """Masks for every decoding step of MRs over one tokenizer and vocabulary; reusable across batches.

    ``MRConstraint(tokenizer, vocabulary).logits_processor(prompt_length, max_new_tokens)`` gives the
    transformers `LogitsProcessor` for one `model.generate` call on a left-padded batch.
    """

    # Below this many tokens, a prefix range of the sorted vocabulary is checked token by token instead of
    # being split further by its next byte.
    _SCAN_BELOW = 24

    def __init__(self, tokenizer, vocabulary: Vocabulary, tokens: list[bytes | None] | None = None):
        """`tokens`: `token_bytes(tokenizer)`, when the caller has it already."""
        self.grammar = MRGrammar(vocabulary)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise MrtuneError("constrained decoding needs a tokenizer with an EOS token")
        self.tokens = token_bytes(tokenizer) if tokens is None else tokens
        # Set by load_cached_constraint: the cache file's key and folder, and `learned` as read from (or written to) it.
        self.cache_key: str | None = None
        self.cache_dir: Path | None = None
        self.saved = (0, 0)
        self.vocab_size = len(self.tokens)
        ordered = sorted((data, token_id) for token_id, data in enumerate(self.tokens) if data)
        self._sorted = [data for data, _ in ordered]  # token strings in byte order: a trie, walked with bisect
        self._sorted_ids = [token_id for _, token_id in ordered]
        self._spellable = set(self._sorted)
        self._longest = max(map(len, self._sorted))
        self._index_value_tokens()
        self._entries: dict[State, _Entry] = {}
        self._spell_costs: dict[bytes, float] = {}
        self._finish_costs: dict[State, float] = {}
        self._budget_masks: dict[tuple[State, int], int] = {}
        self._max_next_cost: dict[State, float] = {}
        # The bank: one bool row per distinct mask, in numpy (a small torch op costs ~1 ms in thread hand-offs on
        # 2 cores, numpy's ~1 us), mirrored on the model's device as "refused" rows for one masked_fill a step.
        self._masks: list[np.ndarray] = []
        self._mask_rows: dict[bytes, int] = {}  # mask bytes -> bank row, so equal masks share a row
        self._device_bank: torch.Tensor | None = None  # (capacity, width) bool, True = refused
        self._device_rows = 0
        eos_only = np.zeros(self.vocab_size, dtype=bool)
        eos_only[self.eos] = True
        self._eos_only = self._bank(eos_only)
        self.states_seen = 0
        # The per-step fast path works on small ints instead of States (hashing a 7-field tuple per row per step
        # was most of the cost at batch 1,083): state id -> State, bank row, worst cost after one more token, and
        # the ids reached by the tokens seen so far.
        self._ids: dict[State, int] = {}
        self._id_states: list[State] = []
        self._id_rows: list[int] = []
        self._id_worst: list[float] = []
        self._id_next: list[dict[int, int]] = []

    # ---- pickling (the disk cache) -------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """What pickle keeps: all tables but the device bank, with the mask bank packed 8 tokens a byte."""
        state = self.__dict__.copy()
        state.update(_device_bank=None, _device_rows=0, _mask_rows=None, _spellable=None, cache_dir=None)
        state["_masks"] = np.packbits(np.stack(self._masks), axis=1)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._masks = list(np.unpackbits(state["_masks"], axis=1, count=self.vocab_size).astype(bool))
        self._mask_rows = {mask.tobytes(): row for row, mask in enumerate(self._masks)}
        self._spellable = set(self._sorted)

    @property
    def learned(self) -> tuple[int, int]:
        """How much this constraint has computed (states, budget masks): it grows as decoding meets new states."""
        return len(self._entries), len(self._budget_masks)

    # ---- precomputed token tables -----------------------------------------------------------------------------

    def _index_value_tokens(self) -> None:
        """Sort tokens for the inside of a value: plain ones (a mask by flags), and the few needing a walk."""
        plain = [False] * self.vocab_size
        starts_space = [False] * self.vocab_size
        # A plain token leaves the value in one of a few states (ends in a space? inside a character?), whatever
        # the attributes written so far: the distinct ones, with used=0, and each plain token's index among them.
        exit_states: dict[State, int] = {}
        exit_index = [0] * self.vocab_size
        walk: list[int] = []  # tokens that contain "]" or start inside a UTF-8 character
        inside = State(VALUE, empty=False)
        ends_in_space = inside._replace(space=True)
        for token_id, data in enumerate(self.tokens):
            if not data:
                continue
            if RBRACKET in data or 0x80 <= data[0] <= 0xBF:
                walk.append(token_id)
                continue
            if ORDINARY_TEXT.fullmatch(data):
                # Most tokens: whole characters, no bracket, no control character, no doubled space. Deciding
                # that with one regex instead of the automaton, byte by byte, takes 50 ms instead of 1.2 s for
                # SmolLM2's 49,152 tokens; tests check both agree on every token.
                state = ends_in_space if data[-1] == SPACE else inside
            else:
                state = self.grammar.advance(inside, data)
            if state is None or state.phase != VALUE:
                continue  # "[", a control character, a doubled space or broken UTF-8: never in a value
            plain[token_id] = True
            starts_space[token_id] = data[0] == SPACE
            exit_index[token_id] = exit_states.setdefault(state, len(exit_states))
        plain_mask, leading_space = np.array(plain), np.array(starts_space)
        self._plain = {
            # (empty, space) of the value so far -> plain tokens allowed next: a space may not lead or double.
            (True, False): plain_mask & ~leading_space,
            (False, False): plain_mask,
            (False, True): plain_mask & ~leading_space,
        }
        self._exit_states = list(exit_states)
        self._exit_index = np.array(exit_index)
        self._value_walk = walk

    @staticmethod
    def _plain_key(state: State) -> tuple[bool, bool] | None:
        if state.phase != VALUE or state.pending:
            return None
        return state.empty, state.space

    # ---- costs ------------------------------------------------------------------------------------------------

    def _spell_cost(self, data: bytes) -> float:
        """Fewest tokens whose strings concatenate to `data` (inf when none do)."""
        cached = self._spell_costs.get(data)
        if cached is not None:
            return cached
        best = [0.0] + [float("inf")] * len(data)
        for start in range(len(data)):
            if best[start] == float("inf"):
                continue
            for end in range(start + 1, min(len(data), start + self._longest) + 1):
                if data[start:end] in self._spellable and best[start] + 1 < best[end]:
                    best[end] = best[start] + 1
        self._spell_costs[data] = best[-1]
        return best[-1]

    def finish_cost(self, state: State) -> float:
        """Tokens needed to close the MR from `state` and write EOS: an upper bound that is always achievable."""
        cost = self._finish_costs.get(state)
        if cost is None:
            cost = 0 if state.phase == FINISHED else 1 + min(map(self._spell_cost, self.grammar.closings(state)))
            self._finish_costs[state] = cost
        return cost

    @property
    def min_new_tokens(self) -> int:
        """The smallest generation budget that fits a whole MR."""
        cost = self.finish_cost(self.grammar.start)
        if cost == float("inf"):
            raise MrtuneError(
                "this tokenizer has no tokens to spell a meaning representation (no byte tokens for "
                "'(', '[' or ']'?): pass --no-constrained"
            )
        return int(cost)

    # ---- masks ------------------------------------------------------------------------------------------------

    def _bank(self, mask: np.ndarray) -> int:
        key = mask.tobytes()
        row = self._mask_rows.get(key)
        if row is None:
            row = self._mask_rows[key] = len(self._masks)
            self._masks.append(mask)
        return row

    def _walk(self, state: State, lo: int, hi: int, depth: int, out: dict[int, State]) -> None:
        """Allowed tokens among self._sorted[lo:hi], which share their first `depth` bytes, reaching `state`."""
        strings, ids = self._sorted, self._sorted_ids
        if hi - lo <= self._SCAN_BELOW:
            for i in range(lo, hi):
                reached = self.grammar.advance(state, strings[i][depth:])
                if reached is not None:
                    out[ids[i]] = reached
            return
        if len(strings[lo]) == depth:  # the token that is exactly the shared prefix sorts first
            out[ids[lo]] = state
            lo += 1
        prefix = strings[lo][:depth]
        for byte in self.grammar.candidate_bytes(state):
            reached = self.grammar.step(state, byte)
            if reached is None:
                continue
            key = prefix + bytes([byte])
            start = bisect.bisect_left(strings, key, lo, hi)
            end = bisect.bisect_left(strings, key + b"\xff" * (self._longest + 1), start, hi)  # past key's range
            if start < end:
                self._walk(reached, start, end, depth + 1, out)

    def _entry(self, state: State) -> _Entry:
        entry = self._entries.get(state)
        if entry is not None:
            return entry
        self.states_seen += 1
        transitions: dict[int, State] = {}
        plain_key = self._plain_key(state)
        if state.phase in (DONE, FINISHED):
            row = self._eos_only
        else:
            if state.phase == VALUE:
                for token_id in self._value_walk:
                    reached = self.grammar.advance(state, self.tokens[token_id])
                    if reached is not None:
                        transitions[token_id] = reached
                mask = self._plain[plain_key].copy() if plain_key else np.zeros(self.vocab_size, dtype=bool)
            else:
                self._walk(state, 0, len(self._sorted), 0, transitions)
                mask = np.zeros(self.vocab_size, dtype=bool)
            mask[list(transitions)] = True
            row = self._bank(mask)
        entry = self._entries[state] = _Entry(row, transitions, plain_key)
        return entry

    @functools.cached_property
    def _exit_costs(self) -> list[float]:
        """finish_cost after a plain value token, by the index of its exit state."""
        return [self.finish_cost(state) for state in self._exit_states]

    def _mask_row(self, state: State, left: int) -> int:
        """Bank row of the tokens allowed in `state` with `left` tokens of budget, this one included."""
        entry = self._entry(state)
        if state.phase in (DONE, FINISHED):
            return entry.mask
        worst = self._max_next_cost.get(state)
        if worst is None:
            costs = [self.finish_cost(s) for s in entry.transitions.values()]
            if entry.plain is not None:
                costs += self._exit_costs
            worst = self._max_next_cost[state] = max(costs)
        if left - 1 >= worst:
            return entry.mask
        key = (state, left)
        row = self._budget_masks.get(key)
        if row is None:
            mask = np.zeros(self.vocab_size, dtype=bool)
            fits = [t for t, s in entry.transitions.items() if self.finish_cost(s) <= left - 1]
            mask[fits] = True
            if entry.plain is not None:
                exit_fits = np.array([cost <= left - 1 for cost in self._exit_costs])
                mask |= self._plain[entry.plain] & exit_fits[self._exit_index]
            row = self._budget_masks[key] = self._bank(mask)
        return row

    def allowed_tokens(self, state: State, left: int) -> torch.Tensor:
        """(vocabulary size,) bool mask of the tokens allowed in `state` with `left` tokens of budget, this one
        included (EOS only once the MR is closed)."""
        return torch.from_numpy(self._masks[self._mask_row(state, left)])

    def next_state(self, state: State, token_id: int) -> State:
        """The state after `token_id`, which must be one the mask of `state` allowed."""
        if state.phase in (DONE, FINISHED):
            return State(FINISHED)
        entry = self._entry(state)
        reached = entry.transitions.get(token_id)
        if reached is not None:
            return reached
        if entry.plain is not None and token_id < self.vocab_size and self._plain[entry.plain][token_id]:
            return self._exit_states[self._exit_index[token_id]]._replace(used=state.used)
        raise ValueError(f"token {token_id} is not allowed in state {state}")

    def refused(self, rows: list[int], device: torch.device, width: int) -> torch.Tensor:
        """(len(rows), width) bool, True where the bank rows `rows` refuse a token, on `device`.

        Ids from the tokenizer's vocabulary size up to `width` (a model's padded output layer) are refused.
        """
        with torch.inference_mode():  # the bank is written in place whether or not the caller is in inference mode
            return self._refused(rows, device, width)

    def _refused(self, rows: list[int], device: torch.device, width: int) -> torch.Tensor:
        bank = self._device_bank
        if bank is None or bank.device != device or bank.shape[1] != width:
            bank, self._device_rows = None, 0
        count = len(self._masks)
        if bank is None or bank.shape[0] < count:  # grow by doubling: copying the bank every step would cost more
            grown = torch.ones((max(64, 2 * count), width), dtype=torch.bool, device=device)
            if bank is not None:
                grown[: self._device_rows] = bank[: self._device_rows]
            bank = self._device_bank = grown
        if self._device_rows < count:
            new = ~np.stack(self._masks[self._device_rows : count])
            bank[self._device_rows : count, : self.vocab_size] = torch.from_numpy(new).to(device)
            self._device_rows = count
        return bank[torch.tensor(rows, device=device)]

    # ---- the per-step fast path ----------------------------------------------------------------------------------

    def _state_id(self, state: State) -> int:
        state_id = self._ids.get(state)
        if state_id is None:
            state_id = self._ids[state] = len(self._id_states)
            self._id_states.append(state)
            self._id_rows.append(self._mask_row(state, 10**9))
            self._id_worst.append(self._max_next_cost.get(state, 0))
            self._id_next.append({})
        return state_id

    def step_ids(self, state_ids: list[int], tokens: list[int]) -> list[int]:
        """The ids of the states after `tokens`, one per row."""
        table = self._id_next
        out = []
        for state_id, token in zip(state_ids, tokens):
            reached = table[state_id].get(token)
            if reached is None:
                reached = table[state_id][token] = self._state_id(self.next_state(self._id_states[state_id], token))
            out.append(reached)
        return out

    def rows_for(self, state_ids: list[int], left: int) -> list[int]:
        """Bank rows of the tokens allowed in each state with `left` tokens of budget, this one included."""
        rows, worst = self._id_rows, self._id_worst
        return [rows[i] if left - 1 >= worst[i] else self._mask_row(self._id_states[i], left) for i in state_ids]

    def logits_processor(self, prompt_length: int, max_new_tokens: int) -> MRLogitsProcessor:
        if max_new_tokens < self.min_new_tokens:
            raise MrtuneError(
                f"eval.max_new_tokens={max_new_tokens} is too small for any meaning representation "
                f"with this tokenizer (it needs at least {self.min_new_tokens}): raise it, or pass "
                f"--no-constrained"
            )
        return MRLogitsProcessor(self, prompt_length, max_new_tokens)


class MRLogitsProcessor(LogitsProcessor):
    """Sets the score of every token the grammar does not allow to -inf, row by row, for one `generate` call."""

    def __init__(self, constraint: MRConstraint, prompt_length: int, max_new_tokens: int):
        self.constraint = constraint
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.state_ids: list[int] | None = None  # one per row (MRConstraint's state ids)

    @property
    def states(self) -> list[State]:
        return [self.constraint._id_states[i] for i in self.state_ids or ()]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_length
        constraint = self.constraint
        if self.state_ids is None:
            self.state_ids = [constraint._state_id(constraint.grammar.start)] * input_ids.shape[0]
        elif generated > 0:
            self.state_ids = constraint.step_ids(self.state_ids, input_ids[:, -1].tolist())
        left = self.max_new_tokens - generated  # tokens still to come, this one included
        rows = constraint.rows_for(self.state_ids, left)
        return scores.masked_fill(constraint.refused(rows, scores.device, scores.shape[-1]), float("-inf"))


# ---- the disk cache ----------------------------------------------------------------------------------------------

CACHE_FORMAT = 1
"""Bump when what a cached constraint holds changes without a change to the modules below."""
_CODE_MODULES = ("mrtune.task.mr", "mrtune.task.grammar", "mrtune.infer.constrained")
"""The code the masks follow from: any change to these files gives new keys, so no stale mask is ever read."""
CACHE_KEEP = 16
"""Cached constraints kept in the directory (the most recently used): one per tokenizer, vocabulary and code."""


def constraint_key(tokens: list[bytes | None], eos: int, vocabulary: Vocabulary) -> str | None:
    """A hash of everything an MRConstraint's masks depend on, or None when this code's files cannot be read."""
    digest = hashlib.sha256(f"mrtune constraint cache {CACHE_FORMAT}".encode())
    for name in _CODE_MODULES:
        try:
            digest.update(Path(sys.modules[name].__file__).read_bytes())
        except (KeyError, TypeError, OSError):
            return None
    digest.update(json.dumps([vocabulary.to_dict(), eos], sort_keys=True, ensure_ascii=False).encode())
    for data in tokens:  # length-prefixed, so that no two token lists hash alike
        digest.update(b"\xff\xff\xff\xff" if data is None else len(data).to_bytes(4, "little") + data)
    return digest.hexdigest()[:40]


def _unpickle(data: bytes):
    """pickle.loads with the garbage collector paused: its passes over the many tuples being made would otherwise
    take longer than the load itself (none of them is garbage yet)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return pickle.loads(data)
    finally:
        if was_enabled:
            gc.enable()


def _read_cached(path: Path, key: str) -> MRConstraint | None:
    """The constraint pickled at `path` by this user, or None (missing, unreadable, foreign, damaged, another key)."""
    try:
        info = path.stat()
        # pickle runs code on load: only a file this user wrote, which no one else can change.
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            logger.warning("ignoring %s: not owned by this user, or writable by others", path)
            return None
        constraint = _unpickle(path.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as error:  # a torn or older file (any unpickling error): rebuilt from scratch, then replaced
        logger.warning("ignoring the unreadable constraint cache %s (%s)", path, type(error).__name__)
        return None
    if not isinstance(constraint, MRConstraint) or constraint.cache_key != key:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _prune
    return constraint


def _prune(cache_dir: Path) -> None:
    """Remove all but the CACHE_KEEP most recently used cache files (each code change leaves one behind)."""
    dated = []
    for path in cache_dir.glob("*.pkl"):
        try:
            dated.append((path.stat().st_mtime, path))
        except OSError:  # removed meanwhile by another process's prune
            continue
    for _, path in sorted(dated, reverse=True)[CACHE_KEEP:]:
        path.unlink(missing_ok=True)


def load_cached_constraint(tokenizer, vocabulary: Vocabulary, cache_dir: Path) -> MRConstraint:
    """An MRConstraint for `tokenizer` and `vocabulary` with the masks an earlier process computed for them (read from
    `cache_dir`), or a new one. Hand it to `save_cached_constraint` after decoding to keep what decoding added."""
    tokens = token_bytes(tokenizer)
    if tokenizer.eos_token_id is None:
        return MRConstraint(tokenizer, vocabulary, tokens)  # refused there, with its message
    key = constraint_key(tokens, tokenizer.eos_token_id, vocabulary)
    constraint = _read_cached(Path(cache_dir) / f"{key}.pkl", key) if key else None
    if constraint is None:
        constraint = MRConstraint(tokenizer, vocabulary, tokens)
        constraint.cache_key = key
    constraint.cache_dir = Path(cache_dir)
    constraint.saved = constraint.learned
    return constraint


def save_cached_constraint(constraint: MRConstraint) -> None:
    """Write `constraint` back to its cache when it computed masks it did not have there; a failure to write (a
    read-only or full disk) is logged, not raised: the cache only saves time."""
    cache_dir = constraint.cache_dir
    if constraint.cache_key is None or cache_dir is None or constraint.learned == constraint.saved:
        return
    path = cache_dir / f"{constraint.cache_key}.pkl"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, pickle.dumps(constraint, protocol=pickle.HIGHEST_PROTOCOL))
        os.chmod(path, 0o600)  # private whatever the umask: _read_cached refuses a file others could change
        _prune(cache_dir)
    except OSError as error:
        logger.warning("could not write the constraint cache %s: %s", path, error)
        return
    constraint.saved = constraint.learned
