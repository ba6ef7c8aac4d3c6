"""Regression tests for the data defects of issue 14 ("Hardening"), each failing on the code before its fix; bad
inputs feed the ``pytest -m reliability`` summary line."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from lit_align.data import DataError, InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_align.data.sources import read_records

pytestmark = pytest.mark.reliability

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red, or green."},
    {"role": "user", "content": "Is this review positive or negative? The acting was superb."},
    {"role": "assistant", "content": "Positive: the acting was superb."},
]


# ----- bad rows in a data file ----------------------------------------------------------------------------------------
def _bad_row_file(tmp_path: Path, good: dict, bad: dict | bytes) -> Path:
    """A JSONL file of a good row, ``bad`` (a row, or the raw bytes of a line) and the good row again."""
    bad_line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + bad_line + b"\n" + json.dumps(good).encode() + b"\n")
    return path


def check_bad_row(make, path: Path, field: str | None, reliability) -> DataError:
    """Row 2 of ``path`` is refused with a ``DataError`` naming file, row and field; with ``bad_rows="skip"`` it is
    skipped and counted, and the two good rows train."""
    reliability["bad_inputs"] += 1
    with pytest.raises(DataError) as error:
        make(path, "error").setup()
    assert f"{path}, row 2" in str(error.value)
    assert error.value.field == field
    reliability["named_errors"] += 1
    skipping = make(path, "skip")
    skipping.setup()
    assert skipping.stats["train"]["skipped_bad_row"] == 1 and skipping.stats["train"]["examples"] == 2
    reliability["counted_skips"] += 1
    return error.value


# ----- 4. role order in prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, good, bad, field",
    [
        (PromptDataModule, {"messages": CHAT[1:3]}, {"messages": [*CHAT[1:3], CHAT[2]]}, "messages[2].role"),
        (PromptDataModule, {"prompt": CHAT[1:2]}, {"prompt": [*CHAT[1:3], CHAT[2]]}, "prompt[2].role"),
        (PromptDataModule, {"prompt": CHAT[1:2]}, {"prompt": CHAT[:1]}, "prompt[0].role"),
        (
            PreferenceDataModule,
            {"prompt": CHAT[1:2], "chosen": "a", "rejected": "b"},
            {"prompt": CHAT[1:3], "chosen": "a", "rejected": "b"},
            "prompt[1].role",
        ),
    ],
    ids=["messages, two assistant turns", "prompt, two assistant turns", "system turn only", "prompt ends in a reply"],
)
def test_prompt_turns_out_of_order_are_named(tmp_path, tiny_tokenizer, reliability, make, good, bad, field):
    """The old PromptDataModule dropped every trailing assistant turn, so ``user, assistant, assistant`` passed; a
    preference prompt ending in an assistant turn named ``prompt[2]``, a turn that does not exist."""
    path = _bad_row_file(tmp_path, good, bad)
    check_bad_row(lambda p, b: make(tiny_tokenizer, str(p), val_fraction=0.0, bad_rows=b), path, field, reliability)


# ----- 5. a null prompt -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": None, "chosen": "a", "rejected": "b"},
        {"prompt": None, "chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"prompt": None, "chosen": [CHAT[1], CHAT[2]], "rejected": [CHAT[1], CHAT[4]]},
    ],
    ids=["text", "text with a shared dialogue", "messages"],
)
def test_a_null_prompt_is_named(tmp_path, tiny_tokenizer, reliability, bad):
    """The old code took ``"prompt": null`` for an implicit-prompt row: it named ``chosen``, or silently split the
    dialogues at their shared turns."""
    path = _bad_row_file(tmp_path, {"prompt": "Q:", "chosen": " a", "rejected": " b"}, bad)

    def make(path, bad_rows):
        return PreferenceDataModule(tiny_tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    check_bad_row(make, path, "prompt", reliability)


# ----- 6. undecodable bytes in a data file ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_an_invalid_utf8_line_is_that_rows_error(tmp_path, tiny_tokenizer, reliability, suffix):
    """One invalid byte made the whole file unreadable with an error that named no row, even with ``bad_rows: skip``."""
    path = _bad_row_file(tmp_path, {"prompt": "Q:", "completion": " a"}, b'{"prompt": "caf\xe9", "completion": " b"}')
    if suffix == ".jsonl.gz":
        zipped = tmp_path / "data.jsonl.gz"
        zipped.write_bytes(gzip.compress(path.read_bytes()))
        path = zipped

    def make(path, bad_rows):
        return InstructionDataModule(tiny_tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    error = check_bad_row(make, path, None, reliability)
    assert "invalid UTF-8" in str(error)


def test_an_invalid_utf8_byte_in_a_json_array_names_file_offset_and_line(tmp_path, reliability):
    data = b'[\n  {"prompt": "Q:", "completion": " a"},\n  {"prompt": "caf\xe9", "completion": " b"}\n]\n'
    path = tmp_path / "data.json"
    path.write_bytes(data)
    reliability["bad_inputs"] += 1
    with pytest.raises(DataError, match=re.escape(f"{path}: invalid UTF-8 at byte offset {data.index(0xE9)} (line 3)")):
        read_records(str(path))
    reliability["named_errors"] += 1


def test_json_lines_keep_their_rows_whatever_characters_the_strings_hold(tmp_path):
    """U+2028 and U+0085 are legal raw inside a JSON string, but ``str.splitlines`` breaks lines at them: the old
    reader split such a row in two unreadable ones and numbered every later row wrong. A UTF-8 byte-order mark made
    the first row unreadable."""
    rows = [{"prompt": "one\u2028two\x85three", "completion": " a"}, {"prompt": "Q:", "completion": " b"}]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r, ensure_ascii=False).encode() for r in rows) + b"\n")
    records = read_records(str(path))
    assert [r.row for r in records] == rows
    assert [r.where for r in records] == [f"{path}, row 1", f"{path}, row 2"]
