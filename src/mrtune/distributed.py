"""Several GPUs through Accelerate: data parallelism (DDP) and sharded 4-bit QLoRA (FSDP).

    accelerate launch --config_file configs/accelerate/ddp.yaml -m mrtune train --config C --output-dir RUN
    mrtune train --num-gpus 2 --config C --output-dir RUN                      # the same, launched for you
    mrtune train --num-gpus 2 --accelerate-config configs/accelerate/fsdp-qlora.yaml --config C --output-dir RUN

The training loop (train.py) is one loop for one process and for many. Each optimizer step takes
gradient_accumulation x processes micro-batches from the same deterministic plan on every rank, and rank r trains
on micro-batches r, r + processes, ...; the loss is divided by the whole step's target count, so the step's
gradient is the same mean over its target tokens however the micro-batches are split over ranks. Only the main
rank writes the run directory; the validation loss is summed over ranks before it is divided.

DDP keeps a whole copy of the model on each GPU (4-bit weights loaded straight onto the rank's own GPU) and
all-reduces the adapters' gradients. FSDP shards the model's weights (4-bit ones too: `bnb_4bit_quant_storage` is
the compute dtype, see modeling.quantization_config) over the GPUs, optionally parking them and the optimizer state
in CPU memory between uses, for models that do not fit on one GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mrtune.errors import MrtuneError


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def wrap_adapters_separately(model, accelerator) -> None:
    """Make FSDP wrap each LoRA layer in its own unit, beside one unit per decoder layer.

    FSDP (with `use_orig_params: false`) flattens each unit's parameters into one tensor, which needs one dtype and
    one requires_grad: the fp32 trainable adapters cannot share a unit with the frozen bf16 (or 4-bit, stored as
    bf16) base weights. peft's policy for this is what transformers' Trainer installs (`update_fsdp_plugin_peft`).
    Call before `accelerator.prepare(model)`.
    """
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def adapter_state_dict(accelerator, model) -> dict | None:
    """The state dict to save the adapter from: under FSDP, the full one gathered on the main rank.

    Collective under FSDP: every rank must call it. accelerate's `get_state_dict` gathers the whole model (the 4-bit
    base too: ~4 GB of CPU memory for Mistral-7B) into the main rank's CPU memory, and `PeftModel.save_pretrained`
    keeps only the adapter's tensors of it (`get_peft_model_state_dict`). Elsewhere None: peft reads the adapter's
    own parameters.
    """
    if not uses_fsdp(accelerator):
        return None
    return accelerator.get_state_dict(model)


def save_adapter(accelerator, model, directory: Path, state_dict: dict | None, initial: Path | None = None) -> None:
    """Save the adapter in PEFT format (adapter_config.json + adapter_model.safetensors), from the main rank.

    `initial`: the adapter as lora.init=pissa|olora made it. Those inits move part of each base weight into the
    adapter, so the trained adapter only fits the altered base; peft then saves the difference from `initial`
    instead, as a plain LoRA adapter of twice the rank that fits the original base weights.
    """
    # save_embedding_layers=False: with lm_head adapted, peft would also save the frozen head (262 MB for
    # Mistral-7B); the base model already has it.
    accelerator.unwrap_model(model).save_pretrained(
        directory, state_dict=state_dict, save_embedding_layers=False,
        path_initial_model_for_weight_conversion=None if initial is None else str(initial))


def launch_command(num_gpus: int | None, accelerate_config: str | None, train_args: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `mrtune train TRAIN_ARGS` on `num_gpus` GPUs of this machine.

    Without an Accelerate config file it is plain DDP (`--multi_gpu`); with one (configs/accelerate/), that file
    says what to do (FSDP, CPU offload, several machines), and `num_gpus`, if given, overrides its num_processes.
    """
    import torch

    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise MrtuneError(f"--accelerate-config {accelerate_config} does not exist: pass an Accelerate config file "
                          "such as configs/accelerate/ddp.yaml or configs/accelerate/fsdp-qlora.yaml")
    available = torch.cuda.device_count()
    if num_gpus is not None and num_gpus > available:
        raise MrtuneError(f"--num-gpus {num_gpus} asks for more GPUs than this machine has ({available}); on a CPU "
                          "machine, try several processes with `torchrun --nproc_per_node N -m mrtune train ...`")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        command += ["--config_file", accelerate_config]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_gpus is not None:
        command += ["--num_processes", str(num_gpus)]
    return command + ["-m", "mrtune", "train", *train_args]


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a run of one process (read from the launcher's environment)."""
    return int(os.environ.get("RANK", "0")) == 0
