"""fp8 matmuls for the frozen base weights (model.fp8_base): values and gradients against the reference paths, on
CPU here and on CUDA where there is one (bitsandbytes 4-bit weights too)."""

import pytest
import torch

from mrtune.config import load_config
from mrtune.errors import MrtuneError
from mrtune.model.build import attach_lora, load_base_model
from mrtune.model.fp8 import E4M3, Fp8FrozenLinear, FrozenFp8Matmul, fp8_problem, quantize_rows

# torch 2.13 runs row-scaled fp8 matmuls on CPU; older CPU builds (the GPU image's 2.11) only per-tensor ones.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(bool(fp8_problem(torch.device("cpu"))), reason="no CPU fp8 here")),
    *(["cuda"] if torch.cuda.is_available() else []),
]
CPU_FP8 = pytest.mark.skipif(bool(fp8_problem(torch.device("cpu"))), reason="this torch has no row-scaled CPU fp8")


def emulated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T from the same fp8 values and scales in fp32: what the fp8 GEMM must compute, up to bf16 rounding."""
    (a8, a_scale), (b8, b_scale) = quantize_rows(a), quantize_rows(b)
    return (a8.float() * a_scale) @ (b8.float() * b_scale).t()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


def test_rows_quantize_to_e4m3_with_one_scale_each():
    rows = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 2e-3, -3e-3, 0.0]])
    quantized, scale = quantize_rows(rows)
    assert quantized.dtype == E4M3 and scale.shape == (3, 1)
    assert quantized.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]  # each row's largest hits e4m3's max
    assert torch.allclose(quantized.float() * scale, rows, rtol=0.07)  # 3 mantissa bits: within 2^-4


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_matmul_matches_its_emulation_and_approximates_the_exact_product(device):
    torch.manual_seed(0)
    x = (torch.randn(40, 128) * torch.linspace(0.1, 10, 40)[:, None]).to(device).requires_grad_()  # rows of all sizes
    weight = (torch.randn(96, 128) * 0.05).to(device)
    out = FrozenFp8Matmul.apply(x, weight, None)
    assert out.dtype == torch.bfloat16 and out.shape == (40, 96)
    assert torch.allclose(out.float(), emulated(x.detach(), weight), rtol=1e-2, atol=1e-2)
    assert relative_error(out, x.detach() @ weight.t()) < 0.06  # fp8's rounding, not a wrong product
    grad = torch.randn(40, 96, device=device, dtype=torch.bfloat16)  # a bf16 output's gradient is bf16
    out.backward(grad)
    # grad_x = grad @ W: the weight scaled per input channel this time (W^T's rows)
    assert torch.allclose(x.grad, emulated(grad.float(), weight.t().contiguous()), rtol=1e-2, atol=1e-2)
    assert relative_error(x.grad, grad.float() @ weight) < 0.06


def tiny_lora(model_dir, *settings):
    config = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=4", *settings])
    torch.manual_seed(0)
    model = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give the adapters a say
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    return model


@CPU_FP8
def test_fp8_wraps_every_frozen_decoder_linear_and_only_in_training(tiny_model_dir):
    reference = tiny_lora(tiny_model_dir, "lora.dropout=0.0")
    model = tiny_lora(tiny_model_dir, "lora.dropout=0.0", "model.fp8_base=true")
    wrapped = [name for name, module in model.named_modules() if isinstance(module, Fp8FrozenLinear)]
    assert len(wrapped) == 2 * 7 and all(name.endswith(".base_layer") for name in wrapped)  # 7 linears, 2 layers
    assert not isinstance(model.get_output_embeddings(), Fp8FrozenLinear)  # the logits stay full precision
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n, p in reference.named_parameters() if p.requires_grad
    )
    ids = torch.randint(0, 500, (2, 24))
    losses = []
    for each in (reference, model):
        loss = each(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] != losses[0] and abs(losses[1] - losses[0]) < 0.02 * losses[0]  # fp8 ran, and is close
    grads = {n: p.grad.flatten() for n, p in reference.named_parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():  # fp8 errors add up through the layers, the directions hold
        if parameter.requires_grad:
            assert torch.cosine_similarity(parameter.grad.flatten(), grads[name], dim=0) > 0.97, name
    model.eval()
    reference.eval()
    with torch.no_grad():  # eval mode: the wrapped layers' own forward, the same values as without fp8
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@CPU_FP8
@pytest.mark.slow
def test_compiled_fp8_layers_match_eager_fp8(tiny_model_dir):
    """Dynamo traces the fp8 autograd function inside each compiled decoder layer, with the same values."""
    eager = tiny_lora(tiny_model_dir, "lora.dropout=0.0", "model.fp8_base=true")
    compiled = tiny_lora(tiny_model_dir, "lora.dropout=0.0", "model.fp8_base=true", "model.compile_layers=true")
    ids = torch.randint(0, 500, (2, 24))
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-3)
    grads = {n: p.grad.flatten() for n, p in eager.named_parameters() if p.requires_grad}
    for name, parameter in compiled.named_parameters():
        if parameter.requires_grad:
            assert torch.cosine_similarity(parameter.grad.flatten(), grads[name], dim=0) > 0.99, name
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.modules()) == 2


@CPU_FP8
def test_an_fp8_run_trains_and_its_loss_falls(tmp_path, tiny_overrides):
    from mrtune.train.recipe import train

    run = train(load_config(None, [*tiny_overrides, "model.fp8_base=true"]), tmp_path / "run", progress=False)
    losses = [r["train_loss"] for r in run.read_history() if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "fp8_base: true" in run.config_file.read_text()
    assert "its matmuls in fp8 while training" in (run.adapter / "README.md").read_text()  # the model card says so


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.method=full"], "train.method=full freezes none"),
        (["lora.dora=true"], "DoRA"),
    ],
)
def test_fp8_with_settings_it_cannot_serve_is_refused_in_one_line(overrides, named):
    with pytest.raises(MrtuneError, match=named) as refused:
        load_config(None, ["model.fp8_base=true", *overrides])
    assert "\n" not in str(refused.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit weights need CUDA")
def test_fp8_of_4bit_weights_matches_bitsandbytes_matmul():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(512, 256) * 0.05})
    linear = linear.cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = linear(x)
    (grad_reference,) = torch.autograd.grad(reference, x, torch.ones_like(reference))
    wrapped = Fp8FrozenLinear(linear).train()
    out = wrapped(x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert out.dtype == torch.bfloat16 and relative_error(out, reference.float()) < 0.06
    assert relative_error(grad, grad_reference.float()) < 0.06


def test_auto_turns_fp8_on_only_where_it_can_run(monkeypatch):
    from mrtune.model import fp8

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp8.resolve_fp8_base("auto", cpu, lora=True, fsdp=False, dora=False) == (False, "off (no CUDA GPU)")
    assert fp8.resolve_fp8_base(True, cpu, lora=True, fsdp=False, dora=False) == (True, "as set")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(fp8, "fp8_problem", lambda device: None)
    assert fp8.resolve_fp8_base("auto", cuda, lora=True, fsdp=False, dora=False) == (True, "on (NVIDIA H200)")
    for blocked, why in (({"lora": False}, "train.method=full"), ({"fsdp": True}, "FSDP"), ({"dora": True}, "DoRA")):
        on, said = fp8.resolve_fp8_base("auto", cuda, **{"lora": True, "fsdp": False, "dora": False, **blocked})
        assert not on and why in said
    monkeypatch.setattr(fp8, "fp8_problem", lambda device: "no fp8 tensor cores")
    assert fp8.resolve_fp8_base("auto", cuda, lora=True, fsdp=False, dora=False) == (
        False,
        "off (NVIDIA H200 cannot run fp8 matmuls)",
    )


def test_a_run_records_what_auto_chose(tmp_path, tiny_overrides, capsys):
    from mrtune.train.recipe import train

    config = load_config(None, [*tiny_overrides, "model.fp8_base=auto", "train.max_steps=1"])
    run = train(config, tmp_path / "run", progress=False)
    assert "fp8_base: false" in run.config_file.read_text()  # this CPU: off, and config.yaml says what ran
    assert "model.fp8_base=auto: fp8 base matmuls off (no CUDA GPU)" in capsys.readouterr().out
    assert config.model.fp8_base == "auto"  # the caller's config is left as given


def test_attaching_adapters_refuses_an_unresolved_auto(tiny_model_dir):
    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32", "model.fp8_base=auto"])
    with pytest.raises(ValueError, match="resolved"):
        attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)


def test_fp8_on_a_torch_that_cannot_is_refused_in_one_line_before_anything_is_written(
    tmp_path, tiny_overrides, monkeypatch
):
    from mrtune.model.fp8 import fp8_problem
    from mrtune.train.recipe import train

    def no_fp8(*args, **kwargs):
        raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.\n(a second line)")

    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)  # the GPU image's torch 2.11 on CPU
    assert fp8_problem(torch.device("cpu")) == (
        "model.fp8_base=true: this PyTorch cannot run fp8 matmuls on cpu (Now _scaled_mm only supports per-tensor "
        "scaling for CPU backend.): set it false"
    )
    with pytest.raises(MrtuneError, match="cannot run fp8 matmuls") as refused:
        train(load_config(None, [*tiny_overrides, "model.fp8_base=true"]), tmp_path / "run", progress=False)
    assert "\n" not in str(refused.value) and not (tmp_path / "run").exists()
