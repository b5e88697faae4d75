"""The memory planner (train/memory.py): its choice from probe measurements, and a planned run on CPU.

The GPU measures memory with the caching allocator's peak; the CPU has none, so the run tests here measure with
a stand-in that still runs every probe step for real and reads the model's real checkpointing switch, while the
planner's figures on an H200 at caps from 8 to 80 GB are in BENCHMARKS.md (`python -m bench.run bench --only
memory-plan`).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mrtune.config import load_config
from mrtune.errors import MrtuneError
from mrtune.train import memory
from mrtune.train.memory import MARGIN, MAX_TOKENS, TOKEN_STEP, Probe, choose, fitted_tokens, predicted_speed

GB = 1e9


def line(checkpointing: bool, fixed_gb: float, mb_per_token: float, sizes=(512, 1024, 2048), cap_gb=None):
    """Probes of a mode whose peak is fixed + per_token * tokens; sizes over `cap_gb` ran out of memory."""
    probes = []
    for tokens in sizes:
        peak = fixed_gb * GB + mb_per_token * 1e6 * tokens
        probes.append(Probe(tokens, checkpointing, None if cap_gb and peak > cap_gb * GB else int(peak)))
    return probes


# Shaped like the 7B recipe in 4-bit on an H200: ~4.5 GB fixed; ~6 MB a token without checkpointing, ~0.35 with.
SEVEN_B = line(False, 4.5, 6.0) + line(True, 4.5, 0.35)


def test_a_large_cap_trains_without_checkpointing_at_the_largest_budget():
    plan = choose(SEVEN_B, 140 * GB, 0, batch_tokens="auto", checkpointing="auto")
    assert plan.gradient_checkpointing is False and plan.batch_tokens == MAX_TOKENS
    assert plan.predicted_peak_gb <= 140 * (1 - MARGIN)


def test_a_small_cap_checkpoints_and_every_choice_fits_its_cap():
    for cap_gb in (8, 16, 24, 48, 80):
        plan = choose(SEVEN_B, cap_gb * GB, 0, batch_tokens="auto", checkpointing="auto")
        assert plan.predicted_peak_gb <= cap_gb * (1 - MARGIN) + 1e-9
        assert plan.batch_tokens % TOKEN_STEP == 0
        chosen = {(o["gradient_checkpointing"], o["batch_tokens"]) for o in plan.options}
        assert (plan.gradient_checkpointing, plan.batch_tokens) in chosen
        # the choice is the fastest option considered
        assert predicted_speed(plan.batch_tokens, plan.gradient_checkpointing) == max(
            predicted_speed(o["batch_tokens"], o["gradient_checkpointing"]) for o in plan.options
        )
    small = choose(SEVEN_B, 16 * GB, 0, batch_tokens="auto", checkpointing="auto")
    assert small.gradient_checkpointing is True  # without: ~1,600 tokens; with: the maximum
    large = choose(SEVEN_B, 80 * GB, 0, batch_tokens="auto", checkpointing="auto")
    assert large.gradient_checkpointing is False and large.batch_tokens >= 8192


def test_the_optimizer_state_counts_against_the_cap():
    without = choose(SEVEN_B, 24 * GB, 0, batch_tokens="auto", checkpointing=False)
    with_optimizer = choose(SEVEN_B, 24 * GB, 3 * GB, batch_tokens="auto", checkpointing=False)
    assert with_optimizer.batch_tokens < without.batch_tokens


def test_a_probe_that_ran_out_of_memory_bounds_the_budget():
    # The line says 2,048 tokens fit; the 2,048-token probe ran out of memory (say, attention's mask grew faster).
    probes = [Probe(512, False, int(1 * GB)), Probe(1024, False, int(1.5 * GB)), Probe(2048, False, None)]
    tokens, _ = fitted_tokens(probes, 10 * GB, 0)
    assert tokens < 2048


def test_one_fitting_probe_is_used_as_it_is():
    probes = [Probe(512, False, int(6 * GB)), Probe(1024, False, None)]
    assert fitted_tokens(probes, 7 * GB, 0) == (512, 6 * GB)
    assert fitted_tokens(probes, 5 * GB, 0) is None


def test_a_given_budget_with_auto_checkpointing_prefers_no_checkpointing_when_it_fits():
    fixed = [Probe(4096, False, int(30 * GB)), Probe(4096, True, int(6 * GB))]
    assert choose(fixed, 80 * GB, 0, batch_tokens=4096, checkpointing="auto").gradient_checkpointing is False
    assert choose(fixed, 24 * GB, 0, batch_tokens=4096, checkpointing="auto").gradient_checkpointing is True


def test_nothing_fitting_is_one_error_that_says_what_to_change():
    with pytest.raises(MrtuneError, match=r"does not fit in 4.0 GB .*needs 4.7 GB.*train.max_memory_gb"):
        choose(SEVEN_B, 4 * GB, 0, batch_tokens="auto", checkpointing="auto")


def test_auto_is_refused_without_a_gpu_before_anything_is_written(tiny_overrides, tmp_path):
    from mrtune.train.recipe import train

    config = load_config(None, [*tiny_overrides, "train.batch_tokens=auto"])
    with pytest.raises(MrtuneError, match=r"train.batch_tokens=auto plans GPU memory.*no CUDA GPU"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_parses_beside_numbers_and_nothing_else():
    config = load_config(None, ["train.batch_tokens=auto", "model.gradient_checkpointing=AUTO"])
    assert (config.train.batch_tokens, config.model.gradient_checkpointing) == ("auto", "auto")
    with pytest.raises(MrtuneError, match="train.batch_tokens: expected int or auto, got 'automatic'"):
        load_config(None, ["train.batch_tokens=automatic"])
    with pytest.raises(MrtuneError, match="train.max_memory_gb: expected a finite number"):
        load_config(None, ["train.max_memory_gb=auto"])
    with pytest.raises(MrtuneError, match="train.max_memory_gb must be greater than 0"):
        load_config(None, ["train.max_memory_gb=0"])


@pytest.fixture
def cpu_planner(monkeypatch):
    """The planner on CPU: every probe step runs for real (collate, forward, backward); the peak is a line whose
    slope follows the model's actual checkpointing switch, so a wrong switch shows in the choice."""
    import mrtune.train.recipe as recipe

    seen = []

    def measure(run_step, tokens, device):
        run_step(tokens)
        on = any(getattr(m, "gradient_checkpointing", False) for m in recipe_model["model"].modules())
        seen.append((tokens, on))
        return int(1 * GB + tokens * (0.1e6 if on else 2e6))

    recipe_model = {}
    original = recipe.plan_memory

    def plan_memory(model, *args):
        recipe_model["model"] = model
        return original(model, *args)

    original_compile = recipe.Recipe._compile_model

    def compile_model(self):  # right after the plan: record the model's checkpointing switch as training gets it
        seen.append(("after plan", any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())))
        original_compile(self)

    monkeypatch.setattr(recipe.Recipe, "_compile_model", compile_model)
    monkeypatch.setattr(recipe, "check_plannable", lambda *args: None)
    monkeypatch.setattr(recipe, "plan_memory", plan_memory)
    monkeypatch.setattr(memory, "measure_peak", measure)
    monkeypatch.setattr(memory, "cap_bytes", lambda config, device: caps[0] * GB)
    caps = [3]
    monkeypatch.setattr(memory, "hold_to_cap", lambda cap, device: None)
    monkeypatch.setattr(memory, "fewer_fragments", lambda: None)
    return seen, caps


