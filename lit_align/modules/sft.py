"""``SFTModule``: supervised fine-tuning on demonstrations (InstructGPT step 1, FLAN instruction tuning)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lit_align.forward import labelled_nll
from lit_align.modules.base import AlignModule


class Perplexity(MeanMetric):
    """Perplexity: the exponent of the (token-weighted) mean negative log-likelihood."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class SFTModule(AlignModule):
    """Next-token cross-entropy on the response tokens (the tokens the DataModule labels).

    Logs ``train/loss`` and ``train/token_acc`` every step, and ``val/loss``, ``val/ppl`` (perplexity, the exponent
    of the token-averaged loss) and ``val/token_acc`` every validation epoch (the same as ``test/...`` under
    ``lit-align test``), reduced over all devices.
    Takes the same arguments as :class:`~lit_align.modules.base.AlignModule`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()
        self.val_token_acc = MeanMetric()

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, n_correct, n_tokens)`` for a batch from :class:`~lit_align.data.collate.SFTCollator`: the mean
        negative log-likelihood of the labelled tokens (the same value as :func:`~lit_align.losses.sft_loss`), with
        the unembedding run only at the positions that predict them."""
        return labelled_nll(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, correct, n_tokens = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # the mean over the global batch's labelled tokens, not the mean of the ranks' means
            share = self.rank_share(n_tokens)
            scale = n_tokens / share if share > 0 else torch.zeros_like(share)  # no labelled token anywhere: 0
            loss, correct, n_tokens = loss * scale, self.rank_share(correct), share
        # logged as the mean over ranks: the global batch's token-mean loss and accuracy
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=world > 1)
        self.log("train/token_acc", correct / n_tokens.clamp(min=1), batch_size=batch_size, sync_dist=world > 1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, correct, n_tokens = self.compute_loss(batch)
        self.val_loss.update(loss, weight=n_tokens)
        self.val_ppl.update(loss, weight=n_tokens)
        self.val_token_acc.update(correct / n_tokens.clamp(min=1), weight=n_tokens)
        # Metric objects: Lightning computes them once per epoch, synced over devices, and resets them.
        split = self.held_out_split  # "val", or "test" under trainer.test
        self.log_dict(
            {f"{split}/loss": self.val_loss, f"{split}/ppl": self.val_ppl, f"{split}/token_acc": self.val_token_acc}
        )
