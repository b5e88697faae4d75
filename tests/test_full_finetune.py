"""train.method=full: every base weight trains in fp32, and the run's adapter/ (a peft adapter of whole modules)
evaluates, predicts, merges and resumes like a LoRA run's. On the tiny Mistral with tied embeddings, as SmolLM2's."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal

import pytest
import torch
from conftest import tiny_run_overrides, write_viggo_splits
from safetensors.torch import load_file

from mrtune.config import ModelSettings, load_config
from mrtune.errors import MrtuneError
from mrtune.model.build import attach_full
from mrtune.run.rundir import RunDir

FULL_SETTINGS = [
    "train.method=full",
    "lora.dropout=0.0",
    "train.max_steps=8",
    "train.eval_every=4",
    "train.log_every=1",
    "train.learning_rate=1e-2",
    "train.warmup_ratio=0.0",
    "train.checkpoint_every=100",
    "eval.batch_size=4",
    "eval.max_new_tokens=24",
]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Mistral with its output head tied to the input embeddings (as SmolLM2's), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tied") / "model"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def full_overrides(tmp_path_factory, tied_model_dir):
    data = write_viggo_splits(tmp_path_factory.mktemp("data"), (("train", 48), ("validation", 8), ("test", 6)))
    return tiny_run_overrides(tied_model_dir, data, *FULL_SETTINGS)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, full_overrides):
    from mrtune.train.recipe import train

    config = load_config(None, full_overrides)
    return train(config, tmp_path_factory.mktemp("full") / "run", progress=False), config


def base_weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_every_base_weight_trains_in_fp32_and_the_loss_falls(full_run, tied_model_dir):
    run, _ = full_run
    before = base_weights(tied_model_dir)
    saved = load_file(run.adapter / "adapter_model.safetensors")
    trained = {key.removeprefix("base_model.model."): tensor for key, tensor in saved.items()}
    assert set(trained) == set(before)  # every weight of the model, the tied head under its own name too
    for name, tensor in trained.items():
        assert tensor.dtype == torch.float32, name
        assert not torch.allclose(tensor, before[name]), f"{name} did not change"
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # still tied
    info = run.info()
    unique = sum(t.numel() for name, t in before.items() if name != "lm_head.weight")
    assert info["trainable_parameters"] == info["total_parameters"] == unique
    history = run.read_history()
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0]
    validation = [r["validation_loss"] for r in history if "validation_loss" in r]
    assert len(validation) == 2 and validation[1] < validation[0]
    adapter_config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == "dummy-target-modules" and adapter_config["modules_to_save"]
    assert "full fine-tuning (every weight, fp32 master weights)" in (run.adapter / "README.md").read_text()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_master_weights_are_fp32_once_and_the_compute_stays_bf16(tied, tied_model_dir, tiny_model_dir):
    """A bf16 base: every parameter trainable in fp32, each stored once (peft's originals share the copies'
    storage), and the training's autocast dtype still bf16, the dtype the base was loaded in."""
    from transformers import AutoModelForCausalLM

    from mrtune.train.recipe import compute_dtype

    base = AutoModelForCausalLM.from_pretrained(tied_model_dir if tied else tiny_model_dir, dtype=torch.bfloat16)
    weights = sum(p.numel() for p in base.parameters())
    model = attach_full(base, ModelSettings(dtype="bfloat16"))
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in parameters)
    assert sum(p.numel() for p in trainable) == weights
    assert {p.data_ptr() for p in parameters} == {p.data_ptr() for p in trainable}
    assert compute_dtype(model) == torch.bfloat16
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embeddings.weight) == tied


