"""Generalization check: rows whose game name was never seen in training. Pure module: no torch.

A model that learned to copy the name from the sentence gets these right; one that memorised ViGGO's ~200 game
names does not. Rows are built from the test split by replacing the `name[...]` slot and every verbatim mention of
that name in the sentence with an invented name that no training row contains:

    {"target": "Little Big Adventure is ...", "meaning_representation": "inform(name[Little Big Adventure], ...)"}
 -> {"target": "Quillmoor Saga is ...",       "meaning_representation": "inform(name[Quillmoor Saga], ...)"}

    python -m mrtune.task.generalization --out unseen-names.jsonl && mrtune evaluate RUN --data unseen-names.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrtune.task.data import load_split
from mrtune.task.mr import MeaningRepresentation, parse_mr

# Invented titles: two or three words, mixed lengths, one with a colon and one with a digit, as ViGGO's names have.
UNSEEN_NAMES = (
    "Quillmoor Saga",
    "Ashen Lanterns",
    "Vexaria: Tides of Brass",
    "Copperfield Drift",
    "Nimbus Foundry",
    "Glasswing Odyssey 3",
    "Tessellate",
    "Harrow & Hearth",
    "Orbital Gardeners",
    "The Saltmarsh Accord",
    "Kestrel Run",
    "Emberline Tactics",
    "Mossback Kingdoms",
    "Lumen Cartographer",
    "Driftwood Sheriff",
)


def with_value(mr: MeaningRepresentation, attribute: str, value: str) -> MeaningRepresentation:
    return MeaningRepresentation(mr.dialogue_act, tuple((a, value if a == attribute else v) for a, v in mr.slots))


def with_name(mr: MeaningRepresentation, name: str) -> MeaningRepresentation:
    return with_value(mr, "name", name)


def unseen_name_rows(rows: list[dict], training_text: str, names: tuple[str, ...] = UNSEEN_NAMES) -> list[dict]:
    """Rows with their game name swapped for an invented one (cycling through `names`).

    Only rows with a `name` slot whose value appears verbatim in the sentence are used; names that occur anywhere
    in `training_text` are refused, so every swapped name is truly unseen.
    """
    seen = [n for n in names if n.lower() in training_text.lower()]
    if seen:
        raise ValueError(f"names seen in training: {seen}")
    swapped = []
    for row in rows:
        mr = parse_mr(row["meaning_representation"])
        old = dict(mr.slots).get("name")
        if not old or old not in row["target"]:
            continue
        new = names[len(swapped) % len(names)]
        swapped.append(
            {
                "target": row["target"].replace(old, new),
                "meaning_representation": str(with_name(mr, new)),
                "original_name": old,
            }
        )
    return swapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write test rows with game names never seen in training.")
    parser.add_argument("--split", default="viggo:test")
    parser.add_argument("--train", default="viggo:train")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    training = load_split(args.train)
    training_text = "\n".join(f"{e.sentence}\n{e.meaning_representation}" for e in training)
    rows = [{"target": e.sentence, "meaning_representation": e.meaning_representation} for e in load_split(args.split)]
    swapped = unseen_name_rows(rows, training_text)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in swapped), encoding="utf-8")
    print(f"wrote {len(swapped)} rows with unseen game names to {args.out}")


if __name__ == "__main__":
    main()
