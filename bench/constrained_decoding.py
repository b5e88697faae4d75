"""What constrained decoding costs, in two measurements on the same rows.

1. The masks alone: the test split's reference MRs, tokenized, are fed through the logits processor as if the
   model had written them (every row of the batch at once), with dummy scores on the device. This is the whole
   cost of the constraint at the batch size of a real evaluation, without a model's speed in the way; it also
   checks that every reference token is allowed.
2. Real decoding: `generation.generate` with and without the constraint, greedy, same prompts and batches:
   generated tokens per second, decode steps, and the processor's share of the time.

    python -m bench.constrained_decoding                                   # embedded SmolLM2, 32 rows, CPU
    python -m bench.constrained_decoding --run runs/demo --rows 1083 --batch-size 1083   # a fine-tuned run

Prints one JSON object. The base model (no --run) answers in prose when free and in short MRs when constrained,
so its two decodes differ in length: compare milliseconds per step there, not tokens per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import LogitsProcessor

from mrtune.infer.constrained import MRConstraint
from mrtune.infer.generation import generate
from mrtune.model.resolve import EMBEDDED_MODEL, load_tokenizer, resolve_model_path
from mrtune.task.data import load_split, spread_sample
from mrtune.task.mr import Vocabulary
from mrtune.task.prompts import build_prompt


class TimedProcessor(LogitsProcessor):
    def __init__(self, owner: TimedConstraint, inner: LogitsProcessor | None):
        self.owner, self.inner = owner, inner

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()  # the model's kernels for this step are not the processor's time
        started = time.perf_counter()
        if self.inner is not None:
            scores = self.inner(input_ids, scores)
            if scores.is_cuda:
                torch.cuda.synchronize()
        self.owner.seconds += time.perf_counter() - started
        self.owner.steps += 1
        return scores


class TimedConstraint:
    """Stands in for an MRConstraint in `generate` (or for none): counts decode steps and times the processor."""

    def __init__(self, constraint: MRConstraint | None):
        self.constraint, self.steps, self.seconds = constraint, 0, 0.0

    def logits_processor(self, prompt_length: int, max_new_tokens: int) -> TimedProcessor:
        inner = self.constraint.logits_processor(prompt_length, max_new_tokens) if self.constraint else None
        return TimedProcessor(self, inner)


def masks_alone(
    constraint: MRConstraint,
    tokenizer,
    references: list[str],
    device: torch.device,
    vocab_width: int,
    max_new_tokens: int,
) -> dict:
    """Feed tokenized reference MRs (+ EOS) through one processor for the whole batch; time every step."""
    rows = [ids + [constraint.eos] for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    steps = max(map(len, rows))
    if steps > max_new_tokens:
        raise SystemExit(f"a reference MR needs {steps} tokens, more than --max-new-tokens {max_new_tokens}")
    forced = torch.tensor([r + [constraint.eos] * (steps - len(r)) for r in rows], device=device)
    scores = torch.zeros((len(rows), vocab_width), device=device)
    processor = constraint.logits_processor(prompt_length=1, max_new_tokens=max_new_tokens)
    input_ids = torch.zeros((len(rows), 1), dtype=torch.long, device=device)
    refused, seconds = 0, 0.0
    for step in range(steps):
        started = time.perf_counter()
        masked = processor(input_ids, scores)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        refused += int(torch.isinf(masked.gather(1, forced[:, step : step + 1])).sum())
        input_ids = torch.cat([input_ids, forced[:, step : step + 1]], dim=1)
    return {
        "rows": len(rows),
        "steps": steps,
        "seconds": round(seconds, 3),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "refused_reference_tokens": refused,
    }


def decode(model, tokenizer, prompts, constraint, batch_size: int, max_new_tokens: int) -> dict:
    timed = TimedConstraint(constraint)
    stats: dict = {}
    generate(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        constraint=timed,
        progress=False,
        stats=stats,
    )
    return {
        "generated_tokens": stats["generated_tokens"],
        "seconds": round(stats["seconds"], 2),
        "tokens_per_s": round(stats["generated_tokens"] / stats["seconds"], 1),
        "decode_steps": timed.steps,
        "ms_per_step": round(1000 * stats["seconds"] / timed.steps, 1),
        "processor_ms_per_step": round(1000 * timed.seconds / timed.steps, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory: its fine-tuned model, tokenizer and vocabulary")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model when no --run (default: embedded)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="--model is a directory with config.json and a tokenizer only: random weights of that "
        "shape (speed per step does not depend on the weights; outputs do)",
    )
    parser.add_argument("--rows", type=int, default=32, help="test rows (an evenly spread sample)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-decode", action="store_true", help="measure the masks alone")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    examples = spread_sample(load_split("viggo:test"), args.rows)
    if args.run:
        from mrtune.infer.predict import load_model as _load
        from mrtune.run.rundir import RunDir

        run = RunDir.open(args.run)
        config, tokenizer, model = _load(run, base=False)
        vocabulary = Vocabulary.from_dict(json.loads(run.vocabulary.read_text(encoding="utf-8")))
        style = config.data.prompt_style
    else:
        from transformers import AutoModelForCausalLM

        path = args.model if args.random_init else resolve_model_path(args.model)
        tokenizer = load_tokenizer(path)
        if args.random_init:
            from transformers import AutoConfig

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, args.dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
        model = model.to(device).eval()
        vocabulary = Vocabulary.from_mrs(e.meaning_representation for e in load_split("viggo:train"))
        style = "compact"
    device = next(model.parameters()).device

    started = time.perf_counter()
    constraint = MRConstraint(tokenizer, vocabulary)
    build_seconds = time.perf_counter() - started
    width = model.get_output_embeddings().weight.shape[0]
    references = [e.meaning_representation for e in examples]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU"),
        "model": args.run or args.model + (" (random init)" if args.random_init else ""),
        "vocabulary_size": len(tokenizer),
        "rows": len(examples),
        "batch_size": args.batch_size,
        "build_seconds": round(build_seconds, 2),
        "masks_alone_cold": masks_alone(constraint, tokenizer, references, device, width, args.max_new_tokens),
        "masks_alone_warm": masks_alone(constraint, tokenizer, references, device, width, args.max_new_tokens),
        "states": constraint.states_seen,
    }
    if not args.skip_decode:
        prompts = [build_prompt(style, e.sentence) for e in examples]
        # Two rounds, alternating: the first pass over new shapes pays for kernel selection and allocator growth,
        # which would otherwise count against whichever decode runs first.
        for round_ in ("warm_up", "measured"):
            result[round_] = {
                "free": decode(model, tokenizer, prompts, None, args.batch_size, args.max_new_tokens),
                "constrained": decode(
                    model, tokenizer, prompts, MRConstraint(tokenizer, vocabulary), args.batch_size, args.max_new_tokens
                ),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
