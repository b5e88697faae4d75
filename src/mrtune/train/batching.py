"""Tokenized rows, the batch plan of an epoch, and the collators (padded or packed).

A row is `prompt + meaning_representation + EOS`, tokenized as two pieces so that the boundary is exactly where
generation starts at inference time. Labels are -100 (ignored by the loss) on the prompt when the loss is on the
completion only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mrtune.errors import MrtuneError
from mrtune.task.data import Example
from mrtune.task.prompts import build_prompt

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizeReport:
    rows: int
    too_long: int
    action: str
    longest: int


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids, with the tokenizer's own special tokens (BOS for Mistral, none for SmolLM2)."""
    return tokenizer(prompts, add_special_tokens=True)["input_ids"]


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    prompt_style: str,
    *,
    completion_only: bool = True,
    max_length: int = 512,
    too_long: str = "error",
) -> tuple[list[TokenizedRow], TokenizeReport]:
    prompts = encode_prompts(tokenizer, [build_prompt(prompt_style, e.sentence) for e in examples])
    completions = tokenizer([e.meaning_representation for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows, over = [], []
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions):
        completion_ids = completion_ids + [eos]
        input_ids = prompt_ids + completion_ids
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)
        labels = prompt_labels + completion_ids
        if len(input_ids) > max_length:
            over.append((example.source, len(input_ids)))
            if too_long == "skip":
                continue
            if too_long == "truncate":
                input_ids, labels = input_ids[:max_length], labels[:max_length]
        rows.append(TokenizedRow(input_ids, labels))
    if over and too_long == "error":
        where, length = over[0]
        raise MrtuneError(
            f"{len(over)} row(s) are longer than data.max_length={max_length} tokens (first: {where}, "
            f"{length} tokens): raise data.max_length or set data.too_long=skip or truncate"
        )
    longest = max((len(r) for r in rows), default=0)
    return rows, TokenizeReport(rows=len(rows), too_long=len(over), action=too_long, longest=longest)


def plan_batches(
    lengths: list[int],
    *,
    batch_size: int,
    batch_tokens: int | None = None,
    packing: bool = False,
    group_by_length: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Row indices of each micro-batch for one epoch; the same (seed, epoch) always gives the same plan.

    With `group_by_length`, rows are shuffled, cut into mega-batches of 64 batches, and sorted by length inside
    each, so batches hold rows of similar length (less padding) while the data order stays random.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = 64 * batch_size if batch_tokens is None else max(64 * batch_tokens // max(1, max(lengths)), 1)
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda i: -lengths[i])
        ]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        if batch_tokens is None:
            fits = len(current) < batch_size
        else:
            # A padded batch costs rows x longest; a packed one only the sum of its rows.
            cost = (
                (sum(lengths[i] for i in current) + lengths[index])
                if packing
                else (len(current) + 1) * max(longest, lengths[index])
            )
            fits = cost <= batch_tokens
        if current and not fits:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, lengths[index])
    if current:
        batches.append(current)
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(
    rows: list[TokenizedRow], pad_token_id: int, packing: bool = False, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch.

    Padded: input_ids/attention_mask/labels of shape (B, T_longest), right-padded.
    Packed: one sequence (1, sum of lengths) with position_ids restarting at 0 for each row and no attention mask:
    transformers then derives per-row (block-diagonal causal) attention from the position ids, so rows do not see
    each other, and no compute is spent on padding. The first label of each row is ignored, so no row is trained
    to predict its start from the previous row's end. `pad_to` appends one padding row (no labels) up to that
    length, so that every micro-batch has the same shape (for torch.compile).
    """
    if packing:
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            input_ids += row.input_ids
            labels += [IGNORE_INDEX] + row.labels[1:]
            position_ids += range(len(row))
        if pad_to is not None and len(input_ids) < pad_to:
            padding = pad_to - len(input_ids)
            input_ids += [pad_token_id] * padding
            labels += [IGNORE_INDEX] * padding
            position_ids += range(padding)
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids]),
        }
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row.input_ids)
        labels[i, : len(row)] = torch.tensor(row.labels)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BLOCK = 128
"""Flex attention's block size (tokens a side): its kernels skip the blocks the mask rules out whole."""


def packed_block_mask(position_ids: torch.Tensor, model_config):
    """Flex attention's block mask for one packed micro-batch (position ids restart at 0 for each row): causal within
    each row, never across rows, and within the model's sliding window if it has one; None where one mask cannot
    serve every layer (layers of mixed attention types), which leaves the mask to transformers.

    Passed to the model as its attention mask, which transformers then uses as it is. transformers builds the same
    mask with a compiled `create_block_mask`, compiled again for each sequence length: for 12,288 tokens that
    compilation ran for minutes (Triton, then ptxas) before the first step on an H200 (BENCHMARKS.md, fifth
    round); uncompiled, `create_block_mask` walks the whole tokens x tokens grid. Rows are contiguous, so which
    128 x 128 blocks are empty, full or partial follows from the rows of each block's first and last tokens: a
    few small operations on the blocks x blocks grid (`packed_blocks`), exact for every token, as the test against
    `create_block_mask` checks; the mask function decides within the partial blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    layer_types = set(getattr(model_config, "layer_types", None) or [])
    if len(layer_types) > 1:
        return None
    window = getattr(model_config, "sliding_window", None) if layer_types <= {"sliding_attention"} else None
    positions = position_ids[0]
    row = torch.cumsum(positions == 0, 0)  # which row each token belongs to

    def same_row_causal(batch, head, q, kv):
        allowed = (row[q] == row[kv]) & (kv <= q)
        return allowed & (kv > q - window) if window else allowed

    def kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block: how many key blocks, and which (those first), as BlockMask takes them."""
        counts = blocks.sum(-1, dtype=torch.int32)
        return counts[None, None], torch.argsort((~blocks).byte(), dim=-1, stable=True).int()[None, None]

    partial, full = packed_blocks(row, window)
    (counts, indices), (full_counts, full_indices) = kv_blocks(partial), kv_blocks(full)
    length = positions.numel()
    return BlockMask.from_kv_blocks(
        counts, indices, full_counts, full_indices, BLOCK, same_row_causal, seq_lengths=(length, length)
    )


def packed_blocks(row: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): which (query block, key block) pairs of a packed sequence hold some allowed (query, key)
    pairs but not only, and which hold only allowed pairs, for a causal mask within rows (`row`: each token's row,
    non-decreasing) and an optional sliding window.

    A key block j before query block i shares a row with it exactly when the row of j's last token is the row of
    i's first (rows are contiguous), and that pair of tokens is the closest one: within the window when their
    distance is. Every pair is in one row when j's first token and i's last token are, and within the window when
    those two are. A block on the diagonal always holds its own tokens; it is never full (causal), nor is a block
    that the sequence's end cuts short.
    """
    length = row.numel()
    starts = torch.arange(0, length, BLOCK, device=row.device)
    ends = torch.clamp(starts + BLOCK, max=length) - 1
    first, last = row[starts], row[ends]
    index = torch.arange(len(starts), device=row.device)
    q, kv = index[:, None], index[None, :]
    complete = ends - starts == BLOCK - 1
    some = (kv < q) & (first[:, None] == last[None, :])
    full = (kv < q) & (last[:, None] == first[None, :]) & complete[:, None] & complete[None, :]
    if window:
        some &= starts[:, None] - ends[None, :] < window
        full &= ends[:, None] - starts[None, :] < window
    return (some | (q == kv)) & ~full, full


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on (labels are shifted by one inside the model, so the first never counts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
