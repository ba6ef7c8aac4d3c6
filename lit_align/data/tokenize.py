"""Tokenizing prompt/response text for any Hugging Face tokenizer, with the guarantees alignment losses rely on.

- The prompt's tokens are an exact prefix of the prompt+response tokens: each text segment is tokenized on its own and
  the ids are concatenated, so no BPE merge ever crosses the prompt/response boundary.
- Exactly one BOS when the tokenizer uses one: tokenizers that add BOS get it once, chat templates that render BOS
  themselves do not get a second one, tokenizers without BOS get none.
- The response ends in EOS, and EOS is labelled even when ``pad_token == eos_token`` (labels are built from segment
  flags, never from comparing ids with the pad id).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_align.data.sources import DataError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids ``tokenizer`` puts before a text when asked for special tokens (``[bos_id]`` for Llama-style
    tokenizers, ``[]`` for GPT-2 or Qwen style)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


@dataclass
class Encoded:
    """A tokenized example: ``input_ids`` and ``labels`` (``IGNORE_INDEX`` where no loss is taken) of equal length,
    and ``prompt_length``: the number of leading tokens up to the first labelled one."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def prompt_length(self) -> int:
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))


@dataclass
class SegmentEncoder:
    """Tokenizes a sequence of ``(text, trainable)`` segments; see the module docstring for the guarantees.

    Args:
        tokenizer: any Hugging Face tokenizer.
        max_length: longest sequence kept, in tokens; longer ones are cut at the end (right truncation).
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int | None = None
    prefix: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} has no eos token; set one before training")
        self.prefix = special_prefix(self.tokenizer)

    def encode(self, segments: Sequence[tuple[str, bool]], add_eos: bool = True) -> Encoded:
        """Token ids and labels for ``segments``; ``add_eos`` ends the last trainable segment with EOS unless its
        text already ends with it (as chat templates do)."""
        eos = self.tokenizer.eos_token_id
        input_ids: list[int] = []
        labels: list[int] = []
        last_trainable = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=None)
        for i, (text, trainable) in enumerate(segments):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if i == last_trainable and add_eos and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            input_ids += ids
            labels += ids if trainable else [IGNORE_INDEX] * len(ids)
        if self.prefix and input_ids[: len(self.prefix)] != self.prefix:
            input_ids = self.prefix + input_ids
            labels = [IGNORE_INDEX] * len(self.prefix) + labels
        truncated = self.max_length is not None and len(input_ids) > self.max_length
        if truncated:
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return Encoded(input_ids, labels, truncated)


MAX_TEXT_CHARS = 200_000  # far beyond any context window's worth of text: a larger field is a broken row


def check_text(value: Any, where: str, field_name: str) -> str:
    """``value`` if it is usable text, else a :class:`DataError` naming ``where`` and ``field_name``."""
    if value is None:
        raise DataError(where, field_name, "is missing (None)")
    if not isinstance(value, str):
        raise DataError(where, field_name, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(
            where, field_name, f"is {len(value):,} characters long, over the {MAX_TEXT_CHARS:,} a field may have"
        )
    if "\x00" in value:
        raise DataError(where, field_name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(where, field_name, "contains a lone surrogate (invalid Unicode)") from None
    return value


def check_messages(messages: Any, where: str, field_name: str = "messages") -> list[dict[str, str]]:
    """Validated chat turns: roles from :data:`CHAT_ROLES`, string contents, an optional leading system turn, then
    user and assistant turns alternating, starting with the user, with at least one assistant turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(where, field_name, "must be a non-empty list of {'role', 'content'} turns")
    turns = []
    for i, message in enumerate(messages):
        name = f"{field_name}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(where, name, f"must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DataError(where, f"{name}.role", f"unknown chat role {role!r}; expected one of {CHAT_ROLES}")
        turns.append({"role": role, "content": check_text(message.get("content"), where, f"{name}.content")})
    roles = [t["role"] for t in turns]
    dialogue = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(dialogue):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            index = i + (len(roles) - len(dialogue))
            raise DataError(where, f"{field_name}[{index}].role", f"turns must alternate user/assistant; got {role!r}")
    if "assistant" not in dialogue:
        raise DataError(where, field_name, "has no assistant turn to learn from")
    return turns


def check_prompt_messages(messages: Any, where: str, field_name: str) -> list[dict[str, str]]:
    """Validated prompt turns: an optional system turn, then user and assistant turns alternating, starting and ending
    with the user (the assistant's reply is what is to come)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(where, field_name, "must be a non-empty list of {'role', 'content'} turns")
    try:
        return check_messages([*messages, {"role": "assistant", "content": ""}], where, field_name)[:-1]
    except DataError as error:
        if error.field != f"{field_name}[{len(messages)}].role":  # not the reply we added
            raise
        last = f"{field_name}[{len(messages) - 1}].role"
        raise DataError(where, last, f"a prompt must end with a user turn; got {messages[-1]['role']!r}") from None


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> list[tuple[str, bool]]:
    """Split a conversation rendered by ``tokenizer``'s chat template into ``(text, is_assistant_turn)`` segments.

    Each assistant turn is the text between the rendering of the turns before it with the generation prompt and the
    rendering that includes it, so the labelled text is exactly what the model must generate at inference.
    """
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; cannot render 'messages'")

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                where,
                "messages",
                f"the chat template does not render turns as prefixes of each other; cannot locate assistant turn {i}",
            )
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    rest = render(messages, False)
    if not rest.startswith(done):
        raise DataError(
            where, "messages", "the chat template renders the whole conversation differently from its turns"
        )
    if rest[len(done) :]:
        segments.append((rest[len(done) :], False))
    return segments
