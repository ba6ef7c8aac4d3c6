"""``KTOModule``: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on completions labelled desirable or
undesirable, with every way of providing the reference policy that DPO has."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.forward import response_logps
from lit_align.losses import kto_loss
from lit_align.modules import reference as ref
from lit_align.modules.base import AlignModule, check_options, zero_dropout

Reference = Literal["auto", "copy", "precomputed", "adapter"]
#: per-completion metrics (train: per step over the global batch and per epoch; val: per epoch)
METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


class KTOModule(AlignModule):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): a human-aware loss
    from prospect theory on single completions labelled desirable or undesirable, no pairs needed. With the implicit
    reward ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z_0``, ``KL(pi || pi_ref)`` estimated on
    mismatched prompt/completion pairs of the batch, a desirable completion costs ``lambda_D (1 - sigmoid(beta (r -
    z_0)))`` and an undesirable one ``lambda_U (1 - sigmoid(beta (z_0 - r)))``
    (:func:`~lit_align.losses.kto_loss`, equal to TRL 1.16's ``KTOTrainer`` loss).

    Pairs with :class:`~lit_align.data.UnpairedDataModule` (``share_prompt: true`` forwards each prompt once for its
    completions and their KL completions: one forward gives both the rewards and the reference point). The reference
    point is the mean over the global batch (every rank's completions), clamped at 0 and detached, and the loss is the
    mean over the global batch's completions: N ranks with batch B train as one device with N x B.

    Logs ``train/loss``, ``train/kl`` (the reference point), ``/rewards/chosen``, ``/rewards/rejected`` (implicit
    rewards ``beta r`` of the desirable and undesirable completions), ``/logps/chosen``, ``/logps/rejected`` (per
    step over the global batch, ``_step``, and per epoch, ``_epoch``; a step without desirable, or without
    undesirable, completions logs no step value for them, as TRL); the same under ``val/``, and
    ``val/rewards/accuracies``: on held-out pairs (unpaired chosen/rejected rows), how often the chosen completion's
    implicit reward is above the rejected one's.

    Args:
        beta: the KTO temperature: strength of the pull towards the reference.
        desirable_weight: ``lambda_D``, the weight of desirable completions' losses.
        undesirable_weight: ``lambda_U``, the weight of undesirable completions' losses. With ``n_D`` desirable and
            ``n_U`` undesirable completions, the paper keeps ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``.
        reference: how the reference policy is provided (as :class:`~lit_align.modules.dpo.DPOModule`).
            ``"copy"``: a frozen copy of the starting policy (or of ``ref_model``), in eval mode, excluded from the
            optimizer and from checkpoints (re-created from ``model``/``ref_model`` on load).
            ``"precomputed"``: its log-probs of every completion and KL completion are computed in one forward-only
            pass before training and cached on disk, keyed by the reference weights, the token ids and the
            precision.
            ``"adapter"``: with ``lora``, the base model with the adapter disabled (no second copy).
            ``"auto"``: ``adapter`` with ``lora``, else ``copy``.
        ref_model: a different reference than the starting policy (hub id or local directory); with
            ``"precomputed"`` it is loaded only for the precomputation.
        ref_cache_dir: where precomputed reference log-probs are cached (default
            :func:`~lit_align.modules.reference.default_cache_dir`).
        ref_batch_size: examples per batch when precomputing (default: the DataModule's ``batch_size``).
        disable_dropout: set every dropout in the policy to 0 (as TRL does by default), so that the policy's
            log-probs come from the same deterministic function as the reference's: at step 0 every implicit
            reward and the reference point are 0. Incompatible with ``residual_dropout``.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: Reference = "auto",
        ref_model: str | None = None,
        ref_cache_dir: str | None = None,
        ref_batch_size: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_options(
            ("beta", beta, beta > 0, "positive"),
            ("desirable_weight", desirable_weight, desirable_weight >= 0, ">= 0"),
            ("undesirable_weight", undesirable_weight, undesirable_weight >= 0, ">= 0"),
            ("reference", reference, reference in ("auto", "copy", "precomputed", "adapter"),
             "one of auto, copy, precomputed, adapter (KTO needs a reference)"),
            ("ref_batch_size", ref_batch_size, ref_batch_size is None or ref_batch_size >= 1, "at least 1"),
        )  # fmt: skip
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (KTO disables dropout by default)")
        if reference == "auto":
            reference = "adapter" if self.lora is not None else "copy"
        if ref_model is not None and reference not in ("copy", "precomputed"):
            raise ValueError(f"ref_model is used by reference 'copy' or 'precomputed', not {reference!r}")
        if reference == "adapter" and self.lora is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError("reference='adapter' needs LoRA adapters (set lora) to disable")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.disable_dropout = disable_dropout
        # the reference's settings, as lit_align.modules.reference reads them
        self.reference, self.ref_model_name = reference, ref_model
        self.ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir else ref.default_cache_dir()
        self.ref_batch_size = ref_batch_size
        self.ref_model: nn.Module | None = None
        self.policy_changed = False  # after a weight load or an optimizer step the policy is no longer the reference
        self.train_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in (*METRICS, "kl")})
        self.val_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in (*METRICS, "kl", "rewards/accuracies")})
        self.val_loss = MeanMetric()

    # ----- the reference -----------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.reference == "copy" and self.ref_model is None:
            self.ref_model = ref.build_reference(self)

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N]`` reference log-probs of the batch's completions and KL completions."""
        return ref.reference_logps(self, batch)

    def on_fit_start(self) -> None:
        ref.attach_reference_logps(self)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self.trainer.training and not self.trainer.sanity_checking:  # trainer.validate on its own
            ref.attach_reference_logps(self)

    def precompute_reference(self, datamodule: Any) -> None:
        """Attach ``ref_logps`` to every example of ``datamodule`` that lacks them (see
        :func:`lit_align.modules.reference.precompute_reference`)."""
        ref.precompute_reference(self, datamodule)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        self.policy_changed = True

    def on_weights_loaded(self) -> None:
        self.policy_changed = True

    # ----- the loss --------------------------------------------------------------------------------------------
    def global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the data-parallel ranks (one collective)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.rank_share(values) * world

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, values)`` for an :class:`~lit_align.data.UnpairedCollator` batch: this rank's share of the mean
        loss over the global batch's completions (its sum divided by the global count), and the values behind the
        metrics (``kl``, ``loss``: the global batch's mean loss, per-completion values, ``counts``)."""
        logps = response_logps(self.model, batch)
        ref_logps = self.reference_logps(batch)
        real, label = batch["real"], batch["label"]
        completion, kl_index = batch["completion"][real], batch["kl"][real]
        label = label[real]
        # the reference point over the global batch: mean of log pi - log pi_ref on the KL completions, clamped at 0
        kl_diff = (logps[kl_index] - ref_logps[kl_index]).detach().float()
        totals = self.global_sum(torch.stack([kl_diff.sum(), torch.tensor(float(len(kl_diff)), device=logps.device)]))
        kl = (totals[0] / totals[1].clamp(min=1)).clamp(min=0)
        mean_loss, chosen_rewards, rejected_rewards = kto_loss(
            logps[completion], ref_logps[completion], label, kl, self.beta, self.desirable_weight,
            self.undesirable_weight,
        )  # fmt: skip
        # totals[1] already counts every rank's completions (one KL completion each): no second collective
        world = self.trainer.world_size if self._trainer is not None else 1
        loss = mean_loss * len(completion) / (totals[1] / world).clamp(min=1)
        if len(completion) == 0:  # keep the graph connected: a zero loss, not a failed backward
            loss = loss + logps.sum() * 0.0
        policy = logps[completion].detach()
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "logps/chosen": policy[label],
            "logps/rejected": policy[~label],
            "kl": kl,
            "loss": mean_loss.detach(),
            "n": totals[1],
        }
        if "better" in batch and len(batch["better"]):  # held-out pairs (padding copies have none)
            rewards = self.beta * (logps[batch["completion"]] - ref_logps[batch["completion"]]).detach().float()
            values["rewards/accuracies"] = (rewards[batch["better"]] > rewards[batch["worse"]]).float()
        else:
            values["rewards/accuracies"] = logps.new_zeros(0)
        return loss, values

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.compute_loss(batch)
        n = int(values["n"])
        # the global batch's mean loss: each rank's loss is its sum over the global count / N, so the mean over
        # the ranks (reduced on a copy, never the returned loss)
        self.log("train/loss", self.rank_share(loss.detach().clone()), prog_bar=True, batch_size=max(n, 1))
        self.log("train/kl_step", values["kl"], on_step=True, on_epoch=False)
        self.train_metrics["kl"].update(values["kl"])
        self.log("train/kl_epoch", self.train_metrics["kl"], on_step=False, on_epoch=True)
        # per-step means over the global batch: sums and counts of every rank in one collective
        sums = torch.stack([torch.stack([values[name].sum(), torch.tensor(float(values[name].numel()))
                                         .to(values[name].device)]) for name in METRICS])  # fmt: skip
        sums = self.global_sum(sums)
        for name, (total, count) in zip(METRICS, sums):
            if count > 0:  # the same decision on every rank
                self.log(f"train/{name}_step", total / count, on_step=True, on_epoch=False)
            metric = self.train_metrics[_key(name)]
            metric.update(values[name])
            self.log(f"train/{name}_epoch", metric, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        _, values = self.compute_loss(batch)
        n_local = int(batch["real"].sum())
        self.val_loss.update(values["loss"], weight=n_local)
        split = self.held_out_split  # "val", or "test" under trainer.test
        self.log(f"{split}/loss", self.val_loss, prog_bar=True)
        self.val_metrics["kl"].update(values["kl"], weight=n_local)
        self.log(f"{split}/kl", self.val_metrics["kl"])
        for name in (*METRICS, "rewards/accuracies"):
            metric = self.val_metrics[_key(name)]
            metric.update(values[name])
            self.log(f"{split}/{name}", metric)


def _key(name: str) -> str:
    return name.replace("/", "_")
