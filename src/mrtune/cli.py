"""The `mrtune` command line: maps sub-commands to the plain functions that do the work."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mrtune.errors import MrtuneError, TrainingInterrupted
from mrtune.task.mr import METRIC_ROWS


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A plain-text table, one column per evaluation (e.g. base vs fine-tuned), the rows of report.md's."""

    def cell(value, kind: str) -> str:
        if not isinstance(value, (int, float)):
            return "-"
        return {"count": f"{value}", "percent": f"{100 * value:.1f}%", "seconds": f"{value:.1f} s"}[kind]

    names = list(columns)
    width = max(len(label) for label, _, _ in METRIC_ROWS) + 2
    lines = ["".ljust(width) + "".join(n.rjust(14) for n in names)]
    for label, key, kind in METRIC_ROWS:
        lines.append(label.ljust(width) + "".join(cell(columns[n].get(key), kind).rjust(14) for n in names))
    return "\n".join(lines)


LAUNCH_OPTIONS = ("num_gpus", "accelerate_config")
"""The `train` options that start `accelerate launch`, and so are not passed on to the processes it starts."""


def relaunch_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line arguments that parse back to `args` under its sub-command's parser, less `skip` (dests).

    Derived from the parser's own actions, so an option added to a sub-command is passed on without a change here.
    """
    argv: list[str] = []
    for action in args.command_parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in skip or action.dest == "help" or value == action.default:
            continue
        if not action.option_strings:
            argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        option = max(action.option_strings, key=len)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(option)
        elif isinstance(action, argparse._AppendAction):
            argv += [arg for item in value for arg in (option, str(item))]
        elif isinstance(action, argparse._StoreAction):
            argv += [option, str(value)]
        else:
            raise TypeError(f"relaunch_args does not know how to pass on {type(action).__name__} {option}")
    return argv


def _train(args) -> None:
    from mrtune.config import load_config
    from mrtune.train.distributed import is_main_process, launch_command
    from mrtune.train.recipe import train

    if args.num_gpus is not None and args.num_gpus < 1:
        raise MrtuneError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if (args.num_gpus or 1) > 1 or args.accelerate_config:
        # Become `accelerate launch ... -m mrtune train` with the same arguments, less the two that launch it.
        command = launch_command(args.num_gpus, args.accelerate_config, relaunch_args(args, LAUNCH_OPTIONS))
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


def _decoding(args) -> dict:
    """The keyword arguments of the options `_add_decoding_options` gives evaluate and predict."""
    return {"base": args.base, "constrained": args.constrained, "overrides": args.set, "ensemble": args.ensemble}


def _evaluate(args) -> None:
    from mrtune.infer.evaluate import evaluate

    metrics = evaluate(args.run, split=args.split, data=args.data, limit=args.limit, **_decoding(args))
    label = "base" if args.base else f"ensemble of {len(args.ensemble) + 1}" if args.ensemble else "fine-tuned"
    print(format_metrics_table({label: metrics}))
    load, decode = metrics["load_seconds"], metrics["decode_seconds"]
    print(f"loaded the model in {load:.1f} s, decoded {metrics['n']} rows in {decode:.1f} s")


def _predict(args) -> None:
    from mrtune.infer.predict import predict

    files = {"input_file": args.input, "output_file": args.output, "overwrite": args.overwrite}
    outputs = predict(args.run, sentences=args.sentence, **files, **_decoding(args))
    if args.output:
        print(f"wrote {len(outputs)} predictions to {args.output}")
    else:
        for output in outputs:
            print(output)


def _merge(args) -> None:
    from mrtune.infer.merge import merge

    path = merge(args.run, args.output, overwrite=args.overwrite)
    print(f"merged model saved to {path}")


def _average(args) -> None:
    from mrtune.infer.average import average

    run = average(args.runs, args.output_dir, overwrite=args.overwrite)
    config = run.config()
    what = f"a LoRA adapter of rank {config.lora.r}" if config.train.method == "lora" else "whole modules"
    print(f"averaged {len(args.runs)} runs into {run.path} ({what}): evaluate, predict or serve it like any run")


def _export(args) -> None:
    from mrtune.export.command import export

    path = export(args.run, args.format, args.output, quant=args.quant, overwrite=args.overwrite)
    print(f"exported {args.format} to {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _compare(args) -> None:
    from mrtune.run.rundir import RunDir

    run = RunDir.open(args.run)
    columns = {}
    for name in args.names:
        path = run.eval_dir(name) / "metrics.json"
        if "/" in name or "\\" in name or name in (".", "..") or not path.is_file():
            raise MrtuneError(f"no evaluation {name!r} in {run.path}: run `mrtune evaluate {run.path}` first")
        columns[name] = run.read_json(path)
        missing = [key for _, key, _ in METRIC_ROWS if not isinstance(columns[name].get(key), (int, float))]
        if missing or not isinstance(columns[name].get("n"), int):
            raise run.damaged(path, f"no number for {(missing or ['n'])[0]}")
    print(format_metrics_table(columns))
    for name, metrics in columns.items():
        if metrics.get("data_file"):
            print(f"{name}: the data file {metrics['data_file']}, not a split")
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
        ensemble=args.ensemble,
    )


def _add_train(commands) -> None:
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
    p.set_defaults(func=_train, command_parser=p)


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    """The options evaluate and predict share: the base model, constrained decoding, eval.* overrides."""
    p.add_argument("--base", action="store_true", help="use the untuned base model with the same prompt")
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
    _add_ensemble_option(p, "after any sentences")


def _add_ensemble_option(p: argparse.ArgumentParser, note: str) -> None:
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="RUN",
        help="two or more other runs whose models also decode; each sentence gets the MR most models wrote "
        f"(e.g. the same recipe trained with other train.seed values); {note}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)

    p = commands.add_parser("evaluate", help="decode a split with a run's model and score it")
    p.add_argument("run", help="a run directory written by `mrtune train`")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--data", help="score this JSONL/CSV file instead of a split (results in eval/data-<name>)")
    p.add_argument("--limit", type=int, help="score only N rows, spread evenly over the split")
    _add_decoding_options(p)
    p.set_defaults(func=_evaluate, command_parser=p)

    p = commands.add_parser("predict", help="write the meaning representation of sentences")
    p.add_argument("run")
    p.add_argument("sentence", nargs="*", help="sentences to parse (or use --input)")
    p.add_argument("--input", help="JSONL/CSV file of rows with the input field (default `target`)")
    p.add_argument("--output", help="JSONL file to write: each input row, whole, with the output field added")
    p.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    _add_decoding_options(p)
    p.set_defaults(func=_predict, command_parser=p)

    p = commands.add_parser("merge", help="save base + adapter as one standalone model")
    p.add_argument("run")
    p.add_argument("--output", required=True, help="directory for the merged model (outside the run)")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already in --output")
    p.set_defaults(func=_merge, command_parser=p)

    p = commands.add_parser("average", help="average several runs' weights into one new run (a model soup)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished runs of one base model, prompt and data")
    p.add_argument("--output-dir", required=True, help="the new run directory (outside the runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a run `mrtune average` wrote in --output-dir")
    p.set_defaults(func=_average, command_parser=p)

    p = commands.add_parser("export", help="write a run's model as GGUF (llama.cpp) or its MR grammar (GBNF, Lark)")
    p.add_argument("run")
    p.add_argument("--format", required=True, help="gguf (merged model), gguf-lora (adapter alone), gbnf or lark")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--quant", help="GGUF weight type: f16 (default), q8_0 (merged gguf only) or f32")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_export, command_parser=p)

    p = commands.add_parser("compare", help="print evaluations of a run side by side")
    p.add_argument("run")
    p.add_argument("names", nargs="+", help="evaluation names, e.g. test-base test (data-<name> for --data files)")
    p.set_defaults(func=_compare, command_parser=p)

    p = commands.add_parser("serve", help="serve a run's model over HTTP: a page, /v1/parse and an OpenAI API")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; a non-local one needs an API key")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MRTUNE_API_KEY)")
    p.add_argument("--max-batch", type=int, metavar="N", help="most rows decoded together (default eval.batch_size)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-request timeout in seconds")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_ensemble_option(p, "trained with the same data.prompt_style, all loaded at once")
    p.set_defaults(func=_serve, command_parser=p)
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
