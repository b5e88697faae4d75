"""Building the model of a run: the frozen base (bf16, or 4-bit NF4 on CUDA) with LoRA adapters on top."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from mrtune.config import LoraSettings, ModelSettings
from mrtune.errors import MrtuneError, first_line
from mrtune.model.fp8 import use_fp8_for_frozen_linears
from mrtune.model.resolve import resolve_model_path

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_safe_dtype(name: str, device: torch.device | None) -> torch.dtype:
    """The dtype to load in: bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) falls to torch's
    reference GEMM, ~180x slower than fp32 (measured on an AVX2-only EPYC: 60 s vs 0.34 s for one 512x49152x576
    matmul), so such a CPU gets fp32, with a notice."""
    dtype = DTYPES[name]
    if (
        dtype == torch.bfloat16
        and (device is None or torch.device(device).type == "cpu")
        and not torch.cuda.is_available()
        and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        warnings.warn(
            "model.dtype=bfloat16 has no fast kernels on this CPU (no AVX512-BF16/AMX): using float32; "
            "set model.dtype=float32 to silence this",
            stacklevel=2,
        )
        return torch.float32
    return dtype


def quantization_config(settings: ModelSettings):
    """The seed recipe's 4-bit set-up: NF4 with double quantization and bf16 compute.

    `bnb_4bit_quant_storage` matches the compute dtype so that FSDP can shard the packed 4-bit weights together
    with the bf16 ones (it needs one dtype per flattened parameter group).
    """
    if not torch.cuda.is_available():
        raise MrtuneError(
            "model.quantization=nf4 needs a CUDA GPU (bitsandbytes 4-bit): on this machine set "
            "--set model.quantization=none (bf16 LoRA), or run on a GPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MrtuneError(
            "model.quantization=nf4 needs bitsandbytes: pip install bitsandbytes, or set model.quantization=none"
        ) from None
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[settings.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_base_model(settings: ModelSettings, device: torch.device | None, model_path: str | None = None):
    """The frozen base model on `device`, in `settings.dtype` or 4-bit.

    `device` None leaves the placement to FSDP (no device map, as accelerate expects): 4-bit weights go to the
    current GPU (bitsandbytes' default), the others stay in CPU memory, or on the meta device on ranks other than 0
    with accelerate's `fsdp_cpu_ram_efficient_loading` (FSDP then broadcasts rank 0's weights).
    """
    from transformers import AutoModelForCausalLM

    model_path = model_path or resolve_model_path(settings.name)
    kwargs = {"dtype": cpu_safe_dtype(settings.dtype, device), "attn_implementation": settings.attn_implementation}
    if settings.quantization == "nf4":
        kwargs["quantization_config"] = quantization_config(settings)
        if device is not None:  # each DDP rank's own GPU: {"": accelerator.device}
            kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as error:
        first = first_line(error)
        raise MrtuneError(
            f"cannot load model {settings.name!r} ({first[:200]}): pass a local directory with "
            f"--set model.name=/path/to/model, or the embedded model {ModelSettings.name}"
        ) from None
    if settings.quantization != "nf4" and device is not None:
        model.to(device)
    model.config.use_cache = False  # the KV cache is useless in training and breaks packed-row attention
    return model


def apply_liger_kernel(model) -> None:
    """Swap the model's RMSNorm, SwiGLU MLP and RoPE for Liger's Triton kernels, in place.

    Liger's fused linear cross-entropy is left off: the loss is computed on the target positions only
    (`train.target_loss`), and an adapted lm_head (the seed recipe's) must stay a peft module.
    """
    try:  # (a CPU is refused before anything loads: train.check_hardware)
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        raise MrtuneError(
            "model.liger_kernel=true needs the liger-kernel package: pip install liger-kernel, "
            "or set model.liger_kernel=false"
        ) from None
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would only log and go on
        raise MrtuneError(
            f"Liger has no kernels for model type {model.config.model_type!r}: set model.liger_kernel=false"
        )
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def decoder_linear_names(model) -> list[str]:
    """The leaf names of the linear layers inside the decoder layers (q_proj, ..., down_proj): what peft's
    `all-linear` means, spelled out (plain and bitsandbytes 4-bit linears both subclass torch.nn.Linear)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
        }
    )


