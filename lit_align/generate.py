"""Sampling from a trained policy: ``lit-align generate`` (prompts from the command line or a file, completions as
JSON lines, optionally scored by a reward model), the functions behind it, and the JSONL writer that
``lit-align predict`` uses.

Prompts are tokenized as in training (one BOS where the tokenizer uses one, none added to a chat template that
renders its own), left-padded, and decoded until EOS or the chat template's end-of-turn token. Sampling is keyed
(:func:`~lit_align.rollout.completion_seeds`, :class:`~lit_align.rollout.KeyedSampling`): completion ``k`` of prompt
``i`` depends on ``(seed, i, k)`` only, not on the batch it shares, so the output is the same for any
``batch_size``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.data.sources import BUNDLED_PREFIX, DataError, Record, UnreadableRow, read_records
from lit_align.data.tokenize import (
    SegmentEncoder,
    check_messages,
    check_prompt_messages,
    check_text,
    render_chat,
)
from lit_align.models import TINY, load_causal_lm, load_tokenizer
from lit_align.rollout.sampling import batch_prompt_ids, decode_prompt, generate_ids, stop_token_ids

__all__ = [
    "PROMPT_FIELDS",
    "PredictionsWriter",
    "batch_prompt_ids",
    "decode_prompt",
    "encode_prompts",
    "generate",
    "generate_ids",
    "load_policy",
    "main",
    "read_prompts",
    "render_prompts",
    "stop_token_ids",
]

Prompt = str | list[dict[str, str]]

#: the row fields ``lit-align generate --prompts FILE`` reads a prompt from, first found first
PROMPT_FIELDS = ("prompt", "messages", "question", "text")


# ----- the policy ---------------------------------------------------------------------------------------------------
def load_policy(
    path: str, dtype: str | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a policy, the model in eval mode: an exported Hugging Face directory (``lit-align fit``
    with ``export_dir``, :meth:`~lit_align.modules.base.AlignModule.export_hf`), a hub id, or ``"tiny"`` (the
    embedded preset, untrained). ``dtype`` as in :func:`~lit_align.models.load_causal_lm`; a model's own code runs
    only with ``trust_remote_code``."""
    if path != TINY:
        where = Path(path).expanduser()
        looks_local = where.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
        if where.exists() and not where.is_dir():
            raise ValueError(f"{path}: not a directory; pass an exported model directory, a hub id or 'tiny'")
        if where.is_dir() and not (where / "config.json").is_file():
            raise ValueError(f"{path}: holds no model (no config.json); pass the directory that export_dir wrote")
        if looks_local and not where.exists():
            raise FileNotFoundError(f"{path}: no such directory (a trained policy is exported to export_dir)")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, tokenizer, dtype, trust_remote_code)
    return model.eval(), tokenizer


# ----- prompts ------------------------------------------------------------------------------------------------------
def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], chat_template: bool | None = None
) -> list[str]:
    """The text the policy continues for each prompt.

    - ``chat_template=None`` (auto): a chat (a list of ``{"role", "content"}`` turns) is rendered with the tokenizer's
      chat template and the assistant's generation prompt; a plain string is used as it is.
    - ``True``: a plain string too is rendered, as one user turn.
    - ``False``: no template; a chat is refused.

    A chat may end with a user turn, or with an assistant turn, which is dropped (the prompt is then what inference
    renders for that reply, as :class:`~lit_align.data.PromptDataModule` reads such rows). Raises ``ValueError``
    naming the prompt (``DataError`` for a malformed chat); a tokenizer without a chat template cannot render one."""
    rendered = []
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}"
        if isinstance(prompt, str):
            text = check_text(prompt, where, "prompt")
            if chat_template:
                text = render_chat(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)
            rendered.append(text)
            continue
        if not isinstance(prompt, Sequence) or not prompt:
            raise DataError(where, "prompt", f"must be a string or a list of chat turns, got {type(prompt).__name__}")
        if chat_template is False:
            raise ValueError(f"{where} is a chat (a list of messages) but the chat template is off (chat_template "
                             "false); pass it as text, or turn the template on")  # fmt: skip
        rendered.append(render_chat(tokenizer, _prompt_turns(prompt, where, "messages"), generation_prompt=True))
    return rendered


def _prompt_turns(messages: Sequence[Any], where: str, field: str) -> list[dict[str, str]]:
    """Validated prompt turns of a chat, a trailing assistant turn dropped."""
    if isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
        return check_messages(messages, where, field)[:-1]
    return check_prompt_messages(messages, where, field)


