"""Training rows and batch plans, checked on the values a broken implementation gets wrong.

Each test here kills a class of realistic bug that once passed the whole suite (issue 18): the EOS label dropped
from the completion, a packed row's first label left unmasked, the batch plan losing a row, and the packing
budget counting padding. Fast: a tokenizer and integer lists, no model.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mrtune.model.resolve import load_tokenizer
from mrtune.task.data import load_split
from mrtune.train.batching import IGNORE_INDEX, collate, count_targets, plan_batches, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rows_and_examples(tokenizer):
    examples = load_split("viggo:validation")[:6]
    rows, _ = tokenize_examples(examples, tokenizer, "compact")
    return rows, examples


def test_every_row_ends_with_a_trained_eos_and_its_completion_is_trained(tokenizer, rows_and_examples):
    """The model learns to stop only if the EOS after the MR is a label (the seed recipe masked it away)."""
    rows, examples = rows_and_examples
    eos = tokenizer.eos_token_id
    for row, example in zip(rows, examples):
        completion = tokenizer(example.meaning_representation, add_special_tokens=False)["input_ids"] + [eos]
        assert row.input_ids[-len(completion) :] == completion
        assert row.labels[-len(completion) :] == completion  # the MR and its EOS, every one a target
        prompt = len(row) - len(completion)
        assert row.labels[:prompt] == [IGNORE_INDEX] * prompt  # completion_only: the prompt is never a target
        assert len(row.labels) == len(row.input_ids)


def test_the_prompt_is_trained_when_completion_only_is_off(tokenizer, rows_and_examples):
    rows, examples = rows_and_examples
    full, _ = tokenize_examples(examples, tokenizer, "compact", completion_only=False)
    for row in full:
        assert row.labels == row.input_ids and row.labels[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["own-pad", "pad-is-eos"])
def test_padded_batches_keep_every_eos_label_and_ignore_only_padding(tokenizer, rows_and_examples, pad_is_eos):
    """With pad == EOS (SmolLM2, many Llama set-ups), masking 'pad' positions by value drops every EOS label."""
    rows, _ = rows_and_examples
    eos = tokenizer.eos_token_id
    pad = eos if pad_is_eos else tokenizer.pad_token_id
    batch = collate(rows, pad)
    longest = max(len(r) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(rows), longest)
    assert all(tensor.dtype == torch.long for tensor in batch.values())  # ids, labels, and a 0/1 (not float) mask
    for i, row in enumerate(rows):
        n = len(row)
        assert batch["input_ids"][i, :n].tolist() == row.input_ids
        assert batch["labels"][i, :n].tolist() == row.labels
        assert batch["labels"][i, n - 1].item() == eos  # the EOS position is a target
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (longest - n)
        assert batch["input_ids"][i, n:].tolist() == [pad] * (longest - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
    targets = sum(sum(label != IGNORE_INDEX for label in row.labels[1:]) for row in rows)
    assert count_targets(batch) == targets


@pytest.mark.parametrize("pad_to", [None, 2000])
@pytest.mark.parametrize("completion_only", [True, False], ids=["completion-only", "whole-row"])
def test_packed_rows_mask_their_first_label_and_restart_positions(
    tokenizer, rows_and_examples, pad_to, completion_only
):
    """No row may be trained to predict its first token from the previous row's last one (with the loss on the
    whole row, its first label is a real token, not the prompt's ignored one)."""
    rows, examples = rows_and_examples
    if not completion_only:
        rows, _ = tokenize_examples(examples, tokenizer, "compact", completion_only=False)
        assert all(row.labels[0] != IGNORE_INDEX for row in rows)
    eos = tokenizer.eos_token_id
    batch = collate(rows, tokenizer.pad_token_id, packing=True, pad_to=pad_to)
    assert "attention_mask" not in batch  # rows are separated by their position ids, not by a mask
    input_ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    total = sum(len(r) for r in rows)
    assert len(input_ids) == len(labels) == len(positions) == (pad_to or total)
    start = 0
    for row in rows:
        n = len(row)
        assert input_ids[start : start + n] == row.input_ids
        assert labels[start] == IGNORE_INDEX  # the row boundary is never a target
        assert labels[start + 1 : start + n] == row.labels[1:]  # the rest of the row is trained as when alone
        assert labels[start + n - 1] == eos
        assert positions[start : start + n] == list(range(n))
        start += n
    assert labels[total:] == [IGNORE_INDEX] * (len(labels) - total)  # the padding row is never a target
    assert input_ids[total:] == [tokenizer.pad_token_id] * (len(labels) - total)
    assert count_targets(batch) == sum(sum(label != IGNORE_INDEX for label in row.labels[1:]) for row in rows)


