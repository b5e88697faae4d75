"""Reading and checking the (sentence, meaning representation) pairs. Pure module: no torch.

The bundled corpus is ViGGO (Juraska et al., INLG 2019; CC BY-SA 4.0, see data/LICENSE.txt and SOURCE.md):
5,103 / 714 / 1,083 rows. One raw record of data/train.jsonl:

    {"meaning_representation": "inform(name[Dirt: Showdown], release_year[2012], esrb[E 10+ (for Everyone 10
      and Older)], genres[driving/racing, sport], platforms[PlayStation, Xbox, PC], available_on_steam[no],
      has_linux_release[no], has_mac_release[no])",
     "target": "Dirt: Showdown from 2012 is a sport racing game for the PlayStation, Xbox, PC rated E 10+ (for
      Everyone 10 and Older). It's not available on Steam, Linux, or Mac."}

A split is named by a spec: `viggo:train` (bundled), a `.jsonl`/`.json`/`.csv` path, or `hf:<dataset>:<split>`
(through `datasets.load_dataset`, when the hub can be reached); several joined by `+` are read one after the other,
e.g. `viggo:train+viggo:validation` to train a final recipe on both.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mrtune.errors import MrtuneError, first_line

BUNDLED_DIR = Path(__file__).parents[1] / "data"
BUNDLED_SPLITS = ("train", "validation", "test")
MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class Example:
    sentence: str
    meaning_representation: str | None
    """None for prediction inputs, which carry only a sentence."""
    source: str = ""
    """Where the row came from, e.g. `train.jsonl:12`, for error messages."""


SOURCE_SEPARATOR = "+"


def _read_rows(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """Rows of a split as (location, record) pairs, plus the problems met while reading them. A spec of several
    sources joined by "+" gives their rows in order; a file whose own name has a "+" in it is read as one source."""
    if SOURCE_SEPARATOR not in spec or Path(spec).exists():
        return _read_source(spec)
    sources = spec.split(SOURCE_SEPARATOR)
    if not all(sources):
        raise MrtuneError(
            f"data spec {spec!r} has an empty source: join sources with a single '+', e.g. viggo:train+viggo:validation"
        )
    rows: list[tuple[str, dict]] = []
    problems: list[str] = []
    for source in sources:
        source_rows, source_problems = _read_source(source)
        rows += source_rows
        problems += source_problems
    return rows, problems


def _read_source(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """Rows of one source (bundled split, file or hub split)."""
    if spec.startswith("viggo:"):
        split = spec.split(":", 1)[1]
        if split not in BUNDLED_SPLITS:
            raise MrtuneError(f"unknown bundled split {spec!r}: use viggo:train, viggo:validation or viggo:test")
        return _read_file(BUNDLED_DIR / f"{split}.jsonl")
    if spec.startswith("hf:"):
        return _read_hub(spec)
    return _read_file(Path(spec))


def _check_is_file(path: Path) -> None:
    """A data path that is not a readable regular file, named for what it is (reading a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise MrtuneError(f"data file {path} is a symlink to {os.readlink(path)}, which does not exist") from None
        raise MrtuneError(
            f"data file {path} does not exist: check the path (or use viggo:train|validation|test)"
        ) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise MrtuneError(f"data file {path} is a symlink loop: point it at a real file") from None
        raise MrtuneError(f"data file {path} cannot be read ({error.strerror}): check the path") from None
    if stat.S_ISDIR(mode):
        raise MrtuneError(f"data file {path} is a directory: give a .jsonl, .json or .csv file inside it")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise MrtuneError(f"data file {path} is {kind}: give a regular .jsonl, .json or .csv file")


def _parse_json(text: str) -> tuple[object, str | None]:
    """(the value, None) or (None, why not), for the malformed inputs json.loads raises on in other ways."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        # A whole-file array names its line; a JSONL line is located by its caller.
        where = f"{error.lineno}: " if error.lineno > 1 or "\n" in text else ""
        return None, f"{where}not valid JSON ({error.msg}, column {error.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except ValueError as error:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        return None, f"not valid JSON ({str(error).split(':')[0]})"
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        return None, f"holds a lone surrogate ({error.object[error.start]!r}), which is not text: fix the escape"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    return value, None


def _read_file(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    _check_is_file(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise MrtuneError(f"data file {path} has an unknown format: use .jsonl (one JSON object a line) or .csv")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise MrtuneError(f"data file {path} cannot be read ({error.strerror}): check its permissions") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # ViGGO's own CSV subsets start with a BOM
    problems: list[str] = []
    lines = raw.split(b"\n")  # not str.splitlines(): that also splits inside JSON strings at U+2028 and friends
    bad_lines: set[int] = set()
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            bad_lines.add(number)
            problems.append(
                f"{path.name}:{number}: the line is not UTF-8 (its byte {error.start + 1}): re-save the file as UTF-8"
            )
    text = raw.decode("utf-8", errors="replace")  # the bad lines are reported above; read on for the others
    if suffix == ".csv":
        return _read_csv(path, text, bad_lines, problems)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_array(path, text, problems)
    rows: list[tuple[str, dict]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or number in bad_lines:
            continue
        record, problem = _parse_json(line)
        if problem:
            problems.append(f"{path.name}:{number}: {problem}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path.name}:{number}: expected a JSON object, got {type(record).__name__}")
            continue
        rows.append((f"{path.name}:{number}", record))
    return rows, problems


def _read_csv(path: Path, text: str, bad_lines: set[int], problems: list[str]):
    """Rows of a CSV file, located by the line their record starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], problems
    except csv.Error as error:
        return [], problems + [f"{path.name}:1: bad CSV header ({error})"]
    rows: list[tuple[str, dict]] = []
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            problems.append(f"{path.name}:{start}: bad CSV ({error})")
            start = reader.line_num + 1
            continue
        location, first, start = f"{path.name}:{start}", start, reader.line_num + 1
        if not values or bad_lines & set(range(first, start)):
            continue  # a blank line, or bytes already reported as not UTF-8
        if len(values) != len(header):
            problems.append(f"{location}: {len(values)} fields where the header names {len(header)}")
            continue
        rows.append((location, dict(zip(header, values))))
    return rows, problems


