"""Shared fixtures: the embedded tokenizer, user-style tokenizers built offline, and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lit_align.models import load_tokenizer
from lit_align.ops import position_ids_from_mask
from lit_align.rollout import Completions, HFGenerator

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")

torch.set_num_threads(min(2, os.cpu_count() or 1))

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Is this review positive or negative? The movie was wonderful and the acting superb.",
    "OPTIONS: - positive - negative. Answer: positive. Answer: negative.",
    "Human: what are some pranks with a pen i can do? Assistant: Are you looking for practical joke ideas?",
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. #### 72",
    "The capital of France is Paris. Translate the sentence into French. Classify the sentiment of the tweet.",
] * 20

LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _train(model, pre_tokenizer, decoder, specials, vocab_size=400, alphabet=()):
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(alphabet), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, no BOS added, pad == bos == eos == <|endoftext|>, ChatML template without BOS."""
    tok = _train(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (metaspace, byte fallback), BOS added by the post-processor, pad == eos, and a
    Llama-2 chat template that renders BOS itself."""
    tok = _train(
        models.BPE(unk_token="<unk>", byte_fallback=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        decoders.Metaspace(replacement="▁", prepend_scheme="first"),
        ["<unk>", "<s>", "</s>"],
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    return fast


TOKENIZER_KINDS = ["embedded", "gpt2_style", "sentencepiece_style"]


@pytest.fixture(scope="session")
def tokenizers_by_kind() -> dict:
    return {
        "embedded": load_tokenizer("tiny"),
        "gpt2_style": gpt2_style_tokenizer(),
        "sentencepiece_style": sentencepiece_style_tokenizer(),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer(tokenizers_by_kind):
    return tokenizers_by_kind["embedded"]


# ----- precisions a CPU can really run ------------------------------------------------------------------------------
def precision_setting(name: str) -> dict:
    """Trainer arguments for ``name``. ``"bf16-mixed"`` is Lightning's own. Lightning turns ``precision="16-mixed"``
    on a CPU into bf16, so ``"fp16-scaled"`` passes the plugin explicitly: fp16 autocast on the CPU with a
    ``GradScaler`` (loss scaling, unscaling before clipping, skipped steps on overflow), fp32 master weights."""
    if name == "fp16-scaled":
        from lightning.pytorch.plugins.precision import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": name}


# ----- the reliability summary (pytest -m reliability) ----------------------------------------------------------------
RELIABILITY = {
    "bad_inputs": 0,
    "named_errors": 0,
    "counted_skips": 0,
    "faults": 0,
    "survived": 0,
    "resumes": 0,
    "batches_lost": 0,
    "batches_duplicated": 0,
}


@pytest.fixture
def reliability() -> dict[str, int]:
    """Counters that reliability tests add to; printed as one line at the end of the session."""
    return RELIABILITY


def pytest_terminal_summary(terminalreporter) -> None:
    r = RELIABILITY
    if r["bad_inputs"] or r["faults"] or r["resumes"]:
        terminalreporter.write_line(
            f"reliability: {r['bad_inputs']} bad inputs tried ({r['named_errors']} named errors, "
            f"{r['counted_skips']} counted skips); {r['faults']} faults injected, {r['survived']} survived; "
            f"{r['resumes']} killed-and-resumed runs, {r['batches_lost']} batches lost, "
            f"{r['batches_duplicated']} duplicated"
        )


class LogpsReportingGenerator(HFGenerator):
    """Hugging Face sampling that also reports the sampler's log-probs, as an engine such as vLLM does: the policy's
    own (a plain forward of the left-padded prompt and completion, at the sampling temperature) plus ``offset``, a
    stand-in for a sampler whose numbers differ from the trainer's."""

    returns_logps = True

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset

    def __call__(self, model, input_ids, attention_mask, **kwargs):
        out = super().__call__(model, input_ids, attention_mask, **kwargs)
        n = kwargs.get("num_samples", 1)
        prompts = input_ids.repeat_interleave(n, 0)
        ids = torch.cat([prompts, out.ids], 1)
        mask = torch.cat([attention_mask.repeat_interleave(n, 0), torch.ones_like(out.ids)], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logits = logits[:, prompts.shape[1] - 1 : -1].float() / kwargs["temperature"]
        logps = logits.log_softmax(-1).gather(-1, out.ids.unsqueeze(-1)).squeeze(-1)
        return Completions(out.ids, logps + self.offset)
