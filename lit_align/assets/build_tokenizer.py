"""Train the embedded byte-level BPE tokenizer on the bundled sample text.

Run from the repository root to rebuild ``lit_align/assets/tokenizer/``::

    python -m lit_align.assets.build_tokenizer

The tokenizer is a real byte-level BPE (merges cross word pieces, as GPT-2/Llama-3 style tokenizers do), so that
prompt/response boundary bugs show up in our tests the way they would with a user's tokenizer. It has distinct BOS,
EOS and PAD tokens, adds BOS when asked for special tokens, and ships a chat template that renders BOS itself (the
Llama habit that causes double-BOS bugs in naive data code).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

ASSETS = Path(__file__).parent
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus() -> Iterator[str]:
    data = ASSETS / "data"
    for line in (data / "self_instruct_seed_tasks.jsonl").read_text().splitlines():
        row = json.loads(line)
        yield row["instruction"]
        for instance in row["instances"]:
            yield instance["input"]
            yield instance["output"]
    for line in (data / "t0_rotten_tomatoes_sentiment_with_choices.jsonl").read_text().splitlines():
        row = json.loads(line)
        yield row["prompt"]
        yield row["completion"]
    with gzip.open(data / "hh_rlhf_harmless_base_test_head300.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            yield row["chosen"]
            yield row["rejected"]


def build(out_dir: Path = ASSETS / "tokenizer") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


if __name__ == "__main__":
    build()
    print(f"wrote {ASSETS / 'tokenizer'}")
