"""Data-parallel training in two CPU processes (gloo), against one process with the same global batch.

The two processes are started by torchrun (`accelerate launch --cpu` starts one process, whatever
--num_processes says: Accelerate runs several CPU processes only under MPI or torchrun). Each runs this file as a
script: it records the micro-batches its rank trains on, then runs `mrtune train` as the CLI does. The reference
is one process with gradient_accumulation 4 where the two processes have 2 each: the same 4 micro-batches per
optimizer step, and since the loss is divided by the step's global target count, the same loss and gradient.

The same two processes also train under FSDP1 (configs/accelerate/fsdp-qlora.yaml) and FSDP2
(configs/accelerate/fsdp2.yaml), whose adapters must be the DDP run's: Accelerate turns FSDP on only on GPUs, so
the script sets its state to FSDP itself (`_force_fsdp_on_cpu`). On this CPU the model trains in fp32 (bf16 has no
fast kernels here, see model.build.cpu_safe_dtype); FSDP2 over bf16 weights with fp32 adapters is run by
tests/test_scaling.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MICRO_BATCH_ROWS = 2
STEPS = 4
SETTINGS = [
    # The 7B recipe's modules: lm_head's adapter sits in FSDP's root unit, the others in a decoder layer's unit.
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]",
    "model.dtype=float32",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.0",
    f"train.batch_size={MICRO_BATCH_ROWS}",
    f"train.max_steps={STEPS}",
    "train.eval_every=2",
    "train.log_every=1",
    "train.learning_rate=5e-3",
    "train.warmup_ratio=0.0",
    "eval.batch_size=4",
    "eval.max_new_tokens=8",
]
# Losses are sums over the same tokens in another order (two processes' partial sums, then an all-reduce).
RELATIVE_TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def data_overrides(tiny_model_dir, tmp_path_factory) -> list[str]:
    from conftest import write_viggo_splits

    base = tmp_path_factory.mktemp("distributed-data")
    # 5 validation rows: rank 0 gets 3 (two batches of 2), rank 1 gets 2 (one batch), so rank 1 runs one uncounted
    # batch to keep the forward passes in step; the validation loss must still equal one process's.
    data = write_viggo_splits(base, (("train", 48), ("validation", 5), ("test", 4)))
    return [f"model.name={tiny_model_dir}", *(f"data.{split}={path}" for split, path in data.items()), *SETTINGS]


def _fsdp_environment(accelerate_config: str = "fsdp-qlora") -> dict[str, str]:
    """What `accelerate launch --config_file configs/accelerate/ACCELERATE_CONFIG.yaml` tells its processes, for
    the CPU.

    FSDP1 cannot broadcast rank 0's weights on the CPU (sync_module_states needs a GPU), so each of its ranks loads
    the whole model itself: the same weights, and the same adapter initialisation from the same seed. FSDP2 runs
    its config as it is: rank 0 loads the model, the other rank builds it on the meta device and receives rank 0's
    tensors over gloo.
    """
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(
        str(Path(__file__).parents[1] / "configs" / "accelerate" / f"{accelerate_config}.yaml")
    )
    environment = {
        key.upper(): str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in config.fsdp_config.items()
    }
    if config.fsdp_config["fsdp_version"] == 1:
        environment.update(FSDP_SYNC_MODULE_STATES="false", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
    return {
        **environment,
        "ACCELERATE_USE_FSDP": "true",
        "MRTUNE_TEST_FSDP_ON_CPU": "1",
        # FSDP compares its device with an index-less "cpu"; Accelerate would say "cpu:0"
        "ACCELERATE_TORCH_DEVICE": "cpu",
    }


def _in_two_processes(records: Path, argv: list[str], extra_env: dict[str, str] | None = None):
    """`mrtune ARGV` in 2 torchrun processes that record their micro-batches in `records`."""
    records.mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(port),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        __file__,
        str(records),
        *argv,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def _train_in_two_processes(data_overrides, base: Path, extra_env: dict[str, str] | None = None):
    """`mrtune train` in 2 processes x gradient_accumulation 2: the run, each rank's micro-batches, stdout, seconds."""
    run_dir, records = base / "run", base / "records"
    started = time.perf_counter()
    result = _in_two_processes(
        records,
        ["train", "--output-dir", str(run_dir), *_sets([*data_overrides, "train.gradient_accumulation=2"])],
        extra_env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    from mrtune.run.rundir import RunDir

    seen = {rank: json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    return RunDir.open(run_dir), seen, result.stdout, time.perf_counter() - started


@pytest.fixture(scope="module")
def two_processes(data_overrides, tmp_path_factory):
    """A run trained by 2 processes (DDP) x gradient_accumulation 2, and the micro-batches each rank trained on."""
    return _train_in_two_processes(data_overrides, tmp_path_factory.mktemp("two-processes"))


@pytest.fixture(scope="module")
def two_processes_fsdp(data_overrides, tmp_path_factory):
    """The same run, sharded by FSDP as configs/accelerate/fsdp-qlora.yaml says."""
    return _train_in_two_processes(data_overrides, tmp_path_factory.mktemp("two-processes-fsdp"), _fsdp_environment())


@pytest.fixture(scope="module")
def two_processes_fsdp2(data_overrides, tmp_path_factory):
    """The same run, sharded by FSDP2 as configs/accelerate/fsdp2.yaml says."""
    return _train_in_two_processes(
        data_overrides, tmp_path_factory.mktemp("two-processes-fsdp2"), _fsdp_environment("fsdp2")
    )


@pytest.fixture(scope="module")
def one_process(data_overrides, tmp_path_factory):
    """The same training in this process: 1 process x gradient_accumulation 4."""
    from mrtune.config import load_config
    from mrtune.train.recipe import train

    config = load_config(None, [*data_overrides, "train.gradient_accumulation=4"])
    return train(config, tmp_path_factory.mktemp("one-process") / "run", progress=False)


def _planned_steps(run) -> list[list[list[list[int]]]]:
    """Each optimizer step's 4 micro-batches (padded input ids), as the plan of every rank gives them."""
    from mrtune.model.resolve import load_tokenizer
    from mrtune.task.data import load_split
    from mrtune.train.batching import collate, plan_batches, tokenize_examples

    config = run.config()
    tokenizer = load_tokenizer(str(run.tokenizer))
    rows, _ = tokenize_examples(
        load_split(config.data.train),
        tokenizer,
        config.data.prompt_style,
        completion_only=config.data.completion_only,
        max_length=config.data.max_length,
        too_long=config.data.too_long,
    )
    plan = plan_batches([len(r) for r in rows], batch_size=MICRO_BATCH_ROWS, seed=config.train.seed, epoch=0)
    micro = [collate([rows[i] for i in indices], tokenizer.pad_token_id)["input_ids"].tolist() for indices in plan]
    return [micro[4 * step : 4 * step + 4] for step in range(STEPS)]


def test_each_rank_trains_its_own_share_of_every_step(two_processes):
    run, seen, _, _ = two_processes
    planned = _planned_steps(run)
    assert len(seen[0]) == len(seen[1]) == 2 * STEPS  # gradient_accumulation 2 on each rank
    for step, batches in enumerate(planned):
        rank0, rank1 = seen[0][2 * step : 2 * step + 2], seen[1][2 * step : 2 * step + 2]
        assert rank0 == batches[0::2] and rank1 == batches[1::2]  # rank r: micro-batches r, r + 2
        rows0 = {tuple(row) for batch in rank0 for row in batch}
        rows1 = {tuple(row) for batch in rank1 for row in batch}
        assert not rows0 & rows1  # no row trained twice in a step
        assert rows0 | rows1 == {tuple(row) for batch in batches for row in batch}  # and none left out


def test_only_the_main_process_writes_the_run_directory(two_processes):
    run, _, stdout, _ = two_processes
    files = {str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file()}
    assert {f for f in files if not f.startswith(("tokenizer/", "tensorboard/"))} == {
        "run.json",
        "config.yaml",
        "prompt.txt",
        "vocabulary.json",
        "history.jsonl",
        "report.md",
        "loss_curve.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
        # the portable adapter carries its tokenizer and the training prompt as a chat template
        "adapter/chat_template.jinja",
        "adapter/tokenizer.json",
        "adapter/tokenizer_config.json",
    }
    assert len(list((run.path / "tensorboard").iterdir())) == 1  # one event file: one writer
    history = run.read_history()
    assert [r["step"] for r in history if "train_loss" in r] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["step"] for r in history if "validation_loss" in r] == [2, 4]
    info = run.info()
    assert info["status"] == "finished" and info["processes"] == 2
    assert stdout.count("trained 4 steps") == 1 and stdout.count("step 2: validation loss") == 1


def test_losses_match_one_process_with_the_same_global_batch(two_processes, one_process):
    run, _, _, _ = two_processes
    two, one = run.read_history(), one_process.read_history()
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(two, one):
        for key in ("train_loss", "grad_norm", "validation_loss", "learning_rate"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=RELATIVE_TOLERANCE), (a["step"], key)
        for key in ("useful_tokens", "padded_tokens"):  # counted over both ranks, exactly
            assert a.get(key) == b.get(key)
    adapter_two = load_file(run.adapter / "adapter_model.safetensors")
    adapter_one = load_file(one_process.adapter / "adapter_model.safetensors")
    assert adapter_two.keys() == adapter_one.keys()
    for name, tensor in adapter_two.items():
        assert torch.allclose(tensor, adapter_one[name], rtol=1e-4, atol=1e-6), name


def test_the_adapter_is_a_peft_adapter_that_evaluate_loads(two_processes, capsys):
    from mrtune.cli import main

    run, _, _, seconds = two_processes
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert main(["evaluate", str(run.path), "--limit", "2"]) == 0
    assert "decoded 2 rows" in capsys.readouterr().out
    metrics = json.loads((run.eval_dir("test") / "metrics.json").read_text())
    assert metrics["n"] == 2
    assert seconds < 120  # two processes' start-up (imports, gloo) and 4 steps; ~20-30 s on 2 cores


@pytest.mark.parametrize("sharded", ["two_processes_fsdp", "two_processes_fsdp2"])
def test_fsdp_saves_the_adapter_that_ddp_saves(sharded, request, two_processes):
    """The same tensors (names, shapes, dtypes, values up to the order of the gradient sums) and adapter config,
    under FSDP1 and FSDP2."""
    fsdp, _, stdout, _ = request.getfixturevalue(sharded)
    ddp, _, _, _ = two_processes
    assert "(no sample under FSDP" in stdout  # it did run sharded
    held = [json.loads((fsdp.path.parent / "records" / f"rank{rank}-model.json").read_text()) for rank in (0, 1)]
    if sharded == "two_processes_fsdp2":  # every parameter a DTensor, of which each rank holds a part
        assert all(h["class"].startswith("FSDP") and h["dtensors"] == h["parameters"] for h in held), held
        assert held[0]["total"] == held[1]["total"] == held[0]["local"] + held[1]["local"], held
        assert all(h["local"] < 0.6 * h["total"] for h in held), held
    else:
        assert all(h["class"] == "FullyShardedDataParallel" for h in held), held
    assert fsdp.info()["status"] == "finished" and fsdp.info()["best_step"] == ddp.info()["best_step"]
    for a, b in zip(fsdp.read_history(), ddp.read_history()):
        for key in ("train_loss", "grad_norm", "validation_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=RELATIVE_TOLERANCE), (a["step"], key)
    assert sorted(p.name for p in fsdp.adapter.iterdir()) == sorted(p.name for p in ddp.adapter.iterdir())
    adapter_fsdp = load_file(fsdp.adapter / "adapter_model.safetensors")
    adapter_ddp = load_file(ddp.adapter / "adapter_model.safetensors")
    assert sorted(adapter_fsdp) == sorted(adapter_ddp)
    assert len(adapter_ddp) == 2 * (7 * 2 + 1)  # lora_A and lora_B of 7 modules x 2 layers, and of lm_head
    for name, tensor in adapter_ddp.items():
        assert (adapter_fsdp[name].shape, adapter_fsdp[name].dtype) == (tensor.shape, tensor.dtype), name
        assert torch.allclose(adapter_fsdp[name], tensor, rtol=1e-4, atol=1e-6), name
    configs = [json.loads((run.adapter / "adapter_config.json").read_text()) for run in (fsdp, ddp)]
    for config in configs:  # a set in peft, written in the process's hash order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    from bench.scaling import compare_adapters  # the check bench/scaling.sh makes on 2 GPUs (repository root)

    assert compare_adapters(fsdp.path, ddp.path)["same"]


def test_bench_scaling_summarises_the_runs_scaling_sh_makes(
    one_process, two_processes, two_processes_fsdp, two_processes_fsdp2, tmp_path
):
    """bench/scaling.py on the runs bench/scaling.sh would make on 2 GPUs (here 1 and 2 CPU processes)."""
    from bench.scaling import summarise

    runs = tmp_path / "runs"
    runs.mkdir()
    trained = {"1gpu": one_process, "2gpu_ddp": two_processes[0], "2gpu_fsdp1": two_processes_fsdp[0]}
    for name, run in {**trained, "2gpu_fsdp2": two_processes_fsdp2[0]}.items():
        (runs / name).symlink_to(run.path, target_is_directory=True)
    (runs / "2gpu_ddp.memory.csv").write_text("0, 1000\n1, 2000\n")
    result = summarise(runs, warm=1)
    assert result["gpus"] == 2 and set(result["runs"]) == {"1gpu", "2gpu_ddp", "2gpu_fsdp1", "2gpu_fsdp2"}
    assert result["scaling_2gpu_7b"] == pytest.approx(result["tokens_per_s_2gpu"] / result["tokens_per_s_1gpu"])
    assert result["efficiency_2gpu_7b_fsdp2"] == pytest.approx(result["scaling_2gpu_7b_fsdp2"] / 2)
    assert result["runs"]["2gpu_ddp"]["peak_memory_gb_per_gpu"] == pytest.approx(
        [1000 * 2**20 / 1e9, 2000 * 2**20 / 1e9]
    )
    for kind in ("fsdp1", "fsdp2"):
        comparison = result[f"{kind}_vs_ddp_2gpu"]
        assert comparison["same"] and comparison["all_finite"], comparison
        assert comparison["relative_difference"] < 1e-4 and comparison["loss_relative_difference"] < RELATIVE_TOLERANCE
    assert result["fsdp2_qlora_matches_ddp"] is True


@pytest.mark.slow  # two more 2-process runs, ~20 s each
@pytest.mark.parametrize(
    ("sharded", "accelerate_config"), [("two_processes_fsdp", "fsdp-qlora"), ("two_processes_fsdp2", "fsdp2")]
)
def test_fsdp_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(
    sharded, accelerate_config, request, data_overrides, tmp_path
):
    """Under FSDP1 and FSDP2 the checkpoint gathers the sharded adapter and optimizer state; a resume shards them
    again."""
    from test_resume import assert_same_as_uninterrupted

    from mrtune.run.rundir import RunDir

    reference, _, _, _ = request.getfixturevalue(sharded)
    run = RunDir(tmp_path / "run")
    # Each rank sends itself SIGTERM in its first micro-batch of step 2: both finish step 2, save, and stop.
    stopped = _in_two_processes(
        tmp_path / "records-stopped",
        ["train", "--output-dir", str(run.path), *_sets([*data_overrides, "train.gradient_accumulation=2"])],
        {**_fsdp_environment(accelerate_config), "MRTUNE_TEST_SIGTERM_AT_MICRO_BATCH": "3"},
    )
    assert stopped.returncode != 0 and "interrupted at step 2 of 4 (SIGTERM): resume with" in stopped.stderr, (
        stopped.stdout + stopped.stderr
    )[-4000:]
    info = run.info()
    assert (info["status"], info["interrupted_at_step"]) == ("interrupted", 2)
    assert json.loads((run.checkpoint / "state.json").read_text())["fsdp"] is True
    assert sorted(load_file(run.checkpoint / "adapter" / "adapter_model.safetensors")) == sorted(
        load_file(reference.adapter / "adapter_model.safetensors")
    )  # the whole adapter, as the best one

    resumed = _in_two_processes(
        tmp_path / "records-resumed", ["train", "--resume", str(run.path)], _fsdp_environment(accelerate_config)
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert_same_as_uninterrupted(run, reference)  # bit for bit
    assert run.info()["resumed_at_steps"] == [2]


@pytest.mark.slow  # a 2-process run and a 1-process one, ~40 s
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_compiled_layers_train_under_ddp_and_fsdp(sharding, data_overrides, tmp_path):
    """configs/mistral-7b-qlora.yaml compiles its layers, and the README launches it on several GPUs."""
    environment = _fsdp_environment() if sharding == "fsdp" else None
    run, seen, _, _ = _train_in_two_processes([*data_overrides, "model.compile_layers=true"], tmp_path, environment)
    losses = [r["train_loss"] for r in run.read_history() if "train_loss" in r]
    assert run.info()["status"] == "finished" and len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert len(seen[0]) == len(seen[1]) == 2 * STEPS


def test_fsdp2_trains_loraplus_as_one_process_does(data_overrides, tmp_path):
    """LoRA+ (a higher rate for the B matrices, told apart by name) under FSDP2, whose optimizer is built on the
    named adapters before sharding; FSDP1 refuses it."""
    from mrtune.config import load_config
    from mrtune.train.recipe import train

    overrides = [*data_overrides, "train.loraplus_ratio=16"]
    sharded, _, _, _ = _train_in_two_processes(overrides, tmp_path, _fsdp_environment("fsdp2"))
    config = load_config(None, [*overrides, "train.gradient_accumulation=4"])
    one = train(config, tmp_path / "one-process", progress=False)
    losses = [[r["train_loss"] for r in run.read_history() if "train_loss" in r] for run in (sharded, one)]
    assert losses[0] == pytest.approx(losses[1], rel=RELATIVE_TOLERANCE)
    adapters = [load_file(run.adapter / "adapter_model.safetensors") for run in (sharded, one)]
    for name, tensor in adapters[1].items():
        assert torch.allclose(adapters[0][name], tensor, rtol=1e-4, atol=1e-6), name

    refused = _in_two_processes(
        tmp_path / "records-fsdp1",
        ["train", "--output-dir", str(tmp_path / "fsdp1"), *_sets(overrides)],
        _fsdp_environment("fsdp-qlora"),
    )
    assert refused.returncode != 0 and "train.loraplus_ratio is not available under FSDP1" in refused.stderr
    assert not (tmp_path / "fsdp1").exists()


def test_num_gpus_launches_accelerate_with_the_other_arguments(monkeypatch, tmp_path, capsys):
    from mrtune.cli import main
    from mrtune.train import distributed

    class Launched(Exception):
        pass

    launched = []

    def execv(path, command):  # os.execv does not return: this process would become the launcher
        launched.append(command)
        raise Launched

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "execv", execv)
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp-qlora.yaml"
    with pytest.raises(Launched):
        main(
            [
                "train",
                "--num-gpus",
                "2",
                "--accelerate-config",
                str(config),
                "--config",
                "c.yaml",
                "--set",
                "a.b=1",
                "--output-dir",
                str(tmp_path / "run"),
                "--overwrite",
            ]
        )
    assert launched == [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "2",
            "-m",
            "mrtune",
            "train",
            "--config",
            "c.yaml",
            "--set",
            "a.b=1",
            "--output-dir",
            str(tmp_path / "run"),
            "--overwrite",
        ]
    ]
    from accelerate.commands.launch import launch_command_parser

    ddp = launch_command_parser().parse_args(distributed.launch_command(2, None, ["--output-dir", "r"])[3:])
    assert (ddp.multi_gpu, ddp.num_processes, ddp.num_machines, ddp.mixed_precision) == (True, 2, 1, "no")
    assert (ddp.module, ddp.training_script) == (True, "mrtune")
    assert ddp.training_script_args == ["train", "--output-dir", "r"]

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["train", "--num-gpus", "2", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--num-gpus 2 asks for more GPUs than this machine has (0)" in capsys.readouterr().err
    assert main(["train", "--num-gpus", "0", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--num-gpus must be at least 1" in capsys.readouterr().err
    assert len(launched) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp-qlora", "fsdp-qlora-offload", "fsdp2", "fsdp2-qlora"])
def test_accelerate_configs_are_what_accelerate_launch_reads(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # unknown top-level keys raise
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launch_options  # accelerate launch ignores an unknown FSDP key silently
    assert config.mixed_precision == "no" and config.num_machines == 1
    if name == "ddp":
        assert config.distributed_type == "MULTI_GPU"
        return
    fsdp = config.fsdp_config
    assert config.distributed_type == "FSDP" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("fsdp2"):
        # FSDP1-only keys, which FSDP2's plugin drops with a warning: none may be there to mislead a reader
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert not {"fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_backward_prefetch"} & set(fsdp)
        # 4-bit weights are quantized on every rank (transformers loads no quantized model on the meta device)
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is (name == "fsdp2") and fsdp["fsdp_offload_params"] is False
    else:
        assert fsdp["fsdp_version"] == 1
        assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_cpu_ram_efficient_loading"] is True
        assert fsdp["fsdp_offload_params"] is (name == "fsdp-qlora-offload")


def _record_micro_batches_and_train(records: Path, argv: list[str]) -> int:
    """Run in each torchrun process: `mrtune train` with the micro-batches this rank trains on recorded."""
    import mrtune.train.recipe
    from mrtune.cli import main

    trained_on, held = [], {}
    target_loss = mrtune.train.recipe.target_loss
    sigterm_at = int(os.environ.get("MRTUNE_TEST_SIGTERM_AT_MICRO_BATCH", 0))  # counted from 1; 0: never

    def recording_target_loss(model, batch, keep, *args):
        if model.training:  # validation batches run in eval mode
            if not held:
                held.update(_how_the_model_is_held(model))
            trained_on.append(batch["input_ids"].tolist())
            if len(trained_on) == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)  # train.StopSignals: stop after this step
        return target_loss(model, batch, keep, *args)

    mrtune.train.recipe.target_loss = recording_target_loss
    code = main(argv)
    (records / f"rank{os.environ['RANK']}.json").write_text(json.dumps(trained_on))
    (records / f"rank{os.environ['RANK']}-model.json").write_text(json.dumps(held))
    return code


def _how_the_model_is_held(model) -> dict:
    """The class of the model a rank trains, and how many of its parameters are DTensors (FSDP2's shards); `local`
    elements of the `total` are on this rank."""
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    return {
        "class": type(model).__name__,
        "parameters": len(parameters),
        "dtensors": sum(isinstance(p, DTensor) for p in parameters),
        "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters),
        "total": sum(p.numel() for p in parameters),
    }


def _force_fsdp_on_cpu() -> None:
    """Make `mrtune train`'s Accelerator an FSDP one on the CPU, as it is on GPUs under `accelerate launch`.

    Accelerate keeps a CPU run MULTI_CPU whatever ACCELERATE_USE_FSDP says; FSDP1 itself runs on the CPU with gloo.
    The plugin is the one Accelerate builds from the launcher's environment (`_fsdp_environment`).
    """
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CpuFsdpAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            plugin = FullyShardedDataParallelPlugin()
            super().__init__(*args, fsdp_plugin=plugin, **kwargs)
            # Both states, as Accelerate sets them for FSDP: AcceleratorState re-reads PartialState's.
            self.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin

    accelerate.Accelerator = CpuFsdpAccelerator


if __name__ == "__main__":
    if os.environ.get("MRTUNE_TEST_FSDP_ON_CPU"):
        _force_fsdp_on_cpu()
    sys.exit(_record_micro_batches_and_train(Path(sys.argv[1]), sys.argv[2:]))
