"""SFTModule inside a plain lightning.Trainer (as in the README), export, checkpoints, precisions, LoRA."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import precision_setting
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align import InstructionDataModule, LoRA, SFTModule, load_causal_lm
from lit_align.modules.base import add_residual_dropout

ROWS = [
    {"prompt": f"Review: the film was {w}.\nIs this review positive or negative?\n", "completion": label}
    for w, label in [("great", "positive"), ("awful", "negative"), ("superb", "positive"), ("dull", "negative")] * 4
]


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def datamodule(tokenizer, **kwargs) -> InstructionDataModule:
    return InstructionDataModule(tokenizer, train_data=ROWS, val_data=ROWS[:8], batch_size=4, **kwargs)


def batch_of(module, n=4):
    dm = datamodule(module.tokenizer)
    dm.setup()
    return dm.collator(dm.train_dataset[:n])


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_plain_trainer_loss_falls_and_weights_change(tmp_path):
    L.seed_everything(0)
    module = SFTModule(lr=3e-3)
    dm = datamodule(module.tokenizer)
    t = trainer(tmp_path)
    before = t.validate(module, dm, verbose=False)[0]["val/loss"]
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    t.fit(module, dm)
    after = t.validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < before - 1.0
    assert after["val/ppl"] == pytest.approx(torch.tensor(after["val/loss"]).exp().item(), rel=1e-4)
    assert 0.0 <= after["val/token_acc"] <= 1.0
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(changed) == len(initial)


def test_export_loads_back_with_identical_logits(tmp_path):
    L.seed_everything(0)
    module = SFTModule(lr=1e-3, export_dir=str(tmp_path / "export"))
    trainer(tmp_path, max_steps=3).fit(module, datamodule(module.tokenizer))
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    batch = batch_of(module)
    assert tokenizer("Review: fine")["input_ids"] == module.tokenizer("Review: fine")["input_ids"]
    assert torch.equal(logits_of(loaded, batch), logits_of(module.model, batch))


def test_checkpoint_loads_back_weights_only(tmp_path):
    L.seed_everything(0)
    module = SFTModule(lr=1e-3)
    t = trainer(tmp_path, max_steps=3, enable_checkpointing=True)
    t.fit(module, datamodule(module.tokenizer))
    path = t.checkpoint_callback.best_model_path or t.checkpoint_callback.last_model_path
    state = torch.load(path, weights_only=True)  # nothing but tensors and primitives in it
    assert state["hyper_parameters"]["lr"] == 1e-3
    restored = SFTModule.load_from_checkpoint(path, weights_only=True)
    batch = batch_of(module)
    assert torch.equal(logits_of(restored.model, batch), logits_of(module.model, batch))


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-scaled"])
def test_mixed_precision_on_cpu_trains_with_fp32_master_weights(tmp_path, precision):
    """bf16 autocast, and fp16 autocast with a gradient scaler (the explicit plugin: Lightning would turn
    ``precision="16-mixed"`` into bf16 on a CPU): the forward runs in the half dtype, the weights stay fp32."""
    L.seed_everything(0)
    module = SFTModule(lr=3e-3)
    dtypes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with trainer.precision_plugin.forward_context():
                dtypes.append(pl_module.model.lm_head(torch.zeros(1, pl_module.model.config.hidden_size)).dtype)

    t = trainer(tmp_path, max_steps=6, callbacks=[Spy()], **precision_setting(precision))
    dm = datamodule(module.tokenizer)
    t.fit(module, dm)
    assert set(dtypes) == {torch.float16 if precision == "fp16-scaled" else torch.bfloat16}
    assert (getattr(t.precision_plugin, "scaler", None) is not None) == (precision == "fp16-scaled")
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    assert torch.isfinite(torch.tensor(t.validate(module, dm, verbose=False)[0]["val/loss"]))


def test_only_response_positions_are_unembedded_and_the_loss_is_unchanged(tmp_path):
    module = SFTModule()
    module.configure_model()
    batch = batch_of(module)
    loss, _, n = module.compute_loss(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from lit_align.losses import sft_loss

    full_loss, full_correct, full_n = sft_loss(logits, batch["labels"])
    assert n == full_n and torch.allclose(loss, full_loss, atol=1e-6)
    assert module.compute_loss(batch)[1] == full_correct
    # and the Hugging Face model's own loss on the same labels (mean cross-entropy over labelled tokens)
    hf_loss = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.allclose(loss, hf_loss.loss, atol=1e-5)


def test_residual_dropout_is_active_in_training_only():
    module = SFTModule(residual_dropout=0.2)
    module.configure_model()
    batch = batch_of(module)
    policy = module.model
    policy.train()
    first = policy(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(first, policy(input_ids=batch["input_ids"]).logits)
    policy.eval()
    assert torch.equal(policy(input_ids=batch["input_ids"]).logits, policy(input_ids=batch["input_ids"]).logits)
    with pytest.raises(ValueError, match="no transformer block"):
        add_residual_dropout(torch.nn.Linear(2, 2), 0.2)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = SFTModule(gradient_checkpointing=checkpointing)
        module.configure_model()
        module.model.train()
        loss, _, _ = module.compute_loss(batch_of(module))
        loss.backward()
        grads.append(module.model.model.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_trains_adapters_only_and_exports_merged(tmp_path):
    pytest.importorskip("peft")
    L.seed_everything(0)
    module = SFTModule(lr=1e-2, lora=LoRA(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer(tmp_path, max_steps=4).fit(module, datamodule(module.tokenizer))
    module.export_hf(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    batch = batch_of(module)
    assert torch.allclose(logits_of(merged, batch), logits_of(module.model, batch), atol=1e-5)


def test_local_directory_and_prebuilt_module(tmp_path, tiny_tokenizer):
    """The non-tiny path is the real ``from_pretrained`` path (a hub id would go the same way)."""
    torch.manual_seed(0)
    model = load_causal_lm("tiny", tiny_tokenizer)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    from_dir = SFTModule(model=str(tmp_path / "model"))
    from_dir.configure_model()
    prebuilt = SFTModule(model=model, tokenizer=tiny_tokenizer)
    batch = batch_of(prebuilt)
    assert torch.equal(logits_of(from_dir.model, batch), logits_of(prebuilt.model, batch))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        SFTModule(model=model)


@pytest.mark.reliability
def test_a_model_loaded_from_a_directory_trains_in_train_mode(tmp_path, tiny_tokenizer, reliability):
    """``from_pretrained`` returns a model in eval mode and Lightning keeps the modes it finds: the model's own
    dropout (here attention dropout 0.3 in its config) must act during ``fit``, so two forwards of the same batch
    differ; a DPO reference loaded beside it stays in eval mode."""
    from lit_align import DPOModule

    reliability["faults"] += 1
    model = load_causal_lm("tiny", tiny_tokenizer)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    module = SFTModule(model=str(tmp_path / "model"), lr=1e-3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            losses = [pl_module.compute_loss(batch)[0].item() for _ in range(2)]
            seen.append((pl_module.model.training, losses[0] != losses[1]))

    trainer(tmp_path, max_steps=2, callbacks=[Spy()], limit_val_batches=0).fit(module, datamodule(module.tokenizer))
    assert seen == [(True, True), (True, True)]
    dpo = DPOModule(model=str(tmp_path / "model"))
    dpo.configure_model()
    dpo.train()
    assert dpo.model.training and not dpo.ref_model.training
    reliability["survived"] += 1


def test_the_eos_embedding_trains_when_pad_is_eos(tmp_path, tokenizers_by_kind):
    """transformers gives the embedding ``padding_idx = config.pad_token_id``, a row that never gets a gradient: with
    pad == eos (the GPT-2-style tokenizer) that row is EOS, which ends every response and is where a reward model
    reads its score. A reward model trained a few steps must move it."""
    from lit_align import PreferenceDataModule, RewardModule
    from lit_align.models import load_reward_model

    tokenizer = tokenizers_by_kind["gpt2_style"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    module = RewardModule(model=load_reward_model("tiny", tokenizer), tokenizer=tokenizer, lr=1e-2)
    eos = tokenizer.eos_token_id
    before = module.model.get_input_embeddings().weight[eos].clone()
    data = PreferenceDataModule(tokenizer, val_fraction=0.0, max_length=96, batch_size=4)
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, data)
    assert not torch.equal(before, module.model.get_input_embeddings().weight[eos])
