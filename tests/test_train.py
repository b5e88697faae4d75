"""Integration tests on a tiny random-init Mistral: train, evaluate, predict, merge, through the real libraries."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import load_file

from mrtune.cli import main
from mrtune.config import load_config
from mrtune.infer.evaluate import evaluate
from mrtune.infer.merge import merge
from mrtune.infer.predict import predict
from mrtune.model.build import attach_lora, load_base_model
from mrtune.run.durable import current_umask
from mrtune.run.rundir import RunDir
from mrtune.task.data import load_split
from mrtune.train.batching import collate, tokenize_examples
from mrtune.train.recipe import train

EXPECTED_RUN_FILES = {
    "run.json",
    "config.yaml",
    "prompt.txt",
    "vocabulary.json",
    "history.jsonl",
    "report.md",
    "loss_curve.png",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/README.md",
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
    "adapter/chat_template.jinja",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """One tiny training run shared by the tests that only read it."""
    from conftest import tiny_run_overrides, write_viggo_splits

    base = tmp_path_factory.mktemp("run")
    data = write_viggo_splits(base, (("train", 48), ("validation", 8), ("test", 6)))
    overrides = tiny_run_overrides(
        tiny_model_dir,
        data,
        "lora.dropout=0.0",
        # lm_head too (as in the seed recipe): a random-init head keeps logits near uniform otherwise.
        "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.log_every=1",
        "train.learning_rate=3e-2",
        "train.warmup_ratio=0.0",
        "eval.batch_size=4",
        "eval.max_new_tokens=24",
    )
    config = load_config(None, overrides)
    run = train(config, base / "run", progress=False)
    return run, config


def test_every_lora_parameter_changes_and_loss_falls(trained_run):
    run, config = trained_run
    torch.manual_seed(config.train.seed)
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    initial = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    initial = {name: p.detach().clone() for name, p in initial.named_parameters() if p.requires_grad}
    trained = load_file(run.adapter / "adapter_model.safetensors")
    assert len(trained) == len(initial) == 2 * (7 * 2 + 1)  # A and B; 7 linear layers a block, 2 blocks, lm_head
    for name, tensor in trained.items():
        start = next(v for k, v in initial.items() if k.replace(".default", "") == name)
        assert not torch.allclose(start, tensor.float()), f"{name} did not change"
    history = run.read_history()
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0]
    validation = [r["validation_loss"] for r in history if "validation_loss" in r]
    assert len(validation) == 2 and validation[1] < validation[0]


def test_run_directory_holds_exactly_the_expected_files(trained_run):
    run, _ = trained_run
    files = {str(p.relative_to(run.path)) for p in run.path.rglob("*") if p.is_file()}
    files = {f for f in files if not f.startswith("tensorboard/")}
    tokenizer_extra = {f for f in files if f.startswith("tokenizer/")} - EXPECTED_RUN_FILES
    assert files - tokenizer_extra == EXPECTED_RUN_FILES
    info = run.info()
    assert info["status"] == "finished" and info["best_step"] in (4, 8) and info["total_steps"] == 8
    assert any((run.path / "tensorboard").iterdir())
    # Every file readable by others (issue 12: safetensors used to leave the adapter 0600), as umask allows.
    readable = 0o666 & ~current_umask()
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in run.path.rglob("*") if p.is_file()} == {
        str(p): readable for p in run.path.rglob("*") if p.is_file()
    }


def test_evaluate_predict_and_merge(trained_run, tmp_path):
    run, config = trained_run
    metrics = evaluate(run.path, progress=False)
    assert metrics["n"] == 6 and set(metrics) >= {
        "exact_match",
        "exact_match_unordered",
        "dialogue_act_accuracy",
        "slot_precision",
        "slot_recall",
        "slot_f1",
        "valid_mr_rate",
        "n",
    }
    predictions = [json.loads(line) for line in (run.eval_dir("test") / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and set(predictions[0]) == {"target", "reference", "prediction", "exact_match"}
    base_metrics = evaluate(run.path, base=True, limit=3, progress=False)
    assert base_metrics["n"] == 3 and (run.eval_dir("test-base") / "metrics.json").is_file()

    out = tmp_path / "predictions.jsonl"
    outputs = predict(run.path, input_file=str(config.data.test), output_file=str(out), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["meaning_representation"] for r in rows] == outputs and len(rows) == 6
    single = predict(run.path, sentences=[rows[0]["target"]], progress=False)
    assert single == [outputs[0]]  # batched and alone decode the same

    merged_dir = merge(run.path, tmp_path / "merged")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(load_base_model(config.model, torch.device("cpu")), str(run.adapter)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)


def test_packed_rows_do_not_see_each_other(tiny_model_dir):
    """A packed row's logits equal the same row run alone: position ids restart, no attention across rows."""
    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
    from mrtune.model.resolve import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = load_split("viggo:validation")[:3]
    rows, _ = tokenize_examples(examples, tokenizer, "compact")
    model = load_base_model(config.model, torch.device("cpu")).eval()
    packed = collate(rows, tokenizer.pad_token_id, packing=True)
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(packed_logits[start : start + len(row)], alone, atol=1e-5)
            start += len(row)


