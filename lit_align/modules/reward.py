"""``RewardModule``: a reward model trained on human comparisons (InstructGPT step 2), and its exported scorer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, Metric
from transformers import PreTrainedTokenizerBase

from lit_align.data.tokenize import SegmentEncoder
from lit_align.forward import response_rewards, sequence_rewards
from lit_align.losses import kwise_bradley_terry_loss
from lit_align.models import OFFSET_KEY, load_reward_model, load_tokenizer
from lit_align.modules.base import AlignModule
from lit_align.ops import pad_sequences


class StdMetric(Metric):
    """Standard deviation of all values seen (population), synced over devices."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("total", "total_sq", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.total += values.sum()
        self.total_sq += (values**2).sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1)
        return (self.total_sq / self.count.clamp(min=1) - mean**2).clamp(min=0).sqrt().float()


class RewardModule(AlignModule):
    """Bradley-Terry reward model: ``-log sigmoid(r_chosen - r_rejected [- margin])``, K-wise rankings averaged per
    prompt (InstructGPT). Pairs with batches from :class:`~lit_align.data.PreferenceDataModule`.

    Logs ``{train,val}/loss``, ``/accuracy`` (pairwise), ``/margin`` (mean chosen - rejected), ``/reward_mean`` and
    ``/reward_std``; validation values through torchmetrics, reduced over devices.

    Args:
        margin: a margin the preferred reward should exceed the other by (``None`` for the plain loss).
        normalize: when fitting ends, shift rewards so that the validation responses (the training ones if there is
            no validation set) score 0 on average, as InstructGPT did before RL. Stored in the checkpoint and export.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments; ``model`` may be a causal LM (an
            SFT export: its unembedding is replaced by a scalar head) or a reward model.
    """

    def __init__(self, *args, margin: float | None = None, normalize: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.margin, self.normalize = margin, normalize
        self.register_buffer("reward_offset", torch.zeros((), dtype=torch.float32))
        self.val_accuracy, self.val_margin, self.val_reward_mean = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_reward_std = StdMetric()
        self.val_loss = MeanMetric()

    def build_model(self) -> nn.Module:
        return load_reward_model(self.model_name_or_path, self.tokenizer, self.dtype_name, self.trust_remote_code,
                                 empty=self.empty_init)  # fmt: skip

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N]`` normalised rewards of the batch's responses, read at each response's last token (in either
        :class:`~lit_align.data.PreferenceCollator` layout: one row per response, or prompt-shared rows)."""
        return response_rewards(self.model, batch) - self.reward_offset

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewards = self.rewards(batch)
        loss = kwise_bradley_terry_loss(rewards, batch["better"], batch["worse"], batch["group"], self.margin)
        diff = (rewards[batch["better"]] - rewards[batch["worse"]]).detach()
        return {"loss": loss, "rewards": rewards.detach(), "diff": diff}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        rewards, diff = out["rewards"], out["diff"]
        self.log_dict(
            {
                "train/loss": out["loss"].detach(),
                "train/accuracy": (diff > 0).float().mean(),
                "train/margin": diff.mean(),
                "train/reward_mean": rewards.mean(),
                "train/reward_std": rewards.std(unbiased=False),
            },
            prog_bar=False,
            batch_size=len(diff),
        )
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.step(batch)
        diff = out["diff"]
        compared = torch.cat([batch["better"], batch["worse"]]).unique()  # responses of a pair (not padding)
        self.val_accuracy.update((diff > 0).float())
        self.val_margin.update(diff)
        self.val_reward_mean.update(out["rewards"][compared])
        self.val_reward_std.update(out["rewards"][compared])
        self.val_loss.update(out["loss"], weight=len(batch["group"].unique()))  # per prompt, however batched
        split = self.held_out_split  # "val", or "test" under trainer.test
        self.log_dict(
            {
                f"{split}/loss": self.val_loss,
                f"{split}/accuracy": self.val_accuracy,
                f"{split}/margin": self.val_margin,
                f"{split}/reward_mean": self.val_reward_mean,
                f"{split}/reward_std": self.val_reward_std,
            },
        )

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``lit-align predict``: the normalised rewards of the held-out split (the DataModule's predict loader). A
        comparison batch (:class:`~lit_align.data.PreferenceDataModule`) gives one row per pair, ``{"prompt",
        "chosen", "rejected", "reward_chosen", "reward_rejected"}``; a batch of responses
        (:class:`~lit_align.data.InstructionDataModule`) one per response, ``{"prompt", "response", "reward"}``. Text
        is decoded from the tokens (the prompt with the special tokens a chat template writes, the responses
        without)."""
        from lit_align.rollout.sampling import batch_prompt_ids, decode_prompt

        prompt_ids = batch_prompt_ids(batch)
        prompts = [decode_prompt(self.tokenizer, ids) for ids in prompt_ids]
        text = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        if "better" in batch and "response_ids" in batch:
            rewards = self.rewards(batch).tolist()
            responses = batch["response_ids"]
            return [
                {
                    "prompt": prompts[g],
                    "chosen": text(responses[b]),
                    "rejected": text(responses[w]),
                    "reward_chosen": rewards[b],
                    "reward_rejected": rewards[w],
                }  # fmt: skip
                for b, w, g in zip(batch["better"].tolist(), batch["worse"].tolist(), batch["group"].tolist())
            ]
        if "labels" in batch:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rewards = (sequence_rewards(self.model, ids, mask, batch.get("position_ids")) - self.reward_offset).tolist()
            rows = []
            for prompt, start, row, real, reward in zip(prompts, prompt_ids, ids.tolist(), mask.bool().tolist(),
                                                        rewards):  # fmt: skip
                response = [t for t, keep in zip(row, real) if keep][len(start) :]
                rows.append({"prompt": prompt, "response": text(response), "reward": reward})
            return rows
        raise ValueError(
            "RewardModule predicts on comparisons (PreferenceDataModule) or on responses (InstructionDataModule); "
            f"this batch has neither (keys {sorted(batch)})"
        )

    # ----- normalisation and export -----------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, dataloader) -> float:
        """Set ``reward_offset`` so that the compared responses in ``dataloader`` (those of a pair: not the padding
        that evens out ranks) score 0 on average. Every rank goes through the whole loader (a sharded model gathers in
        each forward), so all get the same offset."""
        mean = MeanMetric(sync_on_compute=False).to(self.device)
        was_training = self.model.training
        self.model.eval()
        for batch in dataloader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            compared = torch.cat([batch["better"], batch["worse"]]).unique()
            mean.update(response_rewards(self.model, batch)[compared])
        self.model.train(was_training)
        self.reward_offset.fill_(mean.compute())
        return float(self.reward_offset)

    def on_fit_end(self) -> None:
        if self.normalize:  # every rank goes through the whole set (in order, unsharded): all get the same offset
            dm = self.trainer.datamodule
            examples = dm.val_dataset or dm.train_dataset
            self.calibrate(DataLoader(examples, batch_size=dm.batch_size, collate_fn=dm.collator))
        super().on_fit_end()

    def export_hf(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Save the reward model (a ``*ForSequenceClassification`` with one label, safetensors), its tokenizer and its
        normalisation offset; :meth:`RewardScorer.from_pretrained` loads it back."""
        setattr(self.model.config, OFFSET_KEY, float(self.reward_offset))
        return super().export_hf(path, merge_lora)


class RewardScorer(nn.Module):
    """A trained reward model as a scorer: ``score(prompts, responses) -> [N]`` rewards, tokenized exactly as in
    training (prompt and response tokenized separately, one BOS, EOS appended), normalised by the exported offset.

    Args:
        model: a ``*ForSequenceClassification`` with one label.
        tokenizer: its tokenizer.
        offset: subtracted from every raw reward.
        max_length: longest prompt + response in tokens (cut at the end).
    """

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, offset: float = 0.0, max_length: int | None = None
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.encoder = SegmentEncoder(tokenizer, max_length)
        self.register_buffer("offset", torch.tensor(float(offset)))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None, trust_remote_code: bool = False, **kwargs):
        model = load_reward_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, getattr(model.config, OFFSET_KEY, 0.0), **kwargs)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
        """``[N]`` rewards of already tokenized sequences (left or right padded)."""
        return sequence_rewards(self.model, input_ids, attention_mask, position_ids) - self.offset

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """``[N]`` rewards of each ``responses[i]`` to ``prompts[i]``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = self.offset.device
        ids = [self.encoder.encode([(p, False), (r, True)]).input_ids for p, r in zip(prompts, responses)]
        scores = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            input_ids = pad_sequences(chunk, self.tokenizer.pad_token_id).to(device)
            mask = pad_sequences([[1] * len(s) for s in chunk], 0).to(device)
            scores.append(self(input_ids, mask))
        return torch.cat(scores) if scores else torch.zeros(0, device=device)
