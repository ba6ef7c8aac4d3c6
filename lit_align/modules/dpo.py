"""``DPOModule``: direct preference optimisation (Rafailov et al. 2023) and its loss family, with every way of
providing the reference policy."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.forward import response_logps
from lit_align.losses import REFERENCE_FREE_LOSS_TYPES, check_dpo_options, dpo_loss, mean_over_groups
from lit_align.modules import reference as ref
from lit_align.modules.base import AlignModule, zero_dropout
from lit_align.modules.reference import default_cache_dir, examples_fingerprint, weights_fingerprint

log = logging.getLogger(__name__)

Reference = Literal["auto", "copy", "precomputed", "adapter", "none"]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
__all__ = ["DPOModule", "default_cache_dir", "examples_fingerprint", "weights_fingerprint"]


class DPOModule(AlignModule):
    """Direct preference optimisation: the RLHF objective's optimal policy turned into a loss on policy/reference
    log-probability ratios of chosen and rejected responses (Rafailov et al. 2023), no reward model, no sampling.

    Pairs with :class:`~lit_align.data.PreferenceDataModule` (``share_prompt: true`` forwards each prompt once for
    both responses). A ranking of K responses contributes all its pairs, averaged per prompt. Each response is
    forwarded once, the unembedding runs only where a response token is predicted, and log-probabilities are
    gathered without a full-vocabulary fp32 log-softmax.

    Logs ``{train,val}/loss`` and ``/rewards/chosen``, ``/rewards/rejected``, ``/rewards/accuracies``,
    ``/rewards/margins`` (implicit rewards ``beta * (log pi - log pi_ref)``), ``/logps/chosen``, ``/logps/rejected``,
    through torchmetrics, reduced over devices.

    Args:
        beta: strength of the KL regularisation towards the reference (DPO's beta; IPO's tau).
        loss_type: one of ``sigmoid`` (DPO), ``hinge``, ``ipo``, ``robust``, ``exo_pair``, ``nca_pair``,
            ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``, ``discopop``, ``sigmoid_norm``, ``simpo``
            and ``orpo`` (reference-free: ORPO's ``beta`` is its lambda, the odds-ratio term's weight beside the
            chosen response's NLL); see :func:`~lit_align.losses.dpo_loss`.
        label_smoothing: assumed label-noise rate (cDPO with ``sigmoid``, ``robust``, ``exo_pair``).
        simpo_gamma: SimPO's target reward margin.
        discopop_tau: DiscoPOP's temperature.
        rpo_alpha: weight of an extra per-token NLL loss on the chosen response (RPO); ``None`` for none.
        reference: how the reference policy is provided.
            ``"copy"``: a frozen copy of the starting policy (or of ``ref_model``), in eval mode, excluded from the
            optimizer and from checkpoints (re-created from ``model``/``ref_model`` on load).
            ``"precomputed"``: its log-probs are computed in one forward-only pass before training and cached on
            disk, keyed by the reference weights, the token ids and the precision, so no reference is resident while
            training and later runs on the same data reuse them.
            ``"adapter"``: with ``lora``, the base model with the adapter disabled (no second copy).
            ``"none"``: reference-free losses (``simpo``, ``orpo``).
            ``"auto"``: ``none`` for reference-free losses, ``adapter`` with ``lora``, else ``copy``.
        ref_model: a different reference than the starting policy (hub id or local directory); with
            ``"precomputed"`` it is loaded only for the precomputation.
        ref_cache_dir: where precomputed reference log-probs are cached (default :func:`default_cache_dir`).
        ref_batch_size: comparisons per batch when precomputing (default: the DataModule's ``batch_size``).
        disable_dropout: set every dropout in the policy to 0 (as TRL does by default), so that the policy's
            log-probs are those of the same deterministic function as the reference's; with dropout the implicit
            rewards are noisy and the step-0 loss is no longer ln 2. Incompatible with ``residual_dropout``.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        discopop_tau: float = 0.05,
        rpo_alpha: float | None = None,
        reference: Reference = "auto",
        ref_model: str | None = None,
        ref_cache_dir: str | None = None,
        ref_batch_size: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (DPO disables dropout by default)")
        self.disable_dropout = disable_dropout
        check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, rpo_alpha)
        reference_free = loss_type in REFERENCE_FREE_LOSS_TYPES
        if reference == "auto":
            reference = "none" if reference_free else "adapter" if self.lora is not None else "copy"
        if reference_free != (reference == "none"):
            raise ValueError(
                f"reference={reference!r} does not fit loss_type={loss_type!r}: reference-free losses "
                f"({', '.join(REFERENCE_FREE_LOSS_TYPES)}) take reference 'none', the others need a reference"
            )
        if reference == "adapter" and self.lora is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError("reference='adapter' needs LoRA adapters (set lora) to disable")
        if ref_model is not None and reference not in ("copy", "precomputed"):
            raise ValueError(f"ref_model is used by reference 'copy' or 'precomputed', not {reference!r}")
        if ref_batch_size is not None and ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be at least 1, got {ref_batch_size}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma, self.discopop_tau, self.rpo_alpha = simpo_gamma, discopop_tau, rpo_alpha
        self.reference, self.ref_model_name = reference, ref_model
        self.ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir else default_cache_dir()
        self.ref_batch_size = ref_batch_size
        self.ref_model: nn.Module | None = None
        self.train_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in METRICS})
        self.val_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in METRICS})
        self.val_loss = MeanMetric()
        # Whether the policy may differ from its source: after any weight load or optimizer step it can no longer
        # stand in for the reference when precomputing.
        self.policy_changed = False

    # ----- the reference -----------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.reference == "copy" and self.ref_model is None:
            self.ref_model = self.build_reference()

    def build_reference(self) -> nn.Module:
        """A frozen reference policy: ``ref_model`` if given, else a copy of the (just built, untrained) policy."""
        return ref.build_reference(self)

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """``[N]`` reference log-probs of the batch's responses (``None`` when reference-free)."""
        return ref.reference_logps(self, batch)

    # ----- precomputed reference log-probs ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        ref.attach_reference_logps(self)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self.trainer.training and not self.trainer.sanity_checking:  # trainer.validate on its own
            ref.attach_reference_logps(self)

    def precompute_reference(self, datamodule: Any) -> None:
        """Attach ``ref_logps`` to every training and validation example of ``datamodule`` that lacks them, from
        the disk cache when present, else by one forward-only pass of the reference (then cached). The reference is
        the starting policy itself when training has not begun (no second copy), else it is re-created from its
        source (:func:`lit_align.modules.reference.precompute_reference`)."""
        ref.precompute_reference(self, datamodule)

    # ----- the loss --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, values)`` for a :class:`~lit_align.data.PreferenceCollator` batch: the loss averaged over each
        prompt's pairs, then over prompts, and the per-pair values behind the metrics."""
        logps = response_logps(self.model, batch)
        ref_logps = self.reference_logps(batch)
        better, worse, lengths = batch["better"], batch["worse"], batch["response_lengths"]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[better],
            logps[worse],
            None if ref_logps is None else ref_logps[better],
            None if ref_logps is None else ref_logps[worse],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=lengths[better],
            rejected_lengths=lengths[worse],
            simpo_gamma=self.simpo_gamma,
            discopop_tau=self.discopop_tau,
            rpo_alpha=self.rpo_alpha,
        )
        loss = mean_over_groups(losses, batch["group"])
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": logps[better].detach(),
            "logps/rejected": logps[worse].detach(),
        }
        return loss, values

    def _log_step(self, stage: str, loss: torch.Tensor, values: Mapping[str, torch.Tensor], prompts: int) -> None:
        pairs = len(values["rewards/chosen"])
        training = stage == "train"
        if training:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=pairs)
        else:  # the mean over every held-out prompt, however the batches (and ranks) split them
            self.val_loss.update(loss.detach(), weight=prompts)
            self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        for name, value in values.items():
            metric = (self.train_metrics if training else self.val_metrics)[_key(name)]
            if training:  # forward: the batch's value for the step, accumulated for the epoch
                metric(value)
            else:
                metric.update(value)
            self.log(f"{stage}/{name}", metric, on_step=training, on_epoch=True, batch_size=pairs)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        self.policy_changed = True

    def on_weights_loaded(self) -> None:
        self.policy_changed = True

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.compute_loss(batch)
        self._log_step("train", loss, values, len(batch["group"].unique()))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss, values = self.compute_loss(batch)
        self._log_step(self.held_out_split, loss, values, len(batch["group"].unique()))


def _key(name: str) -> str:
    return name.replace("/", "_")
