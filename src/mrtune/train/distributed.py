"""Several GPUs through Accelerate: data parallelism (DDP) and sharded LoRA/QLoRA (FSDP1 and FSDP2).

    accelerate launch --config_file configs/accelerate/ddp.yaml -m mrtune train --config C --output-dir RUN
    mrtune train --num-gpus 2 --config C --output-dir RUN                      # the same, launched for you
    mrtune train --num-gpus 8 --accelerate-config configs/accelerate/fsdp2.yaml --config C --output-dir RUN
    mrtune train --num-gpus 2 --accelerate-config configs/accelerate/fsdp-qlora.yaml --config C --output-dir RUN

The training loop (train.py) is one loop for one process and for many. Each optimizer step takes
gradient_accumulation x processes micro-batches from the same deterministic plan on every rank, and rank r trains
on micro-batches r, r + processes, ...; the loss is divided by the whole step's target count, so the step's
gradient is the same mean over its target tokens however the micro-batches are split over ranks. Only the main
rank writes the run directory; the validation loss is summed over ranks before it is divided.

DDP keeps a whole copy of the model on each GPU (4-bit weights loaded straight onto the rank's own GPU) and
all-reduces the adapters' gradients. FSDP shards the model's weights over the GPUs, for models that do not fit on
one. FSDP2 (`fsdp_version: 2`, torch's `fully_shard`) keeps each parameter as a DTensor of which each rank holds a
slice; FSDP1 flattens each unit's parameters into one sharded tensor, and is kept for 4-bit weights (stored in the
compute dtype, see model.build.quantization_config), which FSDP2 is not yet known to shard correctly
(configs/accelerate/fsdp2-qlora.yaml says why). Both save the same PEFT adapter as DDP, and their checkpoints hold
full (unsharded) state dicts keyed by parameter name, gathered and restored through torch.distributed.checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from mrtune.errors import MrtuneError


def uses_fsdp(accelerator) -> bool:
    """Whether the model is sharded, by FSDP1 or FSDP2 (`fsdp_version` in the Accelerate config)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def uses_fsdp2(accelerator) -> bool:
    """Whether the model is sharded by FSDP2 (torch's `fully_shard`, per-parameter DTensor shards)."""
    return uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version == 2


def wrap_adapters_separately(model, accelerator) -> None:
    """Under FSDP1, make it wrap each LoRA layer in its own unit, beside one unit per decoder layer.

    FSDP1 (with `use_orig_params: false`) flattens each unit's parameters into one tensor, which needs one dtype and
    one requires_grad: the fp32 trainable adapters cannot share a unit with the frozen bf16 (or 4-bit, stored as
    bf16) base weights. peft's policy for this is what transformers' Trainer installs (`update_fsdp_plugin_peft`).
    FSDP2 shards each parameter on its own (a unit all-gathers mixed dtypes as bytes, and only the trainable
    parameters, all fp32, need one dtype), so the config's TRANSFORMER_BASED_WRAP is kept: accelerate's
    `fsdp2_prepare_model` reads no other callable policy, and with peft's it would shard the model as one unit.
    Call before `accelerator.prepare(model)`.
    """
    if uses_fsdp2(accelerator):
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def prepare_model_and_optimizer(accelerator, model, build: Callable) -> tuple:
    """`accelerator.prepare` the model and the optimizer that `build(model) -> (optimizer, scheduler)` makes on its
    trainable parameters; returns (model, optimizer, scheduler).

    FSDP1 replaces the parameters by flat shards, so its optimizer is built on the prepared model. FSDP2 is the other
    way round: accelerate takes the model and its optimizer in one `prepare` call, shards the model, and swaps the
    optimizer's parameters for the sharded ones (matched by name). DDP takes either order.
    """
    if uses_fsdp2(accelerator):
        optimizer, scheduler = build(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler
    model = accelerator.prepare(model)
    optimizer, scheduler = build(model)
    return model, accelerator.prepare(optimizer), scheduler


def _full_state_dict_options(accelerator, **options):
    """torch.distributed.checkpoint's options for full (unsharded) state dicts with canonical names (no FSDP
    prefixes), for FSDP1 and FSDP2 alike.

    When saving, the full tensors are gathered into the main rank's CPU memory (the others get {}), one unit at a
    time for FSDP1, one tensor at a time for FSDP2. Not on a CPU run (the tests): FSDP1 would then free the storage
    of the tensors it returns, so every rank gets the whole state dict in place. When loading, every rank passes the
    whole state dict and keeps its own shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu", **options)


def _main_rank_only(accelerator, state: dict) -> dict:
    return state if accelerator.is_main_process else {}


def adapter_keys(model, adapter_name: str = "default") -> dict[str, str]:
    """The adapter's tensors as PEFT saves them: {key in adapter_model.safetensors: key in the model's state dict}.

    Call before `accelerator.prepare(model)`, on the plain PEFT model. peft 0.21 picks a state dict's adapter
    entries by the names of the model's LoRA modules (`_get_tuner_state_dict_key_prefixes`), and it strips only a
    leading `_fsdp_wrapped_module.` from them; with a unit per decoder layer the FSDP prefix sits inside the names
    (`...layers.0._fsdp_wrapped_module.self_attn.q_proj`), so none of the decoder layers' keys matched and an FSDP
    run saved lm_head's adapter alone (peft 0.20 kept the keys holding "lora_"). The keys here are peft's own,
    read from the model before FSDP renames its modules.
    """
    from peft import get_peft_model_state_dict

    saved = set(get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False))
    # peft's keys are the model's with the adapter name taken out: q_proj.lora_A.default.weight -> q_proj.lora_A.weight
    keys = {}
    for key in model.state_dict():
        saved_key = key.replace(f".{adapter_name}.", ".", 1)
        if saved_key in saved:
            keys[saved_key] = key
    if set(keys) != saved:
        raise MrtuneError(
            f"cannot map the adapter's tensors to the model's state dict for FSDP (no model key for "
            f"{sorted(saved - set(keys))[:3]}): this LoRA set-up is not supported under FSDP"
        )
    return keys


def adapter_state_dict(accelerator, model, keys: dict[str, str] | None) -> dict | None:
    """Under FSDP, the adapter's tensors gathered on the main rank, keyed as in adapter_model.safetensors (`keys`
    from `adapter_keys`; {} on the other ranks). Elsewhere None: peft reads the adapter's own parameters.

    Collective under FSDP: every rank must call it. FSDP2 gathers the trainable parameters alone (the adapter, a few
    MB); FSDP1 can only gather whole units, so it gathers the whole model (the 4-bit base too: ~4 GB of CPU memory
    for Mistral-7B) one unit at a time into the main rank's CPU memory, and drops the frozen weights.
    """
    if not uses_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_state_dict_options(accelerator, ignore_frozen_params=True))
    if not accelerator.is_main_process:
        return {}
    missing = sorted(key for key in keys.values() if key not in full)
    if missing:
        raise MrtuneError(
            f"the state dict gathered by FSDP has no {missing[:3]} ({len(missing)} of the adapter's "
            f"{len(keys)} tensors missing): the adapter cannot be saved"
        )
    return {saved_key: full[key] for saved_key, key in keys.items()}


def optimizer_state_dict(accelerator, model, optimizer) -> dict:
    """The optimizer's state to save: under FSDP, the full state gathered on the main rank ({} on the others),
    keyed by parameter name; elsewhere the optimizer's own. Collective under FSDP: every rank must call it."""
    if not uses_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _unwrapped(optimizer), options=_full_state_dict_options(accelerator))
    return _main_rank_only(accelerator, state)


