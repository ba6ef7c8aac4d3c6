"""Reading raw records: in-memory lists, local JSON/JSONL(.gz)/Parquet/CSV files, or a Hugging Face hub dataset.

Every record comes with a ``where`` string that names its file and row, so that a bad row can be reported exactly.
JSON and JSONL are read with the standard library rather than ``datasets``: Arrow's schema inference turns one
mistyped row into an opaque error about the whole column, and loses the line number.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

DataSource = Union[str, Sequence[Mapping[str, Any]]]  # noqa: UP007 (a runtime alias jsonargparse reads)
"""A path to a local file, a sample file shipped with lit_align (``"bundled:<file name>"``), a hub dataset id
(``"name"`` or ``"name:split"``), or a list of dicts."""

BUNDLED_PREFIX = "bundled:"
BUNDLED_DATA = Path(__file__).parents[1] / "assets" / "data"

_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_ARROW_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some Windows editors write: not text


class DataError(ValueError):
    """A record that cannot be used. The message names the source, the row and the field."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}, field {field!r}: {problem}" if field else f"{where}: {problem}")


@dataclass(frozen=True)
class UnreadableRow:
    """Stands in for a line that could not be parsed; using it raises a :class:`DataError` with ``problem``."""

    problem: str


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (``"path/to/file.jsonl, row 12"``; rows count from 1)."""

    where: str
    row: Any


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise DataError(f"{path}", None, f"cannot be read: {e}") from None


def _read_json(path: Path) -> list[Record]:
    """Records of a JSON array file or a JSONL file. JSONL lines are split at ``\\n`` only (U+2028 and the other
    Unicode line breaks are legal inside a JSON string) and decoded one at a time, so that an undecodable or
    unparsable line is that row's error (skippable with ``bad_rows="skip"``) and every row keeps its line number."""
    data = _read_bytes(path)
    start = len(_BOM) if data.startswith(_BOM) else 0
    if data[start:].lstrip().startswith(b"["):  # a JSON array of records: one document, one bad byte fails it all
        try:
            text = data[start:].decode("utf-8")
        except UnicodeDecodeError as e:
            offset = start + e.start
            line = data.count(b"\n", 0, offset) + 1
            raise DataError(f"{path}", None, f"invalid UTF-8 at byte offset {offset} (line {line})") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}", None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        return [Record(f"{path}, row {i}", row) for i, row in enumerate(rows, start=1)]
    records = []
    for lineno, line in enumerate(data[start:].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:  # a bad line is raised when the row is used, so that bad_rows="skip" can skip it
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            row = UnreadableRow(f"invalid UTF-8 at byte {e.start} of the line")
        except json.JSONDecodeError as e:
            row = UnreadableRow(f"invalid JSON: {e.msg}")
        records.append(Record(f"{path}, row {lineno}", row))
    return records


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*_JSON_SUFFIXES, *_ARROW_BUILDERS):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_records(source: DataSource, split: str = "train") -> list[Record]:
    """Read ``source`` into records. ``split`` applies to hub datasets given without one (``"name:split"`` wins)."""
    if not isinstance(source, str):
        return [Record(f"in-memory data, row {i}", row) for i, row in enumerate(source, start=1)]
    if source.startswith(BUNDLED_PREFIX):
        source = str(BUNDLED_DATA / source[len(BUNDLED_PREFIX) :])
    path = Path(source).expanduser()
    suffix = _suffix(path)
    if path.is_file() or suffix in _JSON_SUFFIXES or suffix in _ARROW_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        if suffix in _JSON_SUFFIXES:
            return _read_json(path)
        if suffix in _ARROW_BUILDERS:
            import datasets

            table = datasets.load_dataset(_ARROW_BUILDERS[suffix], data_files=str(path), split="train")
            return [Record(f"{path}, row {i}", row) for i, row in enumerate(table, start=1)]
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use JSON, JSONL, Parquet or CSV")
    import datasets

    # A hub id, or a local directory laid out like a hub dataset repository (the same code path).
    name, _, hub_split = (source, "", "") if path.is_dir() else source.partition(":")
    split = hub_split or split
    table = datasets.load_dataset(name, split=split)
    return [Record(f"{name} [{split}], row {i}", row) for i, row in enumerate(table, start=1)]