# ----- sampling -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's ids as training encodes a prompt (:class:`~lit_align.data.tokenize.SegmentEncoder`): the
    tokenizer's own encoding with exactly one BOS where the tokenizer uses one (none added to a chat template's own)."""
    encoder = SegmentEncoder(tokenizer)
    return [encoder.encode([(text, False)], add_eos=False).input_ids for text in prompts]


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[str]]:
    """``num_samples`` completions of each prompt (text, as :func:`render_prompts` gives it), decoded without special
    tokens: greedy when ``temperature == 0``, else sampled; the same for a ``seed`` whatever ``batch_size`` (see
    :func:`generate_ids`)."""
    ids = generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, num_samples=num_samples, batch_size=batch_size,
                       stream=(seed, "generate"))  # fmt: skip
    return [[tokenizer.decode(c, skip_special_tokens=True) for c in samples] for samples in ids]


# ----- lit-align predict --------------------------------------------------------------------------------------------
class PredictionsWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returns (a list of JSON-ready dicts per batch) as JSON lines to ``path`` as the
    batches come, and says where when done. With several ranks, rank ``r > 0`` writes ``<stem>.rank<r>.jsonl`` beside
    it. ``lit-align predict`` adds one writing ``<trainer.default_root_dir>/predictions.jsonl`` unless the config
    names a prediction writer of its own."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._file: TextIO | None = None
        self.lines = 0

    def _rank_path(self, trainer: Any) -> Path:
        if trainer.global_rank == 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        path = self._rank_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file, self.lines = path.open("w", encoding="utf-8"), 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = prediction if isinstance(prediction, list) else [prediction]
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.lines += len(rows)
        self._file.flush()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        rank_zero_info(f"lit_align: {self.lines} predictions written to {self.path.resolve()}")


# ----- lit-align generate -------------------------------------------------------------------------------------------
def read_prompts(path: str, field: str | None = None) -> list[Prompt]:
    """The prompts of a JSONL/JSON/CSV/Parquet file or a bundled sample (``bundled:<file>``, read by
    :func:`~lit_align.data.read_records`): from each row's ``field``, or the first of :data:`PROMPT_FIELDS` it has; a
    string, or a chat (a list of turns, validated). A bad row raises a :class:`~lit_align.data.DataError` naming the
    file, the row and the field."""
    if not path.startswith(BUNDLED_PREFIX) and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts: list[Prompt] = []
    for record in read_records(path):
        prompts.append(_row_prompt(record, field))
    if not prompts:
        raise ValueError(f"--prompts {path}: holds no rows")
    return prompts


def _row_prompt(record: Record, field: str | None) -> Prompt:
    row, where = record.row, record.where
    if isinstance(row, UnreadableRow):
        raise DataError(where, None, row.problem)
    if not isinstance(row, Mapping):
        raise DataError(where, None, f"must be an object with named fields, got {type(row).__name__}")
    if field is None:
        field = next((name for name in PROMPT_FIELDS if name in row), None)
        if field is None:
            raise DataError(where, None, f"has fields {sorted(row)}; expected one of {list(PROMPT_FIELDS)} "
                                         "(or name the field with --prompt_field)")  # fmt: skip
    elif field not in row:
        raise DataError(where, field, f"is missing (--prompt_field {field}); the row has {sorted(row)}")
    value = row[field]
    if isinstance(value, list):
        if not value:
            raise DataError(where, field, "is an empty list of chat turns")
        return _prompt_turns(value, where, field)
    text = check_text(value, where, field)
    if not text.strip():
        raise DataError(where, field, "is empty")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-align generate",
        description="Sample completions from a policy (an exported directory, a hub id or 'tiny') and write them as "
        'JSON lines: {"prompt", "completion", "sample"} and, with --reward_model, "reward".',
    )
    parser.add_argument("--model", required=True, help="the policy: an export_dir, a hub id, or 'tiny'")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    given.add_argument("--prompts", help="a JSONL/JSON/CSV/Parquet file of prompts (one a row), or bundled:<file>")
    parser.add_argument("--prompt_field", default=None,
                        help=f"the row field holding the prompt (default: the first of {', '.join(PROMPT_FIELDS)}); "
                        "a string, or a list of chat turns")  # fmt: skip
    parser.add_argument("--output", default=None, help="the JSONL file to write (default: standard output)")
    parser.add_argument("--reward_model", default=None, help="an exported reward model to score each completion")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="the most tokens per completion")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (the default)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling's probability mass")
    parser.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the output does not depend on batch_size)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass")
    parser.add_argument("--chat_template", choices=("auto", "true", "false"), default="auto",
                        help="auto: chats rendered with the tokenizer's template, text as it is; true: text too, as "
                        "one user turn; false: no template")  # fmt: skip
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="let the model's and tokenizer's own code run (off unless you trust the source)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lit-align generate``: returns the exit status (0, or 2 with a one-line error on standard error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _generate_command(args)
    except (DataError, ValueError, FileNotFoundError, OSError) as error:
        print(f"lit-align generate: error: {error}", file=sys.stderr)
        return 2


def _generate_command(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"lit-align generate: {message}", file=sys.stderr, flush=True)

    prompts: list[Prompt] = list(args.prompt) if args.prompt else read_prompts(args.prompts, args.prompt_field)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say(f"loading the policy {args.model}")
    model, tokenizer = load_policy(args.model, args.dtype, args.trust_remote_code)
    model.to(device)
    chat_template = {"auto": None, "true": True, "false": False}[args.chat_template]
    rendered = render_prompts(tokenizer, prompts, chat_template)
    say(f"sampling {args.num_samples} completion(s) for each of {len(prompts)} prompt(s) on {device}")
    completions = generate(model, tokenizer, rendered, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples,
                           seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    rows = [
        {"prompt": prompt, "completion": text, "sample": k}
        for prompt, samples in zip(prompts, completions)
        for k, text in enumerate(samples)
    ]
    if args.reward_model is not None:
        from lit_align.modules.reward import RewardScorer

        say(f"scoring with the reward model {args.reward_model}")
        scorer = RewardScorer.from_pretrained(args.reward_model, args.dtype, args.trust_remote_code).to(device)
        flat_prompts = [text for text, samples in zip(rendered, completions) for _ in samples]
        rewards = scorer.score(flat_prompts, [row["completion"] for row in rows], batch_size=args.batch_size).tolist()
        for i, (row, reward) in enumerate(zip(rows, rewards)):
            if not math.isfinite(reward):
                raise ValueError(f"the reward model gave a non-finite reward ({reward}) to row {i} (prompt "
                                 f"{i // args.num_samples}, sample {row['sample']})")  # fmt: skip
            row["reward"] = reward
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(lines, encoding="utf-8")
        say(f"wrote {len(rows)} completion(s) to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
