"""Exports reproduce training: what a module computes at the end of fit is what plain transformers computes on its
export, for the policy in low precision, for a reward model whose tokenizer pads with EOS, and for PPO's value model;
and a damaged export file is an error that names it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lit_align import PreferenceDataModule, RewardModule, SFTModule
from lit_align.data import InstructionDataModule
from lit_align.modules.reward import sequence_rewards

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
