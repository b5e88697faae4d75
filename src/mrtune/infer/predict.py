"""`mrtune predict`: meaning representations for new sentences, and the loading and decoding evaluate shares.

torch, transformers and peft are imported where the model is loaded or run, not with this module: a command that
stops at a bad argument or a damaged run says so in a fraction of a second instead of after their imports.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from mrtune.config import with_eval_overrides
from mrtune.errors import MrtuneError
from mrtune.model.resolve import default_cache_dir, load_tokenizer
from mrtune.run.outputs import check_output, write_output_text
from mrtune.run.rundir import RunDir, refuse_repeats
from mrtune.task.data import Example, load_rows
from mrtune.task.mr import Vocabulary, majority_vote
from mrtune.task.prompts import build_prompt

CONSTRAINT_CACHE = "constraints"
"""The folder of `$MRTUNE_CACHE` that holds the constrained decoder's masks (infer.constrained's disk cache)."""


def import_model_libraries() -> None:
    """Import torch, transformers and peft (once) with the garbage collector paused, collect once, and freeze what
    is left.

    The imports make hundreds of thousands of objects that live as long as the process, which the collector would
    otherwise scan again and again while they import and while the model loads and decodes (a large share of a
    short command's time: BENCHMARKS.md, evaluate start-up). The one collection before the freeze matters: the
    imports leave garbage cycles that reference the frames on the stack; frozen, they would keep those frames'
    locals (a tokenizer, a model) alive for good. Models and tokenizers are made after the freeze and stay
    collectable, for a process that loads several (tests, `bench`, a server).
    """
    if "peft" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import peft  # noqa: F401  (torch, and transformers' model loading with it)
        import transformers.generation.utils  # noqa: F401
        import transformers.tokenization_utils_tokenizers  # noqa: F401
    finally:
        gc.collect()
        gc.freeze()
        if enabled:
            gc.enable()


def load_model(run: RunDir, config, base: bool):
    """The run's tokenizer and model: base + adapter, or the untuned base with `base` (the run's files checked)."""
    adapter = None if base else run.require_adapter(config)
    import_model_libraries()
    tokenizer = load_tokenizer(run.require_tokenizer())
    return tokenizer, load_run_model(run, config.model, adapter)


def load_run_model(run: RunDir, settings, adapter: Path | None, merge: bool = True):
    """`load_trained_model`, with an adapter that does not fit the base model reported as the run's damage."""
    import_model_libraries()
    from mrtune.model.build import default_device, load_trained_model

    try:
        return load_trained_model(settings, adapter, default_device(), merge=merge)
    except (RuntimeError, ValueError, KeyError) as error:
        if adapter is None or isinstance(error, MrtuneError):
            raise
        reason = " ".join(str(error).split())[:200]
        raise run.damaged(adapter, f"does not fit the base model {settings.name} ({reason})") from None


def load_constraint(run: RunDir, tokenizer, values: bool = True):
    """The decoding constraint for this run's vocabulary (acts, attributes and, with `values`, the items of closed
    attributes, from its training split), with the masks earlier decodes over the same tokenizer and vocabulary
    computed (`decode` writes them back to `$MRTUNE_CACHE/constraints`)."""
    from mrtune.infer.constrained import load_cached_constraint

    if not run.vocabulary.is_file():
        raise MrtuneError(
            f"{run.vocabulary} is missing, so constrained decoding has no vocabulary: pass --no-constrained"
        )
    vocabulary = Vocabulary.from_dict(run.read_vocabulary())
    return load_cached_constraint(
        tokenizer, vocabulary if values else vocabulary.without_values(), default_cache_dir() / CONSTRAINT_CACHE
    )


