"""InstructionDataModule: sources, record shapes, FLAN templates, bad rows, collation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, needs_shared

from lit_align.data import DataError, InstructionDataModule, SFTCollator, load_templates, read_records
from lit_align.ops import IGNORE_INDEX

ROWS = [{"prompt": f"Question {i}: ", "completion": f"answer {i}"} for i in range(10)]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        table = datasets.Dataset.from_list(rows)
        table.to_parquet(str(path)) if kind == "parquet" else table.to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_local_file_sources(tmp_path, kind):
    path = write(tmp_path / f"data.{kind}", ROWS, kind)
    records = read_records(str(path))
    assert [r.row["completion"] for r in records] == [r["completion"] for r in ROWS]
    assert records[3].where == f"{path}, row 4"


def test_local_dataset_directory_takes_the_hub_code_path(tmp_path):
    """A directory laid out like a hub dataset repo goes through ``datasets.load_dataset`` as a hub id would."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write(tmp_path / "repo" / "data" / "train.jsonl", ROWS, "jsonl")
    records = read_records(str(tmp_path / "repo"))
    assert len(records) == len(ROWS) and records[0].where.startswith(str(tmp_path / "repo"))


def test_list_of_files_and_bundled_data(tiny_tokenizer, tmp_path):
    a = write(tmp_path / "a.jsonl", ROWS[:4], "jsonl")
    b = write(tmp_path / "b.jsonl", ROWS[4:], "jsonl")
    dm = InstructionDataModule(tiny_tokenizer, train_data=[str(a), str(b)], val_data=[str(a)])
    dm.setup()
    assert dm.stats["train"]["rows"] == 10 and dm.stats["val"]["rows"] == 4
    bundled = InstructionDataModule(tiny_tokenizer, train_data="bundled:self_instruct_seed_tasks.jsonl")
    bundled.setup()
    assert bundled.stats["train"]["rows"] + bundled.stats["val"]["rows"] == 175


@needs_shared
def test_self_instruct_instances_become_examples():
    rows = [json.loads(line) for line in (SHARED_DATA / "self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    dm = InstructionDataModule(train_data=str(SHARED_DATA / "self_instruct_seed_tasks.jsonl"), val_fraction=0.0)
    dm.setup()
    assert dm.stats["train"]["rows"] == 175
    assert dm.stats["train"]["examples"] + dm.stats["train"]["dropped_empty_after_truncation"] == sum(
        len(r["instances"]) for r in rows
    )


def test_alpaca_and_prompt_completion_shapes(tiny_tokenizer):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"prompt": "Q: ", "completion": "A"},
    ]
    dm = InstructionDataModule(tiny_tokenizer, train_data=rows, val_fraction=0.0)
    dm.setup()
    texts = [tiny_tokenizer.decode(e["input_ids"]) for e in dm.train_dataset]
    assert "### Input:\n2 and 3" in texts[0] and texts[0].endswith("### Response:\n5</s>")
    assert "### Input" not in texts[1]
    assert texts[2] == "<s>Q: A</s>"


FLAN = {
    "sentiment": {
        "templates": [
            {"prompt": "{text}\nDid the reviewer like the movie?", "completion": "{label}"},
            {"prompt": "Review: {text}{options}\nAnswer:", "completion": " {label}"},
        ],
        "options": ["negative", "positive"],
    },
    "topic": {"templates": [{"prompt": "{text}\nTopic?", "completion": "{label}"}], "options_field": "choices"},
}


def test_flan_templates_list_options_after_the_marker(tiny_tokenizer):
    templates = load_templates(FLAN)
    row = {"task": "sentiment", "text": "Great film.", "label": "positive"}
    rendered = templates.render(row, 0, "row 1", every_template=True)
    assert rendered[0] == (
        "Great film.\nDid the reviewer like the movie?\n\nOPTIONS:\n- negative\n- positive",
        "positive",
    )
    assert rendered[1] == ("Review: Great film.\n\nOPTIONS:\n- negative\n- positive\nAnswer:", " positive")
    topic = {"task": "topic", "text": "Stocks fell.", "label": "business", "choices": ["sports", "business"]}
    custom = load_templates(FLAN, options_marker="Choices:")
    assert custom.render(topic, 0, "row 2")[0][0] == "Stocks fell.\nTopic?\n\nChoices:\n- sports\n- business"