def set_checkpointing(model, on: bool) -> None:
    """Turn gradient checkpointing on or off (a transformers or peft model), leaving the model in train mode, where
    checkpointing acts. Non-reentrant: it works with frozen inputs (no enable_input_require_grads hack needed)."""
    # transformers 5.2x renamed the switches (`activation_checkpointing_*`); the GPU image's 5.17 has only the old.
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.train()


def _prepare_base(model, settings: ModelSettings) -> None:
    """What the model's settings change in the base before peft wraps it (Liger's kernels, checkpointing)."""
    if settings.liger_kernel:
        apply_liger_kernel(model)
    if settings.gradient_checkpointing:
        set_checkpointing(model, True)


def _ready_to_train(model, settings: ModelSettings):
    # Gradient checkpointing acts only in train mode, and from_pretrained returns the model in eval mode.
    model.train()
    if settings.compile_layers:
        compile_decoder_layers(model, settings.compile_mode)
    return model


def attach_lora(model, lora: LoraSettings, settings: ModelSettings):
    """Freeze the base and add trainable LoRA adapters (kept in fp32: bf16 weights swallow small updates)."""
    from peft import LoraConfig, get_peft_model

    _prepare_base(model, settings)
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    layers = None
    if lora.top_layers is not None:
        count = model.config.get_text_config().num_hidden_layers
        if lora.top_layers > count:
            raise MrtuneError(f"lora.top_layers={lora.top_layers} but the model has {count} layers: lower it")
        layers = list(range(count - lora.top_layers, count))
        if targets == "all-linear":  # peft takes layers_to_transform only with explicit module names
            targets = decoder_linear_names(model)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        # "pissa": the exact SVD, not a randomized one: a resumed run must rebuild the same residual weights.
        init_lora_weights={"default": True, "pissa": "pissa", "olora": "olora"}[lora.init],
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft():
            model = get_peft_model(model, peft_config)  # autocast_adapter_dtype=True: adapters in fp32
    except ValueError as error:
        raise MrtuneError(f"cannot attach LoRA adapters ({str(error)[:200]}): check lora.target_modules") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if settings.dtype != "float32" and torch.cuda.is_available():
        # fp32 adapter weights, bf16 compute under autocast (train.compute_autocast). By default peft casts each
        # adapted layer's input to fp32 instead: an fp32 copy of every linear layer's input, kept for the
        # backward pass, ~40 GB at 8,192 tokens on Mistral-7B. The same switch as peft's
        # helpers.disable_input_dtype_casting, set for the model's life rather than one block. CUDA only: on
        # CPU, the backward of autocast's bf16 adapter matmuls falls to torch's slow reference GEMM (minutes a
        # step on SmolLM2), while peft's fp32 casting keeps them on MKL.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if settings.fp8_base == "auto":  # the recipe resolves it before building (Recipe._resolve_fp8)
        raise ValueError("model.fp8_base=auto must be resolved (model.fp8.resolve_fp8_base) before attach_lora")
    if settings.fp8_base:
        use_fp8_for_frozen_linears(model)
    return _ready_to_train(model, settings)