def check_lengths(tokenizer, model, config, examples: list[Example]) -> None:
    """Refuse sentences whose prompt and generation budget do not fit in the model's context: decoding past it
    gives garbage (slowly), not an error."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    prompts = [build_prompt(config.data.prompt_style, e.sentence) for e in examples]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    budget = config.eval.max_new_tokens
    over = [(e, n) for e, n in zip(examples, lengths) if n + budget > limit]
    if over:
        first, tokens = over[0]
        where = first.source or f"sentence {examples.index(first) + 1}"
        raise MrtuneError(
            f"{len(over)} sentence(s) too long for the model (first: {where}, {tokens} tokens with its prompt, plus "
            f"eval.max_new_tokens={budget}, over the model's limit of {limit} tokens): shorten or split them"
        )


def open_members(run: RunDir, config, ensemble: list[str] | tuple[str, ...], overrides, base: bool) -> list[tuple]:
    """The (run, config) pairs whose models decode: `run` (its files already checked) and then the `--ensemble` runs
    that vote with it, each with the eval overrides applied and its files checked before any model loads."""
    if not ensemble:
        return [(run, config)]
    if base:
        raise MrtuneError("--base decodes the untuned model, and copies of it would all vote alike: drop --ensemble")
    runs = [run, *(RunDir.open(path) for path in ensemble)]
    if len(runs) < 3:
        raise MrtuneError(
            "--ensemble needs at least two more runs (three models): with two, every disagreement is a tie, which "
            "the first model wins"
        )
    refuse_repeats(runs, "in the ensemble", "each model votes once")
    members = [(run, config)]
    for member in runs[1:]:
        member_config = with_eval_overrides(member.config(), overrides)
        member.check_intact(member_config)
        members.append((member, member_config))
    return members


def decode_members(
    members: list[tuple[RunDir, object]], examples: list[Example], base: bool, constrained: bool | None, progress: bool
) -> tuple[list[list[str]], dict]:
    """Each member's predictions for `examples`, one model in memory at a time, and the `load_seconds`,
    `decode_seconds` and `generated_tokens` of them all."""
    totals = {"load_seconds": 0.0, "decode_seconds": 0.0, "generated_tokens": 0}
    outputs = []
    for run, config in members:
        started = time.perf_counter()
        tokenizer, model = load_model(run, config, base)
        totals["load_seconds"] += time.perf_counter() - started  # with the imports, in a new process
        check_lengths(tokenizer, model, config, examples)
        use = config.eval.constrained if constrained is None else constrained
        started = time.perf_counter()
        predictions, stats = decode(run, config, tokenizer, model, [e.sentence for e in examples], progress, use)
        totals["decode_seconds"] += time.perf_counter() - started
        totals["generated_tokens"] += stats["generated_tokens"]
        outputs.append(predictions)
        if len(members) > 1:  # the next member's model takes this one's place
            del model
            release_memory()
    return outputs, totals


def release_memory() -> None:
    """Give back what a model no longer referenced held: its cycles collected, its GPU blocks returned to the card
    (the caching allocator would otherwise keep them from the next member's model)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode(
    run: RunDir, config, tokenizer, model, sentences: list[str], progress: bool, constrained: bool
) -> tuple[list[str], dict]:
    """Predictions for `sentences`, and the decoding's `generated_tokens` and `seconds`."""
    prompts = [build_prompt(config.data.prompt_style, s) for s in sentences]
    constraint = load_constraint(run, tokenizer, config.eval.constrain_values) if constrained else None
    result = decode_prompts(run, config, tokenizer, model, prompts, constraint, progress)
    if constraint is not None:
        from mrtune.infer.constrained import save_cached_constraint

        save_cached_constraint(constraint)
    return result


def decode_prompts(
    run: RunDir, config, tokenizer, model, prompts: list[str], constraint, progress: bool = False
) -> tuple[list[str], dict]:
    """Completions of ready-made prompts with the run's eval settings, and the decoding's `generated_tokens` and
    `seconds`. `constraint` (from `load_constraint`, or None to decode freely) may be kept across calls: it computes
    each mask once (`mrtune serve` holds one for its lifetime)."""
    import torch

    from mrtune.infer.generation import generate

    stats: dict = {}
    try:
        predictions = generate(
            model,
            tokenizer,
            prompts,
            batch_size=config.eval.batch_size,
            max_new_tokens=config.eval.max_new_tokens,
            constraint=constraint,
            kv_cache=config.eval.kv_cache,
            progress=progress,
            stats=stats,
        )
    except torch.OutOfMemoryError:
        raise MrtuneError(
            f"out of GPU memory decoding {config.eval.batch_size} rows at a time: lower eval.batch_size (or "
            f"eval.max_new_tokens) in {run.config_file}"
        ) from None
    return predictions, stats


def predict(
    run_dir: str | Path,
    *,
    sentences: list[str] | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    overwrite: bool = False,
    base: bool = False,
    constrained: bool | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    ensemble: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> list[str]:
    """Meaning representations for sentences given directly or as a JSONL/CSV file of rows with the input field.

    `constrained` (default: the run's eval.constrained) decodes only valid MRs of the run's vocabulary. The output
    file gets each input row whole with the output field added (replaced, if the row had one); an existing file is
    replaced only with `overwrite`, and never the run's own files or the input. `ensemble`: more runs whose models
    also decode; each sentence then gets the MR most of the models wrote (`majority_vote`).
    """
    run = RunDir.open(run_dir)
    config = with_eval_overrides(run.config(), overrides)
    run.check_intact(config, adapter=not base)
    members = open_members(run, config, ensemble, overrides, base)
    if input_file is not None:
        if output_file is None:
            raise MrtuneError("--input needs --output FILE.jsonl to write the predictions to")
        rows = load_rows(input_file, config.data.input_field)
        examples = [example for example, _ in rows]
    elif sentences:
        rows = None
        examples = [Example(s, None) for s in sentences]
        for number, sentence in enumerate(sentences, start=1):
            if not sentence.strip():
                raise MrtuneError(f"sentence {number} is empty: give the text to parse")
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError:  # bytes of another encoding on the command line arrive as lone surrogates
                raise MrtuneError(f"sentence {number} is not UTF-8 text: pass it in UTF-8") from None
    else:
        raise MrtuneError('give a sentence (mrtune predict RUN "some sentence") or --input FILE.jsonl')
    if output_file is not None:
        protected = {"the run": run.path} | {f"the ensemble's run {m.path}": m.path for m, _ in members[1:]}
        protected |= {"the --input file": Path(input_file)} if input_file else {}
        check_output(output_file, protected=protected, overwrite=overwrite, kind="file")
    outputs, _ = decode_members(members, examples, base, constrained, progress and input_file is not None)
    predictions = majority_vote(outputs) if len(outputs) > 1 else outputs[0]
    if output_file is not None:
        records = [record for _, record in rows] if rows else [{config.data.input_field: e.sentence} for e in examples]
        write_output_text(
            output_file,
            "".join(
                json.dumps({**record, config.data.output_field: p}, ensure_ascii=False) + "\n"
                for record, p in zip(records, predictions)
            ),
        )
    return predictions
