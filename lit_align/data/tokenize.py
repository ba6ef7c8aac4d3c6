"""Tokenizing prompt/response text for any Hugging Face tokenizer, with the guarantees alignment losses rely on.

- The prompt, encoded as at inference, is an exact prefix of the training sequence, for every response of an
  example: every assistant turn of a chat (``tokenizer(apply_chat_template(messages[:i], add_generation_prompt=True),
  add_special_tokens=False)``), the prompt of a prompt/completion row (``tokenizer(prompt)``).
- The text is tokenized as one string, as the tokenizer itself does at inference, and each segment's tokens are found
  by tokenizing the text up to every segment boundary: SentencePiece-style (metaspace) tokenizers mark a word start
  with ``▁`` only at the start of a text, so tokenizing segments one by one would put a spurious ``▁`` at each
  segment start. Where a token spans a boundary (a BPE merge across it), the text after the last boundary is
  tokenized on its own, which keeps the prompt a prefix; a merge across an earlier boundary (a turn of a multi-turn
  chat) leaves no token sequence that is right for every turn, and the row is refused with a ``DataError``.
- Exactly one BOS when the tokenizer uses one: tokenizers that add BOS get it once, chat templates that render BOS
  themselves do not get a second one, tokenizers without BOS get none.
- The response ends in EOS, and EOS is labelled even when ``pad_token == eos_token`` (labels are built from segment
  flags, never from comparing ids with the pad id).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from lit_align.data.sources import DataError
from lit_align.ops import IGNORE_INDEX

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


class Segment(NamedTuple):
    """A piece of an example's text: ``trainable`` if the loss is taken on its tokens; ``field`` names where it comes
    from in the row (``"completion"``, ``"messages[3]"``), for error messages."""

    text: str
    trainable: bool
    field: str | None = None


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

    def tokenize(self, text: str) -> list[int]:
        """``text``'s ids without the special tokens the tokenizer adds around a text (special tokens written in the
        text, as chat templates write them, are kept)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, segments: Sequence[tuple[str, bool]], add_eos: bool = True, where: str = "input") -> Encoded:
        """Token ids and labels for ``segments`` (``(text, trainable)`` pairs or :class:`Segment`); ``add_eos`` ends
        the sequence with EOS, labelled if the last segment is, unless its text already ends with it (as chat
        templates do). Raises a :class:`DataError` naming ``where`` and the segment's field if no token sequence can
        keep the guarantees."""
        segments = [Segment(*segment) for segment in segments]
        input_ids: list[int] = []  # always the tokens of the text so far, as the tokenizer encodes it on its own
        labels: list[int] = []
        text = ""
        for k, segment in enumerate(segments):
            text += segment.text
            ids = self.tokenize(text)
            if ids[: len(input_ids)] == input_ids:
                new = ids[len(input_ids) :]
            elif k == len(segments) - 1:  # a merge across the last boundary: the last segment on its own
                new = self._tokenize_apart(segment, where)
            else:
                raise self._merge_error(segments[k - 1], segment, ids, input_ids, where)
            input_ids += new
            labels += new if segment.trainable else [IGNORE_INDEX] * len(new)
        eos = self.tokenizer.eos_token_id
        if add_eos and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)
            labels.append(eos if segments and segments[-1].trainable else IGNORE_INDEX)
        if self.prefix and input_ids[: len(self.prefix)] != self.prefix:
            input_ids = self.prefix + input_ids
            labels = [IGNORE_INDEX] * len(self.prefix) + labels
        truncated = self.max_length is not None and len(input_ids) > self.max_length
        if truncated:
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return Encoded(input_ids, labels, truncated)

    def _tokenize_apart(self, segment: Segment, where: str) -> list[int]:
        ids = self.tokenize(segment.text)
        # A tokenizer that cannot tell "x" from " x" at the start of a text (SentencePiece's "▁" word-start marker)
        # would give the segment a space it does not have.
        if ids and ids == self.tokenize(" " + segment.text):
            raise DataError(
                where,
                segment.field,
                "the prompt ends in whitespace that this tokenizer joins to the first word of the response, and the "
                "response tokenized on its own would gain a word-start space it does not have (SentencePiece's '▁'); "
                "move the whitespace from the end of the prompt to the start of the response",
            )
        return ids

    def _merge_error(self, before: Segment, after: Segment, ids: list[int], done: list[int], where: str) -> DataError:
        at = next((i for i, (a, b) in enumerate(zip(ids, done)) if a != b), min(len(ids), len(done)))
        token = self.tokenizer.convert_ids_to_tokens(ids[at]) if at < len(ids) else None
        name = after.field if after.trainable or not before.trainable else before.field
        return DataError(
            where,
            name,
            f"the tokenizer merges the end of {before.field or 'the text before'} and the start of "
            f"{after.field or 'the text after'} into one token ({token!r}), so no single token sequence both starts "
            "with every turn's prompt as encoded at inference and labels exactly the assistant turns",
        )


def empty_response(tokenizer: PreTrainedTokenizerBase, text: str) -> str | None:
    """Why ``text`` is no response to learn from, as a count name, or ``None`` if it is one:
    ``"dropped_empty_response"`` if it is blank; ``"dropped_empty_after_tokenization"`` if the tokenizer keeps none of
    it (characters that a vocabulary without byte fallback lacks, such as emoji for a SentencePiece-style one, become
    nothing, a lone word-start ``▁`` or the unknown token), so that only the end-of-turn token would be trained."""
    if not text.strip():
        return "dropped_empty_response"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokenizer.decode(ids, skip_special_tokens=True).strip():
        return "dropped_empty_after_tokenization"
    return None


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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """``messages`` rendered by ``tokenizer``'s chat template, as text (with the assistant's generation prompt if
    ``generation_prompt``): the text that inference tokenizes."""
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; cannot render 'messages'")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str, field_name: str = "messages"
) -> list[Segment]:
    """Split a conversation rendered by ``tokenizer``'s chat template into segments, one trainable segment per
    assistant turn (its field ``f"{field_name}[i]"``), in order.

    Each assistant turn is the text between the rendering of the turns before it with the generation prompt and the
    rendering that includes it, so the labelled text is exactly what the model must generate at inference, and the
    text before it is exactly what inference tokenizes (:meth:`SegmentEncoder.encode` keeps the tokens to match).
    """
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render_chat(tokenizer, messages[:i], True), render_chat(tokenizer, messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                where,
                field_name,
                f"the chat template does not render turns as prefixes of each other; cannot locate assistant turn {i}",
            )
        segments += [
            Segment(before[len(done) :], False, f"{field_name}[{i - 1}]"),
            Segment(after[len(before) :], True, f"{field_name}[{i}]"),
        ]
        done = after
    rest = render_chat(tokenizer, messages, False)
    if not rest.startswith(done):
        raise DataError(
            where, field_name, "the chat template renders the whole conversation differently from its turns"
        )
    if rest[len(done) :]:
        segments.append(Segment(rest[len(done) :], False, field_name))
    return segments
