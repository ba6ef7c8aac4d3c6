"""On-policy distillation (GKD): the per-token divergence the module trains on equals the plain Hugging Face forward
of both models on each lone sequence; a teacher equal to the student gives 0; the teacher stays frozen and out of
checkpoints while the student trains; a teacher with another vocabulary is refused; ``lmbda`` mixes the data's own
completions with samples; and distillation lowers the held-out divergence to an SFT-trained teacher."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import LlamaForCausalLM

from lit_align import DistillModule, InstructionDataModule, PromptDataModule, SFTModule
from lit_align.data.sources import read_records
from lit_align.losses import generalized_jsd
from lit_align.models import load_tokenizer, tiny_config

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0)  # fmt: skip


def _rows(n: int = 24) -> list[dict]:
    return [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:n]]


def _prompts(module, rows, **kwargs) -> PromptDataModule:
    data = PromptDataModule(module.tokenizer, rows, max_prompt_length=32, batch_size=4, **kwargs)
    data.setup()
    return data


@pytest.mark.parametrize("beta", [0.5])  # every beta is checked against the untiled maths in test_distill_loss.py
def test_token_divergence_equals_the_plain_forward_of_each_sequence(beta):
    """Four prompts, two sampled completions each, packed into one row per prompt (the completions never see each
    other): the divergence at every completion token equals :func:`generalized_jsd` of the two models' logits from
    a plain ``model(input_ids)`` on each prompt + completion alone (1e-5), at a temperature."""
    module = DistillModule(teacher="tiny", teacher_seed=3, num_samples=2, max_new_tokens=6, temperature=0.7, beta=beta)
    module.configure_model()
    data = _prompts(module, _rows(4))
    batch = data.collator(data.train_dataset)
    experience = module.sample(batch)
    packed = module.rollout_stage.pack(experience)
    got = module.token_divergence(packed)
    lengths = experience.completion_mask.sum(-1).tolist()
    expected = []
    for i, length in enumerate(lengths):
        prompt = experience.prompt_ids[i // 2]
        ids = torch.tensor([prompt + experience.completion_ids[i, :length].tolist()])
        with torch.no_grad():
            s, t = (m(input_ids=ids).logits[0, len(prompt) - 1 : -1] for m in (module.model, module.teacher_model))
        expected.append(generalized_jsd(s, t, beta=beta, temperature=0.7))
    assert got.shape[0] == sum(lengths)
    assert torch.allclose(got, torch.cat(expected), atol=1e-5), (got - torch.cat(expected)).abs().max()
    assert got.min() > 0  # two different models


def test_a_teacher_equal_to_the_student_gives_zero():
    """``teacher: tiny`` without a seed is the tiny student's own starting point: the divergence is 0 at every
    token (within fp32 rounding)."""
    module = DistillModule(teacher="tiny", max_new_tokens=5)
    module.configure_model()
    data = _prompts(module, _rows(4))
    experience = module.sample(data.collator(data.train_dataset))
    divergence = module.token_divergence(module.rollout_stage.pack(experience))
    assert divergence.numel() > 0 and divergence.abs().max() < 1e-6


def test_training_moves_the_student_only_and_leaves_the_teacher_out_of_checkpoints(tmp_path):
    """Three steps: every student parameter changes, the teacher does not (frozen, eval mode, outside the
    optimizer), checkpoints hold no teacher weight, and a module loaded from one re-creates the same teacher. The
    logged metrics are finite and the same keys as documented."""
    L.seed_everything(0, verbose=False)
    module = DistillModule(teacher="tiny", teacher_seed=1, lr=1e-3, max_new_tokens=4)
    data = PromptDataModule(module.tokenizer, _rows(), val_data=_rows(28)[24:], max_prompt_length=32, batch_size=4)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path,
                        **{**QUIET, "enable_checkpointing": True})  # fmt: skip
    module.configure_model()
    student0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in module.teacher_model.state_dict().items()}
    trainer.fit(module, data)
    assert all(not torch.equal(student0[k], v) for k, v in module.model.state_dict().items() if "rotary" not in k)
    assert all(torch.equal(teacher0[k], v) for k, v in module.teacher_model.state_dict().items())
    assert not module.teacher_model.training and not any(p.requires_grad for p in module.teacher_model.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher_model.parameters()}
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/divergence", "train/response_length", "train/no_eos_fraction",
                "val/divergence", "val/response_length"):  # fmt: skip
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/on_policy"] == 1.0  # prompt-only data: always on-policy
    (checkpoint,) = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher_model.")] and any(k.startswith("model.") for k in state)
    loaded = DistillModule.load_from_checkpoint(checkpoint)
    loaded.configure_model()
    assert all(torch.equal(teacher0[k], v) for k, v in loaded.teacher_model.state_dict().items())


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    """A teacher whose unembedding is 8 entries larger, and a teacher directory whose tokenizer differs: clear
    errors naming what differs. Bad options are named when the module is built."""
    tokenizer = load_tokenizer("tiny")
    config = tiny_config(tokenizer)
    config.vocab_size += 8
    wider = LlamaForCausalLM(config)
    module = DistillModule(teacher=wider)
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} entries and the teacher's {len(tokenizer) + 8}"):
        module.configure_model()
    from conftest import gpt2_style_tokenizer

    other = gpt2_style_tokenizer()
    LlamaForCausalLM(tiny_config(other)).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another tokenizer than the student"):
        DistillModule(teacher=str(tmp_path / "other")).configure_model()
    for bad, match in (({"beta": 1.5}, "beta=1.5"), ({"lmbda": -0.1}, "lmbda=-0.1"),
                       ({"teacher": "x/y", "teacher_seed": 1}, "teacher_seed=1")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DistillModule(**bad)


def test_lmbda_mixes_the_datas_completions_with_samples(tmp_path):
    """With ``completions: true`` the prompt batches carry each row's own response. ``lmbda = 0``: every batch
    trains on those (their lengths, cut at ``max_new_tokens``, are the logged response lengths); ``lmbda = 1``:
    every batch samples; in between, the share of on-policy batches follows ``lmbda`` (a draw keyed by the batch,
    the same for the same stream). Prompt-only batches are always on-policy."""
    module = DistillModule(teacher="tiny", teacher_seed=1, lmbda=0.0, max_new_tokens=8, lr=1e-3)
    data = PromptDataModule(module.tokenizer, _rows(), max_prompt_length=32, batch_size=4, completions=True)
    lengths = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lengths.append((float(trainer.callback_metrics["train/response_length_step"]),
                            sum(min(len(c), 8) for c in batch["completion_ids"]) / 4))  # fmt: skip

    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[Record()], default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/on_policy"] == 0.0
    assert len(lengths) == 2 and all(logged == expected for logged, expected in lengths)
    batch = data.collator(data.train_dataset[:4])
    mixed = DistillModule(teacher="tiny", lmbda=0.3, sampling_seed=5)
    draws = [mixed.on_policy(batch, i) for i in range(400)]
    assert 0.22 < sum(draws) / 400 < 0.38
    prompts_only = {k: v for k, v in batch.items() if k != "completion_ids"}
    assert all(mixed.on_policy(prompts_only, i) for i in range(20))
    assert not any(DistillModule(teacher="tiny", lmbda=0.0).on_policy(batch, i) for i in range(20))


@pytest.mark.slow
def test_distillation_lowers_the_held_out_divergence_to_an_sft_teacher(tmp_path):
    """The teacher: the tiny model after 30 SFT steps on the bundled Self-Instruct tasks (peaked where the untrained
    student is nearly uniform). 16 batches of on-policy distillation (4 prompts, 12 sampled tokens each) lower the
    per-token JSD between the student's samples' distributions and the teacher's on 8 held-out prompts by more than
    half (measured 0.418 -> 0.045)."""
    L.seed_everything(0, verbose=False)
    rows = _rows(175)
    sft = SFTModule(model="tiny", lr=3e-3)
    sft_data = InstructionDataModule(sft.tokenizer, rows, val_fraction=0, max_length=96, batch_size=8)
    L.Trainer(max_steps=30, limit_val_batches=0, **QUIET).fit(sft, sft_data)
    sft.export_hf(tmp_path / "teacher")
    module = DistillModule(model="tiny", teacher=str(tmp_path / "teacher"), lr=3e-3, max_new_tokens=12)
    data = PromptDataModule(module.tokenizer, rows[:160], val_data=rows[160:168], batch_size=4, max_prompt_length=48)
    before = L.Trainer(**QUIET).validate(module, data, verbose=False)[0]["val/divergence"]
    trainer = L.Trainer(max_epochs=1, limit_train_batches=16, limit_val_batches=0, **QUIET)
    trainer.fit(module, data)
    after = L.Trainer(**QUIET).validate(module, data, verbose=False)[0]["val/divergence"]
    print(f"distillation: held-out per-token JSD to the SFT teacher {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before


def test_data_completions_take_instruction_rows_not_a_prompt_template():
    """``completions: true`` reads rows as SFT does, so a ``prompt_template`` (or ``reference_field``) that it would
    ignore is refused by name; and ``lmbda < 1`` on prompt-only data warns that every batch is on-policy."""
    with pytest.raises(ValueError, match="takes no prompt_template or reference_field"):
        PromptDataModule("tiny", completions=True, prompt_template="Question: {question}\nAnswer:")
    module = DistillModule(model="tiny", teacher="tiny", teacher_seed=1, lmbda=0.5, max_new_tokens=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False)
    trainer.datamodule = PromptDataModule(module.tokenizer)
    module.trainer = trainer
    with pytest.warns(UserWarning, match="every batch is trained on-policy"):
        module.setup("fit")