def test_packed_rows_build_one_flex_attention_mask_per_forward(tiny_model_dir, monkeypatch):
    """The rows' block mask (from the restarting position ids) is built once a micro-batch and shared by every
    layer, not rebuilt per layer: issue 15's "packing metadata once per step" holds in transformers itself."""
    import transformers.masking_utils as masking

    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32"])
    config.model.attn_implementation = "flex_attention"
    model = load_base_model(config.model, torch.device("cpu")).eval()
    assert model.config.num_hidden_layers > 1
    built = []
    original = masking.create_block_mask
    monkeypatch.setattr(masking, "create_block_mask", lambda *a, **k: built.append(1) or original(*a, **k))
    positions = torch.cat([torch.arange(40), torch.arange(24)]).unsqueeze(0)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 64)), position_ids=positions, use_cache=False)
    assert len(built) == 1


@pytest.mark.parametrize("window", [None, 4096, 9])
def test_the_packed_block_mask_attends_within_each_row_as_transformers_does(tiny_model_dir, window):
    """The flex attention mask mrtune builds for packed rows (uncompiled: transformers' compiled one took minutes to
    compile at 12,288 tokens) gives the logits of the sdpa model on the same packed rows, whose mask transformers
    derives from the restarting position ids: causal within each row, none across rows, and within a sliding
    window shorter than the rows (9 tokens) when the model has one. target_loss passes it for packed batches, so
    transformers builds none."""
    import transformers.masking_utils as masking
    from transformers import AutoModelForCausalLM

    from mrtune.model.resolve import load_tokenizer
    from mrtune.train.batching import packed_block_mask
    from mrtune.train.recipe import target_loss, target_positions

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows, _ = tokenize_examples(load_split("viggo:validation")[:3], tokenizer, "compact")
    batch = collate(rows, tokenizer.pad_token_id, packing=True, pad_to=256)
    models = {}
    for attention in ("sdpa", "flex_attention"):
        models[attention] = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=attention, sliding_window=window, dtype=torch.float32
        ).eval()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    mask = packed_block_mask(batch["position_ids"], models["flex_attention"].config)
    # Static shapes: a second sequence length otherwise recompiles flex attention with dynamic shapes, whose C++ code
    # for the CPU does not compile in torch 2.13 (`cur_qSplitSize8` undeclared); the GPU's Triton path is not at issue.
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        reference = models["sdpa"](**inputs).logits
        ours = models["flex_attention"](**inputs, attention_mask=mask).logits
        assert torch.allclose(ours, reference, atol=1e-5)
        keep = target_positions(batch["labels"])
        built = []
        original = masking.create_block_mask
        masking.create_block_mask = lambda *a, **k: built.append(1) or original(*a, **k)
        try:
            loss = target_loss(models["flex_attention"], batch, keep)
        finally:
            masking.create_block_mask = original
        assert not built and torch.allclose(loss, target_loss(models["sdpa"], batch, keep), atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_the_packed_block_grid_is_the_one_create_block_mask_finds_token_by_token(seed):
    """Which 128 x 128 blocks are partial and which full, worked out from the rows at the blocks' edges, equals what
    torch's create_block_mask finds by evaluating the mask at every (query, key) pair: random rows from 1 to 700
    tokens, lengths that are not a multiple of 128, with and without a sliding window."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import MistralConfig

    from mrtune.train.batching import packed_block_mask

    generator = torch.Generator().manual_seed(seed)
    lengths, total = [], int(torch.randint(300, 1500, (1,), generator=generator))
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, 700, (1,), generator=generator)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    window = [None, 100, 200, 4096, 300, 129][seed]
    ours = packed_block_mask(positions, MistralConfig(sliding_window=window))
    reference = create_block_mask(ours.mask_mod, 1, None, positions.shape[1], positions.shape[1], _compile=False)

    def grid(counts, indices):
        dense = torch.zeros(indices.shape[-2], indices.shape[-1] + 1, dtype=torch.bool)
        for i, (count, row) in enumerate(zip(counts[0, 0], indices[0, 0])):
            dense[i, row[:count].long()] = True
        return dense[:, : indices.shape[-1]]

    for name in ("kv", "full_kv"):
        mine = grid(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices"))
        theirs = grid(getattr(reference, f"{name}_num_blocks"), getattr(reference, f"{name}_indices"))
        assert torch.equal(mine, theirs), name


def test_compiled_layers_take_a_new_packed_mask_each_step_without_recompiling(tiny_model_dir):
    """Each micro-batch brings a mask of its own rows (a new mask function over a new row tensor): the compiled
    decoder layers must reuse their graph, not compile again at every step."""
    import torch._dynamo.utils as dynamo_utils
    from transformers import AutoModelForCausalLM

    from mrtune.model.build import compile_decoder_layers
    from mrtune.train.batching import packed_block_mask

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention").eval()
    compile_decoder_layers(model)
    graphs = []
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # see the test above
        for step in range(3):
            lengths = [[40, 60, 28, 128], [100, 100, 56], [256]][step]
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            mask = packed_block_mask(positions, model.config)
            model(
                input_ids=torch.randint(0, 500, (1, 256)), position_ids=positions, attention_mask=mask, use_cache=False
            )
            graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == graphs[2]


def test_no_packed_block_mask_when_layers_attend_differently(tiny_model_dir):
    from transformers import AutoConfig

    from mrtune.train.batching import packed_block_mask

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.layer_types = ["sliding_attention", "full_attention"]
    assert packed_block_mask(torch.tensor([[0, 1, 2, 0, 1]]), config) is None


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, tiny_overrides):
    assert main(["train", "--set", "train.nonsense=1", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'train.nonsense'" in err
    assert not (tmp_path / "r").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"target": "hi"}\n{not json\n', encoding="utf-8")
    assert main(["train", "--set", f"data.train={bad}", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:1: missing field 'meaning_representation'" in err and "bad.jsonl:2: not valid JSON" in err

    assert main(["evaluate", str(tmp_path)]) == 2
    assert "is not an mrtune run directory" in capsys.readouterr().err


def test_bf16_base_with_fp32_adapters_trains(tmp_path, tiny_overrides):
    """The default dtype: bf16 frozen weights, fp32 adapters, bf16 compute under autocast (no fp32 input copies)."""
    overrides = [o for o in tiny_overrides if not o.startswith("model.dtype")] + [
        "model.dtype=bfloat16",
        "train.max_steps=2",
        "train.eval_every=2",
    ]
    run = train(load_config(None, overrides), tmp_path / "run", progress=False)
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in run.read_history() if "train_loss" in r)


def test_packed_collate_pads_to_a_fixed_length():
    from mrtune.train.batching import IGNORE_INDEX, TokenizedRow

    rows = [TokenizedRow([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedRow([8, 9], [IGNORE_INDEX, 9])]
    batch = collate(rows, pad_token_id=0, packing=True, pad_to=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]


def test_top_layers_adapts_only_the_top_blocks(tiny_model_dir):
    from mrtune.errors import MrtuneError

    config = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32", "lora.top_layers=1"])
    model = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # the tiny model has blocks 0 and 1
    names = {
        name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1]
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_A" in name
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    config = load_config(None, [f"model.name={tiny_model_dir}", "lora.top_layers=3"])
    with pytest.raises(MrtuneError, match="lora.top_layers=3 but the model has 2 layers"):
        attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)


def test_a_time_budget_ends_training_and_its_schedule_in_time(tmp_path, tiny_overrides, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith(("train.max_steps", "train.eval_every"))] + [
        "train.max_steps=100000",
        "train.eval_every=100000",
        "train.time_budget_s=6",  # 3 s fit only one step on a machine loaded ~10x
        "train.warmup_ratio=0.0",
        "train.log_every=1",
    ]
    from mrtune.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "run"), *[a for o in overrides for a in ("--set", o)]]) == 0
    run = RunDir.open(tmp_path / "run")
    info = run.info()
    steps = [r for r in run.read_history() if "train_loss" in r]
    assert f"trained {steps[-1]['step']} steps in " in capsys.readouterr().out  # the steps done, not planned
    assert info["status"] == "finished" and info["stopped_by_time_budget_at_step"] == steps[-1]["step"] < 100000
    assert 6 <= info["train_seconds"] < 40
    assert any("validation_loss" in r for r in run.read_history())  # the last step is evaluated
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert f"| Stopped by the time budget at step | {steps[-1]['step']} |" in (run.path / "report.md").read_text()
    # The schedule follows the clock: from the peak down to ~0 (cosine) by the budget's end.
    rates = [r["learning_rate"] for r in steps]
    peak = load_config(None, overrides).train.learning_rate
    assert rates[0] > 0.5 * peak and rates[-1] < 0.05 * peak and rates == sorted(rates, reverse=True)


def test_gradient_clipping_can_be_turned_off(tmp_path, tiny_overrides):
    def adapter(*extra):
        run = train(load_config(None, [*tiny_overrides, "train.max_steps=2", *extra]), tmp_path / extra[0])
        norms = [r["grad_norm"] for r in run.read_history() if "grad_norm" in r]
        return load_file(run.adapter / "adapter_model.safetensors"), norms

    off, off_norms = adapter("train.max_grad_norm=null")
    huge, _ = adapter("train.max_grad_norm=1e9")  # a bound never reached: the same updates
    tight, _ = adapter("train.max_grad_norm=1e-4")
    assert off_norms and all(n > 1e-4 for n in off_norms)  # the norm is still measured and logged
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert any(not torch.equal(off[k], tight[k]) for k in off)


def test_loraplus_gives_the_b_matrices_ratio_times_the_rate(tmp_path, tiny_overrides):
    from mrtune.train.recipe import make_optimizer, make_scheduler

    config = load_config(
        None, [*tiny_overrides, "train.loraplus_ratio=16", "lora.rslora=true", "train.weight_decay=0.01"]
    )
    model = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model)
    assert model.peft_config["default"].use_rslora
    optimizer = make_optimizer(model, config)
    rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = (group["lr"], group["weight_decay"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(rates) == trainable  # every adapter tensor is optimized, once
    assert {rates[n] for n in trainable if "lora_A" in n} == {(5e-3, 0.01)}
    assert {rates[n] for n in trainable if "lora_B" in n} == {(5e-3 * 16, 0.01)}
    # The schedule scales both groups from their own rates.
    a, b = (g["lr"] for g in optimizer.param_groups if g["params"])
    assert [
        lr
        for lr, g in zip(make_scheduler(optimizer, config, total_steps=10).base_lrs, optimizer.param_groups)
        if g["params"]
    ] == [a, b]
    # A short run trains with it.
    run = train(config, tmp_path / "run", progress=False)
    assert run.info()["status"] == "finished"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_saved_as_plain_lora_on_the_original_weights(tmp_path, tiny_model_dir, init):
    from accelerate import Accelerator
    from peft import PeftModel

    from mrtune.train.distributed import save_adapter

    config = load_config(
        None,
        [f"model.name={tiny_model_dir}", "model.dtype=float32", "lora.r=4", f"lora.init={init}", "lora.dropout=0.0"],
    )
    model = attach_lora(load_base_model(config.model, torch.device("cpu")), config.lora, config.model).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        original = load_base_model(config.model, torch.device("cpu")).eval()
        # At init the residual base plus the adapter is the original model.
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-4)
        model.save_pretrained(tmp_path / "init")
        for parameter in model.parameters():  # "training"
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
        trained = model(ids).logits
    save_adapter(Accelerator(cpu=True), model, tmp_path / "adapter", None, tmp_path / "init")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained, atol=1e-4)


def test_a_pissa_run_finishes_with_a_plain_adapter_and_no_initial_copy(tmp_path, tiny_overrides):
    run = train(load_config(None, [*tiny_overrides, "lora.init=pissa"]), tmp_path / "run", progress=False)
    assert not run.initial_adapter.exists()
    assert json.loads((run.adapter / "adapter_config.json").read_text())["r"] == 8  # 2 x lora.r
    assert evaluate(run.path, limit=2, progress=False)["n"] == 2