def attach_full(model, settings: ModelSettings):
    """Make every weight of the base trainable, in fp32 (train.method=full): the fp32 weights are the master
    weights, the compute is in the dtype the base was loaded in (bf16 under autocast on CUDA: train.compute_autocast).

    Through peft, so that the run's adapter/ stays a peft adapter that evaluate, predict, merge and serve load as
    they load LoRA: `modules_to_save` wraps each module that holds weights in a ModulesToSaveWrapper, whose trainable
    copy is saved in adapter_model.safetensors and put in the module's place by merge_and_unload. The LoraConfig
    adapts no module (peft's `dummy-target-modules`, its marker for an adapter without targets), and
    `ensure_weight_tying` keeps a tied output head (SmolLM2's) one tensor with the embeddings' copy, as in the base.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import DUMMY_TARGET_MODULES

    _prepare_base(model, settings)
    # Leaf names (q_proj, input_layernorm, ...): peft wraps every module whose name ends with one of them.
    owners = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _owns_weights(module)})
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    peft_config = LoraConfig(
        target_modules=DUMMY_TARGET_MODULES, modules_to_save=owners, ensure_weight_tying=tied, task_type="CAUSAL_LM"
    )
    with _quiet_peft():
        model = get_peft_model(model, peft_config)
    _share_originals(model)
    return _ready_to_train(model, settings)


def _owns_weights(module: torch.nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _share_originals(model) -> None:
    """Cast the trainable copies to fp32 and point peft's untouched originals at them, checking that nothing of the
    base is left frozen outside a wrapper.

    A ModulesToSaveWrapper keeps the original module beside its copy for `disable_adapter()`, which mrtune never
    calls (`--base` loads the base alone). Sharing storage leaves the run holding one fp32 copy of each weight (plus
    its gradient and AdamW's two moments) instead of a bf16 original as well; the originals then follow training.
    """
    from peft.utils.other import ModulesToSaveWrapper

    wrapped = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, ModulesToSaveWrapper):
                continue
            copy = dict(module.modules_to_save[module.active_adapters[0]].named_parameters())
            for name, original in module.original_module.named_parameters():
                copy[name].data = copy[name].data.float()  # tied copies: the same parameter, cast once
                original.data = copy[name].data
                wrapped |= {id(original), id(copy[name])}
    left = [name for name, parameter in model.named_parameters() if id(parameter) not in wrapped]
    if left:
        raise MrtuneError(f"train.method=full cannot make {left[0]} trainable: use train.method=lora for this model")


def compile_decoder_layers(model, mode: str = "default") -> int:
    """torch.compile each decoder layer in place (regional compilation): every layer has the same code and shapes,
    so one compiled graph serves them all and compilation costs seconds, not the whole model's minutes. In place
    (`Module.compile`), so state-dict keys, peft's and accelerate's APIs are unchanged. Returns the count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise MrtuneError(
            f"model.compile_layers: no decoder layers found in {type(model).__name__}: set model.compile_layers=false"
        )
    # Dynamo compiles one graph per distinct set of guards (on the GPU image, transformers 5.17 / torch 2.11 hit
    # the default limit of 8 with a 30-layer model); past the limit it silently runs the frame eagerly. Allow one
    # graph per layer, plus margin, so that every layer stays compiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(layers) + 8)
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def eager_for_evaluation():
    """A context in which compiled layers (and a compiled model) run their plain eager code: for validation and
    sample generation between training steps. Their graphs were compiled for the training step's shapes; padded
    validation batches and a growing KV cache have other shapes each time, and every layer would compile again for
    each: minutes on the 7B shape (BENCHMARKS.md), for passes that are a small share of a run's time."""
    return torch.compiler.set_stance("force_eager")


def _own_adapted_weights(model) -> None:
    """Give the adapted layers' CPU weights memory of their own, so that merging into them in place is cheap.

    from_pretrained leaves CPU weights stored in the checkpoint's dtype as copy-on-write maps of the safetensors
    file: the in-place merge then copies them a page at a time as it writes, several times slower than one copy
    first (BENCHMARKS.md, evaluate start-up). `.data` is swapped on the parameter itself, so tied weights stay tied,
    and the values are unchanged: the merge computes exactly what it did before.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                weight = module.get_base_layer().weight
                if weight.device.type == "cpu":
                    weight.data = weight.data.clone()


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 wraps a model by reading `is_gradient_checkpointing`, which transformers 5 deprecates (renamed
    `is_activation_checkpointing`): a FutureWarning on every train and evaluate that users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def load_trained_model(settings: ModelSettings, adapter_dir: Path | None, device: torch.device, *, merge: bool = True):
    """Base model plus a run's adapter, ready for generation (merged into the weights when not quantized,
    so decoding pays nothing for the adapter)."""
    model = load_base_model(settings, device)
    if adapter_dir is not None:
        from peft import PeftModel

        with _quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge and settings.quantization == "none":
            _own_adapted_weights(model)
            model = model.merge_and_unload()
    model.config.use_cache = True
    model.eval()
    return model