def load_sharded_adapter(accelerator, model, tensors: dict, keys: dict[str, str]) -> list[str]:
    """Put saved adapter tensors (keyed as in adapter_model.safetensors) back into an FSDP model, whose every rank
    passes all of them. Collective. Returns the keys the model did not take (none when the adapter fits).

    strict=False: the frozen base weights are not in the adapter. Under FSDP1 the load is FSDP1's own: torch's
    `set_model_state_dict` fills the keys it is not given with the model's current values, which FSDP1 holds as flat
    shards, and its full-state-dict load then refuses their shapes.
    """
    named = {keys[key]: tensor for key, tensor in tensors.items()}
    if uses_fsdp2(accelerator):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        options = _full_state_dict_options(accelerator, strict=False)
        return list(set_model_state_dict(model, named, options=options).unexpected_keys)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        return list(model.load_state_dict(named, strict=False).unexpected_keys)


def load_sharded_optimizer(accelerator, model, optimizer, state: dict) -> None:
    """Put a full optimizer state from `optimizer_state_dict` back under FSDP: each rank keeps its shards of it.
    Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, _unwrapped(optimizer), state, options=_full_state_dict_options(accelerator))


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (whose state it shares)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_adapter(accelerator, model, directory: Path, tensors: dict | None, initial: Path | None = None) -> None:
    """Save the adapter in PEFT format (adapter_config.json, adapter_model.safetensors, README.md), from the main
    rank; `tensors` from `adapter_state_dict`.

    `initial`: the adapter as lora.init=pissa|olora made it (never under FSDP). Those inits move part of each base
    weight into the adapter, so the trained adapter only fits the altered base; peft then saves the difference from
    `initial` instead, as a plain LoRA adapter of twice the rank that fits the original base weights.
    """
    import copy

    from safetensors.torch import save_file

    peft_model = accelerator.unwrap_model(model)
    if tensors is None:
        # save_embedding_layers=False: with lm_head adapted, peft would also save the frozen head (262 MB for
        # Mistral-7B); the base model already has it.
        peft_model.save_pretrained(
            directory,
            save_embedding_layers=False,
            path_initial_model_for_weight_conversion=None if initial is None else str(initial),
        )
        return
    # Under FSDP, the files PeftModel.save_pretrained writes, from the gathered tensors: passed to it as its
    # state_dict, they would go through the name filter that `adapter_keys` works around.
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(
        {key: tensor.contiguous() for key, tensor in tensors.items()},
        str(Path(directory) / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = copy.copy(peft_model.peft_config["default"])
    config.inference_mode = True  # as save_pretrained writes it
    config.save_pretrained(str(directory))
    peft_model.create_or_update_model_card(str(directory))


def launch_command(num_gpus: int | None, accelerate_config: str | None, train_args: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `mrtune train TRAIN_ARGS` on `num_gpus` GPUs of this machine.

    Without an Accelerate config file it is plain DDP (`--multi_gpu`); with one (configs/accelerate/), that file
    says what to do (FSDP, CPU offload, several machines), and `num_gpus`, if given, overrides its num_processes.
    """
    import torch

    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise MrtuneError(
            f"--accelerate-config {accelerate_config} does not exist: pass an Accelerate config file "
            "such as configs/accelerate/ddp.yaml or configs/accelerate/fsdp-qlora.yaml"
        )
    available = torch.cuda.device_count()
    if num_gpus is not None and num_gpus > available:
        raise MrtuneError(
            f"--num-gpus {num_gpus} asks for more GPUs than this machine has ({available}); on a CPU "
            "machine, try several processes with `torchrun --nproc_per_node N -m mrtune train ...`"
        )
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
