"""Regression tests for the data defects of issue 14 ("Hardening"), each failing on the code before its fix; bad
inputs feed the ``pytest -m reliability`` summary line."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, _train, needs_shared
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lit_align.data import DataError, InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_align.data.sources import read_records
from lit_align.data.tokenize import empty_response, special_prefix
from lit_align.models import load_tokenizer
from lit_align.ops import IGNORE_INDEX

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


# ----- chats: tokenizers of every kind, and the check of every assistant turn -----------------------------------------
# Plain role prefixes, no BOS and no special turn markers: only the EOS that ends an assistant turn splits the text.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def metaspace_tokenizer(unk_token: str | None = "<unk>", template: str = PLAIN_CHAT_TEMPLATE):
    """SentencePiece-style BPE (metaspace) without byte fallback: characters outside the vocabulary become the unknown
    token (or nothing, without one). BOS added by the post-processor, pad == eos, a chat template without BOS."""
    tok = _train(
        models.BPE(unk_token=unk_token),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        decoders.Metaspace(replacement="▁", prepend_scheme="first"),
        ["<unk>", "<s>", "</s>"],
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token=unk_token
    )
    fast.chat_template = template
    return fast


CHAT_KINDS = ["embedded", "gpt2_style", "sentencepiece_style", "metaspace_no_fallback"]


@pytest.fixture(scope="module")
def tokenizers(tokenizers_by_kind) -> dict:
    return {**tokenizers_by_kind, "metaspace_no_fallback": metaspace_tokenizer()}


def render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def inference_ids(tokenizer, text: str) -> list[int]:
    """What inference feeds the model for a rendered chat: the tokenizer on the text as the chat template wrote it,
    with the tokenizer's BOS in front where the template did not write it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def check_chat(tokenizer, messages, input_ids, labels, unlabelled=()) -> int:
    """Every assistant turn's inference prompt is an exact prefix of ``input_ids``, exactly the turn's tokens are
    labelled (none for the turns in ``unlabelled``) and end with a labelled end-of-turn token; the whole sequence is the
    tokenizer's own encoding of the rendered conversation, with one BOS where the tokenizer uses one. Returns the
    number of assistant turns checked."""
    assert input_ids == inference_ids(tokenizer, render(tokenizer, messages, False))
    prefix = special_prefix(tokenizer)
    if prefix:
        assert input_ids[: len(prefix)] == prefix and input_ids.count(tokenizer.bos_token_id) == 1
    expected = [IGNORE_INDEX] * len(input_ids)
    turns = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = inference_ids(tokenizer, render(tokenizer, messages[:i], True))
        assert input_ids[: len(prompt)] == prompt, f"assistant turn {i}: the inference prompt is not a prefix"
        end = len(inference_ids(tokenizer, render(tokenizer, messages[: i + 1], False)))
        if i not in unlabelled:
            expected[len(prompt) : end] = input_ids[len(prompt) : end]
            specials = {k for k, token in tokenizer.added_tokens_decoder.items() if token.special}
            assert specials & set(input_ids[len(prompt) : end]), f"turn {i} has no end-of-turn token"
        turns += 1
    assert labels == expected
    return turns


def instruction_example(tokenizer, row: dict) -> dict:
    dm = InstructionDataModule(tokenizer, [row], val_fraction=0.0, max_length=4096)
    dm.setup()
    assert len(dm.train_dataset) == 1
    return dm.train_dataset[0]


# ----- 1. every assistant turn of a chat is tokenized as inference tokenizes it --------------------------------------
@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_every_assistant_turn_of_a_multi_turn_chat_has_its_inference_prompt_as_prefix(tokenizers, kind):
    """SentencePiece-style tokenizers write a word-start ``▁`` only at the start of a text: tokenizing the rendered
    chat in segments put a spurious one at the start of every later turn (after the end-of-turn token), so turns 2
    and 3 trained on ids that inference never produces."""
    tokenizer = tokenizers[kind]
    example = instruction_example(tokenizer, {"messages": CHAT})
    assert check_chat(tokenizer, CHAT, example["input_ids"], example["labels"]) == 3


@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_preference_and_prompt_data_render_chats_as_inference_does(tokenizers, kind):
    tokenizer = tokenizers[kind]
    rejected = {"role": "assistant", "content": "Negative."}
    dm = PreferenceDataModule(
        tokenizer, [{"prompt": CHAT[:-1], "chosen": [CHAT[-1]], "rejected": [rejected]}], val_fraction=0.0
    )
    dm.setup()
    example = dm.train_dataset[0]
    assert example["prompt_ids"] == inference_ids(tokenizer, render(tokenizer, CHAT[:-1], True))
    for turn, response in zip((CHAT[-1], rejected), example["response_ids"]):
        assert example["prompt_ids"] + response == inference_ids(
            tokenizer, render(tokenizer, [*CHAT[:-1], turn], False)
        )
    prompts = PromptDataModule(tokenizer, [{"messages": CHAT}, {"prompt": CHAT[:-1]}], val_fraction=0.0)
    prompts.setup()
    for prompt in prompts.train_dataset:
        assert prompt["prompt_ids"] == inference_ids(tokenizer, render(tokenizer, CHAT[:-1], True))


