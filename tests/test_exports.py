"""Exports reproduce training: what a module computes at the end of fit is what plain transformers computes on its
export, for the policy in low precision, for a reward model whose tokenizer pads with EOS, and for PPO's value model;
and a damaged export file is an error that names it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_align import PPOModule, PreferenceDataModule, PromptDataModule, RewardModule, RewardScorer, SFTModule
from lit_align.checksums import MANIFEST, ChecksumError
from lit_align.data import InstructionDataModule
from lit_align.forward import sequence_rewards
from lit_align.models import OFFSET_KEY, load_causal_lm, load_frozen_reward_model, load_reward_model, load_tokenizer
from lit_align.ops import pad_sequences
from lit_align.rollout import to_completions

pytestmark = pytest.mark.reliability

ROWS = [{"prompt": f"Q{i}: be polite.", "completion": " Thank you kindly.", "chosen": " Thank you kindly.",
         "rejected": " Go away, idiot."} for i in range(16)]  # fmt: skip


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def _long_ids(tokenizer, length: int = 300) -> torch.Tensor:
    """One sequence reaching far positions, where a rounded rotary table puts the angles furthest off."""
    ids = tokenizer("Below is an instruction that describes a task. " * 40)["input_ids"][:length]
    return torch.tensor([ids])


@pytest.mark.parametrize("dtype, precision", [("bfloat16", "32-true"), (None, "bf16-true")])
@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_low_precision_training_computes_what_its_reloaded_export_computes(tmp_path, kind, dtype, precision):
    """A bf16 model (the ``tiny`` preset cast by ``dtype`` or by the Trainer's ``bf16-true``) trained, exported, and
    reloaded by transformers in bf16 gives the same outputs bit for bit: same weights, same kernels, and the rotary
    tables in fp32 on both sides (transformers computes them in fp32 when it loads; a cast used to round them, 7.8e-3
    off in the logits)."""
    export = tmp_path / "export"
    if kind == "policy":
        module = SFTModule(lr=1e-3, dtype=dtype, export_dir=str(export))
        data = InstructionDataModule(module.tokenizer, train_data=ROWS, batch_size=4)
    else:
        module = RewardModule(lr=1e-3, dtype=dtype, export_dir=str(export))
        data = PreferenceDataModule(module.tokenizer, train_data=ROWS, batch_size=4)
    _trainer(tmp_path, max_steps=2, precision=precision).fit(module, data)
    assert next(module.model.parameters()).dtype == torch.bfloat16
    ids = _long_ids(module.tokenizer)
    mask = torch.ones_like(ids)
    module.eval()
    with torch.no_grad():
        if kind == "policy":
            trained = module.model(ids).logits
            reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()(ids).logits
        else:
            trained = sequence_rewards(module.model, ids, mask)
            reloaded_model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.bfloat16).eval()
            reloaded = sequence_rewards(reloaded_model, ids, mask)
    assert trained.dtype == reloaded.dtype
    assert torch.equal(trained, reloaded), f"max difference {(trained.float() - reloaded.float()).abs().max():.3g}"


PAIRS = [
    ("Q1: be polite.", " Thank you kindly."),
    ("Q2: be polite.", " Go away, idiot."),
    ("Hi", " Hello! How are you?"),
]


@pytest.mark.parametrize("kind", ["sentencepiece_style", "gpt2_style"])
def test_reward_export_scored_by_plain_transformers_gives_the_trained_reward(tmp_path, tokenizers_by_kind, kind):
    """With pad == eos, transformers' ``*ForSequenceClassification`` pools at the last token that is not the pad id:
    the token before EOS, not the EOS lit_align reads (0.012 off here). The export leaves the pad id out of its
    config, so the README's way, one sequence at a time, reads the last token; a right-padded batch, which it could
    only misread, is an error. RewardScorer and PPO's reward loading read the export as before."""
    tokenizer = tokenizers_by_kind[kind]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    export = tmp_path / "rm"
    module = RewardModule(lr=3e-3, tokenizer=tokenizer, normalize=True, export_dir=str(export))
    data = PreferenceDataModule(tokenizer, train_data=ROWS, batch_size=8)
    _trainer(tmp_path, max_steps=6).fit(module, data)
    assert module.model.config.pad_token_id == tokenizer.pad_token_id  # the live model is left as it was
    scorer = RewardScorer.from_pretrained(export)
    expected = scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert expected.std() > 1e-3 and float(scorer.offset) != 0.0

    # the README's way: prompt tokens, response tokens, EOS; one sequence per call; minus the exported offset
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        plain = []
        for prompt, response in PAIRS:
            ids = tok(prompt).input_ids + tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
            plain.append(model(torch.tensor([ids])).logits[0, 0] - model.config.lit_align_reward_offset)
    assert torch.allclose(torch.stack(plain), expected, atol=1e-5), (torch.stack(plain) - expected).abs().max()

    batch = tok([p + r + tok.eos_token for p, r in PAIRS], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with pytest.raises(ValueError, match="no padding token"):
        model(**batch)

    reward_model, offset = load_frozen_reward_model(str(export), tokenizer, None, None)
    ids = [scorer.encoder.encode([(p, False), (r, True)]).input_ids for p, r in PAIRS]
    input_ids = pad_sequences(ids, tokenizer.pad_token_id)
    mask = pad_sequences([[1] * len(s) for s in ids], 0)
    with torch.no_grad():
        assert torch.allclose(sequence_rewards(reward_model, input_ids, mask) - offset, expected, atol=1e-6)


@pytest.mark.parametrize("value_model", ["reward", "policy_head"])
def test_ppo_exports_its_trained_value_model_beside_the_policy(tmp_path, value_model):
    """PPO's value model is trained state too: the export holds it in ``value_model/`` (a ``*ForSequenceClassification``
    directory, or the policy head's weights), and reloaded it gives the values the module computes. A value model
    started from a normalised reward model does not carry the reward's offset: values are the head's raw output."""
    torch.manual_seed(0)
    reward = RewardModule()
    reward.configure_model()
    reward.reward_offset.fill_(0.5)
    reward.export_hf(tmp_path / "rm")
    export = tmp_path / "ppo"
    module = PPOModule(lr=1e-2, max_new_tokens=8, mini_batch_size=4, num_iterations=1, value_model=value_model,
                       reward_model=str(tmp_path / "rm"), export_dir=str(export))  # fmt: skip
    module.configure_model()
    assert module.reward_offset == 0.5
    data = PromptDataModule(module.tokenizer, batch_size=4, max_prompt_length=32)
    initial = {k: v.clone() for k, v in module.value_model.state_dict().items()}
    _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, data)
    assert any(not torch.equal(v, module.value_model.state_dict()[k]) for k, v in initial.items())  # it trained

    data.setup("fit")
    rollout = module.rollout(data.collator(data.train_dataset[:4]))
    batch, width = module.rollout_stage.pack(rollout.experience), rollout.experience.width
    module.eval()
    with torch.no_grad():
        hidden = module.rollout_stage.completion_logps(module.model, batch, width, hidden=True).hidden
        expected = module.token_values(batch, width, hidden)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if value_model == "reward":
            reloaded = AutoModelForSequenceClassification.from_pretrained(export / "value_model").eval()
            assert not hasattr(reloaded.config, OFFSET_KEY)
            values = reloaded.score(reloaded.model(**inputs).last_hidden_state)[..., 0]
        else:
            head = load_file(export / "value_model" / "model.safetensors")
            policy = AutoModelForCausalLM.from_pretrained(export).eval()
            values = policy.model(**inputs).last_hidden_state @ head["score.weight"].T[:, 0] + head["score.bias"]
        values = to_completions(values[batch["target_row"], batch["target_col"]], batch, width)
    assert expected.abs().max() > 0
    assert torch.allclose(values, expected, atol=1e-5)


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip the bits of one byte in the middle of a safetensors file's tensor data (after the 8-byte header length
    and the JSON header), where nothing in the format notices."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[(data_start + len(raw)) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _export(kind: str, path: Path) -> Path:
    """An export written by ``export_hf`` without training (what is checked is the files, not the weights); returns
    the directory holding ``model.safetensors``."""
    module = {"policy": SFTModule, "reward": RewardModule, "value": PPOModule}[kind]()
    module.configure_model()
    module.export_hf(path)
    return path / "value_model" if kind == "value" else path