def _read_json_array(path: Path, text: str, problems: list[str]):
    """A `.json` file holding one array of objects (rows are located by their index in it)."""
    items, problem = _parse_json(text)
    if problem:
        # A syntax error names its line ("b.json:2: not valid JSON (...)"); the other problems concern the file.
        separator = ":" if problem[:1].isdigit() else ": "
        return [], problems + [f"{path.name}{separator}{problem}"]
    rows: list[tuple[str, dict]] = []
    for index, record in enumerate(items):
        location = f"{path.name}[{index}]"
        if isinstance(record, dict):
            rows.append((location, record))
        else:
            problems.append(f"{location}: expected a JSON object, got {type(record).__name__}")
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
        reason = first_line(error)
        raise MrtuneError(
            f"cannot load dataset {name!r} split {split!r} from the hub ({reason[:160]}): "
            f"use the bundled copy (viggo:{split}) or a local file"
        ) from None
    return [(f"{name}[{split}]:{i}", dict(record)) for i, record in enumerate(dataset)], []


def _text_field(record: dict, name: str, location: str, problems: list[str]) -> str | None:
    """The field's text, stripped, or None with the problem recorded."""
    value = record.get(name)
    if value is None:
        problems.append(f"{location}: missing field '{name}'")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{location}: field '{name}' is empty or not text")
        return None
    return value.strip()


def load_split(
    spec: str, input_field: str = "target", output_field: str | None = "meaning_representation"
) -> list[Example]:
    """Read a split and check every row, reporting every problem at once (file, line, field).

    `output_field=None` reads prediction inputs, which need only the sentence.
    """
    return [example for example, _ in _checked_rows(spec, input_field, output_field)]


def load_rows(spec: str, input_field: str = "target") -> list[tuple[Example, dict]]:
    """Prediction inputs, checked as `load_split` checks them, each with its whole record (to be written back)."""
    return _checked_rows(spec, input_field, None)


def _checked_rows(spec: str, input_field: str, output_field: str | None) -> list[tuple[Example, dict]]:
    from mrtune.task.mr import try_parse_mr

    rows, problems = _read_rows(spec)
    absent = [
        name
        for name in (input_field, output_field)
        if name is not None and len(rows) > 1 and all(name not in record for _, record in rows)
    ]
    if absent:
        found = ", ".join(sorted({key for _, record in rows for key in record})[:8])
        problems[:0] = [f"no row has the field '{name}' (fields found: {found})" for name in absent]
        rows = []  # one line per field says it all: each row's own 'missing field' would only repeat it
    examples = []
    for location, record in rows:
        sentence = _text_field(record, input_field, location, problems)
        if sentence is None:
            continue
        meaning_representation = None
        if output_field is not None:
            meaning_representation = _text_field(record, output_field, location, problems)
            if meaning_representation is None:
                continue
            if try_parse_mr(meaning_representation) is None:
                problems.append(f"{location}: '{output_field}' is not a meaning representation act(attr[value], ...)")
                continue
        examples.append((Example(sentence, meaning_representation, location), record))
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


def load_splits(
    specs: dict[str, str], input_field: str = "target", output_field: str = "meaning_representation"
) -> dict[str, list[Example]]:
    """Every named split read and checked, with the problems of all of them reported in one error."""
    splits: dict[str, list[Example]] = {}
    errors: list[str] = []
    for name, spec in specs.items():
        try:
            splits[name] = load_split(spec, input_field, output_field)
        except MrtuneError as error:
            errors.append(f"[data.{name}] {error}")
    if len(errors) == 1:
        raise MrtuneError(errors[0])
    if errors:
        raise MrtuneError(f"{len(errors)} data splits have problems: " + " ".join(errors))
    return splits


def _normalized(sentence: str) -> str:
    return " ".join(sentence.casefold().split())


def find_duplicates(splits: dict[str, list[Example]], reference: str = "train") -> list[str]:
    """Warnings for the sentences of each other split that also occur in `reference` (case and spacing ignored).

    Such rows were seen in training, so they inflate the score measured on their split.
    """
    seen: dict[str, str] = {}
    for example in splits.get(reference, []):
        seen.setdefault(_normalized(example.sentence), example.source)
    warnings = []
    for name, examples in splits.items():
        if name == reference:
            continue
        hits = [(e.source, seen[key]) for e in examples if (key := _normalized(e.sentence)) in seen]
        if hits:
            where, first = hits[0]
            warnings.append(
                f"{len(hits)} of {len(examples)} {name} sentence(s) also occur in {reference} (first: {where} = "
                f"{first}): they inflate the {name} score; remove them from one of the splits"
            )
    return warnings


def spread_sample(items: list, limit: int | None, key: str = "the row limit") -> list:
    """`limit` items spread evenly over the list (deterministic, keeps every part of a sorted file represented).

    `key` names where the limit came from (`--limit`, `eval.limit`) in the error for a limit below one.
    """
    if limit is not None and limit <= 0:
        raise MrtuneError(f"{key} must be at least 1, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
