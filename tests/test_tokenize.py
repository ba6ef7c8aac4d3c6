"""Tokenization guarantees, checked on the real files in ../shared/data with three kinds of tokenizer: the embedded
byte-level BPE (adds BOS, chat template renders BOS too), a GPT-2 style one (no BOS, pad == eos, ChatML) and a
SentencePiece-style one (adds BOS, pad == eos, Llama-2 template that renders BOS)."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, TOKENIZER_KINDS, needs_shared

from lit_align.data import InstructionDataModule, SegmentEncoder, SFTCollator
from lit_align.data.base import resolve_sources
from lit_align.data.sources import Record, read_records
from lit_align.data.tokenize import special_prefix
from lit_align.ops import IGNORE_INDEX

GSM8K_TEMPLATES = {"gsm8k": {"templates": [{"prompt": "Question: {question}\nAnswer:", "completion": " {answer}"}]}}

REAL_FILES = [
    ("t0_ag_news_classify_with_choices.jsonl", {"end_markers": ["<|endoftext|>"]}),
    ("t0_rotten_tomatoes_Sentiment_with_choices_.jsonl", {"end_markers": ["<|endoftext|>"]}),
    ("t0_sciq_Multiple_Choice.jsonl", {"end_markers": ["<|endoftext|>"]}),
    ("self_instruct_seed_tasks.jsonl", {}),
    ("self_instruct_user_oriented_instructions.jsonl", {}),
    ("self_instruct_seed_tasks.jsonl", {"use_chat_template": True}),
    ("gsm8k_train.jsonl", {"templates": GSM8K_TEMPLATES}),
]


def inference_prompt_ids(tokenizer, segments, chat: bool) -> list[int]:
    """How a user would encode the prompt at inference: the tokenizer's own call (with its special tokens) on the
    text before the first labelled segment, or the chat template's generation prompt."""
    prompt = "".join(s.text for s in segments[: next(i for i, s in enumerate(segments) if s.trainable)])
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


def check_example(tokenizer, segments, add_eos, encoded, chat: bool) -> None:
    ids, labels = encoded.input_ids, encoded.labels
    prompt_ids = inference_prompt_ids(tokenizer, segments, chat)
    if chat and special_prefix(tokenizer) and prompt_ids[:1] != special_prefix(tokenizer):
        prompt_ids = special_prefix(tokenizer) + prompt_ids
    # The prompt as encoded at inference is an exact prefix, and exactly it carries no loss.
    assert ids[: len(prompt_ids)] == prompt_ids
    assert encoded.prompt_length == len(prompt_ids)
    # Exactly one BOS where the tokenizer uses one, none where it does not.
    prefix = special_prefix(tokenizer)
    if prefix:
        assert ids[: len(prefix)] == prefix and ids.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token_id != tokenizer.eos_token_id or ids[0] != tokenizer.eos_token_id
    if not encoded.truncated:
        eos_like = tokenizer.eos_token_id if add_eos else ids[-1]
        assert ids[-1] == eos_like and labels[-1] == eos_like


@needs_shared
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("file_name, options", REAL_FILES, ids=lambda v: v if isinstance(v, str) else "")
def test_guarantees_on_real_data(tokenizers_by_kind, kind, file_name, options):
    tokenizer = tokenizers_by_kind[kind]
    dm = InstructionDataModule(tokenizer, train_data=str(SHARED_DATA / file_name), max_length=512, **options)
    records = resolve_sources(dm.train_data)[:400]
    dm_records = dm.encode_records(records, "train")
    assert dm.stats["train"]["examples"] == len(dm_records) > 0
    checked = 0
    for index, record in enumerate(records):
        for example in dm.record_examples(record, index):
            if example.empty:
                continue
            segments, add_eos = example.segments, example.add_eos
            encoded = dm.encoder.encode(segments, add_eos)
            if all(label == IGNORE_INDEX for label in encoded.labels):
                continue
            check_example(tokenizer, segments, add_eos, encoded, chat=not add_eos)
            checked += 1
    assert checked == len(dm_records)


@pytest.mark.parametrize("kind", ["embedded", "gpt2_style"])
def test_prompt_is_a_prefix_where_naive_joining_merges_across_the_boundary(tokenizers_by_kind, kind):
    """A prompt that ends in a space ("Answer: ", a common template ending): tokenizing prompt+completion as one
    string merges the space into the response's first token, so the naive prompt tokens are not a prefix. Ours are."""
    tokenizer = tokenizers_by_kind[kind]
    prompt, completion = "Is this review positive or negative? Answer: ", "positive"
    joined = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert joined[: len(prompt_ids)] != prompt_ids  # the hazard is real for this tokenizer
    encoded = SegmentEncoder(tokenizer).encode([(prompt, False), (completion, True)])
    with_specials = tokenizer(prompt)["input_ids"]
    assert encoded.input_ids[: len(with_specials)] == with_specials
    assert encoded.prompt_length == len(with_specials)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_eos_stays_labelled_when_padding_with_eos(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    encoder = SegmentEncoder(tokenizer)
    short = encoder.encode([("Answer:", False), (" positive", True)])
    long = encoder.encode([("Is this review positive or negative? The movie was wonderful.", False), (" yes", True)])
    pad_id = tokenizer.eos_token_id  # pad == eos, the case that loses EOS in naive collators
    batch = SFTCollator(pad_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n


def test_truncation_that_empties_the_response_is_dropped_and_counted(tiny_tokenizer):
    rows = [
        {"prompt": "word " * 100, "completion": "answer"},  # prompt alone exceeds max_length
        {"prompt": "Q:", "completion": " yes"},
        {"prompt": "Q:", "completion": "   "},  # empty response
    ]
    dm = InstructionDataModule(tiny_tokenizer, train_data=rows, val_fraction=0.0, max_length=16)
    dm.setup()
    counts = dm.stats["train"]
    assert counts["dropped_empty_after_truncation"] == 1
    assert counts["dropped_empty_response"] == 1
    assert counts["examples"] == len(dm.train_dataset) == 1


@pytest.mark.parametrize("kind", ["embedded", "gpt2_style"])
def test_chat_loss_on_every_assistant_turn(tokenizers_by_kind, kind):
    tokenizer = tokenizers_by_kind[kind]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ]
    dm = InstructionDataModule(tokenizer, train_data=[{"messages": messages}], val_fraction=0.0)
    dm.setup()
    example = dm.train_dataset[0]
    labelled = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    masked = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
    assert "Blue." in labelled and "Red." in labelled
    assert "Name a colour." not in labelled and "Another?" not in labelled and "Be brief." not in labelled
    assert "Name a colour." in masked
    # the whole rendered conversation, tokenized segment by segment, decodes to the template's text
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered


def test_special_prefix(tokenizers_by_kind):
    assert special_prefix(tokenizers_by_kind["embedded"]) == [tokenizers_by_kind["embedded"].bos_token_id]
    assert special_prefix(tokenizers_by_kind["sentencepiece_style"]) == [1]
    assert special_prefix(tokenizers_by_kind["gpt2_style"]) == []


def test_record_where_names_the_row(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert [r.where for r in read_records(str(path))] == [f"{path}, row 1", f"{path}, row 3"]
    assert isinstance(read_records([{"x": 1}])[0], Record)
