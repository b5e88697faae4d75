"""Batched greedy decoding of meaning representations, optionally constrained to valid ones.

The constraint is `mrtune.infer.constrained.MRConstraint`.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mrtune.train.batching import encode_prompts

if TYPE_CHECKING:
    from mrtune.infer.constrained import MRConstraint


@contextlib.contextmanager
def sdpa_for_decoding(model):
    """Decode with SDPA when the model trains with flex attention (restored afterwards).

    Flex attention is for packed training rows; its decoding kernel (one query row against the KV cache) failed to
    compile on an H200 for the compact prompt's short prompts (inductor: "NoValidChoicesError"), crashing the
    7B recipe at its first evaluation, and it would compile again for every new cache length anyway.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = base.config._attn_implementation
    if current != "flex_attention":
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(current)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 160,
    constraint: MRConstraint | None = None,
    kv_cache: str = "auto",
    progress: bool = True,
    stats: dict | None = None,
) -> list[str]:
    """Greedy completions of `prompts`, in input order.

    Prompts are sorted by length so each batch holds similar lengths (little left padding), and each batch stops
    as soon as every row in it has written EOS. With a `constraint`, every completion is a valid MR of its
    vocabulary, closed within `max_new_tokens`. When `stats` is a dict, it receives `generated_tokens` (new tokens
    up to and including each row's EOS) and `seconds` (wall time of the decoding). `kv_cache`: see
    `EvalSettings.kv_cache`.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    started = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    static = kv_cache == "static" or (kv_cache == "auto" and device.type == "cuda")
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        # With a static cache, generate would also torch.compile the decoding step by default: a minute of
        # compilation to save seconds, once per process. An evaluation is one process.
        **({"cache_implementation": "static", "disable_compile": True} if static else {}),
    )
    outputs: list[str] = [""] * len(prompts)
    generated_tokens = 0
    bar = tqdm(total=len(prompts), desc="generating", unit="row", disable=not progress, leave=False)
    with sdpa_for_decoding(model):  # once for all batches
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            longest = max(len(prompt_ids[i]) for i in indices)
            # Left padding: every row's last prompt token sits at the same position, where generation starts.
            input_ids = torch.full((len(indices), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
            for row, i in enumerate(indices):
                ids = prompt_ids[i]
                input_ids[row, longest - len(ids) :] = torch.tensor(ids)
                attention_mask[row, longest - len(ids) :] = 1
            extra = {}
            if constraint is not None:
                extra["logits_processor"] = LogitsProcessorList([constraint.logits_processor(longest, max_new_tokens)])
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
                **extra,
            )
            for row, i in enumerate(indices):
                new_tokens = generated[row, longest:].tolist()
                if eos in new_tokens:
                    new_tokens = new_tokens[: new_tokens.index(eos)]
                    generated_tokens += 1
                generated_tokens += len(new_tokens)
                outputs[i] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            bar.update(len(indices))
    bar.close()
    if stats is not None:
        stats.update(generated_tokens=generated_tokens, seconds=time.perf_counter() - started)
    return outputs
