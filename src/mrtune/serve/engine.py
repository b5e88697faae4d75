"""The model behind `mrtune serve`: a finished run's model, tokenizer and decoding constraint, loaded once.

Decoding goes through `mrtune.infer.predict` (the same code as `mrtune predict` and `mrtune evaluate`), with the
run's eval settings; only the batch size follows `--max-batch`. With `--ensemble`, the other runs' models are
loaded beside it and each request gets the MR most of them wrote (`majority_vote`), as `mrtune evaluate` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mrtune.config import with_eval_overrides
from mrtune.errors import MrtuneError
from mrtune.infer.predict import decode_prompts, load_constraint, load_model, open_members
from mrtune.model.resolve import load_tokenizer
from mrtune.run.rundir import RunDir
from mrtune.task.data import load_split
from mrtune.task.mr import majority_vote, try_parse_mr
from mrtune.task.prompts import build_prompt
from mrtune.train.batching import encode_prompts


@dataclass(frozen=True)
class ParsedSentence:
    """One row of a `/v1/parse` answer. `dialogue_act` is None and `slots` empty when the MR does not parse
    (possible only for a run evaluated with eval.constrained=false)."""

    sentence: str
    meaning_representation: str
    dialogue_act: str | None
    slots: dict[str, str]

    @classmethod
    def of(cls, sentence: str, meaning_representation: str) -> ParsedSentence:
        parsed = try_parse_mr(meaning_representation)
        if parsed is None:
            return cls(sentence, meaning_representation, None, {})
        return cls(sentence, meaning_representation, parsed.dialogue_act, dict(parsed.slots))


class Engine:
    """Decodes lists of prompts; one call at a time (the server's batcher owns the only decoding thread)."""

    def __init__(self, run: RunDir, config, tokenizer, model, constraint, counting_tokenizer, others=()):
        """`others`: the (run, config, tokenizer, model, constraint) of the ensemble's other members, which vote."""
        self.others = list(others)
        self.run = run
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.constraint = constraint
        # A second tokenizer instance for request validation on the event loop: a fast tokenizer is not safe to
        # share between threads ("Already borrowed"), and the decoding thread uses the first one.
        self.counting_tokenizer = counting_tokenizer
        self.name = Path(run.path).resolve().name + (f"+{len(self.others)}" if self.others else "")
        # The longest prompt every model takes (each member of an ensemble decodes every prompt).
        self.max_prompt_tokens = min(
            self._prompt_limit(member_config, member_model)
            for member_config, member_model in [(config, model), *((o[1], o[3]) for o in self.others)]
        )

    @staticmethod
    def _prompt_limit(config, model) -> int:
        """The longest prompt a model takes: what training accepted (data.max_length, also within the model's
        positions) less the room every completion is given."""
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or config.data.max_length
        return min(config.data.max_length, positions) - config.eval.max_new_tokens

    @classmethod
    def load(cls, run_dir: str | Path, max_batch: int | None = None, ensemble: list[str] | tuple[str, ...] = ()):
        run = RunDir.open(run_dir)
        overrides = [f"eval.batch_size={max_batch}"] if max_batch is not None else []
        config = with_eval_overrides(run.config(), overrides)
        run.check_intact(config)
        members = open_members(run, config, ensemble, overrides, base=False)
        styles = {member_config.data.prompt_style for _, member_config in members}
        if len(styles) > 1:  # the server builds one prompt a sentence, in the first run's style
            raise MrtuneError(
                f"the ensemble's runs use different prompts ({', '.join(sorted(styles))}): serve runs trained with "
                "the same data.prompt_style"
            )
        loaded = [(member, member_config, *cls._decoder(member, member_config)) for member, member_config in members]
        (_, _, tokenizer, model, constraint), others = loaded[0], loaded[1:]
        return cls(run, config, tokenizer, model, constraint, load_tokenizer(str(run.tokenizer)), others)

    @staticmethod
    def _decoder(run: RunDir, config) -> tuple:
        tokenizer, model = load_model(run, config, base=False)
        constraint = load_constraint(run, tokenizer, config.eval.constrain_values) if config.eval.constrained else None
        return tokenizer, model, constraint

    @property
    def max_batch(self) -> int:
        return self.config.eval.batch_size

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def prompt(self, sentence: str) -> str:
        """The run's training prompt around `sentence`."""
        return build_prompt(self.config.data.prompt_style, sentence)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Prompt tokens of each text, as decoding counts them (with the tokenizer's special tokens)."""
        return [len(ids) for ids in encode_prompts(self.counting_tokenizer, texts)]

    def completion_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.counting_tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def complete(self, prompts: list[str]) -> list[str]:
        """Completions of ready-made prompts: valid MRs of the run's vocabulary when eval.constrained is on."""
        members = [(self.run, self.config, self.tokenizer, self.model, self.constraint), *self.others]
        outputs = [
            decode_prompts(run, config, tokenizer, model, prompts, constraint, progress=False)[0]
            for run, config, tokenizer, model, constraint in members
        ]
        return majority_vote(outputs) if len(outputs) > 1 else outputs[0]

    def save_masks(self) -> None:
        """Write the constraint masks computed while serving to `$MRTUNE_CACHE/constraints`, so that the next
        `mrtune serve`, evaluate or predict of the run starts with them (what `mrtune.infer.predict.decode` does
        after each command)."""
        from mrtune.infer.constrained import save_cached_constraint

        for constraint in [self.constraint, *(member[4] for member in self.others)]:
            if constraint is not None:
                save_cached_constraint(constraint)

    def example_sentences(self, count: int = 5) -> list[str]:
        """A few sentences of the run's validation split, of different dialogue acts, for the web page."""
        try:
            examples = load_split(
                self.config.data.validation, self.config.data.input_field, self.config.data.output_field
            )
        except (MrtuneError, OSError):  # the run's data moved or is a hub dataset offline: no examples
            return []
        chosen: dict[str, str] = {}
        for example in examples:
            parsed = try_parse_mr(example.meaning_representation or "")
            act = parsed.dialogue_act if parsed else ""
            if act not in chosen and len(example.sentence) <= 200:
                chosen[act] = example.sentence
        return list(chosen.values())[:count]