def test_a_planned_run_trains_exactly_as_one_given_the_chosen_values(cpu_planner, tiny_overrides, tmp_path):
    from mrtune.train.recipe import train

    common = [*tiny_overrides, "train.packing=true", "lora.dropout=0.1", "train.max_steps=3", "train.eval_every=3"]
    planned = train(
        load_config(None, [*common, "train.batch_tokens=auto", "model.gradient_checkpointing=auto"]),
        tmp_path / "planned",
        progress=False,
    )
    plan = json.loads((planned.path / "run.json").read_text())["memory_plan"]
    # 3 GB cap, 10% margin, 1 GB fixed: no checkpointing fits (2.7 - 1) / 2 MB = 850 -> 768 tokens; checkpointing
    # fits the maximum, which is predicted faster.
    assert plan["gradient_checkpointing"] is True and plan["batch_tokens"] == MAX_TOKENS
    assert {(o["gradient_checkpointing"], o["batch_tokens"]) for o in plan["options"]} == {
        (False, 768),
        (True, MAX_TOKENS),
    }
    seen, _ = cpu_planner
    assert [on for _, on in seen] == [False] * 3 + [True] * 3 + [True]  # the switch really flipped, and stays on
    saved = yaml.safe_load((planned.path / "config.yaml").read_text())
    assert saved["train"]["batch_tokens"] == MAX_TOKENS and saved["model"]["gradient_checkpointing"] is True

    given = train(
        load_config(None, [*common, f"train.batch_tokens={MAX_TOKENS}", "model.gradient_checkpointing=true"]),
        tmp_path / "given",
        progress=False,
    )
    history = [json.loads(line) for line in (planned.path / "history.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (given.path / "history.jsonl").read_text().splitlines()]
    assert [h.get("loss") for h in history] == [h.get("loss") for h in expected]
    a = load_file(planned.adapter / "adapter_model.safetensors")
    b = load_file(given.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_config_that_says_auto_is_refused(cpu_planner, tiny_overrides, tmp_path):
    from mrtune.train.recipe import train

    config = load_config(None, [*tiny_overrides, "train.packing=true", "train.batch_tokens=auto"])
    run = train(config, tmp_path / "run", progress=False)
    with pytest.raises(MrtuneError, match="already finished"):
        train(run.config(), run.path, resume=True, progress=False)
    with pytest.raises(MrtuneError, match="says `auto` for memory settings"):
        train(config, run.path, resume=True, progress=False)


def test_a_large_cap_leaves_checkpointing_off_for_training(cpu_planner, tiny_overrides, tmp_path):
    from mrtune.train.recipe import train

    seen, caps = cpu_planner
    caps[0] = 100  # no checkpointing fits the most tokens: (90 - 1) GB / 2 MB
    overrides = [*tiny_overrides, "train.packing=true", "train.max_steps=1", "train.eval_every=1"]
    auto = ["train.batch_tokens=auto", "model.gradient_checkpointing=auto"]
    run = train(load_config(None, [*overrides, *auto]), tmp_path / "run", progress=False)
    plan = json.loads((run.path / "run.json").read_text())["memory_plan"]
    assert plan["gradient_checkpointing"] is False and plan["batch_tokens"] == MAX_TOKENS
    assert seen[-1] == ("after plan", False)  # the last probe had it on; training does not
