"""GGUF files for llama.cpp (and Ollama, LM Studio): the merged model, or the LoRA adapter alone.

Written with the `gguf` library (llama.cpp's own Python package: reader, writer, quantizers, tensor-name maps)
rather than by calling llama.cpp's `convert_hf_to_gguf.py`, which is not on PyPI and would need a llama.cpp
checkout. For the embedded model the merged file starts from the very Q4_1 GGUF the run was trained on: its
metadata (architecture, tokenizer, special tokens) is copied, every tensor is dequantized exactly as transformers
did for training, the LoRA delta is added, and the result is written as f32, f16 or Q8_0. Only the chat template is
replaced, by the run's prompt template (see portable.prompt_chat_template).

Orientation. llama.cpp stores the rows of attn_q / attn_k permuted (rotary pairs interleaved, as Meta's original
checkpoints); transformers' GGUF loader un-permutes them and llama.cpp's converters permute HF weights back. A LoRA
delta B @ A computed on HF weights must therefore be permuted the same way before it is added to a GGUF attn_q /
attn_k, and in a LoRA GGUF the permutation goes on lora_b, whose rows are the output rows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from mrtune.config import EMBEDDED_MODEL, Config
from mrtune.errors import MrtuneError
from mrtune.export.portable import EMBEDDED_HUB_ID, base_model_reference, prompt_chat_template
from mrtune.task.prompts import template

QUANTS = ("f16", "q8_0", "f32")
# llama.cpp converts Mistral (and Llama 2/3) checkpoints under the "llama" architecture.
LLAMA_MODEL_TYPES = ("llama", "mistral")


def _qtype(quant: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        quant, gguf.GGMLQuantizationType.Q8_0
    )


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a q/k projection (its `LlamaModel.permute`): per head, the two rotary halves
    interleaved. `weights` is (out_features, ...) in HF order; `heads` is the head count of that projection."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


class LoraWeights:
    """A run's LoRA adapter as llama.cpp names it: {gguf tensor name: (A (r, in), B (out, r))} in float32 numpy,
    B permuted for attn_q / attn_k, and the scale (alpha / r, or alpha / sqrt(r) for rsLoRA) the deltas take. A run
    of train.method=full saves whole modules instead (peft's `modules_to_save`): `whole` holds those trained weights,
    {gguf tensor name: weights}, in llama.cpp's row order too."""

    def __init__(self, adapter_dir: Path, heads: int, kv_heads: int, blocks: int):
        import gguf
        from safetensors.numpy import load_file

        settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        if settings.get("use_dora"):
            raise MrtuneError("the adapter uses DoRA: GGUF export supports plain LoRA and full fine-tuning only")
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
        self.pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scales: dict[str, float] = {}
        self.whole: dict[str, np.ndarray] = {}
        for key, tensor in tensors.items():
            if ".lora_" not in key:  # a module saved whole
                name = _gguf_name(names, re.sub(r"^base_model\.model\.", "", key))
                self.whole[name] = _llama_cpp_rows(tensor.astype(np.float32), name, heads, kv_heads)
            if ".lora_A." not in key:
                continue
            module = re.sub(r"^base_model\.model\.", "", key.split(".lora_A.")[0])
            name = _gguf_name(names, module + ".weight")
            lora_b = _llama_cpp_rows(
                tensors[key.replace(".lora_A.", ".lora_B.")].astype(np.float32), name, heads, kv_heads
            )
            rank = tensor.shape[0]
            alpha = _pattern_value(settings.get("alpha_pattern") or {}, module, settings["lora_alpha"])
            self.scales[name] = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
            self.pairs[name] = (tensor.astype(np.float32), lora_b)

    def delta(self, name: str) -> np.ndarray | None:
        """scale * B @ A for tensor `name` (out, in), or None when the adapter leaves it alone."""
        if name not in self.pairs:
            return None
        lora_a, lora_b = self.pairs[name]
        return self.scales[name] * (lora_b @ lora_a)

    def alpha(self) -> float:
        """`adapter.lora.alpha`: llama.cpp scales every delta by alpha / rank (rank = lora_b's columns)."""
        alphas = {round(self.scales[n] * self.pairs[n][0].shape[0], 6) for n in self.pairs}
        if len(alphas) != 1:
            raise MrtuneError("the adapter's layers have different scales: a llama.cpp LoRA has one alpha")
        return alphas.pop()


def _gguf_name(names, weight: str) -> str:
    """llama.cpp's name of a transformers weight (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    name = names.get_name(weight, try_suffixes=(".weight",))
    if name is None:
        raise MrtuneError(f"the adapter trains {weight}, which has no llama.cpp tensor: export is not possible")
    return name


def _llama_cpp_rows(weights: np.ndarray, name: str, heads: int, kv_heads: int) -> np.ndarray:
    """`weights` (out, ...) in llama.cpp's row order: attn_q / attn_k rows permuted (see the module docstring)."""
    if ".attn_q." in name or ".attn_k." in name:
        return permute_rows(weights, heads if ".attn_q." in name else kv_heads)
    return weights


def _pattern_value(pattern: dict, module: str, default):
    """peft's per-module override: the value of the first key that names `module` or a suffix of it."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _copy_metadata(reader, writer, skip: set[str]) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _mrtune_metadata(writer, run_name: str, config: Config) -> None:
    writer.add_string("mrtune.run", run_name)
    writer.add_string("mrtune.base_model", base_model_reference(config.model.name))
    writer.add_string("mrtune.prompt_template", template(config.data.prompt_style))


def _embedded_reader():
    import gguf

    from mrtune.model.resolve import find_embedded_gguf

    return gguf.GGUFReader(find_embedded_gguf())


def _shape(reader) -> tuple[int, int, int]:
    """(attention heads, key/value heads, blocks) of a llama-architecture GGUF."""
    values = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("llama.")}
    return values["llama.attention.head_count"], values["llama.attention.head_count_kv"], values["llama.block_count"]


def _require_embedded(config: Config, fmt: str) -> None:
    if config.model.name != EMBEDDED_MODEL:
        raise MrtuneError(
            f"--format {fmt} writes runs of the embedded model {EMBEDDED_MODEL} (the base GGUF is at hand); for "
            f"{config.model.name!r} run `mrtune merge RUN --output DIR` and llama.cpp's convert_hf_to_gguf.py DIR"
        )


def write_merged_gguf(run_name: str, config: Config, adapter_dir: Path, output: Path, quant: str) -> None:
    """The embedded base with the run's adapter merged, as one GGUF at `output` (any path; the caller renames)."""
    import gguf

    _require_embedded(config, "gguf")
    reader = _embedded_reader()
    heads, kv_heads, blocks = _shape(reader)
    lora = LoraWeights(adapter_dir, heads, kv_heads, blocks)
    writer = gguf.GGUFWriter(str(output), "llama")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        quant, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "tokenizer.chat_template"}
    _copy_metadata(reader, writer, skip)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_chat_template(prompt_chat_template(config.data.prompt_style))
    writer.add_string("general.base_model.0.repo_url", f"https://huggingface.co/{EMBEDDED_HUB_ID}")
    _mrtune_metadata(writer, run_name, config)
    qtype = _qtype(quant)
    present = {t.name for t in reader.tensors}
    head, embeddings = lora.whole.get("output.weight"), lora.whole.get("token_embd.weight")
    if "output.weight" not in present and head is not None and np.array_equal(head, embeddings):
        del lora.whole["output.weight"]  # a tied head (SmolLM2's): llama.cpp reuses token_embd, which is saved
    for tensor in reader.tensors:
        # (rows, columns) = (out, in) in numpy order; dequantized to float32 as transformers did for training
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
        weights = lora.whole.get(tensor.name, weights)  # train.method=full: the trained weight itself
        delta = lora.delta(tensor.name)
        if delta is not None:
            weights = weights + delta
        target = qtype if weights.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp's
        writer.add_tensor(tensor.name, gguf.quants.quantize(weights.astype(np.float32), target), raw_dtype=target)
    missing = (set(lora.pairs) | set(lora.whole)) - present
    if missing:
        raise MrtuneError(f"the adapter adapts tensors the base GGUF lacks ({', '.join(sorted(missing))})")
    _write(writer)