def test_a_full_run_evaluates_predicts_and_merges_like_a_lora_run(full_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mrtune.infer.evaluate import evaluate
    from mrtune.infer.merge import merge
    from mrtune.infer.predict import predict
    from mrtune.model.build import load_base_model

    run, config = full_run
    assert evaluate(run.path, progress=False)["n"] == 6
    output = str(tmp_path / "predictions.jsonl")
    outputs = predict(run.path, input_file=str(config.data.test), output_file=output, progress=False)
    assert len(outputs) == 6 and len(predict(run.path, sentences=["Is Portal 2 fun?"], progress=False)) == 1

    merged_dir = merge(run.path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    trained = PeftModel.from_pretrained(load_base_model(config.model, torch.device("cpu")), str(run.adapter)).eval()
    base = load_base_model(config.model, torch.device("cpu")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, trained(ids).logits)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)


def test_a_stopped_full_run_resumes_to_the_uninterrupted_result(full_run, full_overrides, tmp_path, monkeypatch):
    from mrtune.errors import TrainingInterrupted
    from mrtune.train.checkpoint import StopSignals
    from mrtune.train.recipe import train

    reference, config = full_run
    asked = {"calls": 0}

    def sigterm_before_step_4(self, accelerator):
        asked["calls"] += 1
        return signal.SIGTERM if asked["calls"] == 4 else None

    monkeypatch.setattr(StopSignals, "requested", sigterm_before_step_4)
    run = RunDir(tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        train(config, run.path, progress=False)
    assert json.loads((run.checkpoint / "state.json").read_text())["step"] == 3
    monkeypatch.undo()
    train(run.config(), run.path, progress=False, resume=True)
    expected, actual = (load_file(r.adapter / "adapter_model.safetensors") for r in (reference, run))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert [r.get("train_loss") for r in run.read_history()] == [r.get("train_loss") for r in reference.read_history()]


def test_a_full_run_takes_checkpointing_and_a_moving_average(full_overrides, tied_model_dir, tmp_path):
    """Neither is LoRA's alone: checkpointing recomputes the decoder layers, the moving average lives beside each
    trainable tensor in AdamW's state, whatever the tensor."""
    from mrtune.train.recipe import train

    settings = ["model.gradient_checkpointing=true", "train.ema_decay=0.9", "train.max_steps=2", "train.eval_every=2"]
    run = train(load_config(None, [*full_overrides, *settings]), tmp_path / "run", progress=False)
    assert run.info()["status"] == "finished"
    before = base_weights(tied_model_dir)
    saved = load_file(run.adapter / "adapter_model.safetensors")
    assert all(not torch.allclose(t, before[k.removeprefix("base_model.model.")]) for k, t in saved.items())


@pytest.mark.parametrize(
    "setting",
    [
        "model.quantization=nf4",
        "lora.init=pissa",
        "lora.init=olora",
        "lora.dora=true",
        "lora.rslora=true",
        "lora.top_layers=1",
        "train.loraplus_ratio=16",
    ],
)
def test_settings_a_full_run_cannot_honour_are_refused_in_one_line(setting):
    with pytest.raises(MrtuneError) as error:
        load_config(None, ["train.method=full", setting])
    message = str(error.value)
    assert "\n" not in message and "train.method=full" in message
    assert (setting if setting != "model.quantization=nf4" else "model.quantization=none") in message
    load_config(None, [setting])  # fine for a LoRA run


def test_full_fine_tuning_is_refused_under_fsdp(tmp_path, full_overrides):
    from mrtune.train.recipe import Recipe

    recipe = Recipe(load_config(None, full_overrides), tmp_path / "run", failure=None, stop=None, progress=False)
    recipe.fsdp = True
    with pytest.raises(MrtuneError, match="train.method=full is not available under FSDP"):
        recipe._check_settings(resume=False)


def test_an_adapter_that_does_not_match_the_runs_method_is_named_as_damage(full_run, tmp_path):
    from mrtune.infer.evaluate import evaluate

    run = RunDir(shutil.copytree(full_run[0].path, tmp_path / "run"))
    adapter_config = run.adapter / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**settings, "modules_to_save": None}))
    with pytest.raises(MrtuneError, match="run damaged: .*adapter_config.json: saves no whole modules"):
        evaluate(run.path, progress=False)


