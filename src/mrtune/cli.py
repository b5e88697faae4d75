"""The `mrtune` command line: maps sub-commands to the plain functions that do the work."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from mrtune.errors import MrtuneError, TrainingInterrupted

METRIC_ROWS = [
    ("exact_match", "exact match"),
    ("exact_match_unordered", "exact match (any slot order)"),
    ("dialogue_act_accuracy", "dialogue-act accuracy"),
    ("slot_precision", "slot precision"),
    ("slot_recall", "slot recall"),
    ("slot_f1", "slot F1"),
    ("valid_mr_rate", "valid MR rate"),
]


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A plain-text table, one column per evaluation (e.g. base vs fine-tuned)."""
    names = list(columns)
    width = max(len(label) for _, label in METRIC_ROWS) + 2
    lines = ["".ljust(width) + "".join(n.rjust(14) for n in names)]
    lines.append("rows".ljust(width) + "".join(str(columns[n]["n"]).rjust(14) for n in names))
    for key, label in METRIC_ROWS:
        lines.append(label.ljust(width) + "".join(f"{100 * columns[n][key]:13.1f}%" for n in names))
    return "\n".join(lines)


def _train(args) -> None:
    from mrtune.config import load_config
    from mrtune.train.distributed import is_main_process, launch_command
    from mrtune.train.recipe import train

    if args.num_gpus is not None and args.num_gpus < 1:
        raise MrtuneError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if (args.num_gpus or 1) > 1 or args.accelerate_config:
        # Become `accelerate launch ... -m mrtune train` with the same arguments, less these two.
        train_args = [
            *(["--config", args.config] if args.config else []),
            *(arg for item in args.set for arg in ("--set", item)),
            *(["--output-dir", args.output_dir] if args.output_dir else []),
            *(["--overwrite"] if args.overwrite else []),
            *(["--resume", args.resume] if args.resume else []),
        ]
        command = launch_command(args.num_gpus, args.accelerate_config, train_args)
        print("running: accelerate launch", shlex.join(command[3:]), file=sys.stderr, flush=True)
        os.execv(command[0], command)
    if args.resume:
        if args.config or args.set or args.output_dir or args.overwrite:
            raise MrtuneError(
                "--resume RUN continues RUN with its own config.yaml: drop --config, --set, "
                "--output-dir and --overwrite"
            )
        from mrtune.run.rundir import RunDir

        run = train(RunDir.open(args.resume).config(), args.resume, resume=True)
    elif not args.output_dir:
        raise MrtuneError("give --output-dir DIR for a new run, or --resume RUN to continue a stopped one")
    else:
        config = load_config(args.config, args.set)
        run = train(config, args.output_dir, overwrite=args.overwrite)
    if not is_main_process():  # one summary for a run of several processes
        return
    info = run.info()
    steps = info.get("stopped_by_time_budget_at_step") or info["total_steps"]
    budget = " (train.time_budget_s ran out)" if info.get("stopped_by_time_budget_at_step") else ""
    print(
        f"trained {steps} steps in {info['train_seconds']:.0f} s{budget}; best validation loss "
        f"{info.get('best_validation_loss', float('nan')):.4f} at step {info.get('best_step')}; run in {run.path}"
    )


def _evaluate(args) -> None:
    from mrtune.infer.evaluate import evaluate

    metrics = evaluate(
        args.run,
        split=args.split,
        data=args.data,
        limit=args.limit,
        base=args.base,
        constrained=args.constrained,
        overrides=args.set,
    )
    label = "base" if args.base else "fine-tuned"
    print(format_metrics_table({label: metrics}))
    print(f"decoded {metrics['n']} rows in {metrics['decode_seconds']:.1f} s")


def _predict(args) -> None:
    from mrtune.infer.predict import predict

    outputs = predict(
        args.run,
        sentences=args.sentence,
        input_file=args.input,
        output_file=args.output,
        base=args.base,
        constrained=args.constrained,
        overrides=args.set,
    )
    if args.output:
        print(f"wrote {len(outputs)} predictions to {args.output}")
    else:
        for output in outputs:
            print(output)


