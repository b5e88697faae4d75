"""Reading and checking the (sentence, meaning representation) pairs. Pure module: no torch.

The bundled corpus is ViGGO (Juraska et al., INLG 2019; CC BY-SA 4.0, see data/LICENSE.txt and SOURCE.md):
5,103 / 714 / 1,083 rows. One raw record of data/train.jsonl:

    {"meaning_representation": "inform(name[Dirt: Showdown], release_year[2012], esrb[E 10+ (for Everyone 10
      and Older)], genres[driving/racing, sport], platforms[PlayStation, Xbox, PC], available_on_steam[no],
      has_linux_release[no], has_mac_release[no])",
     "target": "Dirt: Showdown from 2012 is a sport racing game for the PlayStation, Xbox, PC rated E 10+ (for
      Everyone 10 and Older). It's not available on Steam, Linux, or Mac."}

A split is named by a spec: `viggo:train` (bundled), a `.jsonl`/`.json`/`.csv` path, or `hf:<dataset>:<split>`
(through `datasets.load_dataset`, when the hub can be reached).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from mrtune.errors import MrtuneError

BUNDLED_DIR = Path(__file__).parent / "data"
BUNDLED_SPLITS = ("train", "validation", "test")
MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class Example:
    sentence: str
    meaning_representation: str | None
    """None for prediction inputs, which carry only a sentence."""
    source: str = ""
    """Where the row came from, e.g. `train.jsonl:12`, for error messages."""


def _read_rows(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """Rows of a split as (location, record) pairs, plus the problems met while reading them."""
    if spec.startswith("viggo:"):
        split = spec.split(":", 1)[1]
        if split not in BUNDLED_SPLITS:
            raise MrtuneError(f"unknown bundled split {spec!r}: use viggo:train, viggo:validation or viggo:test")
        return _read_file(BUNDLED_DIR / f"{split}.jsonl")
    if spec.startswith("hf:"):
        return _read_hub(spec)
    return _read_file(Path(spec))


def _read_file(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    if not path.is_file():
        raise MrtuneError(f"data file {path} does not exist: check the path (or use viggo:train|validation|test)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: ViGGO's own CSV subsets start with a BOM
    except UnicodeDecodeError as error:
        raise MrtuneError(
            f"data file {path} is not UTF-8 (byte {error.start}): re-save it as UTF-8"
        ) from None
    except OSError as error:
        raise MrtuneError(f"data file {path} cannot be read ({error.strerror}): check its permissions") from None
    rows: list[tuple[str, dict]] = []
    problems: list[str] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for index, record in enumerate(reader, start=2):  # line 1 is the header
            if None in record:
                problems.append(f"{path.name}:{index}: more fields than the header names")
                continue
            rows.append((f"{path.name}:{index}", record))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for index, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{path.name}:{index}: not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path.name}:{index}: expected a JSON object, got {type(record).__name__}")
                continue
            rows.append((f"{path.name}:{index}", record))
    else:
        raise MrtuneError(f"data file {path} has an unknown format: use .jsonl (one JSON object a line) or .csv")
    return rows, problems


def _read_hub(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    _, _, rest = spec.partition(":")
    name, _, split = rest.rpartition(":")
    if not name or not split:
        raise MrtuneError(f"bad hub spec {spec!r}: use hf:<dataset id>:<split>, e.g. hf:gem/viggo:train")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - any hub failure is reported as one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MrtuneError(
            f"cannot load dataset {name!r} split {split!r} from the hub ({reason[:160]}): "
            f"use the bundled copy (viggo:{split}) or a local file"
        ) from None
    return [(f"{name}[{split}]:{i}", dict(record)) for i, record in enumerate(dataset)], []


def load_split(
    spec: str, input_field: str = "target", output_field: str | None = "meaning_representation"
) -> list[Example]:
    """Read a split and check every row, reporting every problem at once (file, line, field).

    `output_field=None` reads prediction inputs, which need only the sentence.
    """
    from mrtune.mr import try_parse_mr

    rows, problems = _read_rows(spec)
    examples = []
    for location, record in rows:
        sentence = record.get(input_field)
        if sentence is None:
            problems.append(f"{location}: missing field '{input_field}'")
            continue
        if not isinstance(sentence, str) or not sentence.strip():
            problems.append(f"{location}: field '{input_field}' is empty or not text")
            continue
        meaning_representation = None
        if output_field is not None:
            meaning_representation = record.get(output_field)
            if meaning_representation is None:
                problems.append(f"{location}: missing field '{output_field}'")
                continue
            if not isinstance(meaning_representation, str) or not meaning_representation.strip():
                problems.append(f"{location}: field '{output_field}' is empty or not text")
                continue
            meaning_representation = meaning_representation.strip()
            if try_parse_mr(meaning_representation) is None:
                problems.append(f"{location}: '{output_field}' is not a meaning representation act(attr[value], ...)")
                continue
        examples.append(Example(sentence.strip(), meaning_representation, location))
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        fields = f"'{input_field}'" + (f" and '{output_field}'" if output_field else "")
        raise MrtuneError(
            f"{spec}: {len(problems)} bad row(s): {shown}{more}. Fix them, or point data.input_field/"
            f"data.output_field at the right fields (expected {fields})"
        )
    if not examples:
        raise MrtuneError(f"{spec}: the split is empty: give a file with at least one row")
    return examples


def spread_sample(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over the list (deterministic, keeps every part of a sorted file represented)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        raise MrtuneError(f"a row limit must be positive, got {limit}")
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