def _hub_shape(config: Config) -> tuple[int, int, int]:
    from transformers import AutoConfig

    from mrtune.model.resolve import resolve_model_path

    hf = AutoConfig.from_pretrained(resolve_model_path(config.model.name))
    if hf.model_type not in LLAMA_MODEL_TYPES:
        raise MrtuneError(
            f"--format gguf-lora supports llama and mistral models, not {hf.model_type!r}: use llama.cpp's "
            "convert_lora_to_gguf.py"
        )
    heads = hf.num_attention_heads
    return heads, getattr(hf, "num_key_value_heads", None) or heads, hf.num_hidden_layers


def write_lora_gguf(run_name: str, config: Config, adapter_dir: Path, output: Path, quant: str) -> None:
    """The run's adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf --lora FILE`)."""
    import gguf

    if config.model.name == EMBEDDED_MODEL:
        reader = _embedded_reader()
        heads, kv_heads, blocks = _shape(reader)
    else:
        reader = None
        heads, kv_heads, blocks = _hub_shape(config)
    if quant == "q8_0":
        raise MrtuneError("--format gguf-lora writes f16 or f32 (lora_b's rank columns do not fill Q8_0 blocks)")
    lora = LoraWeights(adapter_dir, heads, kv_heads, blocks)
    if lora.whole:
        raise MrtuneError(
            "the run trained whole modules (train.method=full), which a llama.cpp LoRA file cannot hold: export "
            "--format gguf (the merged model) instead"
        )
    writer = gguf.GGUFWriter(str(output), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha())
    if reader is not None:
        writer.add_string("general.base_model.0.repo_url", f"https://huggingface.co/{EMBEDDED_HUB_ID}")
    _mrtune_metadata(writer, run_name, config)
    qtype = _qtype(quant)
    for name, (lora_a, lora_b) in lora.pairs.items():
        writer.add_tensor(f"{name}.lora_a", gguf.quants.quantize(lora_a, qtype), raw_dtype=qtype)
        writer.add_tensor(f"{name}.lora_b", gguf.quants.quantize(lora_b, qtype), raw_dtype=qtype)
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
