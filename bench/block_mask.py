"""What the flex attention mask of one packed micro-batch costs to build, three ways, on this machine's device.

1. `mrtune.train.batching.packed_block_mask`: the block grid from the rows at each block's edges (what training
   uses).
2. torch's `create_block_mask` uncompiled: the mask evaluated at every (query, key) pair.
3. (`--compiled`) torch's `create_block_mask` compiled, as transformers builds it: the first call of each length
   pays the compilation (minutes on an H200 for 12,288 tokens: BENCHMARKS.md, fifth round), then each call.

Rows of ViGGO's seed-prompt length (~240 tokens) fill each length; the Mistral-7B shape's sliding window (4,096)
applies. Every way's block grid is checked equal to the first's. Prints one JSON object.

    python -m bench.block_mask [--lengths 8192 16384] [--compiled] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import MistralConfig

from mrtune.train.batching import packed_block_mask


def seconds(build, device: torch.device, repeat: int) -> float:
    """Median wall time of `build()`, the device synchronized around each call."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        build()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def grid(mask) -> torch.Tensor:
    """The (query block, key block) grid of a block mask: 0 skipped, 1 partial, 2 full."""
    out = torch.zeros(mask.kv_indices.shape[-2:], dtype=torch.int8)
    parts = ((1, mask.kv_num_blocks, mask.kv_indices), (2, mask.full_kv_num_blocks, mask.full_kv_indices))
    for value, counts, indices in parts:
        if counts is None:  # a mask with no full block
            continue
        for row, (count, columns) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0].tolist())):
            out[row, columns[:count]] = value
    return out


def measure(length: int, device: torch.device, compiled: bool, repeat: int) -> dict:
    config = MistralConfig()
    rows = [240] * (length // 240) + ([length % 240] if length % 240 else [])
    positions = torch.cat([torch.arange(n) for n in rows])[None].to(device)
    ours = packed_block_mask(positions, config)
    result = {
        "tokens": length,
        "packed_block_mask_ms": 1000 * seconds(lambda: packed_block_mask(positions, config), device, repeat),
        "create_block_mask_uncompiled_ms": 1000
        * seconds(
            lambda: create_block_mask(ours.mask_mod, 1, None, length, length, device=device, _compile=False),
            device,
            max(1, repeat // 4),
        ),
    }
    reference = create_block_mask(ours.mask_mod, 1, None, length, length, device=device, _compile=False)
    result["same_blocks"] = bool(torch.equal(grid(ours), grid(reference)))
    if compiled:
        started = time.perf_counter()
        create_block_mask(ours.mask_mod, 1, None, length, length, device=device, _compile=True)
        result["create_block_mask_compiled_first_call_s"] = time.perf_counter() - started
        result["create_block_mask_compiled_ms"] = 1000 * seconds(
            lambda: create_block_mask(ours.mask_mod, 1, None, length, length, device=device, _compile=True),
            device,
            repeat,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 12288, 16384])
    parser.add_argument("--compiled", action="store_true", help="also time transformers' compiled way")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = [measure(n, device, args.compiled, args.repeat) for n in args.lengths]
    print(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
