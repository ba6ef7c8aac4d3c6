"""``DPOModule``: direct preference optimisation (Rafailov et al. 2023) and its loss family, with every way of
providing the reference policy."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lit_align.checkpoint import archive_problem
from lit_align.forward import eval_mode, response_logps
from lit_align.losses import REFERENCE_FREE_LOSS_TYPES, check_dpo_options, dpo_loss, mean_over_groups
from lit_align.models import load_causal_lm
from lit_align.modules.base import AlignModule, zero_dropout
from lit_align.parallel import full_tensor

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
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Where precomputed reference log-probs are kept: ``$LIT_ALIGN_CACHE/reference_logps``, by default under
    ``~/.cache/lit_align``."""
    root = os.environ.get("LIT_ALIGN_CACHE") or Path.home() / ".cache" / "lit_align"
    return Path(root) / "reference_logps"


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer of ``model`` (names, dtypes, shapes and values), the same whether the
    model is whole or sharded (each sharded tensor is gathered in turn: every rank must call it)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = full_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def examples_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """A hash of the token ids of every example (so of the data and the tokenizer that produced them)."""
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(repr((example["prompt_ids"], example["response_ids"])).encode())
    return digest.hexdigest()


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
            (reference-free); see :func:`~lit_align.losses.dpo_loss`.
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
            ``"none"``: reference-free losses (``simpo``).
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
        self._policy_changed = False

    # ----- the reference -----------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.reference == "copy" and self.ref_model is None:
            self.ref_model = self.build_reference()

    def build_reference(self) -> nn.Module:
        """A frozen reference policy: ``ref_model`` if given, else a copy of the (just built, untrained) policy."""
        if self.ref_model_name is not None:
            reference = load_causal_lm(self.ref_model_name, self.tokenizer, self.dtype_name, self.trust_remote_code,
                                       empty=self.empty_init)  # fmt: skip
        else:
            reference = copy.deepcopy(self.model)
        return reference.requires_grad_(False).eval()

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """``[N]`` reference log-probs of the batch's responses (``None`` when reference-free)."""
        if self.reference == "none":
            return None
        if self.reference == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError(
                    "reference='precomputed' but the batch carries no 'ref_logps': they are attached to the "
                    "DataModule's examples when fitting starts (use a PreferenceDataModule with trainer.fit)"
                )
            return batch["ref_logps"].float()
        with torch.no_grad():
            if self.reference == "adapter":
                with eval_mode(self.model), self.model.disable_adapter():
                    return response_logps(self.model, batch)
            return response_logps(self.ref_model, batch)

    # ----- precomputed reference log-probs ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._attach_reference_logps()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self.trainer.training and not self.trainer.sanity_checking:  # trainer.validate on its own
            self._attach_reference_logps()

    def _attach_reference_logps(self) -> None:
        if self.reference != "precomputed":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_dataset"):
            raise RuntimeError("reference='precomputed' needs a PreferenceDataModule passed to the Trainer")
        self.precompute_reference(datamodule)

    @torch.no_grad()
    def precompute_reference(self, datamodule: Any) -> None:
        """Attach ``ref_logps`` to every training and validation example of ``datamodule`` that lacks them, from
        the disk cache when present, else by one forward-only pass of the reference (then cached). The reference is
        the starting policy itself when training has not begun (no second copy), else it is re-created from its
        source."""
        splits = {"train": datamodule.train_dataset or [], "val": datamodule.val_dataset or []}
        reference, fingerprint = None, None
        for split, examples in splits.items():
            if not examples or all("ref_logps" in e for e in examples):
                continue
            if reference is None:
                reference = self._reference_for_precompute()
                fingerprint = weights_fingerprint(reference)
            key = hashlib.blake2b(
                f"{_CACHE_VERSION}:{fingerprint}:{examples_fingerprint(examples)}:{self.trainer.precision}".encode(),
                digest_size=16,
            ).hexdigest()
            path = self.ref_cache_dir / f"{key}.pt"
            # Decided by all ranks together: nodes that do not share the cache directory compute it together
            # (the computation is a collective), and each node's first rank writes its own copy.
            if self.trainer.strategy.reduce_boolean_decision(path.exists(), all=True):
                values = _load_cache(path, len(examples))
                rank_zero_info(f"lit_align: reference log-probs for {split} ({len(examples)} examples) from {path}")
            else:
                values = self._compute_reference_logps(reference, examples, datamodule)
                if self.trainer.local_rank == 0 and not path.exists():
                    _save_cache(path, values)
                rank_zero_info(f"lit_align: reference log-probs for {split} computed and cached at {path}")
            for example, logps in zip(examples, values):
                example["ref_logps"] = logps.tolist()
        if reference is not None and reference is not self.model:
            del reference

    def _reference_for_precompute(self) -> nn.Module:
        if self.ref_model_name is None and not self._policy_changed:
            return self.model  # still the starting policy
        if self.ref_model_name is None and self.model_name_or_path is None:
            raise RuntimeError("cannot re-create the reference of a policy given as an nn.Module; pass ref_model")
        name = self.ref_model_name or self.model_name_or_path
        if getattr(self, "_device_mesh", None) is None:
            return load_causal_lm(name, self.tokenizer, self.dtype_name, self.trust_remote_code).to(self.device).eval()
        # sharded like the models configure_model made: rank 0 reads it, the others receive their shards
        empty = self.trainer.world_size > 1 and self.trainer.global_rank != 0
        reference = load_causal_lm(name, self.tokenizer, self.dtype_name, self.trust_remote_code, empty=empty)
        return self.distribute(reference.requires_grad_(False).eval(), frozen=True)

    def _compute_reference_logps(
        self, reference: nn.Module, examples: Sequence[Mapping[str, Any]], datamodule: Any
    ) -> list[torch.Tensor]:
        """Reference log-probs of each example's responses; ranks share the work and exchange the results."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batch_size = self.ref_batch_size or datamodule.batch_size
        mine = list(range(rank, len(examples), world))
        results: dict[int, torch.Tensor] = {}
        # as many forward passes on every rank (a sharded reference all-gathers in each): the last may be a repeat
        passes = math.ceil(math.ceil(len(examples) / world) / batch_size)
        with eval_mode(reference):
            for start in range(0, passes * batch_size, batch_size):
                indices = mine[start : start + batch_size] or [0]  # [0]: a repeat, its values are not kept
                batch = datamodule.collator([_without_ref(examples[i]) for i in indices])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.trainer.precision_plugin.forward_context():
                    logps = response_logps(reference, batch).float().cpu()
                sizes = [len(examples[i]["response_ids"]) for i in indices]
                for i, values in zip(mine[start : start + batch_size], logps.split(sizes)):
                    results[i] = values
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, results)
            results = {i: v for part in gathered for i, v in part.items()}
        return [results[i] for i in range(len(examples))]

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
            self.log("val/loss", self.val_loss, prog_bar=True)
        for name, value in values.items():
            metric = (self.train_metrics if training else self.val_metrics)[_key(name)]
            if training:  # forward: the batch's value for the step, accumulated for the epoch
                metric(value)
            else:
                metric.update(value)
            self.log(f"{stage}/{name}", metric, on_step=training, on_epoch=True, batch_size=pairs)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        self._policy_changed = True

    def on_weights_loaded(self) -> None:
        self._policy_changed = True

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.compute_loss(batch)
        self._log_step("train", loss, values, len(batch["group"].unique()))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss, values = self.compute_loss(batch)
        self._log_step("val", loss, values, len(batch["group"].unique()))


def _key(name: str) -> str:
    return name.replace("/", "_")


def _without_ref(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k != "ref_logps"}


def _save_cache(path: Path, values: list[torch.Tensor]) -> None:
    """Write atomically: a run killed mid-write never leaves a torn cache file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"version": _CACHE_VERSION, "logps": values}, tmp)
    os.replace(tmp, path)


def _load_cache(path: Path, n_examples: int) -> list[torch.Tensor]:
    try:
        problem = archive_problem(path)
        if problem is not None:
            raise ValueError(problem)
        data = torch.load(path, weights_only=True)
        values = data["logps"]
        if len(values) != n_examples:
            raise ValueError(f"{len(values)} entries for {n_examples} examples")
        return values
    except Exception as error:  # noqa: BLE001 - any unreadable cache is reported the same way
        # The cause stays chained; the message does not repeat torch's advice to load unsafely.
        message = f"reference log-prob cache {path} is unreadable ({error}); delete it to recompute"
        raise RuntimeError(message) from error