def _merge(args) -> None:
    from mrtune.infer.merge import merge

    path = merge(args.run, args.output, overwrite=args.overwrite)
    print(f"merged model saved to {path}")


def _compare(args) -> None:
    from mrtune.run.rundir import RunDir

    run = RunDir.open(args.run)
    columns = {}
    for name in args.names:
        path = run.eval_dir(name) / "metrics.json"
        if not path.is_file():
            raise MrtuneError(f"no evaluation {name!r} in {run.path}: run `mrtune evaluate {run.path}` first")
        columns[name] = json.loads(path.read_text(encoding="utf-8"))
    print(format_metrics_table(columns))
    print(f"report: {run.path / 'report.md'}")


def _serve(args) -> None:
    from mrtune.serve.command import serve

    serve(
        args.run,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        log_level=args.log_level,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fine-tune a model with LoRA/QLoRA")
    p.add_argument("--config", help="YAML config (see configs/); defaults are used for what it omits")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.learning_rate=3e-4 (repeatable)",
    )
    p.add_argument("--output-dir", help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a stopped run (Ctrl-C, SIGTERM, a kill, a crash) from its last checkpoint, with its own config",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        metavar="N",
        help="train on N GPUs of this machine: runs "
        "`accelerate launch` (data-parallel, or what --accelerate-config says) with the other arguments",
    )
    p.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="Accelerate config file for the launch, e.g. "
        "configs/accelerate/fsdp-qlora.yaml (sharded 4-bit model); see README, Several GPUs",
    )
    p.set_defaults(func=_train)

    p = commands.add_parser("evaluate", help="decode a split with a run's model and score it")
    p.add_argument("run", help="a run directory written by `mrtune train`")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--data", help="score this JSONL/CSV file instead of a split")
    p.add_argument("--limit", type=int, help="score only N rows, spread evenly over the split")
    p.add_argument("--base", action="store_true", help="score the untuned base model with the same prompt")
    p.add_argument(
        "--no-constrained",
        dest="constrained",
        action="store_false",
        default=None,
        help="decode freely instead of only valid MRs of the run's vocabulary (eval.constrained)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="change a decoding setting for this command only, e.g. --set eval.batch_size=64 (repeatable)",
    )
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("predict", help="write the meaning representation of sentences")
    p.add_argument("run")
    p.add_argument("sentence", nargs="*", help="sentences to parse (or use --input)")
    p.add_argument("--input", help="JSONL/CSV file of rows with the input field (default `target`)")
    p.add_argument("--output", help="JSONL file to write; rows gain the output field")
    p.add_argument("--base", action="store_true", help="use the untuned base model")
    p.add_argument(
        "--no-constrained",
        dest="constrained",
        action="store_false",
        default=None,
        help="decode freely instead of only valid MRs of the run's vocabulary (eval.constrained)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="change a decoding setting for this command only, e.g. --set eval.batch_size=64 (repeatable)",
    )
    p.set_defaults(func=_predict)

    p = commands.add_parser("merge", help="save base + adapter as one standalone model")
    p.add_argument("run")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_merge)

    p = commands.add_parser("compare", help="print evaluations of a run side by side")
    p.add_argument("run")
    p.add_argument("names", nargs="+", help="evaluation names, e.g. test-base test")
    p.set_defaults(func=_compare)

    p = commands.add_parser("serve", help="serve a run's model over HTTP: a page, /v1/parse and an OpenAI API")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; a non-local one needs an API key")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MRTUNE_API_KEY)")
    p.add_argument("--max-batch", type=int, metavar="N", help="most rows decoded together (default eval.batch_size)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-request timeout in seconds")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except TrainingInterrupted as stop:  # a clean stop, checkpoint saved: not an error, but not a success
        print(stop, file=sys.stderr)
        return 128 + stop.signal_number
    except MrtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