def test_template_choice_is_seeded_and_spread(tiny_tokenizer):
    templates = load_templates(FLAN)
    row = {"task": "sentiment", "text": "x", "label": "positive"}
    picks = [templates.render(row, i, "")[0][0].startswith("Review") for i in range(40)]
    assert picks == [load_templates(FLAN).render(row, i, "")[0][0].startswith("Review") for i in range(40)]
    assert 0 < sum(picks) < 40


def test_templates_from_yaml_file_in_a_datamodule(tiny_tokenizer, tmp_path):
    import yaml

    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump(FLAN))
    rows = [{"task": "sentiment", "text": f"film {i}", "label": "positive"} for i in range(4)]
    dm = InstructionDataModule(
        tiny_tokenizer, train_data=rows, templates=str(path), every_template=True, val_fraction=0
    )
    dm.setup()
    assert dm.stats["train"]["examples"] == 8
    assert all("OPTIONS:" in tiny_tokenizer.decode(e["input_ids"]) for e in dm.train_dataset)


BAD_ROWS = [
    ({"prompt": "q"}, "completion", "missing"),
    ({"prompt": None, "completion": "a"}, "prompt", "missing"),
    ({"prompt": "q", "completion": 5}, "completion", "must be a string"),
    ({"prompt": "q\x00", "completion": "a"}, "prompt", "NUL"),
    ({"prompt": "q\ud800", "completion": "a"}, "prompt", "surrogate"),
    ({"instruction": "Do it.", "instances": [{"input": "x"}]}, "instances[0].output", "missing"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "unknown chat role"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "messages[1].role",
        "alternate",
    ),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ({"text": "what is this"}, None, "expected"),
    ("just a string", None, "named fields"),
]


@pytest.mark.parametrize("bad, field, problem", BAD_ROWS)
def test_bad_row_error_names_file_row_and_field(tiny_tokenizer, tmp_path, bad, field, problem):
    rows = [{"prompt": "ok", "completion": "fine"}, bad]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = InstructionDataModule(tiny_tokenizer, train_data=str(path), val_fraction=0.0)
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert f"{path}, row 2" in message and problem in message
    if field:
        assert repr(field) in message
    skipping = InstructionDataModule(tiny_tokenizer, train_data=str(path), val_fraction=0.0, bad_rows="skip")
    skipping.setup()
    assert skipping.stats["train"]["skipped_bad_row"] == 1 and skipping.stats["train"]["examples"] == 1


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    assert len(read_records(str(path))) == 2  # read, and reported when used, so that it can also be skipped
    with pytest.raises(DataError, match=r"broken.jsonl, row 2: invalid JSON"):
        InstructionDataModule(train_data=str(path), val_fraction=0.0).setup()


def test_collator_pads_right_with_positions():
    batch = SFTCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2], [0, 0, 0]]))
    left = SFTCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    )
    assert torch.equal(left["input_ids"], torch.tensor([[0, 5, 6, 7]]))
    assert torch.equal(left["position_ids"], torch.tensor([[0, 0, 1, 2]]))


def test_group_by_length_batches_similar_lengths_and_covers_every_example_once():
    from lit_align.data.base import ResumableSampler

    lengths = [(i * 37) % 101 for i in range(300)]
    plain = ResumableSampler(300, 8, seed=1)
    grouped = ResumableSampler(300, 8, seed=1, lengths=lengths)
    for sampler in (plain, grouped):
        assert sorted(sampler.order()) == list(range(300))

    def padding(order):
        batches = [order[i : i + 8] for i in range(0, 300, 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    assert padding(grouped.order()) < padding(plain.order()) / 4
    assert grouped.order() == ResumableSampler(300, 8, seed=1, lengths=lengths).order()  # fixed by seed and epoch
    grouped.set_epoch(1)
    assert grouped.order() != ResumableSampler(300, 8, seed=1, lengths=lengths).order()
