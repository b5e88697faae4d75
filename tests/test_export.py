"""`mrtune export` and the portable adapter directory: on a tiny Mistral run (fast) and on the real embedded model."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.export.command import export
from mrtune.export.gguf_export import permute_rows
from mrtune.export.grammars import CANONICAL_ATTRIBUTES, grammar
from mrtune.infer.predict import predict
from mrtune.run.rundir import RunDir
from mrtune.task.grammar import MRGrammar
from mrtune.task.mr import Vocabulary, parse_mr, value_items
from mrtune.task.prompts import build_prompt, template
from mrtune.train.recipe import train

DATA = Path(__file__).parents[1] / "src" / "mrtune" / "data"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> RunDir:
    from conftest import tiny_run_overrides, write_viggo_splits

    base = tmp_path_factory.mktemp("export-run")
    data = write_viggo_splits(base, (("train", 32), ("validation", 8), ("test", 4)))
    overrides = tiny_run_overrides(
        tiny_model_dir,
        data,
        "train.max_steps=4",
        "train.eval_every=2",
        "train.learning_rate=3e-2",
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        "eval.max_new_tokens=16",
    )
    return train(load_config(None, overrides), base / "run", progress=False)


# -- the portable adapter directory ---------------------------------------------------------------------------------


def test_adapter_directory_is_self_contained_readable_and_renders_the_training_prompt(tiny_run, tiny_model_dir):
    from transformers import AutoTokenizer

    adapter = tiny_run.adapter
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    for path in adapter.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    sentence = "  Is Portal 2 on Mac? "
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "ignored"}, {"role": "user", "content": sentence}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == build_prompt("compact", sentence)
    with_answer = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentence}, {"role": "assistant", "content": "verify_attribute(name[Portal 2])"}],
        tokenize=False,
    )
    assert with_answer == build_prompt("compact", sentence) + "verify_attribute(name[Portal 2])" + tokenizer.eos_token
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir.name
    card = (adapter / "README.md").read_text()
    assert "license: cc-by-sa-4.0" in card and "### Sentence:" in card and "mrtune predict" in card


def test_run_files_are_world_readable_and_name_no_path_of_the_training_machine(tiny_run, tiny_model_dir):
    # config.yaml (and the report, which quotes it) hold the model name as the user gave it, here a local
    # directory: that is the run's input, not something the run chose
    for path in tiny_run.path.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & stat.S_IROTH, path  # a server running as another user reads the run
        if path.is_file() and path.name not in ("config.yaml", "report.md") and path.suffix != ".png":
            text = path.read_bytes().decode("utf-8", errors="replace")
            assert str(tiny_model_dir) not in text and str(Path.home() / ".cache") not in text, path


def test_model_card_gains_the_test_metrics_after_evaluate(tiny_run, tmp_path):
    from mrtune.infer.evaluate import evaluate

    copy = RunDir(shutil.copytree(tiny_run.path, tmp_path / "run"))
    assert "Not evaluated yet" in (copy.adapter / "README.md").read_text()
    metrics = evaluate(copy.path, limit=4, constrained=True)
    card = (copy.adapter / "README.md").read_text()
    assert f"| exact_match | {100 * metrics['exact_match']:.1f}% |" in card
    assert stat.S_IMODE((copy.adapter / "README.md").stat().st_mode) == 0o644


def test_evaluate_rewrites_only_the_card_of_a_portable_adapter_and_makes_others_portable(tiny_run, tmp_path):
    """The card is the one file an evaluation changes: the others keep their inodes (not rewritten), and the card is
    the one a full make_portable writes. An adapter directory that is not portable (no tokenizer) is made so."""
    from mrtune.export.portable import make_portable
    from mrtune.infer.evaluate import evaluate

    copy = RunDir(shutil.copytree(tiny_run.path, tmp_path / "run"))

    def others() -> dict:
        return {p.name: (p.stat().st_ino, p.read_bytes()) for p in copy.adapter.iterdir() if p.name != "README.md"}

    before = others()
    evaluate(copy.path, limit=4, constrained=True, progress=False)
    assert others() == before
    card = (copy.adapter / "README.md").read_text()
    assert "| exact_match |" in card
    make_portable(copy)
    assert (copy.adapter / "README.md").read_text() == card

    (copy.adapter / "tokenizer.json").unlink()
    evaluate(copy.path, limit=4, constrained=True, progress=False)
    assert (copy.adapter / "tokenizer.json").read_bytes() == before["tokenizer.json"][1]


def test_a_copied_run_predicts_the_same(tiny_run, tmp_path):
    sentences = ["Is Portal 2 on Mac?", "I loved Tetris."]
    here = predict(tiny_run.path, sentences=sentences, constrained=True)
    elsewhere = shutil.copytree(tiny_run.path, tmp_path / "moved" / "another-name")
    assert predict(elsewhere, sentences=sentences, constrained=True) == here


# -- grammars -------------------------------------------------------------------------------------------------------


def _attributes(text: str) -> list[str]:
    return re.findall(r"([a-z_]+)\[", text)


def test_every_viggo_mr_lists_its_attributes_in_canonical_order():
    for split in ("train", "validation", "test"):
        for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            names = _attributes(json.loads(line)["meaning_representation"])
            assert names == sorted(names, key=CANONICAL_ATTRIBUTES.index), line


def _matcher(tmp_path):
    """An llguidance matcher factory on a small byte-level tokenizer (llguidance implements both formats)."""
    llguidance = pytest.importorskip("llguidance")
    from llguidance._grammar_from import grammar_from
    from llguidance.hf import from_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["inform(name[Portal 2], rating[good])"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")
    wrapped = from_tokenizer(fast)

    def accepts(fmt: str, grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(wrapped, grammar_from(fmt, grammar))
        assert not matcher.is_error(), matcher.get_error()
        ids = fast(text, add_special_tokens=False).input_ids
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    return accepts


def test_gbnf_and_lark_accept_every_test_mr_and_refuse_what_mrtune_refuses(tmp_path):
    from test_constrained import OUTSIDE_CLOSED_VALUES, WITHIN_CLOSED_VALUES

    accepts = _matcher(tmp_path)
    train = [json.loads(line)["meaning_representation"] for line in (DATA / "train.jsonl").read_text().splitlines()]
    references = [json.loads(line)["meaning_representation"] for line in (DATA / "test.jsonl").read_text().splitlines()]
    vocabulary = Vocabulary.from_mrs(train)
    assert vocabulary.closed_values  # the export states the closed values too
    bad = [
        "inform(name[A], name[B])",  # an attribute twice
        "inform()",
        "inform(name[A] )",
        "inform(name[ A])",
        "inform(name[A  B])",
        "chat(name[A])",  # not an act of the vocabulary
        "inform(colour[red])",
        "inform(name[A]",
        "inform(name[" + " ".join(["word"] * 13) + "])",  # values are bounded: 12 words of up to 32 characters
        "inform(name[" + "x" * 33 + "])",
    ]
    # Closed values as mrtune's automaton has them, with one narrowing: a list keeps training's item order (which
    # also keeps any item from coming twice), where mrtune takes its items in any order.
    automaton = MRGrammar(vocabulary)

    def in_training_order(mr: str) -> bool:
        for attribute, value in parse_mr(mr).slots:
            order = vocabulary.order_of(attribute)
            if order and value:
                ranks = [order.index(item) for item in value_items(value)]
                if ranks != sorted(set(ranks)):
                    return False
        return True

    shuffled = [mr for mr in WITHIN_CLOSED_VALUES if not in_training_order(mr)]
    assert shuffled and all(map(automaton.accepts, shuffled))  # e.g. platforms[Nintendo, ..., PlayStation, Xbox]
    for fmt in ("gbnf", "lark"):
        text = grammar(vocabulary, fmt)
        assert all(accepts(fmt, text, mr) for mr in references[::5]), fmt
        assert accepts(fmt, text, "inform(esrb[], name[x])") is False  # canonical order: name first
        assert accepts(fmt, text, " give_opinion(name[Élan 2], esrb[])")
        for mr in bad:
            assert not accepts(fmt, text, mr), (fmt, mr)
        for mr in WITHIN_CLOSED_VALUES:
            assert accepts(fmt, text, mr) is (mr not in shuffled), (fmt, mr)
        for mr in OUTSIDE_CLOSED_VALUES:  # repeated items included
            assert not accepts(fmt, text, mr), (fmt, mr)
        # eval.constrain_values=false: any value, as mrtune then allows
        free = grammar(vocabulary.without_values(), fmt)
        assert accepts(fmt, free, "inform(name[Tetris], rating[great], platforms[Steam])")


# -- bad input ------------------------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("status", ["running", "interrupted", "failed", "diverged"])
def test_unfinished_or_diverged_run_is_refused(tiny_run, tmp_path, capsys, status):
    copy = RunDir(shutil.copytree(tiny_run.path, tmp_path / "run"))
    copy.update_info(status=status)
    err = _error(capsys, ["export", str(copy.path), "--format", "gbnf", "--output", str(tmp_path / "g.gbnf")])
    assert ("diverged" if status == "diverged" else "not finished") in err
    assert not (tmp_path / "g.gbnf").exists()


def test_bad_format_quant_and_output_are_one_line_errors(tiny_run, tmp_path, capsys):
    run = str(tiny_run.path)
    out = tmp_path / "g.gbnf"
    assert "unknown export format" in _error(capsys, ["export", run, "--format", "onnx", "--output", str(out)])
    assert "unknown quantization" in _error(
        capsys, ["export", run, "--format", "gguf-lora", "--quant", "q4", "--output", str(out)]
    )
    assert "--quant applies" in _error(
        capsys, ["export", run, "--format", "gbnf", "--quant", "f16", "--output", str(out)]
    )
    missing = tmp_path / "nowhere" / "g.gbnf"
    assert "does not exist" in _error(capsys, ["export", run, "--format", "gbnf", "--output", str(missing)])
    out.write_text("keep me")
    assert "--overwrite" in _error(capsys, ["export", run, "--format", "gbnf", "--output", str(out)])
    assert out.read_text() == "keep me"
    assert main(["export", run, "--format", "gbnf", "--output", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("# ViGGO") and stat.S_IMODE(out.stat().st_mode) == 0o644
    assert "embedded model" in _error(capsys, ["export", run, "--format", "gguf", "--output", str(tmp_path / "m.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gbnf"]


def test_full_disk_mid_write_leaves_no_file(tiny_run, tmp_path, capsys, monkeypatch):
    import gguf

    written = []

    def tofile_then_full(self, *args, **kwargs):  # the first tensor's bytes go out, then the disk is full
        written.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", tofile_then_full)
    previous = tmp_path / "lora.gguf"
    previous.write_bytes(b"an older export")
    argv = ["export", str(tiny_run.path), "--format", "gguf-lora", "--output", str(previous), "--overwrite"]
    assert "disk" in _error(capsys, argv) and written
    assert previous.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.gguf"]


# -- GGUF -----------------------------------------------------------------------------------------------------------


def test_permutation_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads, kv_heads, name in ((3, 3, "blk.0.attn_q.weight"), (6, 3, "blk.0.attn_k.weight")):
        loader = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        assert np.array_equal(loader.process(permute_rows(weights, kv_heads), name).weights, weights)
        assert not np.array_equal(permute_rows(weights, kv_heads), weights)


def test_gguf_lora_holds_the_adapter_in_llama_cpp_layout(tiny_run, tmp_path, tiny_model_dir):
    import gguf
    from safetensors.numpy import load_file

    out = export(tiny_run.path, "gguf-lora", tmp_path / "lora.gguf", quant="f32")
    reader = gguf.GGUFReader(out)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)  # llama.cpp: scale = alpha / rank = 8 / 4
    tensors = {t.name: t.data.reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    saved = load_file(str(tiny_run.adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1."
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], saved[prefix + "self_attn.v_proj.lora_B.weight"])
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_a"], saved[prefix + "mlp.down_proj.lora_A.weight"])
    # q / k: rows in llama.cpp's order (tiny Mistral: 4 heads, 2 key/value heads)
    assert np.array_equal(
        tensors["blk.1.attn_q.weight.lora_b"], permute_rows(saved[prefix + "self_attn.q_proj.lora_B.weight"], 4)
    )
    assert np.array_equal(
        tensors["blk.1.attn_k.weight.lora_b"], permute_rows(saved[prefix + "self_attn.k_proj.lora_B.weight"], 2)
    )
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks


# -- the real embedded model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> RunDir:
    """A finished run of the embedded model whose adapter has random, non-zero B matrices (no training needed to
    check the arithmetic of the export)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mrtune.model.resolve import load_tokenizer, resolve_model_path

    path = tmp_path_factory.mktemp("embedded") / "run"
    path.mkdir()
    config = load_config(None, ["model.dtype=float32", "lora.r=8", "lora.alpha=16"])  # the adapter made below
    model_path = resolve_model_path(config.model.name)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    run = RunDir(path)
    peft_model.save_pretrained(run.adapter)
    load_tokenizer(config.model.name).save_pretrained(run.tokenizer)
    run.save_config(config)
    (run.path / "prompt.txt").write_text(template(config.data.prompt_style), encoding="utf-8")  # as train writes it
    references = [
        json.loads(line)["meaning_representation"] for line in (DATA / "train.jsonl").read_text().splitlines()
    ]
    run.vocabulary.write_text(json.dumps(Vocabulary.from_mrs(references).to_dict()))
    run.update_info(status="finished", model_path=model_path)
    from mrtune.export.portable import make_portable

    make_portable(run)
    return run