LENGTHS = [37, 5, 120, 64, 64, 9, 250, 33, 18, 77, 101, 2, 45, 45, 45, 300, 12, 88, 61, 7, 150, 19, 23]


@pytest.mark.parametrize(
    "rows,batch_size,batch_tokens,packing,group_by_length",
    [
        (n, size, tokens, packing, grouped)
        for n, (size, tokens, packing), grouped in itertools.product(
            (1, 7, 23, 200),
            ((1, None, False), (3, None, False), (8, None, False), (4, 300, False), (4, 310, True), (4, 600, True)),
            (True, False),
        )
    ],
)
def test_the_batch_plan_holds_every_row_exactly_once(rows, batch_size, batch_tokens, packing, group_by_length):
    lengths = [LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS) for i in range(rows)]
    for epoch in (0, 1):
        plan = plan_batches(
            lengths,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            packing=packing,
            group_by_length=group_by_length,
            seed=3,
            epoch=epoch,
        )
        assert sorted(i for batch in plan for i in batch) == list(range(rows))
        assert all(plan)  # no empty micro-batch
        if batch_tokens is None:
            assert all(len(batch) <= batch_size for batch in plan)
            # Full batches: only one may be short (the last one cut, wherever the shuffle put it).
            assert sum(len(batch) < batch_size for batch in plan) <= 1
            assert len(plan) == -(-rows // batch_size)


def _cost(lengths, batch, packing):
    return sum(lengths[i] for i in batch) if packing else len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("group_by_length", [True, False], ids=["grouped", "shuffled"])
def test_the_token_budget_counts_what_a_batch_costs_and_fills_it(packing, group_by_length):
    """Packed batches cost the sum of their rows (no padding), padded ones rows x longest; each batch is filled
    until the next row would not fit, so counting padding in a packed batch makes more, smaller batches."""
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(60)]
    budget = 400
    plan = plan_batches(lengths, batch_size=1, batch_tokens=budget, packing=packing, group_by_length=group_by_length)
    for batch in plan:
        assert len(batch) == 1 or _cost(lengths, batch, packing) <= budget
    if not group_by_length:  # the plan is in the order it was filled (grouped plans are shuffled afterwards)
        for batch, following in zip(plan, plan[1:]):
            assert _cost(lengths, batch + following[:1], packing) > budget, "a batch was closed before it was full"


def test_packed_batches_hold_rows_that_padding_would_not_fit():
    """Rows of 10 and 290 tokens fit a 300-token packed batch together; padded, they would cost 580."""
    lengths = [10, 290] * 10
    packed = plan_batches(lengths, batch_size=1, batch_tokens=300, packing=True, group_by_length=False)
    padded = plan_batches(lengths, batch_size=1, batch_tokens=300, packing=False, group_by_length=False)
    assert all(sum(lengths[i] for i in batch) <= 300 for batch in packed)
    assert sum(len(batch) for batch in packed) == 20 and len(packed) <= 11
    assert all(len(batch) * max(lengths[i] for i in batch) <= 300 for batch in padded)
    assert len(packed) < len(padded)  # a 290-token row shares a padded batch with no other row


def test_a_batch_plan_is_a_function_of_seed_and_epoch():
    lengths = LENGTHS * 3
    settings = dict(batch_size=4, seed=11)
    assert plan_batches(lengths, epoch=2, **settings) == plan_batches(lengths, epoch=2, **settings)
    assert plan_batches(lengths, epoch=2, **settings) != plan_batches(lengths, epoch=3, **settings)
    assert plan_batches(lengths, epoch=2, **settings) != plan_batches(lengths, epoch=2, batch_size=4, seed=12)