@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_a_completion_is_tokenized_as_it_follows_its_prompt(tokenizers, kind):
    """The same defect outside chats: a completion tokenized on its own got a word-start ``▁`` (a space that is not in
    the data) from SentencePiece-style tokenizers, as with the Alpaca format's ``"### Response:\\n"`` + ``"Sure"``."""
    tokenizer = tokenizers[kind]
    prompt, completion = "Is this review positive or negative?\nAnswer:", "positive"
    example = instruction_example(tokenizer, {"prompt": prompt, "completion": completion})
    expected = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer(prompt)["input_ids"] == expected[: len(tokenizer(prompt)["input_ids"])]  # no merge here
    assert example["input_ids"] == expected
    assert example["labels"][len(tokenizer(prompt)["input_ids"]) :] == expected[len(tokenizer(prompt)["input_ids"]) :]


def dialogue_messages(text: str) -> list[dict[str, str]]:
    """An Anthropic HH dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) as chat turns."""
    parts = re.split(r"\n\n(Human|Assistant):", text)[1:]
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[::2], parts[1::2])
    ]


@needs_shared
@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_every_turn_of_hh_dialogues_has_its_inference_prompt_as_prefix(tokenizers, kind):
    """400 Anthropic HH dialogues as multi-turn chats (991 assistant turns): with the SentencePiece-style tokenizer,
    591 of them trained on ids that differ from what ``apply_chat_template`` gives at inference before the fix."""
    tokenizer = tokenizers[kind]
    with gzip.open(SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz", "rt") as f:
        chats = [dialogue_messages(json.loads(line)["chosen"]) for _, line in zip(range(400), f)]
    dm = InstructionDataModule(tokenizer, [{"messages": m} for m in chats], val_fraction=0.0, max_length=100_000)
    dm.setup()
    examples = iter(dm.train_dataset)
    checked = 0
    for messages in chats:
        replies = {
            i: empty_response(tokenizer, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"
        }
        if all(replies.values()):
            continue  # no trainable turn: dropped and counted
        example = next(examples)
        unlabelled = {i for i, reason in replies.items() if reason}
        checked += check_chat(tokenizer, messages, example["input_ids"], example["labels"], unlabelled)
    assert checked == sum(m["role"] == "assistant" for messages in chats for m in messages) > 900


# ----- a merge across a turn boundary leaves no right sequence: a named error ---------------------------------------
SPACE_AFTER_MARKER_TEMPLATE = (  # the generation prompt ends in a space, which byte-level BPE joins to the next word
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ 'Human: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def test_a_merge_across_a_turn_boundary_is_a_named_error(tmp_path, tiny_tokenizer, reliability):
    """Here the inference prompt of turn 1 ends in ``"Ġ"`` while that of turn 2 holds ``"ĠB"`` (of ``" Blue."``): no
    one token sequence has both as prefixes. The old code trained turn 2 on a prompt that inference never gives."""
    tokenizer = load_tokenizer("tiny")  # a copy: the session's tokenizer keeps its template
    tokenizer.chat_template = SPACE_AFTER_MARKER_TEMPLATE
    alone = tokenizer("Assistant: ", add_special_tokens=False)["input_ids"]
    assert tokenizer("Assistant: Blue.", add_special_tokens=False)["input_ids"][: len(alone)] != alone  # the hazard
    good = {"messages": CHAT[1:3]}  # one turn: the turn alone after its prompt keeps the guarantee
    path = _bad_row_file(tmp_path, good, {"messages": CHAT[1:5]})

    def make(path, bad_rows):
        return InstructionDataModule(tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    error = check_bad_row(make, path, "messages[1]", reliability)
    assert "merges the end of messages[0] and the start of messages[1]" in str(error)
    single = instruction_example(tokenizer, good)
    prompt = inference_ids(tokenizer, render(tokenizer, CHAT[1:2], True))
    turn = tokenizer("Blue." + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert single["input_ids"] == prompt + turn and single["labels"] == [IGNORE_INDEX] * len(prompt) + turn


def test_a_completion_that_would_gain_a_space_is_a_named_error(tmp_path, reliability):
    """A prompt ending in a space: SentencePiece-style tokenizers join the space to the completion's first word, and the
    completion on its own gains a word-start ``▁`` (the old code trained on ``"▁", "▁positive"``: two spaces)."""
    tokenizer = metaspace_tokenizer()
    good = {"prompt": "Answer:", "completion": " positive"}
    path = _bad_row_file(tmp_path, good, {"prompt": "Answer: ", "completion": "positive"})

    def make(path, bad_rows):
        return InstructionDataModule(tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    check_bad_row(make, path, "completion", reliability)


# ----- 2. content outside the vocabulary ------------------------------------------------------------------------------
@pytest.mark.parametrize("unk_token", ["<unk>", None], ids=["unknown token", "no unknown token"])
def test_responses_the_vocabulary_cannot_represent_are_dropped_and_counted(unk_token, reliability):
    """Emoji with a metaspace vocabulary without byte fallback become nothing (or ``▁`` and the unknown token): the
    old code trained a lone end-of-turn token, or the unknown token, uncounted."""
    tokenizer = metaspace_tokenizer(unk_token)
    emoji = "😀🙂"
    assert empty_response(tokenizer, emoji) == "dropped_empty_after_tokenization"
    assert empty_response(tokenizer, "Blue. " + emoji) is None  # some text survives: a response
    chat = [*CHAT[1:3], {"role": "user", "content": "And you?"}, {"role": "assistant", "content": emoji}]
    rows = [
        {"prompt": "Q:", "completion": " Blue."},
        {"prompt": "Q:", "completion": emoji},
        {"instruction": "Name a colour.", "output": emoji},
        {"messages": [*CHAT[1:2], {"role": "assistant", "content": emoji}]},  # nothing left: dropped
        {"messages": chat},  # the emoji turn is not labelled, the first turn trains
    ]
    dm = InstructionDataModule(tokenizer, rows, val_fraction=0.0)
    dm.setup()
    reliability["bad_inputs"] += 4
    assert dm.stats["train"]["dropped_empty_after_tokenization"] == 4
    assert dm.stats["train"]["examples"] == len(dm.train_dataset) == 2
    reliability["counted_skips"] += 4
    check_chat(tokenizer, chat, dm.train_dataset[1]["input_ids"], dm.train_dataset[1]["labels"], unlabelled={3})
    for example in dm.train_dataset:  # nothing trains on an end-of-turn token alone
        labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(labelled, skip_special_tokens=True).strip()

    preference = PreferenceDataModule(
        tokenizer,
        [
            {"prompt": "Q:", "chosen": " Blue.", "rejected": " Red."},
            {"prompt": "Q:", "chosen": emoji, "rejected": " Red."},
            {"prompt": CHAT[1:2], "chosen": " Blue.", "rejected": emoji},
        ],
        val_fraction=0.0,
    )
    preference.setup()
    reliability["bad_inputs"] += 2
    assert preference.stats["train"]["dropped_empty_after_tokenization"] == 2
    assert preference.stats["train"]["examples"] == 1
    reliability["counted_skips"] += 2


# ----- 3. an empty assistant turn -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_empty_assistant_turns_are_not_trained_and_counted(tokenizers, kind, reliability):
    """The old code kept a chat whose assistant turn is empty and trained an immediate end of turn, uncounted. Now an
    empty turn is not labelled and counted as an empty response; a chat with no other turn is dropped."""
    tokenizer = tokenizers[kind]
    chat = [CHAT[1], {"role": "assistant", "content": ""}, CHAT[3], CHAT[4]]
    rows = [
        {"messages": [CHAT[1], {"role": "assistant", "content": "  "}]},
        {"messages": chat},
        {"messages": CHAT[1:3]},
    ]
    dm = InstructionDataModule(tokenizer, rows, val_fraction=0.0)
    dm.setup()
    reliability["bad_inputs"] += 2
    assert dm.stats["train"]["dropped_empty_response"] == 2
    assert dm.stats["train"]["examples"] == len(dm.train_dataset) == 2
    reliability["counted_skips"] += 2
    check_chat(tokenizer, chat, dm.train_dataset[0]["input_ids"], dm.train_dataset[0]["labels"], unlabelled={1})

    empty_chosen = {"prompt": CHAT[1:2], "chosen": [{"role": "assistant", "content": ""}], "rejected": "Red."}
    preference = PreferenceDataModule(tokenizer, [empty_chosen], val_fraction=0.0)
    reliability["bad_inputs"] += 1
    with pytest.raises(ValueError, match="no usable training examples"):
        preference.setup()
    assert preference.stats["train"]["dropped_empty_response"] == 1
    reliability["counted_skips"] += 1


def test_prompts_of_rows_with_an_empty_response_are_still_prompts(tiny_tokenizer):
    """PPO samples its own responses: an instruction row whose output is empty still gives its prompt (the old code
    dropped it without a count)."""
    dm = PromptDataModule(tiny_tokenizer, [{"instruction": "Name a colour.", "output": ""}], val_fraction=0.0)
    dm.setup()
    assert len(dm.train_dataset) == 1 and dm.train_dataset[0]["prompt_text"].endswith("### Response:\n")


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


# ----- 7. an empty chosen response ------------------------------------------------------------------------------------
def test_an_empty_response_is_counted_as_empty_not_as_truncated(tiny_tokenizer, reliability):
    rows = [
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q:", "chosen": "", "rejected": " no"},
        {"prompt": "Q:", "chosen": " yes", "rejected": "  "},
        {"prompt": "Q:", "responses": [" a", "", " b"], "ranking": [0, 2, 1]},
    ]
    dm = PreferenceDataModule(tiny_tokenizer, rows, val_fraction=0.0)
    dm.setup()
    counts = dm.stats["train"]
    reliability["bad_inputs"] += 4
    assert counts["dropped_empty_response"] == 4 and counts["dropped_empty_after_truncation"] == 0
    assert counts["examples"] == 2 and counts["pairs"] == 2
    reliability["counted_skips"] += 4