@pytest.mark.embedded
def test_embedded_adapter_names_its_base_portably(embedded_run):
    config = json.loads((embedded_run.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded:smollm2-135m-instruct"
    card = (embedded_run.adapter / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Q4_1" in card
    assert embedded_run.info()["model_path"] == "embedded:smollm2-135m-instruct"


@pytest.mark.embedded
def test_merged_gguf_is_the_merged_model_transformers_reads_back(embedded_run, tmp_path):
    """f32 export read back by transformers' GGUF loader (which un-permutes q/k) equals peft's merge of the same
    adapter on the same dequantized base."""
    import torch
    from transformers import AutoModelForCausalLM

    from mrtune.model.build import load_trained_model

    out = export(embedded_run.path, "gguf", tmp_path / "model.gguf", quant="f32")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    merged = load_trained_model(embedded_run.config().model, embedded_run.adapter, torch.device("cpu"))
    ours, theirs = exported.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    reader_fields = {f.name: f.contents() for f in __import__("gguf").GGUFReader(out).fields.values()}
    assert reader_fields["tokenizer.chat_template"].startswith("{%- for message in messages")
    assert reader_fields["mrtune.prompt_template"] == "### Sentence:\n{sentence}\n### Meaning representation:\n"
    assert reader_fields["tokenizer.ggml.model"] == "gpt2" and len(reader_fields["tokenizer.ggml.tokens"]) == 49152
    assert os.stat(out).st_mode & 0o777 == 0o644


@pytest.mark.embedded
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_quantized_exports_are_close_and_smaller(embedded_run, tmp_path, quant):
    import gguf

    out = export(embedded_run.path, "gguf", tmp_path / f"model-{quant}.gguf", quant=quant)
    reader = gguf.GGUFReader(out)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type.name == quant.upper()
    assert out.stat().st_size < (170e6 if quant == "q8_0" else 280e6)
