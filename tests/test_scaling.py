"""bench/scaling.py off the GPU: the 70B run's code on a 2-layer model in two CPU processes (gloo), and the
figures bench/scaling.sh reads from nvidia-smi and compares. (Its summary of real runs is tested in
test_distributed.py, on the runs trained there.)"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_big_run_trains_a_model_no_rank_holds_whole(tmp_path):
    """`torchrun ... -m bench.scaling big --shape tiny`: the code of the 70B run, on 2 CPU processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "big.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), "-m", "bench.scaling", "big", "--shape", "tiny", "--cpu"]
    command += ["--steps", "3", "--warm", "1", "--seq-len", "16", "--batch", "2", "--out", str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    big = json.loads(out.read_text())
    assert big["processes"] == 2 and big["steps_timed"] == 2 and big["useful_tokens_per_s"] > 0
    # every parameter a DTensor; the two ranks' shards make up the model, each about half of it
    assert big["all_dtensors"] and sum(big["local_elements_per_rank"]) == big["parameters"]
    assert all(local < 0.6 * big["parameters"] for local in big["local_elements_per_rank"])
    # LoRA: r x (in + out) of 7 linear layers a decoder layer (2 layers of hidden 64, MLP 128, 2 of 4 heads kv)
    per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert big["trainable_parameters"] == 2 * per_layer
    # filled shards, lora_B zero: the random-init model starts near uniform over its 256 tokens (to_empty's
    # garbage would not), and trains without NaNs
    losses = big["losses_rank0"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(256), abs=0.1)


def test_peak_memory_per_gpu_reads_nvidia_smi_samples(tmp_path):
    from bench.scaling import peak_memory_per_gpu

    samples = tmp_path / "run.memory.csv"
    samples.write_text("0, 1024\n1, 2048\n0, 3072\n[N/A]\n1, 512\n")  # index, MiB; a line of no figure skipped
    assert peak_memory_per_gpu(samples) == pytest.approx([3072 * 2**20 / 1e9, 2048 * 2**20 / 1e9])


@pytest.mark.parametrize(
    ("fsdp2", "fsdp1", "matches"),
    [
        ({"same": True, "all_finite": True, "relative_difference": 3e-4}, {"relative_difference": 2e-4}, True),
        # altered 4-bit weights: the adapter trained elsewhere
        ({"same": True, "all_finite": True, "relative_difference": 0.4}, {"relative_difference": 2e-4}, False),
        ({"same": True, "all_finite": False, "relative_difference": 0.0}, {"relative_difference": 2e-4}, False),
        ({"same": False, "all_finite": True, "relative_difference": 0.0}, {"relative_difference": 2e-4}, False),
    ],
)
def test_fsdp2_qlora_matches_ddp_only_as_closely_as_fsdp1(fsdp2, fsdp1, matches):
    from bench.scaling import _fsdp2_qlora_verdict

    verdict = _fsdp2_qlora_verdict({"fsdp2_vs_ddp_4gpu": fsdp2, "fsdp1_vs_ddp_4gpu": fsdp1})
    assert verdict == {"fsdp2_qlora_matches_ddp": matches}
    assert _fsdp2_qlora_verdict({}) == {}  # no FSDP runs, no verdict