@pytest.mark.embedded
def test_a_full_runs_merged_gguf_is_its_merged_model(tmp_path):
    """The embedded SmolLM2 with every weight moved (no training needed to check the export's arithmetic): the f32
    GGUF read back by transformers (which un-permutes q/k) equals the run's merged model; a LoRA GGUF is refused."""
    from transformers import AutoModelForCausalLM

    from mrtune.export.command import export
    from mrtune.export.portable import make_portable
    from mrtune.model.build import load_trained_model
    from mrtune.model.resolve import load_tokenizer, resolve_model_path
    from mrtune.task.mr import Vocabulary
    from mrtune.task.prompts import template

    config = load_config(None, ["train.method=full", "model.dtype=float32"])
    model_path = resolve_model_path(config.model.name)
    model = attach_full(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), config.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter), alpha=0.01)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    model.save_pretrained(run.adapter, save_embedding_layers=False)
    load_tokenizer(config.model.name).save_pretrained(run.tokenizer)
    run.save_config(config)
    (run.path / "prompt.txt").write_text(template(config.data.prompt_style), encoding="utf-8")
    run.vocabulary.write_text(json.dumps(Vocabulary.from_mrs(["inform(name[Portal 2])"]).to_dict()))
    run.update_info(status="finished", model_path=model_path)
    make_portable(run)

    out = export(run.path, "gguf", tmp_path / "model.gguf", quant="f32")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    merged = load_trained_model(config.model, run.adapter, torch.device("cpu"))
    ours, theirs = exported.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    with pytest.raises(MrtuneError, match="train.method=full.*--format gguf"):
        export(run.path, "gguf-lora", tmp_path / "lora.gguf")


@pytest.mark.slow  # a 2-process run (~30 s) and a 1-process one
def test_ddp_trains_a_full_run_as_one_process_does(tmp_path, full_overrides):
    """DDP on 2 CPU processes x gradient_accumulation 2 takes the same steps as 1 process x 4: the frozen originals
    that share the trainable copies' storage neither get gradients nor break DDP's broadcast of the weights."""
    from test_distributed import _train_in_two_processes

    from mrtune.train.recipe import train

    settings = [*full_overrides, "train.batch_size=2", "train.max_steps=3", "train.eval_every=3"]
    (tmp_path / "two").mkdir()
    two, _, _, _ = _train_in_two_processes(settings, tmp_path / "two")
    one = train(load_config(None, [*settings, "train.gradient_accumulation=4"]), tmp_path / "one", progress=False)
    losses = [[r["train_loss"] for r in run.read_history() if "train_loss" in r] for run in (two, one)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    weights_two, weights_one = (load_file(run.adapter / "adapter_model.safetensors") for run in (two, one))
    assert weights_two.keys() == weights_one.keys()
    for name, tensor in weights_two.items():  # Adam's step magnifies summation-order noise where gradients are ~0
        assert torch.allclose(tensor, weights_one[name], rtol=1e-4, atol=1e-5), name


def test_a_full_run_decodes_in_the_dtype_its_base_loads_in(full_run):
    """The adapter holds fp32 master weights; merged into a base loaded in half precision, the model must be all
    half precision (a mix fails in the first matmul or cache write on a GPU). peft loads the saved copies into
    modules cloned from the base, so they take its dtype."""
    from mrtune.model.build import load_trained_model

    run, config = full_run
    settings = dataclasses.replace(config.model, dtype="float16")
    model = load_trained_model(settings, run.adapter, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_a_full_runs_sample_between_steps_uses_a_cache_of_the_keys_dtype(full_overrides, tmp_path, monkeypatch):
    """A static cache takes the weights' dtype (fp32 master weights) while autocast writes bf16 keys into it: the
    sample shown between steps must ask for a dynamic cache (on a CPU, `auto` is dynamic anyway)."""
    import mrtune.train.recipe as recipe

    asked = []
    real = recipe.generate

    def spy(*args, **kwargs):
        asked.append(kwargs.get("kv_cache", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "generate", spy)
    config = load_config(None, [*full_overrides, "train.max_steps=2", "train.eval_every=2"])
    recipe.train(config, tmp_path / "run", progress=False)
    assert asked and set(asked) == {"dynamic"}


def test_full_runs_average_into_the_mean_of_their_weights(full_run, full_overrides, tmp_path):
    """`mrtune average` of full fine-tuning runs: the new run's whole modules are the members' mean, and it loads."""
    from mrtune.infer.average import average
    from mrtune.infer.predict import load_run_model
    from mrtune.train.recipe import train

    first, config = full_run
    second = train(load_config(None, [*full_overrides, "train.seed=1"]), tmp_path / "seed1", progress=False)
    soup = average([first.path, second.path], tmp_path / "soup")
    assert soup.config() == config and soup.info()["averaged_from"] == [str(first.path), str(second.path)]

    def weights(run):
        return load_run_model(run, run.config().model, run.require_adapter(run.config())).state_dict()

    a, b, mean = weights(first), weights(second), weights(soup)
    assert any(not torch.equal(a[name], b[name]) for name in a), "the two runs are equal: nothing is tested"
    for name, tensor in mean.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, msg=name)