LOADERS = {
    "load_causal_lm": ("policy", lambda path: load_causal_lm(str(path))),
    "load_tokenizer": ("policy", lambda path: load_tokenizer(str(path))),
    "load_reward_model": ("reward", lambda path: load_reward_model(str(path))),
    "RewardScorer.from_pretrained": ("reward", RewardScorer.from_pretrained),
    "load_frozen_reward_model": ("reward", lambda path: load_frozen_reward_model(str(path), load_tokenizer(), None,
                                                                                 None)),
    "PPO value_model/": ("value", lambda path: load_reward_model(str(path))),
}  # fmt: skip


@pytest.mark.parametrize("loader", LOADERS)
def test_a_flipped_byte_in_an_exported_weight_file_is_an_error_naming_it(tmp_path, reliability, loader):
    """Every directory an export writes holds a SHA-256 manifest of its files. A byte flipped in a weight file's
    tensor data loads silently through safetensors and transformers; lit_align's loaders refuse it, naming the file.
    An untouched export loads, and a directory without a manifest (a hub model's, another tool's) loads as before."""
    kind, load = LOADERS[loader]
    export = _export(kind, tmp_path / "export")
    manifest = (export / MANIFEST).read_text()
    assert {line.split("  ")[1] for line in manifest.splitlines()} == {p.name for p in export.iterdir()} - {MANIFEST}
    load(export)

    corrupted = tmp_path / "corrupted"
    shutil.copytree(export, corrupted)
    weights = corrupted / "model.safetensors"
    _flip_a_tensor_byte(weights)
    reliability["faults"] += 1
    before, after = load_file(export / "model.safetensors"), load_file(weights)  # safetensors itself sees nothing
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ChecksumError, match=f"{re.escape(str(weights))} is corrupted"):
        load(corrupted)
    reliability["survived"] += 1

    (corrupted / MANIFEST).unlink()
    load(corrupted)


def test_a_file_missing_from_an_export_is_named(tmp_path, reliability):
    export = _export("policy", tmp_path / "export")
    (export / "tokenizer.json").unlink()
    reliability["faults"] += 1
    with pytest.raises(ChecksumError, match=f"{re.escape(str(export / 'tokenizer.json'))} is missing"):
        load_tokenizer(str(export))
    reliability["survived"] += 1
