"""fp8 matmuls for the frozen base weights while training (`model.fp8_base`).

In LoRA training the base weights are frozen, so each base linear layer does two large GEMMs a step: the output in
the forward pass (x @ W^T) and the input's gradient in the backward pass (grad @ W); there is no weight gradient.
Hopper's fp8 tensor cores run those at about twice bf16's rate. Here both run as `torch._scaled_mm` on float8_e4m3
operands with one scale per row of each operand (per token of the activations and gradients, per output channel of
the weight in the forward pass and per input channel in the backward pass), accumulating in fp32 and writing bf16:
torchao's "rowwise" float8 training recipe, applied to frozen weights that may be stored in 4-bit. The weight is
dequantized (bitsandbytes NF4) or read (bf16) in each pass, as bitsandbytes' own 4-bit matmul does, so eagerly
nothing of the size of the weights is kept between the two passes. Compiled, torch's partitioner keeps each weight's
fp8 transpose for the backward pass instead (one byte a weight: ~7 GB on a 7B model), because it may not recompute
bitsandbytes' dequantize op (BENCHMARKS.md, seventh GPU round).

Why not torchao's `Float8Linear`: it converts plain `nn.Linear` layers and trains their weights; the layers here are
bitsandbytes 4-bit (or frozen bf16) layers under peft's adapters, which it does not take. The adapters, the output
head, attention, norms and the loss stay in bf16/fp32; evaluation and generation (eval mode) run the wrapped layer's
own forward, in bf16.
"""

from __future__ import annotations

import torch

from mrtune.errors import first_line

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> (float8_e4m3 (R, C), fp32 (R, 1)): each row scaled so that its largest magnitude maps to e4m3's
    largest value; the second tensor is what multiplies a row back (1 / scale). An all-zero row keeps scale 1/eps."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    quantized = (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized, scale.reciprocal()


def fp8_matmul_nt(a: torch.Tensor, b: torch.Tensor, *, fast_accum: bool) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T in fp8, each operand scaled per row: bf16 (M, N)."""
    a8, a_scale = quantize_rows(a.contiguous())
    b8, b_scale = quantize_rows(b.contiguous())
    # _scaled_mm wants its second operand column-major: b8 is (N, K) row-major, so b8.t() is (K, N) column-major.
    return torch._scaled_mm(
        a8, b8.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=torch.bfloat16, use_fast_accum=fast_accum
    )


def dense_weight(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The (out, in) weight in its compute dtype: bitsandbytes 4-bit weights dequantized (as its own matmul does
    in each pass), others as they are."""
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.view(-1, 1), quant_state)


class FrozenFp8Matmul(torch.autograd.Function):
    """y = x @ W^T with a frozen W, both passes in fp8. The weight's gradient is never computed (W is frozen), and
    only the (4-bit or bf16) weight is kept for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, quant_state):  # x (M, K), weight (N, K) or packed 4-bit
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)
        # Hopper's fast accumulation for the output, as torchao's recipe: faster, its partial sums promoted to fp32
        # less often; the gradient (backward) accumulates in full.
        return fp8_matmul_nt(x, dense_weight(weight, quant_state), fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):  # (M, N)
        (weight,) = ctx.saved_tensors
        dense = dense_weight(weight, ctx.quant_state)
        # grad_x = grad @ W = grad @ (W^T)^T: W^T's rows are W's input channels, each scaled on its own.
        grad_x = fp8_matmul_nt(grad_output, dense.t(), fast_accum=False)
        return grad_x, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """A frozen linear layer (plain, or bitsandbytes 4-bit) whose training matmuls run in fp8.

    It holds the layer it replaces, so the layer's own forward serves eval mode (validation, sample generation),
    and `weight`/`bias` are that layer's. Only the adapters are trained and saved, so the extra `.linear` in the
    base's state-dict keys never reaches a saved file."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.linear(x)
        weight = self.linear.weight
        quant_state = getattr(weight, "quant_state", None)
        out = FrozenFp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, quant_state)
        if self.linear.bias is not None:
            out = out + self.linear.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def fp8_shapes_ok(linear: torch.nn.Linear) -> bool:
    """_scaled_mm needs both dimensions of the weight to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def use_fp8_for_frozen_linears(model) -> int:
    """Put every frozen linear layer inside the decoder layers (the base layers under peft's adapters, and layers
    not adapted at all) behind Fp8FrozenLinear, when _scaled_mm takes its sizes; the output head stays bf16 (the
    logits' precision is the loss's). Returns the count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                frozen = isinstance(child, torch.nn.Linear) and not child.weight.requires_grad
                if frozen and fp8_shapes_ok(child):
                    setattr(parent, name, Fp8FrozenLinear(child))
                    count += 1
    return count


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on `device`, or None: one tiny _scaled_mm of the kind training runs, tried."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (
            f"model.fp8_base=true needs fp8 tensor cores (compute capability 8.9+: L4, RTX 40, H100, H200), and "
            f"{name} has none: set model.fp8_base=false"
        )
    try:
        probe = torch.ones(16, 16, device=device)
        fp8_matmul_nt(probe, probe, fast_accum=False)
    except (RuntimeError, NotImplementedError) as error:
        first = first_line(error)[:160]
        return f"model.fp8_base=true: this PyTorch cannot run fp8 matmuls on {device.type} ({first}): set it false"
    return None


def resolve_fp8_base(
    setting: bool | str, device: torch.device, *, lora: bool, fsdp: bool, dora: bool
) -> tuple[bool, str]:
    """model.fp8_base as a bool, with the reason: `auto` is on where fp8 can run and help (LoRA on a CUDA GPU with
    fp8 tensor cores, not under FSDP, not DoRA); true and false stay as they are (true was checked already)."""
    if setting != "auto":
        return bool(setting), "as set"
    if device.type != "cuda":
        return False, "off (no CUDA GPU)"
    name = torch.cuda.get_device_name(device)
    if not lora:
        return False, "off (train.method=full trains the base weights)"
    if fsdp:
        return False, "off (not under FSDP)"
    if dora:
        return False, "off (not with DoRA)"
    if fp8_problem(device) is not None:
        return False, f"off ({name} cannot run fp8 matmuls)"
    return True, f"on ({name})"
