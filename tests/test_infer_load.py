"""Loading a run's model for evaluate/predict/serve: the fast paths compute exactly what the plain ones do."""

from __future__ import annotations

import pytest
import torch

from mrtune.config import ModelSettings
from mrtune.model.build import load_trained_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=["linears", "linears+lm_head"])
def tied_model_with_adapter(request, tmp_path_factory, tiny_model_dir):
    """The tiny Mistral with tied input and output embeddings (as SmolLM2's), and a random LoRA adapter on every
    linear layer of the decoder, and with the second param on the tied output head too (peft's merge then moves the
    input embeddings with it): B is random too, so every adapted weight moves when merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path_factory.mktemp("tied")
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base / "model")
    model = AutoModelForCausalLM.from_pretrained(base / "model", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / "model" / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.manual_seed(1)
    head = request.param.endswith("lm_head")
    targets = LINEARS + (["lm_head"] if head else [])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(base / "adapter")
    return base / "model", base / "adapter", head


def test_merged_model_equals_peft_merge_on_weights_in_memory(tied_model_with_adapter):
    """load_trained_model's merge (into weights copied out of the mmapped checkpoint first) gives bit for bit the
    weights of peft's merge into a base read wholly into memory, and ties the embeddings exactly when it does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir, head_adapted = tied_model_with_adapter
    settings = ModelSettings(name=str(model_dir), dtype="float32")
    merged = load_trained_model(settings, adapter_dir, torch.device("cpu"))

    reference_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, disable_mmap=True)
    reference = PeftModel.from_pretrained(reference_base, str(adapter_dir)).merge_and_unload()

    def tied(model) -> bool:
        return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    assert tied(merged) == tied(reference) == (merged.lm_head.weight is merged.model.embed_tokens.weight)

    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[query], plain[query])
    assert torch.equal(ours["lm_head.weight"], plain["lm_head.weight"]) != head_adapted
